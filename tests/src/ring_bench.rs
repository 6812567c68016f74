//! `shoal-bench ring`: what a ring of origins costs and how it recovers, against one origin
//! in the same run. Pushes and cold-pulls one blob through an agent on a single file-backed
//! origin, on a 3-origin ring (2 owners per blob, 2 trackers), and on the same ring backed by
//! a real S3-compatible server (`moto_server`, when the tools virtualenv has it), also after
//! every origin lost its disk (so the pull fills from the store); then kills an owner of a
//! set of images and times how long until pulls succeed again and until every blob is back
//! on two live origins (the repair pass), with the bytes repair copied.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::cluster::{pull_image, Cluster, ClusterOptions};
use crate::ring_cluster::{RingCluster, RingOptions};

/// What to measure.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Size of the one-layer image pushed and cold-pulled, in MiB.
    #[arg(long, default_value_t = 256)]
    pub size_mib: u64,
    /// Images (one layer each) pushed before an owner is killed.
    #[arg(long, default_value_t = 8)]
    pub images: usize,
    /// Size of each of those images' layer, in MiB.
    #[arg(long, default_value_t = 16)]
    pub image_mib: u64,
    /// Skip the S3-backed ring.
    #[arg(long)]
    pub no_s3: bool,
}

/// The S3-backed ring's times.
struct S3Ring {
    push: Duration,
    pull: Duration,
    /// A cold pull through a fresh agent after every origin restarted on an empty disk.
    pull_from_store: Duration,
}

/// Pushes a `size`-byte blob to a 3-origin ring sharing one S3 store (a `moto_server` from
/// `bin`), cold-pulls it through an agent, then wipes every origin's disk, restarts them and
/// cold-pulls it through another agent.
async fn s3_ring(bin: &std::path::Path, size: usize, piece: u32) -> anyhow::Result<S3Ring> {
    let moto = crate::moto::Moto::start(bin).await?;
    moto.bucket("bench").await?;
    // Read by the origins' S3 clients as they start; nothing else in this process reads it.
    crate::moto::set_aws_env(&moto.url());
    let options = RingOptions {
        agents: 2,
        piece_length: piece,
        store: Some("s3://bench/ring".into()),
        ..Default::default()
    };
    let mut ring = RingCluster::start(options).await?;
    let started = Instant::now();
    let image = ring.push_image(0, "bench/s3:v1", &[size], 1).await?;
    let push = started.elapsed();
    let started = Instant::now();
    let pulled = pull_image(&ring.client, &ring.agents[0].registry_url, "bench/s3", "v1").await?;
    let pull = started.elapsed();
    anyhow::ensure!(pulled.manifest_digest == image.manifest, "wrong image");
    for i in 0..ring.origins.len() {
        ring.stop_origin(i).await;
        std::fs::remove_dir_all(&ring.origins[i].data).context("wiping an origin's disk")?;
    }
    for i in 0..ring.origins.len() {
        ring.restart_origin(i).await?;
    }
    let started = Instant::now();
    let pulled = pull_image(&ring.client, &ring.agents[1].registry_url, "bench/s3", "v1").await?;
    let pull_from_store = started.elapsed();
    anyhow::ensure!(pulled.manifest_digest == image.manifest, "wrong image from the store");
    Ok(S3Ring { push, pull, pull_from_store })
}

fn rate(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / took.as_secs_f64().max(1e-9) / 1e6
}

