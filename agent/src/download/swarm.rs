//! The swarm loop of one download: drives the [`Scheduler`] with real peers and a real clock.
//!
//! The scheduler decides; this loop carries out its [`Action`]s (one task per piece request,
//! aborted on cancel, which resets the QUIC stream), reports every answer back, and feeds it
//! what peers hold: the tracker's peer list (re-announced on [`Schedule::AGENT`], in a task
//! of its own so that a slow tracker does not hold up the pieces), then per peer one probe (a
//! `Subscribe` stream to an agent still downloading, whose `Have` frames arrive as its pieces
//! verify; a bitfield from a seeder or origin). Re-announces start at 250 ms and slow down
//! as the download ages ([`Announces`]). A download that makes
//! no progress for half the progress timeout is re-planned (every request cancelled,
//! back-offs forgiven, the tracker asked again); for the whole timeout, it fails: the rule
//! is [`Progress`], in the protocol core, which the simulator drives too.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use shoal_shared::bitfield::Bitfield;
use shoal_shared::client::{Announce, PeerInfo};
use shoal_shared::metainfo::{Metainfo, VerifiedPiece};
use shoal_shared::peer::PeerError;
use shoal_shared::scheduler::{self, Action, Failure, Scheduler};
use shoal_shared::seams::{Announcer, Haves, PeerTransport};
use shoal_shared::session::{
    self, Announces, Listed, Miss, Prefix, Progress, Schedule, Stall, PROBE_TIMEOUT,
};
use shoal_shared::tls::Role;
use shoal_shared::tracker::LookupError;
use shoal_shared::wire::Refusal;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};

use super::{store_err, Active, DownloadError, DownloadMetrics, Settings};
use crate::delivery::Source;

/// Leads (peers to probe) queued for a download before further ones are dropped.
pub(super) const LEAD_QUEUE: usize = 256;
/// Have batches queued from all peers before their streams are made to wait.
const HAVE_QUEUE: usize = 256;

/// A piece request's outcome, with how long it took.
type Fetch = (SocketAddr, u32, Result<VerifiedPiece, PeerError>, Duration);
type Probe<H> = (PeerInfo, Result<(Bitfield, Option<H>), PeerError>);

/// What the swarm loop talks to and reports to: peers, the tracker (real ones or fakes),
/// the engine's settings and its metrics.
pub(crate) struct Env<'a, P, T> {
    pub peers: &'a P,
    pub tracker: &'a T,
    pub settings: &'a Settings,
    pub metrics: &'a DownloadMetrics,
}

