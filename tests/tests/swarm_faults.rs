//! Fault injection at the seams of a swarm, in-process: a peer killed mid-transfer, a peer
//! serving corrupted pieces, a stalled peer, the tracker restarted, the origin stopped, an
//! agent restarted mid-download; and the bandwidth limits those tests lean on to make a
//! transfer last long enough to be interrupted.
//!
//! Pieces are 64 KiB and blobs a few MiB so that every blob has many pieces. Timing checks
//! are lower bounds only; waits are generous (the machine is small and shared).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use shoal_shared::bitfield::Bitfield;
use shoal_shared::digest::Digest;
use shoal_shared::metainfo::Metainfo;
use shoal_shared::peer::PieceSource;
use shoal_shared::tracker::TrackerClient;
use shoal_tests::cluster::{fetch_blob, pieces, scrape_counter, AgentOptions, Cluster, ClusterOptions};
use tokio::task::JoinHandle;

const MIB: usize = 1 << 20;
const PIECE: u32 = 64 << 10;
const SERVED: &str = "shoal_peer_pieces_served_total";
/// Requests one download keeps in flight, all peers together: the agent's
/// `(IN_FLIGHT_BYTES / piece_len).clamp(4, 64)` with `IN_FLIGHT_BYTES` = 16 MiB
/// (`config()` in agent/src/download/swarm.rs).
const MAX_IN_FLIGHT: u64 = clamp((16 << 20) / PIECE as u64, 4, 64);
/// Deepest pipeline to one peer: `32.min(max_in_flight)` there (the scheduler grows a
/// pipeline up to it). With one peer, the pieces it may have sent but the agent not yet
/// written.
const MAX_PIPELINE: u64 = min(32, MAX_IN_FLIGHT);
/// Starting pipeline to a seeder: `8.min(max_in_flight)` there. It only grows on good
/// pieces, so it bounds what a peer serving only bad pieces is asked before the ban.
const SEEDER_PIPELINE: u64 = min(8, MAX_IN_FLIGHT);

const fn min(a: u64, b: u64) -> u64 {
    if a < b {
        a
    } else {
        b
    }
}

const fn clamp(v: u64, lo: u64, hi: u64) -> u64 {
    min(if v > lo { v } else { lo }, hi)
}

async fn cluster() -> Cluster {
    Cluster::start(ClusterOptions {
        agents: 0,
        piece_length: PIECE,
        progress_timeout: 60,
        ..Default::default()
    })
    .await
    .expect("cluster")
}

/// Fetches a blob through agent `index` in the background, verifying its sha256.
fn spawn_fetch(
    cluster: &Cluster,
    index: usize,
    name: &str,
    digest: &str,
    size: u64,
) -> JoinHandle<anyhow::Result<u64>> {
    let (client, url) = (cluster.client.clone(), cluster.agents[index].registry_url.clone());
    let (name, digest) = (name.to_owned(), digest.to_owned());
    tokio::spawn(async move { fetch_blob(&client, &url, &name, &digest, Some(size)).await })
}