/// Runs the benchmark and returns its report.
pub async fn run(opts: Options) -> anyhow::Result<String> {
    let size = (opts.size_mib << 20) as usize;
    let piece = 4 << 20;
    let mut out = String::new();

    // One origin.
    let single =
        Cluster::start(ClusterOptions { agents: 1, piece_length: piece, ..Default::default() }).await?;
    let started = Instant::now();
    let image = single.push_image("bench/one:v1", &[size], 1).await?;
    let push_single = started.elapsed();
    let started = Instant::now();
    let pulled = pull_image(&single.client, &single.agents[0].registry_url, "bench/one", "v1").await?;
    let pull_single = started.elapsed();
    anyhow::ensure!(pulled.manifest_digest == image.manifest, "wrong image");
    drop(single);

    // The ring.
    let mut ring =
        RingCluster::start(RingOptions { agents: 2, piece_length: piece, ..Default::default() }).await?;
    let started = Instant::now();
    let image = ring.push_image(0, "bench/one:v1", &[size], 1).await?;
    let push_ring = started.elapsed();
    let started = Instant::now();
    let pulled = pull_image(&ring.client, &ring.agents[0].registry_url, "bench/one", "v1").await?;
    let pull_ring = started.elapsed();
    anyhow::ensure!(pulled.manifest_digest == image.manifest, "wrong image");
    let bytes = pulled.total_bytes;
    writeln!(out, "blob of {} MiB, 4 MiB pieces, one agent, cold", opts.size_mib)?;
    writeln!(
        out,
        "  one origin:          push {:>7.2}s ({:>7.1} MB/s)  cold pull {:>6.2}s ({:>7.1} MB/s)",
        push_single.as_secs_f64(),
        rate(bytes, push_single),
        pull_single.as_secs_f64(),
        rate(bytes, pull_single)
    )?;
    writeln!(
        out,
        "  ring of 3, 2 owners: push {:>7.2}s ({:>7.1} MB/s)  cold pull {:>6.2}s ({:>7.1} MB/s)",
        push_ring.as_secs_f64(),
        rate(bytes, push_ring),
        pull_ring.as_secs_f64(),
        rate(bytes, pull_ring)
    )?;
    writeln!(
        out,
        "  ring / one origin:   push {:.2}x the time, cold pull {:.2}x the time",
        push_ring.as_secs_f64() / push_single.as_secs_f64(),
        pull_ring.as_secs_f64() / pull_single.as_secs_f64()
    )?;
    match crate::moto::moto_bin().filter(|_| !opts.no_s3) {
        Some(bin) => {
            let s3 = s3_ring(&bin, size, piece).await?;
            let line = |label: &str, push: Option<Duration>, pull: Duration| {
                let push = push.map_or(String::from("                            "), |p| {
                    format!("push {:>7.2}s ({:>7.1} MB/s)", p.as_secs_f64(), rate(bytes, p))
                });
                format!(
                    "  {label:<20} {push}  cold pull {:>6.2}s ({:>7.1} MB/s)  {:.2}x one origin's pull time",
                    pull.as_secs_f64(),
                    rate(bytes, pull),
                    pull.as_secs_f64() / pull_single.as_secs_f64()
                )
            };
            writeln!(out, "{}", line("ring over S3 (moto):", Some(s3.push), s3.pull))?;
            writeln!(out, "{}", line("  origins' disks lost:", None, s3.pull_from_store))?;
        }
        None => writeln!(out, "  ring over S3: skipped (no moto_server in $SHOAL_TOOLS_VENV, or --no-s3)")?,
    }

    // An owner dies under a set of images that origin 0 took.
    let mut images = Vec::new();
    for i in 0..opts.images {
        let tag = format!("bench/set{i}:v1");
        images.push(ring.push_image(0, &tag, &[(opts.image_mib << 20) as usize], 100 + i as u64).await?);
    }
    let blobs: Vec<(String, u64)> = images.iter().flat_map(|im| im.layers.clone()).collect();
    // The other owner of the most layers origin 0 owns: the most repair work.
    let mut counts = vec![0usize; ring.origins.len()];
    for (b, _) in &blobs {
        let holders = ring.holders(b);
        if holders.len() == 2 && holders.contains(&0) {
            for h in holders.into_iter().filter(|&h| h != 0) {
                counts[h] += 1;
            }
        }
    }
    let victim = (1..counts.len()).max_by_key(|&i| counts[i]).context("no other origin")?;
    let lost: Vec<&(String, u64)> = blobs.iter().filter(|(b, _)| ring.holders(b).contains(&victim)).collect();
    let to_copy: u64 =
        blobs.iter().filter(|(b, _)| ring.holders(b) == vec![0, victim]).map(|(_, s)| *s).sum();
    let killed = Instant::now();
    ring.stop_origin(victim).await;
    // Pulls through an agent that holds nothing of these images.
    let agent = ring.agents[1].registry_url.clone();
    let mut first_ok = None;
    for (i, _) in images.iter().enumerate() {
        let name = format!("bench/set{i}");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            match pull_image(&ring.client, &agent, &name, "v1").await {
                Ok(_) => break,
                Err(e) if Instant::now() > deadline => return Err(e.context("pull after an owner died")),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        first_ok.get_or_insert_with(|| killed.elapsed());
    }
    let all_pulled = killed.elapsed();
    let live = |r: &RingCluster, b: &str| r.holders(b).into_iter().filter(|&h| h != victim).count();
    let deadline = Instant::now() + Duration::from_secs(300);
    while blobs.iter().any(|(b, _)| live(&ring, b) < 2) {
        anyhow::ensure!(Instant::now() < deadline, "repair did not finish in 300 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let repaired = killed.elapsed();
    writeln!(
        out,
        "owner killed under {} images of {} MiB ({} of their layers on it, {} MiB left with one copy)",
        opts.images,
        opts.image_mib,
        lost.len(),
        to_copy >> 20
    )?;
    writeln!(
        out,
        "  first pull succeeded {:.2}s after the kill; all {} pulled (fresh agent) after {:.2}s",
        first_ok.unwrap_or_default().as_secs_f64(),
        opts.images,
        all_pulled.as_secs_f64()
    )?;
    writeln!(
        out,
        "  every blob on two live origins again after {:.2}s (repair pass every {}s): {:.1} MB/s of repair copies over that time",
        repaired.as_secs_f64(),
        shoal_origin::cluster::REPAIR_EVERY.as_secs(),
        rate(to_copy, repaired)
    )?;
    Ok(out)
}