/// Fetches every piece of the blob into `active`.
pub(crate) async fn run<P: PeerTransport, T: Announcer>(
    dl: &Env<'_, P, T>,
    metainfo: &Metainfo,
    active: &Active,
    mut leads: mpsc::Receiver<PeerInfo>,
) -> Result<(), DownloadError> {
    let digest = metainfo.digest();
    let initial = active.have.borrow().clone();
    let mut sched: Scheduler<SocketAddr> = Scheduler::new(
        &initial,
        metainfo.piece_length(),
        rand::random(),
        agent_policy(u64::from(metainfo.piece_length()), dl.settings),
    );
    // How fast the first blocks of relayed pieces came: the scheduler's cap on requests
    // in flight follows them.
    let mut judged = active.relays.judgements();
    let mut applied = *judged.borrow_and_update();
    let started = Instant::now();
    let mut progress = Progress::new(dl.settings.progress_timeout);
    // A resumed download may start with a prefix already held.
    let mut prefix = Prefix::default();
    advance_prefix(metainfo, active, &mut prefix);
    let mut fetches: JoinSet<Fetch> = JoinSet::new();
    let mut handles: HashMap<(SocketAddr, u32), AbortHandle> = HashMap::new();
    let mut probes: JoinSet<Probe<P::Haves>> = JoinSet::new();
    let mut probing: HashSet<SocketAddr> = HashSet::new();
    let mut watchers: JoinSet<SocketAddr> = JoinSet::new();
    let (have_tx, mut have_rx) = mpsc::channel::<(SocketAddr, Vec<u32>)>(HAVE_QUEUE);
    let mut actions = Vec::new();
    // The announce runs beside the loop (a slow tracker must not hold up pieces), at most
    // one at a time; the next is due a while after the last one answered.
    let mut announcing: JoinSet<Result<Vec<PeerInfo>, LookupError>> = JoinSet::new();
    let mut announces = Announces::new(Schedule::AGENT);

    while !sched.is_complete() {
        let now = started.elapsed();
        if announces.poll(now) {
            let (tracker, a) =
                (dl.tracker.clone(), Announce { digest, peer: dl.settings.me, complete: false });
            announcing.spawn(async move { tracker.announce(&a).await.map(|resp| resp.peers) });
        }
        match progress.check(now, sched.last_progress()) {
            Some(Stall::Fail) => return Err(DownloadError::Stalled(progress.timeout())),
            Some(Stall::Replan) => {
                let idle = now.saturating_sub(sched.last_progress());
                tracing::info!(%digest, ?idle, "no progress: re-planning");
                sched.replan();
                announces.replan(now);
            }
            None => {}
        }
        sched.poll(now, &mut actions);
        for action in actions.drain(..) {
            match action {
                Action::Request { peer, index } => {
                    let (client, m, relays) = (dl.peers.clone(), metainfo.clone(), active.relays.clone());
                    let handle = fetches.spawn(async move {
                        let asked = Instant::now();
                        let result = client.piece(peer, &m, index, &relays).await;
                        (peer, index, result, asked.elapsed())
                    });
                    handles.insert((peer, index), handle);
                }
                Action::Cancel { peer, index } => {
                    if let Some(h) = handles.remove(&(peer, index)) {
                        h.abort();
                    }
                }
            }
        }
        let stall_at = progress.next_check(sched.last_progress());
        let announce_at = announces.next_wakeup().unwrap_or(Duration::MAX);
        let wake = sched.next_wakeup(now).unwrap_or(stall_at).min(stall_at).min(announce_at);
        tokio::select! {
            Some(joined) = announcing.join_next(), if !announcing.is_empty() => {
                let age = started.elapsed();
                announces.on_answer(age);
                match joined {
                    Ok(Ok(listed)) => probe_listed(dl, metainfo, &sched, &mut probes, &mut probing, listed, age),
                    Ok(Err(e)) => tracing::warn!(%digest, cause = %e, "announce failed"),
                    Err(e) => tracing::warn!(%digest, cause = %e, "announce task failed"),
                }
            }
            Some(joined) = fetches.join_next(), if !fetches.is_empty() => {
                // Aborted (cancelled) requests come back as join errors.
                let Ok((peer, index, result, took)) = joined else { continue };
                handles.remove(&(peer, index));
                let now = started.elapsed();
                match result {
                    Ok(piece) => {
                        if !active.have.borrow().get(index) {
                            active.partial.write_piece(piece.clone()).await.map_err(store_err)?;
                            // Before the prefix moves past it: the sha256 task and streaming
                            // clients take it from memory.
                            active.written.send(&piece);
                            let source = if sched.is_origin(peer) { active.sources.origin() } else { Source::Peer };
                            active.sources.set(index, source);
                            if let Ok(mut by_peer) = active.by_peer.lock() {
                                *by_peer.entry(peer).or_default() += 1;
                            }
                            active.have.send_modify(|have| have.set(index));
                            active.relays.written(index);
                            dl.metrics.piece_seconds.observe(took.as_secs_f64());
                            advance_prefix(metainfo, active, &mut prefix);
                            dl.metrics.pieces.inc();
                        } else {
                            // An endgame copy that came whole after another: not kept.
                            dl.metrics.discarded.inc_by(piece.len() as u64);
                        }
                        sched.on_piece(peer, index, now);
                    }
                    Err(e) => {
                        let failure = miss(&e).failure(sched.is_origin(peer));
                        match failure {
                            Failure::Bad => {
                                dl.metrics.bad_pieces.inc();
                                tracing::warn!(%digest, %peer, cause = %e, "peer blacklisted for this blob");
                                dl.peers.ban(peer);
                            }
                            Failure::Unavailable => {
                                tracing::debug!(%digest, %peer, cause = %e, "piece request failed");
                            }
                            // Busy: paused. Deferred: an origin declined a piece it has just
                            // sent to another agent (first copies first): take it from there.
                            Failure::Busy | Failure::Deferred => {}
                        }
                        sched.on_failure(peer, index, now, failure);
                    }
                }
            }
            Some(joined) = probes.join_next(), if !probes.is_empty() => {
                let Ok((info, result)) = joined else { continue };
                probing.remove(&info.addr);
                let now = started.elapsed();
                match result {
                    Ok((bits, stream)) => {
                        let full = bits.is_complete();
                        if let Err(e) = sched.add_peer(info.addr, info.origin, bits, now) {
                            tracing::debug!(%digest, peer = %info.addr, cause = %e, "peer not taken");
                        } else if let (Some(stream), false) = (stream, full) {
                            probing.insert(info.addr);
                            watchers.spawn(forward_haves(info.addr, stream, have_tx.clone()));
                        }
                    }
                    Err(e) => {
                        tracing::debug!(%digest, peer = %info.addr, cause = %e, "peer probe failed");
                        sched.back_off(info.addr, now);
                    }
                }
            }
            Some(lead) = leads.recv() => {
                // An agent following us (downloading the blob too), or a peer from the
                // batched announce: probe it now rather than at our next announce.
                let now = started.elapsed();
                let addr = lead.addr;
                if session::takes_lead(&sched, addr, now, addr == dl.settings.me || probing.contains(&addr)) {
                    spawn_probe(dl, metainfo, &mut probes, &mut probing, lead);
                }
            }
            Ok(()) = judged.changed() => {
                let now = *judged.borrow_and_update();
                for _ in applied.fast..now.fast {
                    sched.on_first_blocks(true);
                }
                for _ in applied.slow..now.slow {
                    sched.on_first_blocks(false);
                }
                applied = now;
            }
            Some((peer, indices)) = have_rx.recv() => {
                for index in indices {
                    sched.on_have(peer, index);
                }
            }
            Some(ended) = watchers.join_next(), if !watchers.is_empty() => {
                if let Ok(peer) = ended {
                    probing.remove(&peer);
                }
            }
            _ = tokio::time::sleep_until((started + wake).into()) => {}
        }
    }
    Ok(())
}

