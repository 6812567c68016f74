//! The origin's durable store (`--store s3://...`) against a real S3-compatible server:
//! `moto_server` from PyPI's `moto[server]`, found in the tools virtualenv `.ci/run` sets up
//! (`$SHOAL_TOOLS_VENV`, default `~/.cache/shoal/install-venv`). Without it these tests print
//! a skip line locally and fail under `CI=true`.
//!
//! - An image pushed to an origin survives the loss of its disk: a fresh origin on an empty
//!   `--data` with the same `--store` serves it, tags included, to an agent and directly.
//! - The store going away during a push (its connections cut while the blob's multipart
//!   upload runs) answers 503 and leaves no blob visible, on the origin or in the bucket.
//! - An unreachable or misconfigured store stops the origin at startup with the URL named.
//!
//! `cargo test -p shoal-tests --test store -- --ignored --nocapture measure` measures push
//! and cold pull of a 256 MiB blob, S3-backed vs file-backed, in the same run.
//!
//! The S3 client reads its endpoint and keys from the `AWS_*` environment when an origin
//! starts, so origins are started one at a time under [`ENV`].

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use sha2::{Digest as _, Sha256};
use shoal_shared::tls::Role;
use shoal_tests::moto::{set_aws_env, Moto};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Held while the `AWS_*` environment is set and an origin reads it.
static ENV: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn missing(what: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{what} is required under CI=true (.ci/run installs it)");
    }
    eprintln!("SKIPPED: {what} not found");
}

/// `moto_server` of the tools virtualenv.
fn moto_bin() -> Option<PathBuf> {
    let bin = shoal_tests::moto::moto_bin();
    if bin.is_none() {
        missing("moto_server (moto[server] in $SHOAL_TOOLS_VENV)");
    }
    bin
}

/// A TCP relay in front of the store: stopping it is the store going away for the origin
/// (connections cut, new ones refused) while the server keeps what it holds, so the test can
/// look at the bucket afterwards.
struct Relay {
    addr: SocketAddr,
    target: SocketAddr,
    stop: CancellationToken,
}

impl Relay {
    async fn start(target: SocketAddr) -> anyhow::Result<Relay> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        Ok(Relay { addr, target, stop: Self::serve(listener, target) })
    }

    fn serve(listener: tokio::net::TcpListener, target: SocketAddr) -> CancellationToken {
        let stop = CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move {
            let conns = tokio_util::task::TaskTracker::new();
            loop {
                tokio::select! {
                    _ = token.cancelled() => break,
                    accepted = listener.accept() => {
                        let Ok((mut inbound, _)) = accepted else { continue };
                        let token = token.clone();
                        conns.spawn(async move {
                            let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else { return };
                            tokio::select! {
                                _ = token.cancelled() => {}
                                _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                            }
                        });
                    }
                }
            }
            // Dropping the listener and every connection: the store is gone.
        });
        stop
    }

    fn stop(&self) {
        self.stop.cancel();
    }

    /// Serves again on the same address.
    async fn restart(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if Instant::now() >= deadline => bail!("rebinding relay {}: {e}", self.addr),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        self.stop = Self::serve(listener, self.target);
        Ok(())
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// CA and certificates for one test.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> anyhow::Result<Pki> {
        let dir = tempfile::tempdir()?;
        shoal_shared::tls::init_ca(&dir.path().join("ca"))?;
        Ok(Pki { dir })
    }

    fn issue(&self, name: &str, role: Role) -> anyhow::Result<PathBuf> {
        let out = self.dir.path().join(name);
        shoal_shared::tls::issue(&self.dir.path().join("ca"), name, role, &out)?;
        Ok(out)
    }
}

/// An origin running in this process.
struct Origin {
    url: String,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), shoal_origin::OriginError>>,
}

