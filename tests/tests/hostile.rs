//! Attacks from issue "a hostile world", each reproduced against a running cluster: a full
//! disk under a chunked upload, and clients that request blobs and never read them.
//!
//! The full-disk test mounts a small tmpfs, so it needs root; it prints a skip line without
//! it locally and fails under `CI`.

use std::io::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use sha2::{Digest as _, Sha256};
use shoal_tests::cluster::{Cluster, ClusterOptions};

/// A tmpfs of a given size, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// `None` (with a skip line) when mounting is not allowed here, unless under CI.
    fn mount(bytes: u64) -> Option<Self> {
        let dir = tempfile::tempdir().expect("mount point");
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir.path())
            .status();
        match status {
            Ok(s) if s.success() => Some(Self { dir }),
            other => {
                assert!(std::env::var_os("CI").is_none(), "CI must be able to mount a tmpfs: {other:?}");
                eprintln!("skipped: cannot mount a tmpfs here ({other:?})");
                None
            }
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Issue item 1: with the disk full, a chunked upload's PATCH failed but its session went on
/// reporting a length past what was on disk; resuming from there published a short file
/// under the client's digest. Now a failed write ends the upload, its bytes are freed, and
/// nothing is ever published that does not hash to its digest at its full length.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_never_publishes_a_short_blob() {
    let Some(fs) = Tmpfs::mount(2 << 20) else { return };
    let c = Cluster::start(ClusterOptions {
        agents: 0,
        origin_data: Some(fs.path().join("origin")),
        // No bound on open uploads: the disk itself must run out.
        max_upload_bytes: Some(0),
        ..Default::default()
    })
    .await
    .expect("cluster");
    let blob: Vec<u8> = (0..3u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let digest = digest_of(&blob);
    let base = format!("{}/v2/app/full", c.origin_url);

    let start = c.client.post(format!("{base}/blobs/uploads/")).send().await.expect("start");
    assert_eq!(start.status(), StatusCode::ACCEPTED);
    let mut location = start.headers()["location"].to_str().expect("location").to_owned();
    let mut failed = None;
    for chunk in blob.chunks(256 << 10) {
        let resp = c
            .client
            .patch(format!("{}{location}", c.origin_url))
            .header("content-type", "application/octet-stream")
            .body(chunk.to_vec())
            .send()
            .await
            .expect("patch");
        if resp.status() != StatusCode::ACCEPTED {
            failed = Some((resp.status(), resp.text().await.unwrap_or_default()));
            break;
        }
        location = resp.headers()["location"].to_str().expect("location").to_owned();
    }
    let (status, body) = failed.expect("a 3 MiB upload cannot fit in a 2 MiB filesystem");
    assert_eq!(status, StatusCode::INSUFFICIENT_STORAGE, "{body}");
    assert!(body.contains("out of disk space"), "{body}");
    assert!(!body.contains(&fs.path().display().to_string()), "no host paths in errors: {body}");

    // The session is over: its status and a resumed PUT both say so, and nothing is stored.
    let status = c.client.get(format!("{}{location}", c.origin_url)).send().await.expect("status");
    assert_eq!(status.status(), StatusCode::NOT_FOUND);
    let put = c
        .client
        .put(format!("{}{location}?digest={digest}", c.origin_url))
        .body(Vec::new())
        .send()
        .await
        .expect("put");
    assert_ne!(put.status(), StatusCode::CREATED, "a short blob was published");
    let head = c.client.head(format!("{base}/blobs/{digest}")).send().await.expect("head");
    assert_eq!(head.status(), StatusCode::NOT_FOUND);

    // Its bytes were freed: a blob that fits goes through at once, exact.
    let small = &blob[..512 << 10];
    let small_digest = digest_of(small);
    let put = c
        .client
        .post(format!("{base}/blobs/uploads/?digest={small_digest}"))
        .body(small.to_vec())
        .send()
        .await
        .expect("monolithic upload");
    assert_eq!(put.status(), StatusCode::CREATED, "{}", put.text().await.unwrap_or_default());
    let got = c.client.get(format!("{base}/blobs/{small_digest}")).send().await.expect("get");
    assert_eq!(got.bytes().await.expect("body").as_ref(), small);
}

/// Threads of this process.
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map(|d| d.count()).unwrap_or(0)
}

