//! The load test behind `shoal-bench load`: many clients at once against real processes,
//! reported as latency percentiles and resident memory, next to a baseline measured in the
//! same run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures_util::StreamExt as _;
use tokio::sync::Barrier;

/// Latencies of one phase, and what failed.
#[derive(Debug, Default)]
pub struct Latencies {
    samples: Vec<Duration>,
    pub errors: usize,
    /// Wall time of the whole phase.
    pub elapsed: Duration,
}

impl Latencies {
    /// The `p`th percentile (0 to 100) of the successful requests.
    pub fn percentile(&self, p: f64) -> Duration {
        let mut sorted = self.samples.clone();
        sorted.sort();
        let Some(last) = sorted.len().checked_sub(1) else { return Duration::ZERO };
        sorted[((p / 100.0) * last as f64).round() as usize]
    }

    pub fn count(&self) -> usize {
        self.samples.len()
    }
}

/// `clients` GETs of `url` started at the same moment, each on its own connection, each
/// body read in full and length-checked against `size`.
pub async fn concurrent_gets(url: &str, clients: usize, size: u64) -> anyhow::Result<Latencies> {
    let http = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(120))
        .build()
        .context("http client")?;
    let barrier = Arc::new(Barrier::new(clients));
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (http, url, barrier) = (http.clone(), url.to_owned(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                let t = Instant::now();
                let resp = http.get(&url).send().await.ok().filter(|r| r.status().is_success())?;
                let mut body = resp.bytes_stream();
                let mut len = 0u64;
                while let Some(chunk) = body.next().await {
                    len += chunk.ok()?.len() as u64;
                }
                (len == size).then(|| t.elapsed())
            })
        })
        .collect();
    let mut out = Latencies::default();
    for task in tasks {
        match task.await {
            Ok(Some(d)) => out.samples.push(d),
            _ => out.errors += 1,
        }
    }
    out.elapsed = started.elapsed();
    Ok(out)
}

/// `peers` simulated agents (127.0.0.1, one port each), each re-announcing the same `blobs`
/// seeded blobs in one batch, as fast as `concurrency` requests in flight allow, for
/// `duration`: the tracker's sustained announce rate and its latency.
pub async fn announce_load(
    tracker: &str,
    peers: u16,
    blobs: usize,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<Latencies> {
    let http = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(30)).build()?;
    let bodies: Vec<String> = (0..peers)
        .map(|p| {
            let blobs: Vec<serde_json::Value> = (0..blobs)
                .map(|b| {
                    let digest = shoal_shared::digest::Digest::of(format!("load {p} {b}").as_bytes());
                    serde_json::json!({ "digest": digest, "complete": true })
                })
                .collect();
            serde_json::json!({ "peer": format!("127.0.0.1:{}", 20_000 + p), "blobs": blobs }).to_string()
        })
        .collect();
    let bodies = Arc::new(bodies);
    let url = format!("{tracker}/shoal/v1/announce/batch");
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|w| {
            let (http, url, bodies) = (http.clone(), url.clone(), bodies.clone());
            tokio::spawn(async move {
                let mut out = Latencies::default();
                let mut i = w;
                while started.elapsed() < duration {
                    let body = bodies[i % bodies.len()].clone();
                    i += concurrency;
                    let t = Instant::now();
                    let ok = http
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(body)
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success());
                    if ok {
                        out.samples.push(t.elapsed());
                    } else {
                        out.errors += 1;
                    }
                }
                out
            })
        })
        .collect();
    let mut all = Latencies::default();
    for w in workers {
        let part = w.await.context("announce worker")?;
        all.samples.extend(part.samples);
        all.errors += part.errors;
    }
    all.elapsed = started.elapsed();
    Ok(all)
}

/// A `kB` field (`VmRSS`, `VmHWM`, ...) of `/proc/<process>/status`; `process` is a pid or
/// `self`.
pub fn status_kib(process: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{process}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// `VmRSS` and `VmHWM` of process `pid`, in MiB.
pub fn rss_mib(pid: u32) -> (f64, f64) {
    let mib = |field| status_kib(&pid.to_string(), field).map_or(0.0, |kib| kib as f64 / 1024.0);
    (mib("VmRSS"), mib("VmHWM"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let l = Latencies {
            samples: (1..=100).rev().map(Duration::from_millis).collect(),
            errors: 0,
            elapsed: Duration::ZERO,
        };
        assert_eq!(l.percentile(50.0), Duration::from_millis(51));
        assert_eq!(l.percentile(99.0), Duration::from_millis(99));
        assert_eq!(l.percentile(100.0), Duration::from_millis(100));
        assert_eq!(Latencies::default().percentile(99.0), Duration::ZERO);
    }
}
