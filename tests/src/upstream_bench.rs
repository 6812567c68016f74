//! `shoal-bench pull-through`: what a pull-through costs and saves, against a real CNCF
//! distribution registry (`/usr/bin/docker-registry`) as the upstream.
//!
//! One image with one large layer is pushed to the registry. Then, in one run, with the
//! same blob: a direct GET from the registry (the baseline); a cold GET through agent 1
//! (the origin fetches the blob from the registry once, then the agent swarms it from the
//! origin); the other agents at once (from the origin and agent 1); agent 1 again (hot).
//! It prints each as a throughput ratio to the direct GET, and how many times the registry
//! served the blob (the single-flight figure: must be 1).

use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};

use crate::cluster::{fetch_blob, Cluster, ClusterOptions, UpstreamOptions};
use crate::registry::Registry;

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    pub size_mib: u64,
    pub agents: usize,
    pub piece_length: u32,
}

const NAME: &str = "bench/big";

async fn timed<F: std::future::Future<Output = anyhow::Result<u64>>>(
    f: F,
) -> anyhow::Result<(Duration, u64)> {
    let start = Instant::now();
    let bytes = f.await?;
    Ok((start.elapsed(), bytes))
}

fn line(out: &mut String, what: &str, d: Duration, bytes: u64, base: f64) {
    use std::fmt::Write as _;
    let rate = bytes as f64 / d.as_secs_f64() / 1e6;
    let _ = writeln!(out, "{what:<46} {:>8.2} s {:>9.1} MB/s {:>7.2}x", d.as_secs_f64(), rate, rate / base);
}

/// Runs the benchmark and returns the printed report.
pub async fn run(opts: Options) -> anyhow::Result<String> {
    ensure!(opts.agents >= 2, "need at least 2 agents");
    let registry = Registry::start(None).await.context("starting docker-registry")?;
    let size = usize::try_from(opts.size_mib << 20).context("size")?;
    let pushed =
        registry.push_image(&format!("{NAME}:v1"), &[size], 99).await.context("pushing to the registry")?;
    let (layer, layer_size) = pushed.layers.first().cloned().context("no layer")?;
    let cluster = Cluster::start(ClusterOptions {
        agents: opts.agents,
        piece_length: opts.piece_length,
        progress_timeout: 120,
        upstream: Some(UpstreamOptions::new(&registry.url())),
        ..Default::default()
    })
    .await?;
    let client = &cluster.client;

    let (direct, bytes) = timed(fetch_blob(client, &registry.url(), NAME, &layer, Some(layer_size))).await?;
    let base = bytes as f64 / direct.as_secs_f64() / 1e6;
    let first = &cluster.agents[0].registry_url;
    let (cold, _) = timed(fetch_blob(client, first, NAME, &layer, Some(layer_size))).await?;
    let rest = cluster.agents[1..]
        .iter()
        .map(|a| fetch_blob(client, &a.registry_url, NAME, &layer, Some(layer_size)));
    let (warm, _) = timed(async {
        for r in futures_util::future::join_all(rest).await {
            r?;
        }
        Ok(layer_size)
    })
    .await?;
    let (hot, _) = timed(fetch_blob(client, first, NAME, &layer, Some(layer_size))).await?;
    let upstream_gets = registry.blob_gets(&layer);

    let mut out = String::new();
    out.push_str(&format!(
        "blob {} MiB, piece {} KiB, {} agents, upstream: CNCF distribution registry on loopback\n",
        layer_size >> 20,
        opts.piece_length >> 10,
        opts.agents
    ));
    out.push_str(&format!("{:<46} {:>10} {:>14} {:>8}\n", "phase", "time", "throughput", "ratio"));
    line(&mut out, "direct GET from the upstream registry", direct, bytes, base);
    line(&mut out, "cold via agent 1 (origin pulls through)", cold, layer_size, base);
    let n = (opts.agents - 1) as u64;
    line(&mut out, &format!("agents 2..{} at once (aggregate)", opts.agents), warm, layer_size * n, base);
    line(&mut out, "hot via agent 1 (its cache)", hot, layer_size, base);
    // The baseline's own GET is one of them.
    out.push_str(&format!(
        "upstream GETs of the blob caused by Shoal: {} (pulls through agents: {}; single-flight target: 1)\n",
        upstream_gets.saturating_sub(1),
        opts.agents + 1
    ));
    Ok(out)
}