/// Resident memory of this process, in bytes.
fn rss() -> u64 {
    shoal_tests::load::status_kib("self", "VmRSS").map_or(0, |kib| kib * 1024)
}

/// Established server-side TCP connections on `port` (from `/proc/net/tcp`).
fn established_on(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3
                && f[3] == "01"
                && f[1].rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok()) == Some(port)
        })
        .count()
}

/// Opens `n` connections that each ask for `path` and never read a byte of the answer.
fn stalled_clients(addr: SocketAddr, path: &str, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|_| {
            // A small receive window, so the server's side fills fast and the kernel holds
            // little for each.
            let socket =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
            socket.set_recv_buffer_size(64 << 10).expect("rcvbuf");
            socket.connect(&addr.into()).expect("connect");
            let mut s: TcpStream = socket.into();
            write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").expect("request");
            s
        })
        .collect()
}

/// Issue item 2: 600 clients that GET a large blob and stop reading took the origin to 3.2 GB
/// and 518 threads and starved every other GET. Now a stalled response holds one small chunk
/// and no thread, other clients are served at once, and the stalled connections are dropped
/// after the send timeout. Checked on the origin and on an agent serving from its cache, at
/// the same time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_read_cost_only_a_socket() {
    const STALLED: usize = 120;
    const SEND_TIMEOUT: Duration = Duration::from_secs(20);
    let c = Cluster::start(ClusterOptions {
        agents: 1,
        send_timeout: SEND_TIMEOUT.as_secs(),
        ..Default::default()
    })
    .await
    .expect("cluster");
    let image = c.push_image("app/stall:v1", &[32 << 20], 5).await.expect("push");
    let (layer, size) = image.layers[0].clone();
    let path = format!("/v2/app/stall/blobs/{layer}");
    let agent = &c.agents[0];
    let warm = c.client.get(format!("{}{path}", agent.registry_url)).send().await;
    assert_eq!(warm.expect("warm").bytes().await.expect("body").len() as u64, size);
    let bases = [c.origin_url.clone(), agent.registry_url.clone()];
    let addrs: Vec<SocketAddr> =
        bases.iter().map(|b| b.trim_start_matches("http://").parse().expect("addr")).collect();

    // Idle blocking-pool threads retire after 10 s: count from a settled process.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let (threads_before, rss_before) = (threads(), rss());
    let clients = tokio::task::spawn_blocking({
        let (addrs, path) = (addrs.clone(), path.clone());
        move || addrs.iter().flat_map(|a| stalled_clients(*a, &path, STALLED)).collect::<Vec<_>>()
    })
    .await
    .expect("clients");
    // Let every response run into its client's full socket.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for a in &addrs {
        assert!(established_on(a.port()) >= STALLED, "{a}: the stalled clients are connected");
    }
    let extra_rss = rss().saturating_sub(rss_before);
    eprintln!("{} stalled clients cost {} MiB RSS", 2 * STALLED, extra_rss >> 20);
    assert!(extra_rss < 96 << 20, "{} MiB for {} stalled responses", extra_rss >> 20, 2 * STALLED);

    // Everyone else is served at once, in full.
    for base in &bases {
        let t = Instant::now();
        let body =
            c.client.get(format!("{base}{path}")).send().await.expect("get").bytes().await.expect("body");
        assert_eq!(digest_of(&body), layer, "{base}");
        assert!(t.elapsed() < Duration::from_secs(10), "{base}: a GET took {:?}", t.elapsed());
    }

    // No thread waits on a stalled client, once the threads that served the GETs above
    // have retired.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let extra_threads = threads().saturating_sub(threads_before);
    eprintln!("{} stalled clients hold {extra_threads} threads", 2 * STALLED);
    assert!(extra_threads <= 4, "{extra_threads} threads held by {} stalled responses", 2 * STALLED);

    // The stalled connections are dropped once the send timeout passes.
    let deadline = Instant::now() + SEND_TIMEOUT + Duration::from_secs(20);
    while addrs.iter().any(|a| established_on(a.port()) > 0) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for a in &addrs {
        assert_eq!(established_on(a.port()), 0, "{a}: stalled connections outlived the send timeout");
    }
    drop(clients);
}

