//! Timed downloads: a GET whose body is discarded as it streams and sha256-verified on a
//! separate thread, this machine's sha256 speed (the bound on a verified run), and the
//! origin's served-bytes counter.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use bytes::Bytes;
use sha2::{Digest as _, Sha256};

use crate::{CHUNK, MB};

/// GETs `url` and discards the body; returns the time from sending the request until the
/// last byte arrived and, with `digest`, was sha256-verified by a separate thread (hashing
/// overlaps the transfer, but a verified run cannot be faster than this machine's sha256).
/// Without `digest` only the length is checked.
pub(crate) async fn fetch(
    http: &reqwest::Client,
    url: &str,
    size: u64,
    digest: Option<&str>,
) -> anyhow::Result<Duration> {
    let (tx, hasher) = match digest {
        Some(_) => {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Bytes>(64);
            let hasher = std::thread::spawn(move || {
                let mut hash = Sha256::new();
                for chunk in rx {
                    hash.update(&chunk);
                }
                format!("sha256:{}", hex::encode(hash.finalize()))
            });
            (Some(tx), Some(hasher))
        }
        None => (None, None),
    };
    let started = Instant::now();
    let received = async {
        let mut resp = http.get(url).send().await.with_context(|| format!("GET {url}"))?;
        let status = resp.status();
        if !status.is_success() {
            bail!("GET {url}: {status}: {}", resp.text().await.unwrap_or_default());
        }
        let mut len = 0u64;
        while let Some(chunk) = resp.chunk().await.with_context(|| format!("reading {url}"))? {
            len += chunk.len() as u64;
            if let Some(tx) = &tx {
                tx.send(chunk).map_err(|_| anyhow::anyhow!("hasher thread gone"))?;
            }
        }
        Ok(len)
    }
    .await;
    drop(tx);
    let actual = match hasher {
        Some(h) => Some(h.join().map_err(|_| anyhow::anyhow!("hasher thread panicked"))?),
        None => None,
    };
    let elapsed = started.elapsed();
    let len = received?;
    ensure!(len == size, "GET {url}: got {len} bytes, expected {size}");
    if let (Some(expected), Some(actual)) = (digest, actual) {
        ensure!(actual == expected, "GET {url}: body has digest {actual}, expected {expected}");
    }
    eprintln!(
        "    {:.0} MB/s ({:.2?}){}",
        size as f64 / MB / elapsed.as_secs_f64(),
        elapsed,
        if digest.is_some() { ", sha256 OK" } else { ", length OK" }
    );
    Ok(elapsed)
}

/// This machine's single-thread sha256 speed in MB/s (over 64 MiB).
pub(crate) fn sha256_rate() -> f64 {
    let buf = vec![0x5au8; CHUNK];
    let mut hash = Sha256::new();
    let started = Instant::now();
    for _ in 0..64 {
        hash.update(&buf);
    }
    std::hint::black_box(hash.finalize());
    (64 * CHUNK) as f64 / MB / started.elapsed().as_secs_f64()
}

/// `shoal_peer_bytes_served_total` from the origin's `/metrics` (summed over label sets).
pub(crate) async fn peer_bytes_served(http: &reqwest::Client, origin_url: &str) -> Option<f64> {
    let text = http.get(format!("{origin_url}/metrics")).send().await.ok()?.text().await.ok()?;
    let values: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with("shoal_peer_bytes_served_total"))
        .filter_map(|l| l.split_whitespace().last()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}
