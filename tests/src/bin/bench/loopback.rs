//! The loopback cluster `pull` and `load` run against (tracker, origin and one agent on
//! 127.0.0.1, with certificates from the origin's CA tool) and the pseudo-random blob they
//! upload to the origin.

use std::fs::File;
use std::io::{BufWriter, Write as _};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{RngCore as _, SeedableRng as _};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncReadExt as _;

use crate::cluster::{free_tcp_port, free_udp_port, run_tool, s, wait_healthy, Bins, Cluster};
use crate::{CHUNK, MIB};

/// A loopback cluster of real processes: tracker, origin, one agent.
pub(crate) struct Loopback {
    pub(crate) http: reqwest::Client,
    pub(crate) tracker_url: String,
    pub(crate) origin_url: String,
    pub(crate) agent_url: String,
    /// Index of each in the [`Cluster`]'s processes.
    pub(crate) tracker: usize,
    pub(crate) origin: usize,
    pub(crate) agent: usize,
}

/// Issues certificates and starts tracker, origin and agent on free loopback ports.
pub(crate) async fn start_loopback(
    dir: &Path,
    bins: &Bins,
    piece_length: u32,
    cluster: &mut Cluster,
) -> anyhow::Result<Loopback> {
    let (origin_bin, tracker_bin, agent_bin) = (&bins.origin, &bins.tracker, &bins.agent);
    // Certificates.
    let ca = dir.join("ca");
    let path = |p: &Path| p.to_str().map(str::to_owned).context("non-UTF-8 temp path");
    run_tool(origin_bin, &["ca", "init", &path(&ca)?])?;
    for node in ["origin", "agent"] {
        run_tool(
            origin_bin,
            &[
                "ca",
                "issue",
                "--ca",
                &path(&ca)?,
                "--name",
                node,
                "--role",
                node,
                &path(&dir.join(node).join("tls"))?,
            ],
        )?;
    }

    // Ports: bind :0 to find free ones, release them, hand them to the servers.
    let tracker_http = free_tcp_port()?;
    let origin_http = free_tcp_port()?;
    let origin_peer = free_udp_port()?;
    let agent_http = free_tcp_port()?;
    let agent_peer = free_udp_port()?;
    let tracker_url = format!("http://{tracker_http}");
    let origin_url = format!("http://{origin_http}");
    let agent_url = format!("http://{agent_http}");

    let tracker = cluster.spawn(
        "tracker",
        tracker_bin,
        &[s("serve"), s("--http"), s(tracker_http), s("--origin"), origin_url.clone()],
        dir,
    )?;
    let origin = cluster.spawn(
        "origin",
        origin_bin,
        &[
            s("serve"),
            s("--http"),
            s(origin_http),
            s("--peer"),
            s(origin_peer),
            s("--data"),
            path(&dir.join("origin").join("data"))?,
            s("--tls"),
            path(&dir.join("origin").join("tls"))?,
            s("--piece-length"),
            s(piece_length),
        ],
        dir,
    )?;
    let agent = cluster.spawn(
        "agent",
        agent_bin,
        &[
            s("serve"),
            s("--registry"),
            s(agent_http),
            s("--peer"),
            s(agent_peer),
            s("--data"),
            path(&dir.join("agent").join("data"))?,
            s("--tls"),
            path(&dir.join("agent").join("tls"))?,
            s("--tracker"),
            tracker_url.clone(),
        ],
        dir,
    )?;

    let http = reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(5))
        .build()
        .context("http client")?;
    for url in [format!("{tracker_url}/healthz"), format!("{origin_url}/healthz"), format!("{agent_url}/v2/")]
    {
        wait_healthy(&http, &url, cluster).await?;
    }
    Ok(Loopback { http, tracker_url, origin_url, agent_url, tracker, origin, agent })
}

/// Generates a pseudo-random blob of `size` bytes and uploads it to the origin as
/// `bench/blob`; returns its digest.
pub(crate) async fn upload_blob(lb: &Loopback, dir: &Path, size: u64, seed: u64) -> anyhow::Result<String> {
    let blob_path = dir.join("blob.bin");
    let started = Instant::now();
    let digest = {
        let blob_path = blob_path.clone();
        tokio::task::spawn_blocking(move || write_random_blob(&blob_path, size, seed)).await??
    };
    eprintln!("generated {} MiB blob {digest} in {:.1?}", size / MIB, started.elapsed());

    // Monolithic upload with a streaming body.
    let started = Instant::now();
    let file = tokio::fs::File::open(&blob_path).await.context("open blob")?;
    let body = futures_util::stream::unfold(file, |mut file| async move {
        let mut buf = vec![0u8; CHUNK];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(Bytes::from(buf)), file))
            }
            Err(e) => Some((Err(e), file)),
        }
    });
    let resp = lb
        .http
        .post(format!("{}/v2/bench/blob/blobs/uploads/?digest={digest}", lb.origin_url))
        .header(reqwest::header::CONTENT_LENGTH, size)
        .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .context("uploading the blob to the origin")?;
    let status = resp.status();
    ensure!(status.as_u16() == 201, "upload answered {status}: {}", resp.text().await.unwrap_or_default());
    eprintln!("uploaded to the origin in {:.1?}", started.elapsed());
    // The local file is no longer needed; free the disk space.
    let _ = std::fs::remove_file(&blob_path);
    Ok(digest)
}

/// Writes `size` pseudo-random bytes to `path` chunk by chunk; returns `sha256:<hex>`.
pub(crate) fn write_random_blob(path: &Path, size: u64, seed: u64) -> anyhow::Result<String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = BufWriter::with_capacity(CHUNK, File::create(path).context("create blob file")?);
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut left = size;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        hash.update(&buf[..n]);
        out.write_all(&buf[..n]).context("write blob file")?;
        left -= n as u64;
    }
    out.into_inner().map_err(|e| e.into_error()).context("flush blob file")?.sync_all()?;
    Ok(format!("sha256:{}", hex::encode(hash.finalize())))
}