/// Flips one byte of a file at `offset`.
fn flip_byte(path: &Path, offset: u64) {
    use std::os::unix::fs::FileExt as _;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).expect("open cached blob");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).expect("read");
    f.write_all_at(&[b[0] ^ 0x5a], offset).expect("write");
}

/// Whether the tracker lists `peer` among a blob's announced peers.
async fn tracker_lists(c: &Cluster, digest: &str, peer: SocketAddr) -> bool {
    let url = format!("{}/shoal/v1/peers/{digest}", c.tracker_url);
    let v: serde_json::Value = c.client.get(url).send().await.expect("peers").json().await.expect("json");
    v["peers"].as_array().into_iter().flatten().any(|p| p["addr"] == peer.to_string())
}

/// Issue item 7: a blob whose bytes were flipped on the agent's disk was served to local
/// clients as its digest with 200, and the agent stayed its seeder. Now every piece is
/// checked as it is read: damage in the first piece is caught before answering and the blob
/// is fetched again; damage further in cuts the body short (never a wrong byte), drops the
/// blob and ends its announcements; the next request gets the right bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_damaged_in_the_cache_is_never_served() {
    let c = Cluster::start(ClusterOptions { agents: 1, piece_length: 64 << 10, ..Default::default() })
        .await
        .expect("cluster");
    let image = c.push_image("app/rot:v1", &[1 << 20], 9).await.expect("push");
    let (layer, size) = image.layers[0].clone();
    let agent = &c.agents[0];
    let url = format!("{}/v2/app/rot/blobs/{layer}", agent.registry_url);
    let get = || async { c.client.get(&url).send().await.expect("get").bytes().await };
    assert_eq!(digest_of(&get().await.expect("body")), layer);
    let cached = agent.data_dir.join("blobs").join(layer.trim_start_matches("sha256:"));
    let damaged = || async {
        let metrics = c.client.get(format!("{}/metrics", agent.registry_url)).send().await.expect("metrics");
        shoal_tests::cluster::parse_counter(
            &metrics.text().await.expect("text"),
            "shoal_agent_damaged_blobs_total",
        )
    };

    // A streamed download is committed to the cache just after its last byte went out.
    let wait_cached = || async {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cached.exists() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    wait_cached().await;

    // Damage in the first piece: caught before the answer; the client gets the right bytes.
    flip_byte(&cached, 10);
    let body = get().await.expect("body");
    assert_eq!((body.len() as u64, digest_of(&body)), (size, layer.clone()), "re-fetched, exact");
    assert_eq!(damaged().await, 1);
    wait_cached().await;
    assert_eq!(digest_of(&std::fs::read(&cached).expect("cache")), layer, "the cache holds a good copy");

    // Damage further in: the body stops before the damaged piece.
    let announced = Instant::now() + Duration::from_secs(10);
    while !tracker_lists(&c, &layer, agent.peer_addr).await && Instant::now() < announced {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(tracker_lists(&c, &layer, agent.peer_addr).await, "the agent seeds the blob");
    flip_byte(&cached, 10 * (64 << 10) + 7);
    // An error is the connection cut short: the client knows the body is incomplete.
    if let Ok(body) = get().await {
        assert!((body.len() as u64) < size, "a damaged blob was served whole");
        assert!(body.len() <= 10 * (64 << 10), "bytes of the damaged piece were sent");
    }
    assert_eq!(damaged().await, 2);
    assert!(!cached.exists(), "the damaged blob was dropped");
    // No longer announced: the tracker forgets the agent as a seeder of it.
    let forgotten = Instant::now() + Duration::from_secs(15);
    while tracker_lists(&c, &layer, agent.peer_addr).await && Instant::now() < forgotten {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(!tracker_lists(&c, &layer, agent.peer_addr).await, "still announced after being dropped");

    let body = get().await.expect("body");
    assert_eq!(digest_of(&body), layer, "fetched again, exact");

    // A cached file cut short at a piece boundary: every piece left verifies, but the blob
    // is not its metainfo's length, so it is dropped and fetched again, never served short.
    wait_cached().await;
    let f = std::fs::OpenOptions::new().write(true).open(&cached).expect("open cached blob");
    f.set_len(4 * (64 << 10)).expect("truncate");
    drop(f);
    let body = get().await.expect("body");
    assert_eq!((body.len() as u64, digest_of(&body)), (size, layer.clone()), "re-fetched, exact");
    assert_eq!(damaged().await, 3);
}

/// Issue item 6: an agent on a full disk answered a GET with 200 and a body cut short,
/// fetched what fitted from the origin again on every retry, and showed its data path. Now
/// the blob's space is reserved before anything is fetched: a clear 507 with an OCI error,
/// no byte fetched, no host path, on every try.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_on_a_full_disk_answers_507_before_any_byte() {
    let Some(fs) = Tmpfs::mount(2 << 20) else { return };
    let mut c = Cluster::start(ClusterOptions { agents: 0, ..Default::default() }).await.expect("cluster");
    let data = fs.path().join("agent");
    let index = c
        .start_agent(shoal_tests::cluster::AgentOptions {
            data_dir: Some(data.clone()),
            ..Default::default()
        })
        .await
        .expect("agent");
    let image = c.push_image("app/big:v1", &[3 << 20], 21).await.expect("push");
    let (layer, _) = image.layers[0].clone();
    let url = format!("{}/v2/app/big/blobs/{layer}", c.agents[index].registry_url);
    for attempt in 0..3 {
        let resp = c.client.get(&url).send().await.expect("get");
        let status = resp.status();
        let body = resp.text().await.expect("a whole error body");
        assert_eq!(status, StatusCode::INSUFFICIENT_STORAGE, "attempt {attempt}: {body}");
        let json: serde_json::Value = serde_json::from_str(&body).expect("OCI error JSON");
        assert!(json["errors"][0]["message"].as_str().is_some_and(|m| m.contains("no room")), "{body}");
        assert!(!body.contains(&fs.path().display().to_string()), "a host path in {body}");
    }
    let served = c.origin_counter("shoal_peer_bytes_served_total").await.expect("origin metrics");
    assert_eq!(served, 0, "the origin sent piece bytes to an agent that cannot store them");
    // Nothing is left behind to fill the disk further.
    let partial = std::fs::read_dir(data.join("partial")).expect("partial dir").count();
    assert_eq!(partial, 0);
}

/// Starts a chunked upload and returns its location.
async fn start_upload(c: &Cluster, base: &str) -> String {
    let start = c.client.post(format!("{base}/blobs/uploads/")).send().await.expect("start");
    assert_eq!(start.status(), StatusCode::ACCEPTED);
    start.headers()["location"].to_str().expect("location").to_owned()
}

async fn patch(c: &Cluster, location: &str, chunk: &[u8]) -> (StatusCode, String) {
    let resp = c.client.patch(format!("{}{location}", c.origin_url)).body(chunk.to_vec()).send().await;
    let resp = resp.expect("patch");
    let status = resp.status();
    (status, resp.text().await.unwrap_or_default())
}

/// Issue item 5: up to 1,024 chunked uploads of unlimited size could be opened and hold the
/// disk until they expired an hour later. Now open uploads share a byte bound: the chunk that
/// would pass it ends its own upload (413) and frees its bytes; the others go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_uploads_are_bounded_in_bytes() {
    let c =
        Cluster::start(ClusterOptions { agents: 0, max_upload_bytes: Some(1 << 20), ..Default::default() })
            .await
            .expect("cluster");
    let base = format!("{}/v2/app/bounded", c.origin_url);
    let blob: Vec<u8> = (0..768u32 << 10).map(|i| (i % 251) as u8).collect();
    let a = start_upload(&c, &base).await;
    assert_eq!(patch(&c, &a, &blob[..512 << 10]).await.0, StatusCode::ACCEPTED);
    let b = start_upload(&c, &base).await;
    let (status, body) = patch(&c, &b, &[7u8; 600 << 10]).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    let ended = c.client.get(format!("{}{b}", c.origin_url)).send().await.expect("status");
    assert_eq!(ended.status(), StatusCode::NOT_FOUND, "the upload past the bound was ended");
    // The first upload goes on and completes, exact.
    assert_eq!(patch(&c, &a, &blob[512 << 10..]).await.0, StatusCode::ACCEPTED);
    let digest = digest_of(&blob);
    let put = c.client.put(format!("{}{a}?digest={digest}", c.origin_url)).send().await.expect("put");
    assert_eq!(put.status(), StatusCode::CREATED);
    let got = c.client.get(format!("{base}/blobs/{digest}")).send().await.expect("get");
    assert_eq!(got.bytes().await.expect("body").as_ref(), &blob[..]);
    // A single-request upload takes its bytes of the same bound.
    let big = vec![9u8; 1536 << 10];
    let put = c
        .client
        .post(format!("{base}/blobs/uploads/?digest={}", digest_of(&big)))
        .body(big.clone())
        .send()
        .await
        .expect("monolithic upload");
    assert_eq!(put.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let head = c.client.head(format!("{base}/blobs/{}", digest_of(&big))).send().await.expect("head");
    assert_eq!(head.status(), StatusCode::NOT_FOUND);
    // With the first one done, its room is free again.
    let b = start_upload(&c, &base).await;
    assert_eq!(patch(&c, &b, &[7u8; 600 << 10]).await.0, StatusCode::ACCEPTED);
}

/// Issue item 3, the part that needs no certificate: announces were taken from anyone for
/// any address, one host could put 10,000 "seeders" in a swarm, and every lookup of an
/// unknown digest went to the origins. Now an announcer may announce only its own IP (and a
/// dialable address), one IP holds at most a bounded share of a swarm and of the table, and
/// "no origin has it" is remembered briefly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_announces_from_one_host_locks_nobody_out() {
    let c = Cluster::start(ClusterOptions { agents: 1, ..Default::default() }).await.expect("cluster");
    let image = c.push_image("app/flood:v1", &[256 << 10], 4).await.expect("push");
    let (layer, _) = image.layers[0].clone();
    // The flooder is another host: another loopback address.
    let flooder = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .build()
        .expect("client");
    let announce = |peer: String| {
        let body = serde_json::json!({ "digest": layer, "peer": peer, "complete": true });
        flooder.post(format!("{}/shoal/v1/announce", c.tracker_url)).json(&body).send()
    };
    let status = |r: reqwest::Result<reqwest::Response>| r.expect("announce").status();
    assert_eq!(
        status(announce("10.9.9.9:5051".into()).await),
        StatusCode::FORBIDDEN,
        "someone else's address"
    );
    assert_eq!(status(announce("127.0.0.2:0".into()).await), StatusCode::BAD_REQUEST, "port 0");
    assert_eq!(status(announce("0.0.0.0:5051".into()).await), StatusCode::BAD_REQUEST, "unspecified");

    // A thousand "seeders" from one host: a bounded few are kept.
    for port in 1..=1000u16 {
        assert_eq!(status(announce(format!("127.0.0.2:{port}")).await), StatusCode::OK);
    }
    let url = format!("{}/shoal/v1/peers/{layer}", c.tracker_url);
    let peers: serde_json::Value =
        c.client.get(&url).send().await.expect("peers").json().await.expect("json");
    let fake = peers["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["addr"].as_str().is_some_and(|a| a.starts_with("127.0.0.2:")))
        .count();
    assert!(fake <= 64, "{fake} addresses of one host in one swarm");

    // Fifty lookups of a digest nobody has cost the origins one request.
    let lookups = || async {
        let metrics = c.client.get(format!("{}/metrics", c.tracker_url)).send().await.expect("metrics");
        shoal_tests::cluster::parse_counter(
            &metrics.text().await.expect("text"),
            "shoal_tracker_origin_lookups_total",
        )
    };
    let before = lookups().await;
    let unknown = digest_of(b"nobody has this");
    for _ in 0..50 {
        let r = flooder.get(format!("{}/shoal/v1/metainfo/{unknown}", c.tracker_url)).send().await;
        assert_eq!(r.expect("lookup").status(), StatusCode::NOT_FOUND);
    }
    assert_eq!(lookups().await - before, 1, "every unknown lookup went to the origin");

    // The real agent still pulls the layer, from the origin (the fakes answer nothing).
    let agent = &c.agents[0];
    let body = c.client.get(format!("{}/v2/app/flood/blobs/{layer}", agent.registry_url)).send().await;
    assert_eq!(digest_of(&body.expect("get").bytes().await.expect("body")), layer);
}