/// Polls `probe` until it holds, for at most `limit`.
async fn wait_until<F, Fut>(limit: Duration, what: &str, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !probe().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn agent_counter(cluster: &Cluster, index: usize, name: &str) -> u64 {
    let url = format!("{}/metrics", cluster.agents[index].registry_url);
    scrape_counter(&cluster.client, &url, name).await.expect("agent metrics")
}

async fn origin_served(cluster: &Cluster) -> u64 {
    cluster.origin_counter(SERVED).await.expect("origin metrics")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restarted_mid_download_fetches_only_what_it_lacks() {
    let mut c = cluster().await;
    let image = c.push_image("faults/resume:v1", &[6 * MIB], 11).await.expect("push");
    let (layer, size) = image.layers[0].clone();
    let total = pieces(size, PIECE);
    // 1 MiB/s in: the download lasts about six seconds. A 1 s drain: the restart cuts the
    // download off (the default drain would let the client's response, and so the
    // download, finish).
    let opts = AgentOptions { ingress_limit: MIB as u64, drain_timeout: Some(1), ..Default::default() };
    c.start_agent(opts).await.expect("agent");
    let served_before = origin_served(&c).await;
    let cut = spawn_fetch(&c, 0, "faults/resume", &layer, size);
    let cr = &c;
    // Past MAX_PIPELINE pieces, so that re-fetching everything breaks the bound below.
    assert!(total / 2 > MAX_PIPELINE, "{total} pieces: too few to tell a resume from a restart");
    wait_until(Duration::from_secs(60), "half of the blob", move || async move {
        origin_served(cr).await - served_before >= total / 2
    })
    .await;

    c.restart_agent(0, AgentOptions::default()).await.expect("restart");
    // The client of the stopped agent was cut off: it must not have seen a whole, valid blob
    // of the wrong content (fetch_blob checks the digest if it got everything).
    let _ = cut.await.expect("join");
    let partial = c.agents[0].data_dir.join("partial");
    assert_eq!(std::fs::read_dir(&partial).expect("partial dir").count(), 1, "the partial download survives");
    let before_restart = origin_served(&c).await - served_before;
    assert!(before_restart < total, "the first run finished before the restart; slow it down");

    let got = fetch_blob(&c.client, &c.agents[0].registry_url, "faults/resume", &layer, Some(size))
        .await
        .expect("resumed download");
    assert_eq!(got, size);
    let after_restart = origin_served(&c).await - served_before - before_restart;
    // The only peer is the origin: at most one pipeline of pieces was sent and not written.
    assert!(
        after_restart + before_restart <= total + MAX_PIPELINE,
        "re-fetched {after_restart} pieces after {before_restart} of {total} before the restart"
    );
    assert!(after_restart < total, "nothing was resumed");
    eprintln!("resume: {before_restart} pieces from the origin before the restart, {after_restart} after, of {total}");
    // Clients stream the verified prefix, so the blob may be published just after they end.
    let empty = move || {
        let partial = partial.clone();
        async move { std::fs::read_dir(&partial).expect("partial dir").count() == 0 }
    };
    wait_until(Duration::from_secs(30), "the partial to become the blob", empty).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_and_ingress_limits_slow_transfers_down() {
    let mut c = cluster().await;
    let image = c.push_image("faults/limits:v1", &[12 * MIB], 12).await.expect("push");
    let (layer, size) = image.layers[0].clone();

    // Ingress: 4 MiB/s in, 12 MiB from the origin (burst 1 MiB): at least 2.75 s.
    c.start_agent(AgentOptions {
        ingress_limit: 4 * MIB as u64,
        egress_limit: 4 * MIB as u64,
        ..Default::default()
    })
    .await
    .expect("agent");
    let started = Instant::now();
    fetch_blob(&c.client, &c.agents[0].registry_url, "faults/limits", &layer, Some(size))
        .await
        .expect("fetch");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(2500), "12 MiB through a 4 MiB/s ingress limit took {took:?}");
    eprintln!("12 MiB through a 4 MiB/s ingress limit: {took:?}");

    // Egress: the only source left sends at 4 MiB/s.
    stop_origin(&mut c).await;
    c.start_agent(AgentOptions::default()).await.expect("agent");
    let started = Instant::now();
    fetch_blob(&c.client, &c.agents[1].registry_url, "faults/limits", &layer, Some(size))
        .await
        .expect("fetch");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(2500), "12 MiB through a 4 MiB/s egress limit took {took:?}");
    eprintln!("12 MiB through a 4 MiB/s egress limit: {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_killed_mid_transfer_leaves_every_other_download_complete() {
    let mut c = cluster().await;
    let image = c.push_image("faults/kill:v1", &[4 * MIB], 13).await.expect("push");
    let (layer, size) = image.layers[0].clone();
    // A seeder that serves slowly, so it dies with transfers in flight.
    c.start_agent(AgentOptions { egress_limit: MIB as u64, ..Default::default() }).await.expect("seeder");
    fetch_blob(&c.client, &c.agents[0].registry_url, "faults/kill", &layer, Some(size)).await.expect("seed");
    // Three downloaders; agent 1 dies too, mid-download.
    for _ in 0..3 {
        c.start_agent(AgentOptions { ingress_limit: MIB as u64, ..Default::default() }).await.expect("agent");
    }
    let fetches: Vec<_> = (1..4).map(|i| spawn_fetch(&c, i, "faults/kill", &layer, size)).collect();
    let cr = &c;
    wait_until(Duration::from_secs(60), "the seeder to serve", move || async move {
        agent_counter(cr, 0, SERVED).await >= 4
    })
    .await;
    c.agents[0].stop().await.expect("stop the seeder");
    c.agents[1].stop().await.expect("stop agent 1");
    let mut fetches = fetches.into_iter();
    let _ = fetches.next().expect("agent 1").await;
    for (i, fetch) in (2..).zip(fetches) {
        let got = fetch.await.expect("join").unwrap_or_else(|e| panic!("agent {i}: {e:#}"));
        assert_eq!(got, size);
    }
}

/// Serves the real blob with one byte of every piece flipped, claiming to hold it all.
#[derive(Debug)]
struct Corrupting {
    metainfo: Metainfo,
    data: Bytes,
    served: AtomicU64,
}

impl PieceSource for Corrupting {
    async fn bitfield(&self, digest: Digest) -> Option<Bitfield> {
        (digest == self.metainfo.digest()).then(|| Bitfield::full(self.metainfo.piece_count()))
    }

    async fn piece(&self, digest: Digest, index: u32) -> Option<Bytes> {
        if digest != self.metainfo.digest() {
            return None;
        }
        let offset = self.metainfo.piece_offset(index) as usize;
        let size = self.metainfo.piece_size(index).ok()? as usize;
        let mut piece = self.data[offset..offset + size].to_vec();
        piece[size / 2] ^= 0x5a;
        self.served.fetch_add(1, Ordering::Relaxed);
        Some(piece.into())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_serving_corrupt_pieces_is_banned_and_no_client_sees_its_bytes() {
    let mut c = cluster().await;
    let image = c.push_image("faults/corrupt:v1", &[3 * MIB], 14).await.expect("push");
    let (layer, size) = image.layers[0].clone();
    let digest: Digest = layer.parse().expect("digest");
    let metainfo =
        TrackerClient::new(std::slice::from_ref(&c.tracker_url)).metainfo(digest).await.expect("metainfo");
    let url = format!("{}/v2/faults/corrupt/blobs/{layer}", c.origin_url);
    let data = c.client.get(&url).send().await.expect("origin").bytes().await.expect("blob");
    assert_eq!(data.len() as u64, size);
    let rogue = Arc::new(Corrupting { metainfo, data, served: AtomicU64::new(0) });
    let peer = c.start_rogue_peer("corrupt", SharedSource(rogue.clone()), vec![digest]).await.expect("rogue");

    let agents = 3;
    for _ in 0..agents {
        c.start_agent(AgentOptions::default()).await.expect("agent");
    }
    let fetches: Vec<_> = (0..agents).map(|i| spawn_fetch(&c, i, "faults/corrupt", &layer, size)).collect();
    for (i, fetch) in fetches.into_iter().enumerate() {
        // fetch_blob hashes every byte the client received.
        let got = fetch.await.expect("join").unwrap_or_else(|e| panic!("agent {i}: {e:#}"));
        assert_eq!(got, size);
    }
    let sent = rogue.served.load(Ordering::Relaxed);
    assert!(sent >= 1, "the rogue peer was never asked; the test proves nothing");
    let mut rejected = 0;
    for i in 0..agents {
        rejected += agent_counter(&c, i, "shoal_agent_bad_pieces_total").await;
    }
    assert!(rejected >= 1, "{sent} corrupt pieces sent, none counted as bad");
    // Banned at the first bad piece: only requests already in flight can still be answered.
    assert!(sent <= SEEDER_PIPELINE * agents as u64, "{sent} corrupt pieces sent to {agents} agents");
    drop(peer);
}

/// Claims to hold everything and never answers a piece request.
#[derive(Debug)]
struct Stalling {
    metainfo: Metainfo,
    asked: AtomicU64,
}

impl PieceSource for Stalling {
    async fn bitfield(&self, digest: Digest) -> Option<Bitfield> {
        (digest == self.metainfo.digest()).then(|| Bitfield::full(self.metainfo.piece_count()))
    }

    async fn piece(&self, _digest: Digest, _index: u32) -> Option<Bytes> {
        self.asked.fetch_add(1, Ordering::Relaxed);
        std::future::pending().await
    }
}

/// Lets a test keep a handle on the source it gave to the peer server.
#[derive(Debug)]
struct SharedSource<S>(Arc<S>);

impl<S: PieceSource> PieceSource for SharedSource<S> {
    async fn bitfield(&self, digest: Digest) -> Option<Bitfield> {
        self.0.bitfield(digest).await
    }

    async fn piece(&self, digest: Digest, index: u32) -> Option<Bytes> {
        self.0.piece(digest, index).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_to_a_stalled_peer_are_dispatched_elsewhere() {
    let mut c = cluster().await;
    let image = c.push_image("faults/stall:v1", &[2 * MIB], 15).await.expect("push");
    let (layer, size) = image.layers[0].clone();
    let digest: Digest = layer.parse().expect("digest");
    let metainfo =
        TrackerClient::new(std::slice::from_ref(&c.tracker_url)).metainfo(digest).await.expect("metainfo");
    let stall = Arc::new(Stalling { metainfo, asked: AtomicU64::new(0) });
    let _peer = c.start_rogue_peer("stall", SharedSource(stall.clone()), vec![digest]).await.expect("rogue");
    c.start_agent(AgentOptions::default()).await.expect("agent");
    let started = Instant::now();
    let got = fetch_blob(&c.client, &c.agents[0].registry_url, "faults/stall", &layer, Some(size))
        .await
        .expect("download despite a stalled peer");
    let took = started.elapsed();
    assert_eq!(got, size);
    assert!(
        stall.asked.load(Ordering::Relaxed) >= 1,
        "the stalled peer was never asked; the test proves nothing"
    );
    eprintln!("download with a stalled peer took {took:?}");
    // The stalled requests end at their deadline (the scheduler's 5 s floor; 64 KiB pieces
    // at its 1 MiB/s minimum rate give less), the peer backs off and the origin serves the
    // rest. Without deadlines only the re-plan, at half the progress timeout, would free the
    // pieces: the bound sits well below it, with room for a loaded machine.
    let replan = Duration::from_secs(c.options.progress_timeout / 2);
    let bound = Duration::from_secs(20);
    assert!(bound + Duration::from_secs(5) <= replan, "the bound must stay below the re-plan ({replan:?})");
    assert!(took < bound, "a stalled peer held the download up for {took:?} (re-plan at {replan:?})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_survives_a_tracker_restart() {
    let mut c = cluster().await;
    let image = c.push_image("faults/tracker:v1", &[6 * MIB], 16).await.expect("push");
    let (layer, size) = image.layers[0].clone();
    c.start_agent(AgentOptions { ingress_limit: MIB as u64, ..Default::default() }).await.expect("agent");
    let served_before = origin_served(&c).await;
    let fetch = spawn_fetch(&c, 0, "faults/tracker", &layer, size);
    let cr = &c;
    wait_until(Duration::from_secs(60), "the download to start", move || async move {
        origin_served(cr).await > served_before
    })
    .await;
    c.restart_tracker(Duration::from_secs(1)).await.expect("tracker restart");
    assert!(!fetch.is_finished(), "the download ended before the tracker came back; slow it down");
    let got = fetch.await.expect("join").expect("download across the tracker restart");
    assert_eq!(got, size);

    // The fresh tracker relearnt the swarm: a new agent finds the blob and the first agent.
    // With the origin stopped, agent 0 is the only source, so a download proves the tracker
    // told the new agent about it. The tracker caches the metainfo while the origin is up.
    let digest: Digest = layer.parse().expect("digest");
    TrackerClient::new(std::slice::from_ref(&c.tracker_url)).metainfo(digest).await.expect("metainfo");
    stop_origin(&mut c).await;
    let served_by_0 = agent_counter(&c, 0, SERVED).await;
    c.start_agent(AgentOptions::default()).await.expect("agent");
    let got = fetch_blob(&c.client, &c.agents[1].registry_url, "faults/tracker", &layer, Some(size))
        .await
        .expect("download after the tracker restart");
    assert_eq!(got, size);
    let served = agent_counter(&c, 0, SERVED).await - served_by_0;
    assert!(served >= pieces(size, PIECE), "agent 0 served {served} pieces of {}", pieces(size, PIECE));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_origin_stopped_the_others_finish_from_a_complete_agent() {
    let mut c = cluster().await;
    let image = c.push_image("faults/noorigin:v1", &[3 * MIB, 500_000], 17).await.expect("push");
    c.start_agent(AgentOptions::default()).await.expect("agent");
    for (layer, size) in &image.layers {
        fetch_blob(&c.client, &c.agents[0].registry_url, "faults/noorigin", layer, Some(*size))
            .await
            .expect("first");
    }
    let served = origin_served(&c).await;
    stop_origin(&mut c).await;
    for _ in 0..3 {
        c.start_agent(AgentOptions::default()).await.expect("agent");
    }
    let mut fetches = Vec::new();
    for i in 1..4 {
        for (layer, size) in &image.layers {
            fetches.push((i, spawn_fetch(&c, i, "faults/noorigin", layer, *size)));
        }
    }
    for (i, fetch) in fetches {
        fetch.await.expect("join").unwrap_or_else(|e| panic!("agent {i}: {e:#}"));
    }
    let total: u64 = image.layers.iter().map(|(_, s)| pieces(*s, PIECE)).sum();
    assert_eq!(served, total, "the first agent fetched every piece from the origin once");
    assert!(agent_counter(&c, 0, SERVED).await >= 1, "the complete agent served the others");
    // The origin is gone: every piece the three others needed came from an agent.
    let mut by_agents = Vec::new();
    for i in 0..4 {
        by_agents.push(agent_counter(&c, i, SERVED).await);
    }
    assert!(
        by_agents.iter().sum::<u64>() >= 3 * total,
        "agents served {by_agents:?} pieces; the three others needed {total} each"
    );
    assert!(
        c.client.get(format!("{}/healthz", c.origin_url)).send().await.is_err(),
        "the origin still answers: it may have served the others"
    );
}

/// Stops the origin and checks that it no longer answers.
async fn stop_origin(c: &mut Cluster) {
    c.stop_origin().await;
    let health = c.client.get(format!("{}/healthz", c.origin_url)).send().await;
    assert!(health.is_err(), "the origin still answers after it was stopped: {health:?}");
}