/// The scheduler's policy for this agent: with cut-through off nothing judges first
/// blocks, so the download keeps its most requests in flight from the start.
fn agent_policy(piece_len: u64, settings: &Settings) -> scheduler::Config {
    let config = scheduler::Config::for_agent(piece_len, settings.max_peers);
    if settings.cut_through {
        config
    } else {
        config.whole_pieces()
    }
}

/// What a failed piece request was, for [`Miss::failure`].
fn miss(e: &PeerError) -> Miss {
    match e {
        _ if e.is_misbehaviour() => Miss::Misbehaved,
        PeerError::Refused { refusal, .. } => Miss::Refused(*refusal),
        _ => Miss::Lost,
    }
}

/// Moves the verified prefix past every held piece and tells streaming readers.
fn advance_prefix(metainfo: &Metainfo, active: &Active, prefix: &mut Prefix) {
    let grown = prefix.advance(&active.have.borrow(), metainfo);
    if let Some(bytes) = grown {
        active.prefix.send_if_modified(|p| {
            let grew = bytes > p.bytes;
            p.bytes = p.bytes.max(bytes);
            grew
        });
    }
}

/// Probes the peers an announce listed that the scheduler would take and is not following
/// ([`session::to_probe`] chooses them).
fn probe_listed<P: PeerTransport, T: Announcer>(
    dl: &Env<'_, P, T>,
    metainfo: &Metainfo,
    sched: &Scheduler<SocketAddr>,
    probes: &mut JoinSet<Probe<P::Haves>>,
    probing: &mut HashSet<SocketAddr>,
    listed: Vec<PeerInfo>,
    now: Duration,
) {
    let me = dl.settings.me;
    let listed = listed.into_iter().map(Listed::from);
    let chosen = session::to_probe(sched, listed, now, |p| p == me || probing.contains(&p));
    for p in chosen {
        spawn_probe(dl, metainfo, probes, probing, p.into());
    }
}

/// Probes `p` in the background; the loop gets the answer from `probes`.
fn spawn_probe<P: PeerTransport, T: Announcer>(
    dl: &Env<'_, P, T>,
    metainfo: &Metainfo,
    probes: &mut JoinSet<Probe<P::Haves>>,
    probing: &mut HashSet<SocketAddr>,
    p: PeerInfo,
) {
    probing.insert(p.addr);
    let (client, m) = (dl.peers.clone(), metainfo.clone());
    probes.spawn(async move {
        let r = tokio::time::timeout(PROBE_TIMEOUT, probe(&client, p, &m)).await;
        let r =
            r.unwrap_or_else(|_| Err(PeerError::Transport { addr: p.addr, cause: "probe timed out".into() }));
        (p, r)
    });
}

/// What `peer` holds: a subscription if it is still downloading, else its bitfield.
async fn probe<P: PeerTransport>(
    client: &P,
    peer: PeerInfo,
    metainfo: &Metainfo,
) -> Result<(Bitfield, Option<P::Haves>), PeerError> {
    // The tracker's word that a peer is an origin (which earns it first copies and a deeper
    // pipeline) must be backed by an origin's certificate.
    if peer.origin && client.role(peer.addr).await? != Some(Role::Origin) {
        return Err(PeerError::Protocol {
            addr: peer.addr,
            cause: "listed as an origin, but its certificate is not an origin's".into(),
        });
    }
    if !peer.origin && !peer.complete {
        match client.subscribe(peer.addr, metainfo).await {
            Ok((bits, stream)) => return Ok((bits, Some(stream))),
            // Not downloading it (any more): it may hold it whole.
            Err(PeerError::Refused { refusal: Refusal::NotFound, .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok((client.bitfield(peer.addr, metainfo).await?, None))
}

/// Forwards a peer's Have batches to the download loop until the stream ends.
async fn forward_haves<H: Haves>(
    peer: SocketAddr,
    mut stream: H,
    tx: mpsc::Sender<(SocketAddr, Vec<u32>)>,
) -> SocketAddr {
    loop {
        match stream.next().await {
            Ok(Some(indices)) => {
                if tx.send((peer, indices)).await.is_err() {
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(%peer, cause = %e, "have stream ended");
                break;
            }
        }
    }
    peer
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(cut_through: bool) -> Settings {
        Settings {
            me: SocketAddr::from(([127, 0, 0, 1], 1)),
            progress_timeout: Duration::from_secs(60),
            seed_time: Duration::ZERO,
            max_peers: 10,
            cut_through,
        }
    }

    #[test]
    fn without_cut_through_the_download_starts_at_its_most_requests_in_flight() {
        let relayed = agent_policy(1 << 20, &settings(true));
        assert_eq!((relayed.start_in_flight, relayed.max_in_flight), (4, 16));
        let whole = agent_policy(1 << 20, &settings(false));
        assert_eq!((whole.start_in_flight, whole.max_in_flight), (16, 16));
    }
}