impl Origin {
    /// Starts an origin on `data` with `store` (S3 endpoint `endpoint`), ready to serve.
    async fn start(
        data: &Path,
        store: Option<&str>,
        endpoint: Option<&str>,
        pki: &Pki,
    ) -> anyhow::Result<Origin> {
        let (http, peer) = (TcpListener::bind("127.0.0.1:0")?, UdpSocket::bind("127.0.0.1:0")?);
        let url = format!("http://{}", http.local_addr()?);
        let shutdown = CancellationToken::new();
        let _env = ENV.lock().await;
        let mut config = shoal_origin::Config::new(data.to_path_buf(), pki.issue("origin", Role::Origin)?);
        config.store = store.map(str::to_owned);
        config.piece_length = 1 << 20;
        if let Some(endpoint) = endpoint {
            set_aws_env(endpoint);
        }
        let task = tokio::spawn(shoal_origin::run(
            config,
            shoal_origin::Listeners { http, peer, internal: None },
            shutdown.clone(),
        ));
        let origin = Origin { url, shutdown, task };
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if origin.task.is_finished() {
                match origin.task.await.context("origin task")? {
                    Err(e) => bail!("origin stopped at startup: {e}"),
                    Ok(()) => bail!("origin stopped at startup"),
                }
            }
            if client
                .get(format!("{}/healthz", origin.url))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return Ok(origin);
            }
            ensure!(Instant::now() < deadline, "origin did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

/// A tracker and an agent in front of `origin`.
struct Puller {
    registry: String,
    shutdown: CancellationToken,
}

impl Drop for Puller {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Puller {
    async fn start(origin: &str, pki: &Pki, data: &Path) -> anyhow::Result<Puller> {
        let shutdown = CancellationToken::new();
        let tracker = TcpListener::bind("127.0.0.1:0")?;
        let tracker_url = format!("http://{}", tracker.local_addr()?);
        let mut config = shoal_tracker::Config::new(vec![origin.to_owned()]);
        config.announce_interval = 2;
        tokio::spawn(shoal_tracker::run(config, tracker, shutdown.clone()));
        let mut config =
            shoal_agent::Config::new(data.to_path_buf(), pki.issue("agent", Role::Agent)?, vec![tracker_url]);
        config.progress_timeout = 20;
        let (registry, peer) = (TcpListener::bind("127.0.0.1:0")?, UdpSocket::bind("127.0.0.1:0")?);
        let registry_url = format!("http://{}", registry.local_addr()?);
        // On its own runtime, as a separate process would be.
        std::thread::spawn({
            let shutdown = shutdown.clone();
            move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("agent runtime");
                let listeners = shoal_agent::Listeners { registry, peer, metrics: None };
                if let Err(e) = runtime.block_on(shoal_agent::run(config, listeners, shutdown)) {
                    tracing::error!(cause = %e, "agent failed");
                }
                runtime.shutdown_timeout(Duration::from_secs(5));
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        while !reqwest::get(format!("{registry_url}/v2/")).await.is_ok_and(|r| r.status().is_success()) {
            ensure!(Instant::now() < deadline, "agent did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Puller { registry: registry_url, shutdown })
    }
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// GETs `url` and checks the body's sha256.
async fn get_verified(client: &reqwest::Client, url: &str, digest: &str) -> anyhow::Result<Vec<u8>> {
    let resp = client.get(url).send().await.with_context(|| format!("GET {url}"))?;
    ensure!(resp.status().is_success(), "GET {url}: {}", resp.status());
    let body = resp.bytes().await?.to_vec();
    ensure!(sha256(&body) == digest, "GET {url}: content is {}, expected {digest}", sha256(&body));
    Ok(body)
}

async fn push(
    origin: &str,
    dir: &Path,
    tag: &str,
    layers: &[usize],
    seed: u64,
) -> anyhow::Result<shoal_tests::image::GeneratedImage> {
    let layout = dir.join(format!("layout-{seed}"));
    let short = tag.rsplit_once(':').map(|(_, t)| t.to_owned()).context("NAME:TAG")?;
    let image = shoal_tests::image::generate_oci_layout(&layout, &short, layers, seed)?;
    let source = shoal_origin::push::Source::Oci { dir: layout, reference: Some(short) };
    shoal_origin::push::push_with_token(origin, None, &source, tag, shoal_origin::push::Progress::Quiet)
        .await?;
    Ok(image)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_image_survives_the_loss_of_the_origins_disk() -> anyhow::Result<()> {
    shoal_tests::cluster::init_tracing();
    let Some(bin) = moto_bin() else { return Ok(()) };
    let moto = Moto::start(&bin).await?;
    moto.bucket("shoal").await?;
    let store = "s3://shoal/cluster-a";
    let (pki, dir) = (Pki::new()?, tempfile::tempdir()?);
    let client = reqwest::Client::builder().timeout(Duration::from_secs(120)).build()?;

    let first_disk = dir.path().join("origin-1");
    let origin = Origin::start(&first_disk, Some(store), Some(&moto.url()), &pki).await?;
    // A layer over the part size goes up as a multipart upload, the others in one request.
    let app = push(&origin.url, dir.path(), "team/app:v1", &[20 << 20, 300 << 10], 1).await?;
    let base = push(&origin.url, dir.path(), "team/app:v2", &[64 << 10], 2).await?;
    let other = push(&origin.url, dir.path(), "other:latest", &[10 << 10], 3).await?;
    let keys = moto.keys("shoal", "cluster-a/").await?;
    for d in [&app.manifest, &app.config, &app.layers[0].0] {
        let hex = d.trim_start_matches("sha256:");
        ensure!(keys.contains(&format!("cluster-a/blobs/sha256/{hex}")), "{d} not in the bucket: {keys:?}");
        ensure!(keys.contains(&format!("cluster-a/meta/{hex}")), "metainfo of {d} not in the bucket");
    }
    ensure!(keys.contains(&"cluster-a/tags/team/app/v1.tag".to_string()), "{keys:?}");
    origin.stop().await;

    // Every disk lost: a new origin on an empty data directory, the same store.
    std::fs::remove_dir_all(&first_disk)?;
    let origin = Origin::start(&dir.path().join("origin-2"), Some(store), Some(&moto.url()), &pki).await?;
    let tags: serde_json::Value =
        client.get(format!("{}/v2/team/app/tags/list", origin.url)).send().await?.json().await?;
    ensure!(tags["tags"] == serde_json::json!(["v1", "v2"]), "tags/list: {tags}");
    let unknown = format!("{}/v2/team/app/blobs/{}", origin.url, sha256(b"never pushed"));
    ensure!(client.head(&unknown).send().await?.status() == 404, "a blob in neither is unknown");

    // Through an agent: tag -> manifest -> every blob, each digest checked.
    let puller = Puller::start(&origin.url, &pki, &dir.path().join("agent")).await?;
    for (name, tag, image) in [("team/app", "v1", &app), ("team/app", "v2", &base)] {
        let url = format!("{}/v2/{name}/manifests/{tag}", puller.registry);
        let resp = client.get(&url).send().await?;
        ensure!(resp.status().is_success(), "GET {url}: {}", resp.status());
        let header =
            resp.headers().get("docker-content-digest").and_then(|v| v.to_str().ok()).map(str::to_owned);
        ensure!(header.as_deref() == Some(image.manifest.as_str()), "{name}:{tag} is {header:?}");
        ensure!(sha256(&resp.bytes().await?) == image.manifest, "{name}:{tag} manifest content");
        get_verified(
            &client,
            &format!("{}/v2/{name}/blobs/{}", puller.registry, image.config),
            &image.config,
        )
        .await?;
        for (layer, _) in &image.layers {
            get_verified(&client, &format!("{}/v2/{name}/blobs/{layer}", puller.registry), layer).await?;
        }
    }
    // And straight from the origin.
    let url = format!("{}/v2/other/manifests/latest", origin.url);
    get_verified(&client, &url, &other.manifest).await?;
    get_verified(
        &client,
        &format!("{}/v2/other/blobs/{}", origin.url, other.layers[0].0),
        &other.layers[0].0,
    )
    .await?;
    drop(puller);
    origin.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_that_goes_away_during_a_push_answers_503_and_shows_nothing() -> anyhow::Result<()> {
    shoal_tests::cluster::init_tracing();
    let Some(bin) = moto_bin() else { return Ok(()) };
    let moto = Moto::start(&bin).await?;
    moto.bucket("shoal").await?;
    let mut relay = Relay::start(moto.addr).await?;
    let (pki, dir) = (Pki::new()?, tempfile::tempdir()?);
    let data = dir.path().join("origin");
    let endpoint = format!("http://{}", relay.addr);
    let origin = Origin::start(&data, Some("s3://shoal/p"), Some(&endpoint), &pki).await?;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(300)).build()?;

    // A blob of many parts, uploaded in chunks; the last PUT commits it.
    let blob: Vec<u8> = (0..96u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let digest = sha256(&blob);
    let resp = client.post(format!("{}/v2/big/blobs/uploads/", origin.url)).send().await?;
    ensure!(resp.status() == 202, "start upload: {}", resp.status());
    let location = resp.headers()["location"].to_str()?.to_owned();
    let resp = client.patch(format!("{}{location}", origin.url)).body(blob.clone()).send().await?;
    ensure!(resp.status() == 202, "patch: {}", resp.status());
    let commit = tokio::spawn({
        let url = format!("{}{location}?digest={digest}", origin.url);
        let client = client.clone();
        async move { client.put(url).send().await }
    });
    // The store goes away while the blob's multipart upload is in progress.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !moto.uploading("shoal").await? {
        ensure!(!commit.is_finished(), "the commit ended before its upload was seen");
        ensure!(Instant::now() < deadline, "no multipart upload started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    relay.stop();
    let started = Instant::now();
    let resp = commit.await??;
    eprintln!("commit answered {} {:.1?} after the store went away", resp.status(), started.elapsed());
    ensure!(resp.status() == 503, "commit with the store gone: {}", resp.status());

    let hex = digest.trim_start_matches("sha256:");
    ensure!(!data.join("blobs").join(hex).exists(), "the blob was published locally");
    ensure!(std::fs::read_dir(data.join("tmp"))?.count() == 0, "temp files left behind");
    let keys = moto.keys("shoal", "p/blobs/").await?;
    ensure!(keys.is_empty(), "a blob object is visible in the store: {keys:?}");

    // Back again: still unknown, and a new push lands.
    relay.restart().await?;
    let blob_url = format!("{}/v2/big/blobs/{digest}", origin.url);
    ensure!(client.head(&blob_url).send().await?.status() == 404, "HEAD of the failed blob");
    let resp = client
        .post(format!("{}/v2/big/blobs/uploads/?digest={digest}", origin.url))
        .body(blob.clone())
        .send()
        .await?;
    ensure!(resp.status() == 201, "push with the store back: {}", resp.status());
    ensure!(moto.keys("shoal", &format!("p/blobs/sha256/{hex}")).await?.len() == 1, "blob not in the store");
    get_verified(&client, &blob_url, &digest).await?;
    origin.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_or_wrong_store_stops_the_origin_at_startup() -> anyhow::Result<()> {
    shoal_tests::cluster::init_tracing();
    let (pki, dir) = (Pki::new()?, tempfile::tempdir()?);
    let closed = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let err =
        Origin::start(&dir.path().join("a"), Some("s3://nowhere/x"), Some(&format!("http://{closed}")), &pki)
            .await
            .err()
            .context("an origin started on an unreachable store")?;
    ensure!(format!("{err:#}").contains("s3://nowhere/x"), "error does not name the URL: {err:#}");

    let err = Origin::start(&dir.path().join("b"), Some("ftp://host/x"), None, &pki)
        .await
        .err()
        .context("an origin started on a bad URL")?;
    ensure!(format!("{err:#}").contains("ftp://host/x"), "{err:#}");

    let Some(bin) = moto_bin() else { return Ok(()) };
    let moto = Moto::start(&bin).await?;
    let err = Origin::start(&dir.path().join("c"), Some("s3://no-such-bucket/x"), Some(&moto.url()), &pki)
        .await
        .err()
        .context("an origin started on a missing bucket")?;
    ensure!(format!("{err:#}").contains("s3://no-such-bucket/x"), "{err:#}");
    Ok(())
}

/// Push and cold pull of a 256 MiB blob: S3-backed (moto) vs file-backed, same run.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "measurement; run by name"]
async fn measure() -> anyhow::Result<()> {
    let Some(bin) = moto_bin() else { return Ok(()) };
    let moto = Moto::start(&bin).await?;
    moto.bucket("bench").await?;
    let (pki, dir) = (Pki::new()?, tempfile::tempdir()?);
    let client = reqwest::Client::builder().timeout(Duration::from_secs(600)).build()?;
    let size = 256usize << 20;
    let blob: Vec<u8> = (0..size as u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let digest = sha256(&blob);
    let mib = size as f64 / (1 << 20) as f64;
    for (label, store) in [("file", None), ("s3 (moto)", Some("s3://bench/m"))] {
        let data = dir.path().join(label.replace(' ', "-"));
        let origin = Origin::start(&data, store, store.map(|_| moto.url()).as_deref(), &pki).await?;
        let started = Instant::now();
        let resp = client
            .post(format!("{}/v2/bench/blobs/uploads/?digest={digest}", origin.url))
            .body(blob.clone())
            .send()
            .await?;
        ensure!(resp.status() == 201, "{label} push: {}", resp.status());
        let push = started.elapsed();
        // Cold: the S3-backed origin restarts on an empty disk and fills from the store; the
        // file-backed one restarts on its disk.
        origin.stop().await;
        if store.is_some() {
            std::fs::remove_dir_all(&data)?;
        }
        let origin = Origin::start(&data, store, store.map(|_| moto.url()).as_deref(), &pki).await?;
        let started = Instant::now();
        get_verified(&client, &format!("{}/v2/bench/blobs/{digest}", origin.url), &digest).await?;
        let pull = started.elapsed();
        println!(
            "{label}: push {:.2}s ({:.0} MiB/s), cold pull {:.2}s ({:.0} MiB/s)",
            push.as_secs_f64(),
            mib / push.as_secs_f64(),
            pull.as_secs_f64(),
            mib / pull.as_secs_f64()
        );
        origin.stop().await;
    }
    Ok(())
}
