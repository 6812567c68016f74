//! A real S3-compatible server for tests and benchmarks: `moto_server` from PyPI's
//! `moto[server]`, found in the tools virtualenv `.ci/run` sets up (`$SHOAL_TOOLS_VENV`,
//! default `~/.cache/shoal/install-venv`).
//!
//! An origin's S3 client reads its endpoint and keys from the `AWS_*` environment when the
//! origin starts; [`set_aws_env`] points it at a server.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};

/// `moto_server` of the tools virtualenv, if installed.
pub fn moto_bin() -> Option<PathBuf> {
    let venv = std::env::var_os("SHOAL_TOOLS_VENV").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/shoal/install-venv")
    });
    let bin = venv.join("bin/moto_server");
    bin.is_file().then_some(bin)
}

/// Points S3 clients started from now on at `endpoint` (moto takes any keys). Callers
/// serialize it with whatever else reads the environment.
pub fn set_aws_env(endpoint: &str) {
    for (k, v) in [
        ("AWS_ENDPOINT_URL", endpoint),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_ALLOW_HTTP", "true"),
    ] {
        std::env::set_var(k, v);
    }
}

/// A `moto_server` on a loopback port, killed when dropped.
#[derive(Debug)]
pub struct Moto {
    child: Child,
    pub addr: SocketAddr,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Moto {
    /// Starts `bin` and waits until it listens.
    pub async fn start(bin: &Path) -> anyhow::Result<Moto> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let moto = Moto { child, addr: SocketAddr::from(([127, 0, 0, 1], port)) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(moto.addr).await.is_err() {
            ensure!(Instant::now() < deadline, "moto_server did not listen on {}", moto.addr);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(moto)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Creates a bucket (moto takes unsigned requests).
    pub async fn bucket(&self, name: &str) -> anyhow::Result<()> {
        let resp = reqwest::Client::new().put(format!("{}/{name}", self.url())).send().await?;
        ensure!(resp.status().is_success(), "creating bucket {name}: {}", resp.status());
        Ok(())
    }

    /// The keys of the bucket under `prefix`.
    pub async fn keys(&self, bucket: &str, prefix: &str) -> anyhow::Result<Vec<String>> {
        let url = format!("{}/{bucket}?list-type=2&prefix={prefix}", self.url());
        let xml = reqwest::get(url).await?.text().await?;
        Ok(xml.split("<Key>").skip(1).filter_map(|s| s.split("</Key>").next()).map(str::to_owned).collect())
    }

    /// Whether a multipart upload is in progress in `bucket`.
    pub async fn uploading(&self, bucket: &str) -> anyhow::Result<bool> {
        let xml = reqwest::get(format!("{}/{bucket}?uploads", self.url())).await?.text().await?;
        Ok(xml.contains("<Upload>"))
    }
}
