//! Day-2 operations on a real in-process cluster: a bounded cache, readiness, draining on
//! shutdown, bytes delivered by source, and the status pages rendered by a real browser.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use sha2::{Digest as _, Sha256};
use shoal_tests::cluster::{fetch_blob, parse_counter, pull_image, AgentOptions, Cluster, ClusterOptions};

/// Disk bytes the agent's cache files take (what `du` counts), its own directories only.
fn cache_disk_bytes(data: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    ["blobs", "meta", "partial", "tmp"]
        .iter()
        .filter_map(|sub| std::fs::read_dir(data.join(sub)).ok())
        .flatten()
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

/// Samples the cache's disk usage until dropped; keeps the largest seen.
struct DiskWatch {
    max: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DiskWatch {
    fn start(data: &Path) -> Self {
        let (max, stop) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
        let thread = std::thread::spawn({
            let (max, stop, data) = (max.clone(), stop.clone(), data.to_path_buf());
            move || {
                while !stop.load(Ordering::Relaxed) {
                    max.fetch_max(cache_disk_bytes(&data), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        });
        Self { max, stop, thread: Some(thread) }
    }

    fn max(&self) -> u64 {
        self.max.load(Ordering::Relaxed)
    }
}

impl Drop for DiskWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn metrics(client: &reqwest::Client, url: &str) -> String {
    client.get(format!("{url}/metrics")).send().await.expect("metrics").text().await.expect("text")
}

async fn status_of(client: &reqwest::Client, url: &str) -> (u16, String) {
    let resp = client.get(url).send().await.expect("GET");
    (resp.status().as_u16(), resp.text().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_small_cache_holds_its_bound_evicts_and_keeps_serving() {
    const CAP: u64 = 48 << 20;
    const LAYER: usize = 8 << 20;
    const IMAGES: u64 = 18; // 144 MiB of layers: three times the cap.
                            // Larger than what the loopback socket buffers take, so the server is still sending it
                            // while the client reads slowly.
    const BIG: usize = 32 << 20;
    let mut c = Cluster::start(ClusterOptions { agents: 0, ..Default::default() }).await.expect("cluster");
    let index =
        c.start_agent(AgentOptions { cache_size: Some(CAP), ..Default::default() }).await.expect("agent");
    let mut images = Vec::new();
    for i in 0..IMAGES {
        images.push(c.push_image(&format!("app/img{i}:v1"), &[LAYER], 100 + i).await.expect("push"));
    }
    let big = c.push_image("app/big:v1", &[BIG], 99).await.expect("push");
    let (agent_url, data, me) = {
        let a = &c.agents[index];
        (a.registry_url.clone(), a.data_dir.clone(), a.peer_addr)
    };
    let watch = DiskWatch::start(&data);
    for i in 0..IMAGES {
        pull_image(&c.client, &agent_url, &format!("app/img{i}"), "v1").await.expect("every pull succeeds");
    }
    let text = metrics(&c.client, &agent_url).await;
    assert!(parse_counter(&text, "shoal_agent_cache_evictions_total") > 0, "{text}");
    assert!(watch.max() <= CAP, "the cache took {} bytes on disk, over its {CAP}", watch.max());

    // The first image's layer was evicted: the tracker no longer lists this agent for it,
    // and it pulls again.
    let layer0 = images[0].layers[0].0.clone();
    assert!(!data.join("blobs").join(layer0.trim_start_matches("sha256:")).exists(), "evicted");
    let peers_url = format!("{}/shoal/v1/peers/{layer0}", c.tracker_url);
    let mut listed = true;
    for _ in 0..50 {
        let body: serde_json::Value =
            c.client.get(&peers_url).send().await.expect("peers").json().await.expect("json");
        listed = body["peers"].as_array().expect("peers").iter().any(|p| p["addr"] == me.to_string());
        if !listed {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!listed, "the tracker still lists the agent for an evicted blob");
    pull_image(&c.client, &agent_url, "app/img0", "v1").await.expect("an evicted image pulls again");

    // A blob streaming to a slow client is not evicted under it, though any pull would
    // evict it otherwise (it takes two thirds of the cap): read the big layer from the cache
    // slowly while other images are pulled.
    pull_image(&c.client, &agent_url, "app/big", "v1").await.expect("big pull");
    let (digest, size) = big.layers[0].clone();
    let url = format!("{agent_url}/v2/app/big/blobs/{digest}");
    let resp = c.client.get(&url).send().await.expect("GET");
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut hash = Sha256::new();
    let mut got = 0u64;
    let first = stream.next().await.expect("a chunk").expect("bytes");
    hash.update(&first);
    got += first.len() as u64;
    for i in 1..3 {
        pull_image(&c.client, &agent_url, &format!("app/img{i}"), "v1").await.expect("pull while streaming");
    }
    let path = data.join("blobs").join(digest.trim_start_matches("sha256:"));
    assert!(path.exists(), "the blob being streamed was evicted under its client");
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("bytes");
        hash.update(&chunk);
        got += chunk.len() as u64;
    }
    assert_eq!(got, size);
    assert_eq!(format!("sha256:{}", hex::encode(hash.finalize())), digest);
    assert!(watch.max() <= CAP, "the cache took {} bytes on disk, over its {CAP}", watch.max());
    drop(watch);

    // Usage survives a restart: it is rebuilt from the files, and still within the cap.
    c.restart_agent(index, AgentOptions { cache_size: Some(CAP), ..Default::default() })
        .await
        .expect("restart");
    let text = metrics(&c.client, &c.agents[index].registry_url).await;
    let used = parse_counter(&text, "shoal_agent_cache_bytes");
    assert!(used > 0 && used <= CAP, "cache bytes after restart: {used}");
    assert!(
        used.abs_diff(cache_disk_bytes(&data)) < 1 << 20,
        "{used} vs {} on disk",
        cache_disk_bytes(&data)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readiness_follows_what_each_component_needs() {
    let mut c = Cluster::start(ClusterOptions::default()).await.expect("cluster");
    let agent = c.agents[0].registry_url.clone();
    let client = c.client.clone();
    let ready = |url: String| {
        let client = client.clone();
        async move { status_of(&client, &format!("{url}/readyz")).await }
    };
    assert_eq!(ready(agent.clone()).await.0, 200);
    assert_eq!(ready(c.tracker_url.clone()).await.0, 200);
    assert_eq!(ready(c.origin_url.clone()).await.0, 200);

    c.stop_tracker().await;
    let (status, body) = ready(agent.clone()).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("tracker"), "{body}");
    assert_eq!(status_of(&c.client, &format!("{agent}/healthz")).await.0, 200, "still alive");

    c.start_tracker(vec![c.origin_url.clone()]).await.expect("tracker back");
    assert_eq!(ready(agent.clone()).await.0, 200);

    // The tracker is ready only while an origin answers.
    c.stop_origin().await;
    let (status, body) = ready(c.tracker_url.clone()).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("origin"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_lets_a_slow_streaming_pull_finish() {
    const SIZE: usize = 256 << 20;
    let c = Cluster::start(ClusterOptions::default()).await.expect("cluster");
    let image = c.push_image("app/big:v1", &[SIZE], 11).await.expect("push");
    let (digest, size) = image.layers[0].clone();
    let agent = &c.agents[0];
    let url = format!("{}/v2/app/big/blobs/{digest}", agent.registry_url);
    let resp = c.client.get(&url).send().await.expect("GET");
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut hash = Sha256::new();
    let mut got = 0u64;
    let mut stopped = false;
    let started = std::time::Instant::now();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("the body is not cut short");
        hash.update(&chunk);
        got += chunk.len() as u64;
        // A slow client: about 50 MB/s, so the rest takes longer than the old 2 s drain.
        tokio::time::sleep(Duration::from_micros(chunk.len() as u64 / 50)).await;
        if !stopped && got > 16 << 20 {
            // What SIGTERM does (`cancel_on_signal`): the agent starts shutting down.
            agent.shutdown.cancel();
            stopped = true;
        }
    }
    assert!(stopped);
    assert_eq!(got, size, "every byte arrives after the shutdown began");
    assert_eq!(format!("sha256:{}", hex::encode(hash.finalize())), digest);
    // No new request is taken meanwhile.
    let refused = c.client.get(format!("{}/v2/", agent.registry_url)).send().await;
    assert!(refused.is_err() || !refused.expect("resp").status().is_success(), "still accepting");
    eprintln!("drained a {} MiB pull in {:?}", SIZE >> 20, started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bytes_delivered_by_source_add_up_to_what_clients_got() {
    let c = Cluster::start(ClusterOptions { agents: 2, ..Default::default() }).await.expect("cluster");
    let image = c.push_image("app/src:v1", &[3 << 20, 5 << 20], 21).await.expect("push");
    let delivered = |text: &str, source: &str| {
        parse_counter(text, &format!("shoal_agent_delivered_bytes_total{{source=\"{source}\"}}"))
    };
    let one = c.agents[0].registry_url.clone();
    let cold = pull_image(&c.client, &one, "app/src", "v1").await.expect("cold pull");
    let text = metrics(&c.client, &one).await;
    let (cache, peer, origin) =
        (delivered(&text, "cache"), delivered(&text, "peer"), delivered(&text, "origin"));
    assert_eq!(cache + peer + origin, cold.total_bytes, "{text}");
    assert!(origin >= image.layers.iter().map(|l| l.1).sum::<u64>(), "layers came from the origin: {text}");
    assert!(parse_counter(&text, "shoal_agent_piece_fetch_seconds_count") > 0, "{text}");
    assert!(parse_counter(&text, "shoal_agent_download_duration_seconds_count") > 0, "{text}");
    assert!(text.contains("shoal_agent_peers "), "{text}");
    // Exported, and zero: one source (the origin), no endgame copies, nothing cut short.
    assert!(text.contains("shoal_agent_piece_discarded_bytes_total "), "{text}");
    assert_eq!(parse_counter(&text, "shoal_agent_piece_discarded_bytes_total"), 0, "{text}");

    let hot = pull_image(&c.client, &one, "app/src", "v1").await.expect("hot pull");
    let text = metrics(&c.client, &one).await;
    assert_eq!(delivered(&text, "cache"), cache + hot.total_bytes, "a hot pull is all cache: {text}");
    assert_eq!(delivered(&text, "origin") + delivered(&text, "peer"), origin + peer);

    // A second agent: what it got came from peers or the origin, and it adds up too.
    let two = c.agents[1].registry_url.clone();
    let pulled = pull_image(&c.client, &two, "app/src", "v1").await.expect("second agent");
    let text = metrics(&c.client, &two).await;
    let sum: u64 = ["cache", "peer", "origin", "upstream"].iter().map(|s| delivered(&text, s)).sum();
    assert_eq!(sum, pulled.total_bytes, "{text}");
    // And a ranged read counts only the bytes it sent.
    let (layer, _) = &image.layers[1];
    let resp = c
        .client
        .get(format!("{two}/v2/app/src/blobs/{layer}"))
        .header("Range", "bytes=100-1099")
        .send()
        .await
        .expect("range");
    assert_eq!(resp.bytes().await.expect("body").len(), 1000);
    let text = metrics(&c.client, &two).await;
    let after: u64 = ["cache", "peer", "origin", "upstream"].iter().map(|s| delivered(&text, s)).sum();
    assert_eq!(after, sum + 1000);
    fetch_blob(&c.client, &two, "app/src", layer, None).await.expect("whole");
}

/// A real headless browser, or `None` (a skip line locally; a failure under CI).
fn chromium() -> Option<&'static str> {
    for bin in ["chromium", "chromium-browser", "google-chrome"] {
        if std::process::Command::new(bin).arg("--version").output().is_ok_and(|o| o.status.success()) {
            return Some(bin);
        }
    }
    assert!(std::env::var_os("CI").is_none(), "chromium is required under CI (apt-get install chromium)");
    eprintln!("skipping: no chromium on PATH");
    None
}

/// The page as the browser rendered it (its DOM after load).
fn render(browser: &str, url: &str) -> String {
    let profile = tempfile::tempdir().expect("profile");
    let out = std::process::Command::new(browser)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(["--virtual-time-budget=2000", "--dump-dom", url])
        .output()
        .expect("run chromium");
    assert!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_pages_render_in_a_real_browser_and_list_the_download() {
    let Some(browser) = chromium() else { return };
    let mut c = Cluster::start(ClusterOptions { agents: 0, ..Default::default() }).await.expect("cluster");
    // Slow on purpose (2 MiB/s in), so the download is still running while the page is read.
    let index =
        c.start_agent(AgentOptions { ingress_limit: 2 << 20, ..Default::default() }).await.expect("agent");
    let image = c.push_image("app/page:v1", &[24 << 20], 31).await.expect("push");
    let (digest, _) = image.layers[0].clone();
    let agent = c.agents[index].registry_url.clone();
    let pull = tokio::spawn({
        let (client, agent, digest) = (c.client.clone(), agent.clone(), digest.clone());
        async move { fetch_blob(&client, &agent, "app/page", &digest, None).await }
    });
    // Until the download shows up in the agent's state.
    for _ in 0..100 {
        if status_of(&c.client, &format!("{agent}/status")).await.1.contains(&digest) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (url, b) = (format!("{agent}/status"), browser.to_owned());
    let dom = tokio::task::spawn_blocking(move || render(&b, &url)).await.expect("render");
    assert!(dom.contains("Downloads in progress"), "{dom}");
    let row = dom
        .split("<tr>")
        .find(|r| r.contains(&digest))
        .unwrap_or_else(|| panic!("no row for {digest}: {dom}"));
    assert!(row.contains("class=\"bar\""), "a progress bar: {row}");
    assert!(dom.contains("Largest cached blobs"), "{dom}");

    for (url, title) in [(c.tracker_url.clone(), "shoal-tracker"), (c.origin_url.clone(), "shoal-origin")] {
        let b = browser.to_owned();
        let dom =
            tokio::task::spawn_blocking(move || render(&b, &format!("{url}/status"))).await.expect("render");
        assert!(dom.contains(&format!("<h1>{title}")), "{dom}");
    }
    let tracker_dom = {
        let (b, url) = (browser.to_owned(), format!("{}/status", c.tracker_url));
        tokio::task::spawn_blocking(move || render(&b, &url)).await.expect("render")
    };
    assert!(tracker_dom.contains(&digest), "the tracker lists the swarm: {tracker_dom}");
    pull.await.expect("join").expect("the pull completes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_grafana_dashboard_asks_only_for_metrics_that_exist() {
    let c = Cluster::start(ClusterOptions::default()).await.expect("cluster");
    c.push_image("app/dash:v1", &[1 << 20], 41).await.expect("push");
    let agent = c.agents[0].registry_url.clone();
    pull_image(&c.client, &agent, "app/dash", "v1").await.expect("pull");
    let mut exposed = String::new();
    for url in [&agent, &c.origin_url, &c.tracker_url] {
        exposed.push_str(&metrics(&c.client, url).await);
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/shoal.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("dashboard")).expect("JSON");
    let mut names = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            let mut rest = expr;
            while let Some(at) = rest.find("shoal_") {
                let name: String =
                    rest[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                rest = &rest[at + name.len()..];
                names.push(name);
            }
        }
    }
    assert!(names.len() >= 10, "{names:?}");
    for name in names {
        let sample = exposed.lines().any(|l| !l.starts_with('#') && l.starts_with(&name));
        assert!(sample, "the dashboard asks for {name}, which no component exposes");
    }
}
