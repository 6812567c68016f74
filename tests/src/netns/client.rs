//! The HTTP client the benchmark runs inside a host's namespace (`shoal-bench netns-client`).
//!
//! A process per host, because a socket belongs to the namespace of the process that opens
//! it. `pull` prints `ready`, waits for a line on stdin (so all hosts start together, at a
//! time the parent records), GETs the blob while hashing it, and prints one JSON [`PullReport`].

use std::io::BufRead as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context as _};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Largest body `body` prints (metrics pages).
const MAX_BODY: usize = 4 << 20;

/// `shoal-bench netns-client` modes.
#[derive(Debug, clap::Subcommand)]
pub enum ClientCmd {
    /// Poll URL until it answers 2xx.
    Wait {
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 30)]
        timeout_secs: u64,
    },
    /// Print the body of URL (at most 4 MiB).
    Body {
        #[arg(long)]
        url: String,
    },
    /// Print `ready`, wait for a stdin line, GET URL, check its length and sha256, print a
    /// JSON report.
    Pull {
        #[arg(long)]
        url: String,
        #[arg(long)]
        size: u64,
        #[arg(long)]
        digest: String,
    },
}

/// What one host's `pull` measured; times are Unix nanoseconds of the machine's clock, which
/// every namespace shares.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PullReport {
    pub error: Option<String>,
    pub bytes: u64,
    pub sent_unix_ns: u64,
    pub first_byte_unix_ns: u64,
    pub done_unix_ns: u64,
    /// CPU seconds this client used (user + system), hashing included.
    pub cpu_secs: f64,
}

pub fn unix_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// Runs one client mode on a single-threaded runtime.
pub fn main(cmd: ClientCmd) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("tokio runtime")?;
    let http = reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(5))
        .build()
        .context("http client")?;
    match cmd {
        ClientCmd::Wait { url, timeout_secs } => rt.block_on(async {
            let deadline = std::time::Instant::now() + Duration::from_secs(timeout_secs);
            loop {
                if let Ok(resp) = http.get(&url).timeout(Duration::from_secs(2)).send().await {
                    if resp.status().is_success() {
                        return Ok(());
                    }
                }
                ensure!(std::time::Instant::now() < deadline, "{url} not healthy after {timeout_secs} s");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }),
        ClientCmd::Body { url } => rt.block_on(async {
            let mut resp =
                http.get(&url).timeout(Duration::from_secs(10)).send().await?.error_for_status()?;
            let mut body = Vec::new();
            while let Some(chunk) = resp.chunk().await? {
                ensure!(body.len() + chunk.len() <= MAX_BODY, "{url}: body over {MAX_BODY} bytes");
                body.extend_from_slice(&chunk);
            }
            print!("{}", String::from_utf8_lossy(&body));
            Ok(())
        }),
        ClientCmd::Pull { url, size, digest } => {
            println!("ready");
            let mut line = String::new();
            std::io::stdin().lock().read_line(&mut line).context("waiting for the start line")?;
            let mut report = PullReport {
                error: None,
                bytes: 0,
                sent_unix_ns: unix_ns(),
                first_byte_unix_ns: 0,
                done_unix_ns: 0,
                cpu_secs: 0.0,
            };
            if let Err(e) = rt.block_on(pull(&http, &url, size, &digest, &mut report)) {
                report.error = Some(format!("{e:#}"));
            }
            report.done_unix_ns = unix_ns();
            report.cpu_secs = self_cpu_secs().unwrap_or(0.0);
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
    }
}

async fn pull(
    http: &reqwest::Client,
    url: &str,
    size: u64,
    digest: &str,
    report: &mut PullReport,
) -> anyhow::Result<()> {
    let mut resp = http.get(url).send().await.with_context(|| format!("GET {url}"))?;
    let status = resp.status();
    if !status.is_success() {
        bail!("GET {url}: {status}: {}", resp.text().await.unwrap_or_default());
    }
    let mut hash = Sha256::new();
    while let Some(chunk) = resp.chunk().await.with_context(|| format!("reading {url}"))? {
        if report.bytes == 0 {
            report.first_byte_unix_ns = unix_ns();
        }
        report.bytes += chunk.len() as u64;
        ensure!(report.bytes <= size, "GET {url}: more than the {size} bytes expected");
        hash.update(&chunk);
    }
    ensure!(report.bytes == size, "GET {url}: got {} bytes, expected {size}", report.bytes);
    let actual = format!("sha256:{}", hex::encode(hash.finalize()));
    ensure!(actual == digest, "GET {url}: body has digest {actual}, expected {digest}");
    Ok(())
}

/// User + system CPU seconds of this process.
fn self_cpu_secs() -> anyhow::Result<f64> {
    super::cpu::proc_cpu_secs("self")
}
