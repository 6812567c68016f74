//! The swarm: agents, origins and the tracker, driven by events on the virtual clock.
//!
//! Model, per message: a piece request, a bitfield request and its reply, a Have and a piece's
//! last byte each take half the round-trip time; a lost request packet (probability `loss`)
//! costs a QUIC probe timeout more. Piece data is a flow in [`Net`]; with loss, each flow is
//! also capped at the throughput a loss-based congestion controller sustains (Mathis et al.:
//! MSS / RTT * sqrt(3/2) / sqrt(loss)). A server serves a bounded number of pieces at once
//! and queues the rest in arrival order, as the real peer server's upload semaphore does.
//! Departed hosts answer nothing: requests to them run into the requester's deadline.
//!
//! Each agent mirrors the agent's download loop (`agent/src/download/swarm.rs`) around the
//! scheduler ([`super::driver`]): it announces at once, then a quarter of the download's
//! age (250 ms to 3 s) after each answer, one announce in flight (the agent's announce
//! timer); probes up to `max_peers` less the peers known of the
//! listed ones (seeders and origins first), with a Subscribe to an agent still downloading
//! (which then streams Have messages as its pieces verify, and probes the subscriber back)
//! and a bitfield request otherwise; carries out the scheduler's requests and cancels; and
//! polls it again at its next deadline or back-off. A download without progress for half
//! the progress timeout is re-planned and re-announces; for the whole of it, it fails (the
//! rule is the protocol core's `session::Progress`, reached through [`super::driver`]).
//!
//! Cut-through (`Config::cut_through`, on by default as in the agent): once the first
//! blocks of a piece (`EARLY_OFFER_BLOCKS`) have arrived and passed at a host, the host
//! serves it, and offers it (Have to its followers, and in its bitfield) if they came fast
//! enough (the agent's `session::EarlyOffer`); a flow from a host still receiving the
//! piece delivers its last block one block time after the host's own last block, and only
//! while the host's chain of relays reaches a holder. The flow itself runs at its fair
//! share, so the model spends the server's uplink a little earlier than a real relay, which
//! is paced by its input.

use std::collections::VecDeque;
use std::fmt;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::seq::SliceRandom as _;
use rand::{Rng as _, SeedableRng as _};
use shoal_shared::bitfield::Bitfield;

use super::driver::{
    Action, EarlyOffer, FirstCopies, Listed, Miss, Refusal, Scheduler, Stall, EARLY_OFFER_BLOCKS,
    PROBE_TIMEOUT,
};
use super::net::{Finish, FlowId, Net};
use super::queue::{EventQueue, Nanos, SEC};
use super::{Config, ConfigError};
use tracker::Tracker;

/// Bytes of payload per packet (QUIC over a 1500-byte MTU, roughly).
const MSS: f64 = 1200.0;

#[derive(Debug, Clone, Copy)]
enum Ev {
    /// An announce may be due (the download's announce timer decides).
    Announce {
        host: u32,
    },
    AnnounceReply {
        host: u32,
    },
    /// A probe reaches `server`: a Subscribe if `subscribe`, else a bitfield request.
    BitfieldArrive {
        client: u32,
        server: u32,
        subscribe: bool,
    },
    BitfieldReply {
        client: u32,
        server: u32,
    },
    BitfieldTimeout {
        client: u32,
        server: u32,
    },
    RequestArrive(u32),
    FlowDone {
        flow: FlowId,
        version: u32,
    },
    Deliver(u32),
    /// The server said Busy: the request fails at the requester.
    Refused(u32),
    /// The host's scheduler has a deadline or back-off due, or its progress timer.
    Wake(u32),
    HaveFlush(u32),
    Leave(u32),
    /// Cut-through: the first blocks of request `.0`'s piece have arrived and passed at its
    /// requester, which now relays the piece and may offer it to its followers.
    FirstBlock(u32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReqState {
    /// On its way to the server.
    Sent,
    /// Waiting for an upload slot.
    Queued,
    Flowing(FlowId),
    /// Sent in full; the last byte is on its way.
    InTransit,
    /// Cut-through: sent in full by a server that is itself still receiving the piece; the
    /// last block follows once the server has it.
    Waiting,
    /// The server left: the requester will time out.
    Lost,
    /// The server had no upload slot and a full line: the requester pauses it.
    Busy,
    /// An origin declined it (first copies first): the requester defers the piece there.
    Declined,
    Done,
    Cancelled,
}

#[derive(Debug)]
struct Req {
    client: u32,
    server: u32,
    piece: u32,
    state: ReqState,
    /// Cut-through: the piece's first blocks passed at the client, which relays it from here.
    relaying: bool,
}

#[derive(Debug)]
struct Host {
    origin: bool,
    bits: Bitfield,
    have: u32,
    sched: Option<Box<Scheduler>>,
    done_at: Option<Nanos>,
    /// The requests its download was allowed in flight when it finished.
    cap_at_end: u32,
    /// The download stalled for the whole progress timeout and failed.
    failed: bool,
    /// The earliest [`Ev::Wake`] pending.
    wake_at: Nanos,
    left_at: Option<Nanos>,
    announced: bool,
    /// Peers waiting for this host's Have messages.
    subscribers: Vec<u32>,
    /// Peers probed and not answered yet, and agents whose Have stream it follows (the
    /// agent's `probing`).
    connecting: Vec<u32>,
    following: Vec<u32>,
    /// Have messages received and not yet applied: (arrival, peer, piece).
    haves: Vec<(Nanos, u32, u32)>,
    flush_at: Option<Nanos>,
    // Serving side.
    slots: u32,
    uploading: u32,
    line: VecDeque<u32>,
    serving: Vec<u32>,
    // Requesting side: requests sent and not settled.
    outstanding: Vec<u32>,
    /// Cut-through: pieces being received and offered to peers (their first blocks came fast).
    early: Bitfield,
    /// Cut-through: requests served from a piece still arriving here, waiting for its end.
    waiters: Vec<u32>,
    /// Origins with first copies first: the pieces sent in the current wave.
    first_copies: Option<FirstCopies>,
}

impl Host {
    fn gone(&self) -> bool {
        self.left_at.is_some()
    }
    fn downloading(&self) -> bool {
        self.sched.is_some()
    }
}

struct World {
    cfg: Config,
    q: EventQueue<Ev>,
    net: Net,
    hosts: Vec<Host>,
    reqs: Vec<Req>,
    tracker: Tracker,
    rng: StdRng,
    one_way: Nanos,
    pto: Nanos,
    pieces: u32,
    finishes: Vec<Finish>,
    actions: Vec<Action<u32>>,
    origin_egress: f64,
    wasted: f64,
    /// Requests refused Busy.
    busy: u64,
    /// Agents neither finished nor gone.
    active: u32,
    departed: u32,
    failed: u32,
}

/// Runs one simulation to the end (every agent finished or gone) or to `max_time`.
pub fn run(cfg: &Config) -> Result<Report, ConfigError> {
    cfg.validate()?;
    let started = Instant::now();
    let mut w = World::new(cfg.clone());
    while w.active > 0 {
        let Some((now, ev)) = w.q.pop() else { break };
        if now > cfg.max_time {
            break;
        }
        w.handle(ev);
    }
    let (mut ratios, mut slow_ratios) = (Vec::new(), Vec::new());
    let (mut caps, mut slow_caps) = (Vec::new(), Vec::new());
    for (i, h) in w.hosts.iter().enumerate().skip(cfg.origins as usize) {
        let Some(t) = h.done_at else { continue };
        let secs = t as f64 / SEC as f64;
        if cfg.is_slow(i as u32 - cfg.origins) {
            slow_ratios.push(secs / cfg.slow_limit());
            slow_caps.push(h.cap_at_end);
        } else {
            ratios.push(secs / cfg.limit());
            caps.push(h.cap_at_end);
        }
    }
    ratios.sort_by(f64::total_cmp);
    slow_ratios.sort_by(f64::total_cmp);
    caps.sort_unstable();
    slow_caps.sort_unstable();
    Ok(Report {
        config: cfg.clone(),
        limit: cfg.limit(),
        ratios,
        slow_ratios,
        caps,
        slow_caps,
        departed: w.departed,
        failed: w.failed,
        unfinished: w.active,
        origin_egress: w.origin_egress / cfg.size as f64,
        wasted: w.wasted / cfg.size as f64,
        requests: w.reqs.len() as u64,
        busy: w.busy,
        virtual_secs: w.q.now() as f64 / SEC as f64,
        wall_secs: started.elapsed().as_secs_f64(),
        events: w.q.processed(),
    })
}

impl World {
    fn new(cfg: Config) -> Self {
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let pieces = cfg.pieces();
        let total = (cfg.origins + cfg.hosts) as usize;
        let flow_cap = if cfg.loss > 0.0 && cfg.rtt > 0 {
            MSS / (cfg.rtt as f64 / SEC as f64) * 1.5f64.sqrt() / cfg.loss.sqrt()
        } else {
            f64::INFINITY
        };
        let mut net = Net::new(total, cfg.rate, cfg.rate).with_flow_cap(flow_cap);
        for agent in (0..cfg.hosts).filter(|&a| cfg.is_slow(a)) {
            net.set_capacity(cfg.origins + agent, cfg.slow_rate, cfg.slow_rate);
        }
        let mut hosts = Vec::with_capacity(total);
        let mut tracker = Tracker::default();
        for i in 0..total as u32 {
            let origin = i < cfg.origins;
            let sched =
                (!origin).then(|| Box::new(Scheduler::new(pieces, cfg.piece_len, rng.random(), cfg.policy)));
            hosts.push(Host {
                origin,
                bits: if origin { Bitfield::full(pieces) } else { Bitfield::new(pieces) },
                have: if origin { pieces } else { 0 },
                sched,
                done_at: None,
                cap_at_end: 0,
                failed: false,
                wake_at: Nanos::MAX,
                left_at: None,
                announced: origin,
                subscribers: Vec::new(),
                connecting: Vec::new(),
                following: Vec::new(),
                haves: Vec::new(),
                flush_at: None,
                slots: cfg.slots(if origin { cfg.origin_budget } else { cfg.agent_budget }),
                uploading: 0,
                line: VecDeque::new(),
                serving: Vec::new(),
                outstanding: Vec::new(),
                early: Bitfield::new(pieces),
                waiters: Vec::new(),
                first_copies: (origin && cfg.origin_wave > 0)
                    .then(|| FirstCopies::new(pieces, cfg.origin_wave, 0)),
            });
            if origin {
                tracker.origins.push(i);
            }
        }
        let mut q = EventQueue::new();
        let agents: Vec<u32> = (cfg.origins..total as u32).collect();
        for &h in &agents {
            q.schedule(0, Ev::Announce { host: h });
        }
        let leaving = ((cfg.churn * f64::from(cfg.hosts)).round() as usize).min(agents.len());
        let limit_ns = (cfg.limit() * SEC as f64) as Nanos;
        let mut chosen = agents.clone();
        let (chosen, _) = chosen.partial_shuffle(&mut rng, leaving);
        for &h in chosen.iter() {
            q.schedule(rng.random_range(0..limit_ns.max(1)), Ev::Leave(h));
        }
        Self {
            one_way: cfg.rtt / 2,
            // A QUIC probe timeout: about an RTT plus variance plus the peer's ack delay.
            pto: 3 * cfg.rtt + 25 * SEC / 1000,
            pieces,
            active: cfg.hosts,
            cfg,
            q,
            net,
            hosts,
            reqs: Vec::new(),
            tracker,
            rng,
            finishes: Vec::new(),
            actions: Vec::new(),
            origin_egress: 0.0,
            wasted: 0.0,
            busy: 0,
            departed: 0,
            failed: 0,
        }
    }

    /// Delay of one small message, with the chance it is lost and sent again.
    fn message_delay(&mut self) -> Nanos {
        let lost = self.cfg.loss > 0.0 && self.rng.random::<f64>() < self.cfg.loss;
        self.one_way + if lost { self.pto } else { 0 }
    }

    fn piece_bytes(&self, piece: u32) -> f64 {
        let start = u64::from(piece) * self.cfg.piece_len;
        (self.cfg.size - start).min(self.cfg.piece_len) as f64
    }

    fn now(&self) -> Nanos {
        self.q.now()
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Announce { host } => self.announce(host),
            Ev::AnnounceReply { host } => self.announce_reply(host),
            Ev::BitfieldArrive { client, server, subscribe } => self.probe_arrive(client, server, subscribe),
            Ev::BitfieldReply { client, server } => self.bitfield_reply(client, server),
            Ev::BitfieldTimeout { client, server } => {
                let now = self.now();
                let c = &mut self.hosts[client as usize];
                if let Some(i) = c.connecting.iter().position(|&s| s == server) {
                    c.connecting.swap_remove(i);
                    if let Some(s) = c.sched.as_mut() {
                        s.back_off(server, now);
                    }
                    self.dispatch(client);
                }
            }
            Ev::RequestArrive(r) => self.request_arrive(r),
            Ev::FlowDone { flow, version } => self.flow_done(flow, version),
            Ev::Deliver(r) => self.deliver(r),
            Ev::Refused(r) => self.refused(r),
            Ev::Wake(h) => {
                let now = self.now();
                let host = &mut self.hosts[h as usize];
                if host.wake_at == now {
                    host.wake_at = Nanos::MAX;
                    self.dispatch(h);
                }
            }
            Ev::HaveFlush(h) => self.flush_haves(h),
            Ev::Leave(h) => self.leave(h),
            Ev::FirstBlock(r) => self.first_block(r),
        }
    }

    /// One turn of the agent's download loop: the progress timer, then the scheduler's
    /// cancels and requests, then the next wake-up.
    fn dispatch(&mut self, client: u32) {
        let now = self.now();
        let stall = match self.hosts[client as usize].sched.as_mut() {
            Some(s) => s.stall(now),
            None => return,
        };
        if stall == Some(Stall::Fail) {
            self.fail(client);
            return;
        }
        let h = &mut self.hosts[client as usize];
        let Some(s) = h.sched.as_mut() else { return };
        if stall == Some(Stall::Replan) {
            s.replan(now);
            if let Some(at) = s.next_announce() {
                self.q.schedule(at, Ev::Announce { host: client });
            }
        }
        let mut actions = std::mem::take(&mut self.actions);
        actions.clear();
        s.poll(now, &mut actions);
        for &a in &actions {
            match a {
                Action::Cancel { peer, index } => {
                    let c = &self.hosts[client as usize];
                    let found = c.outstanding.iter().copied().find(|&x| {
                        let q = &self.reqs[x as usize];
                        q.server == peer && q.piece == index
                    });
                    if let Some(r) = found {
                        self.cancel(r);
                    }
                }
                Action::Request { peer, index } => {
                    let id = self.reqs.len() as u32;
                    self.reqs.push(Req {
                        client,
                        server: peer,
                        piece: index,
                        state: ReqState::Sent,
                        relaying: false,
                    });
                    self.hosts[client as usize].outstanding.push(id);
                    let delay = self.message_delay();
                    self.q.after(delay, Ev::RequestArrive(id));
                }
            }
        }
        self.actions = actions;
        let h = &mut self.hosts[client as usize];
        let Some(s) = h.sched.as_ref() else { return };
        let stall_at = s.next_stall_check();
        let wake = s.next_wakeup(now).unwrap_or(stall_at).min(stall_at).max(now + 1);
        if wake < h.wake_at {
            h.wake_at = wake;
            self.q.schedule(wake, Ev::Wake(client));
        }
    }

    /// The download made no progress for the whole progress timeout: it fails, as the
    /// agent's does (its verified pieces are no longer served).
    fn fail(&mut self, client: u32) {
        let c = &mut self.hosts[client as usize];
        c.failed = true;
        c.sched = None;
        c.connecting.clear();
        c.following.clear();
        c.haves.clear();
        c.subscribers.clear();
        let left = std::mem::take(&mut c.outstanding);
        self.active -= 1;
        self.failed += 1;
        for r in left {
            self.cancel(r);
        }
    }

    fn finish(&mut self, client: u32) {
        let now = self.now();
        let c = &mut self.hosts[client as usize];
        c.done_at = Some(now);
        c.cap_at_end = c.sched.as_ref().map_or(0, |s| s.in_flight_cap());
        c.sched = None;
        c.connecting.clear();
        c.following.clear();
        c.haves.clear();
        let left = std::mem::take(&mut c.outstanding);
        self.active -= 1;
        self.tracker.seeders.push(client);
        for r in left {
            self.cancel(r);
        }
    }

    fn flush_haves(&mut self, host: u32) {
        let now = self.now();
        let batch = self.cfg.have_batch;
        let h = &mut self.hosts[host as usize];
        h.flush_at = None;
        let Some(s) = h.sched.as_mut() else {
            h.haves.clear();
            return;
        };
        let mut later = None::<Nanos>;
        h.haves.retain(|&(at, peer, piece)| {
            if at <= now {
                s.on_have(peer, piece);
                false
            } else {
                later = Some(later.map_or(at, |l: Nanos| l.min(at)));
                true
            }
        });
        if let Some(at) = later {
            h.flush_at = Some(at + batch);
            self.q.schedule(at + batch, Ev::HaveFlush(host));
        }
        self.dispatch(host);
    }
}

mod peers;
mod relay;
mod report;
mod requests;
#[cfg(test)]
mod tests;
mod tracker;

pub use report::Report;
