//! A real upstream registry for pull-through tests: the CNCF distribution registry
//! (`/usr/bin/docker-registry`, Debian package `docker-registry`) on 127.0.0.1, filesystem
//! storage in a temporary directory, optionally behind htpasswd basic auth (hashes made by
//! `htpasswd -Bbn`, Debian package `apache2-utils`). Its access log is captured so tests can
//! count the requests the upstream actually served.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};

use crate::cluster::MANIFEST_ACCEPT;
use crate::image::{generate_multiarch_layout, generate_oci_layout};

/// An image as the registry stores it (skopeo may rewrite what it copies, e.g. compress
/// uncompressed layers, so digests are read back from the registry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pushed {
    /// Digest of the manifest (or index) the tag points at.
    pub manifest: String,
    /// Config digest (empty for an index).
    pub config: String,
    /// `(digest, size)` of each layer (empty for an index).
    pub layers: Vec<(String, u64)>,
    /// The platform manifests of an index (empty for a manifest).
    pub children: Vec<String>,
}

/// The registry binary.
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// A running registry; killed on drop.
#[derive(Debug)]
pub struct Registry {
    /// `127.0.0.1:<port>`.
    pub host: String,
    /// `user:password` when basic auth is on.
    pub credentials: Option<(String, String)>,
    /// With TLS: the directory holding `ca.pem`, `cert.pem`, `key.pem`.
    pub tls: Option<PathBuf>,
    child: Option<Child>,
    log: Arc<Mutex<Vec<String>>>,
    dir: TempDir,
    config: PathBuf,
}

impl Registry {
    /// Starts a registry; with `credentials`, every request needs HTTP basic auth.
    pub async fn start(credentials: Option<(&str, &str)>) -> anyhow::Result<Registry> {
        Self::start_with(credentials, None).await
    }

    /// Like [`start`](Self::start); with `tls`, serves HTTPS with `cert.pem` and `key.pem`
    /// from that directory (e.g. from `shoal_shared::tls::issue(ca, "127.0.0.1", Role::Origin, dir)`).
    pub async fn start_with(
        credentials: Option<(&str, &str)>,
        tls: Option<&Path>,
    ) -> anyhow::Result<Registry> {
        let dir = tempfile::tempdir().context("registry temp dir")?;
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").context("free port")?;
            l.local_addr()?.port()
        };
        let host = format!("127.0.0.1:{port}");
        let mut auth = String::new();
        if let Some((user, pass)) = credentials {
            let out = std::process::Command::new("htpasswd")
                .args(["-Bbn", user, pass])
                .output()
                .context("running htpasswd (apache2-utils)")?;
            if !out.status.success() {
                bail!("htpasswd failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            let file = dir.path().join("htpasswd");
            std::fs::write(&file, &out.stdout)?;
            auth = format!("auth:\n  htpasswd:\n    realm: shoal-test\n    path: {}\n", file.display());
        }
        let tls_config = match tls {
            Some(t) => format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                t.join("cert.pem").display(),
                t.join("key.pem").display()
            ),
            None => String::new(),
        };
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {host}\n{tls_config}{auth}",
                dir.path().join("data").display()
            ),
        )?;
        let mut registry = Registry {
            host,
            credentials: credentials.map(|(u, p)| (u.to_owned(), p.to_owned())),
            tls: tls.map(Path::to_path_buf),
            child: None,
            log: Arc::new(Mutex::new(Vec::new())),
            dir,
            config,
        };
        registry.spawn().await?;
        Ok(registry)
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let mut child = Command::new(REGISTRY_BIN)
            .args(["serve", &self.config.display().to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {REGISTRY_BIN}"))?;
        for out in [
            child.stdout.take().map(|o| Box::new(o) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            child.stderr.take().map(|e| Box::new(e) as _),
        ]
        .into_iter()
        .flatten()
        {
            let log = self.log.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(out).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    log.lock().expect("log lock").push(line);
                }
            });
        }
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            if tokio::net::TcpStream::connect(&self.host).await.is_ok() {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("registry at {} did not start; log: {:?}", self.host, self.log_lines());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Restarts the registry (same content) requiring bearer tokens from `realm`, signed by
    /// the certificate in `root_pem` for `service` by `issuer` (distribution's `auth.token`).
    /// Must have been started without basic auth.
    pub async fn require_tokens(
        &mut self,
        realm: &str,
        service: &str,
        issuer: &str,
        root_pem: &Path,
    ) -> anyhow::Result<()> {
        anyhow::ensure!(self.credentials.is_none(), "a registry has one auth scheme");
        self.stop().await;
        let mut config = std::fs::read_to_string(&self.config)?;
        config.push_str(&format!(
            "auth:\n  token:\n    realm: {realm}\n    service: {service}\n    issuer: {issuer}\n    rootcertbundle: {}\n",
            root_pem.display()
        ));
        std::fs::write(&self.config, config)?;
        // The old process's port must be free before the new one binds it.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(&self.host).await.is_ok() {
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "registry did not stop");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.spawn().await
    }

    /// `http://127.0.0.1:<port>` (`https://` with TLS).
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.host)
    }

    /// Stops the registry (the upstream "has a bad day").
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Every log line so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().expect("log lock").clone()
    }

    /// How many `GET /v2/.../blobs/<digest>` requests the registry answered with 200 or 307.
    pub fn blob_gets(&self, digest: &str) -> usize {
        let needle = format!("/blobs/{digest} ");
        self.log_lines()
            .iter()
            .filter(|l| l.contains("\"GET /v2/") && l.contains(&needle))
            .filter(|l| {
                // Combined log format: `"GET <path> HTTP/1.1" <status> <bytes> ...`.
                l.split('"')
                    .nth(2)
                    .and_then(|rest| rest.split_whitespace().next())
                    .is_some_and(|s| s == "200" || s == "307")
            })
            .count()
    }

    fn skopeo_creds(&self) -> Vec<String> {
        match &self.credentials {
            Some((u, p)) => vec!["--dest-creds".into(), format!("{u}:{p}")],
            None => Vec::new(),
        }
    }

    async fn skopeo_copy(&self, layout: &Path, tag: &str, name_tag: &str, all: bool) -> anyhow::Result<()> {
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "--quiet", "--dest-tls-verify=false"]);
        if all {
            cmd.arg("--all");
        }
        cmd.args(self.skopeo_creds())
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}/{name_tag}", self.host));
        let out = cmd.output().await.context("running skopeo")?;
        if !out.status.success() {
            bail!("skopeo copy to {name_tag} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// Reads `name:reference` back from the registry.
    pub async fn image(&self, name: &str, reference: &str) -> anyhow::Result<Pushed> {
        let url = format!("{}/v2/{name}/manifests/{reference}", self.url());
        let mut client = reqwest::Client::builder();
        if let Some(t) = &self.tls {
            client = client
                .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(t.join("ca.pem"))?)?);
        }
        let mut req = client.build()?.get(&url).header("Accept", MANIFEST_ACCEPT);
        if let Some((u, p)) = &self.credentials {
            req = req.basic_auth(u, Some(p));
        }
        let resp = req.send().await?.error_for_status()?;
        let bytes = resp.bytes().await?;
        use sha2::Digest as _;
        let manifest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&bytes)));
        let json: serde_json::Value = serde_json::from_slice(&bytes)?;
        let digest = |v: &serde_json::Value| v["digest"].as_str().unwrap_or_default().to_owned();
        let layers = json["layers"]
            .as_array()
            .map(|l| l.iter().map(|d| (digest(d), d["size"].as_u64().unwrap_or(0))).collect())
            .unwrap_or_default();
        let children =
            json["manifests"].as_array().map(|m| m.iter().map(digest).collect()).unwrap_or_default();
        Ok(Pushed { manifest, config: digest(&json["config"]), layers, children })
    }

    /// Generates a single-platform image and pushes it as `name:tag`.
    pub async fn push_image(
        &self,
        name_tag: &str,
        layer_sizes: &[usize],
        seed: u64,
    ) -> anyhow::Result<Pushed> {
        let (name, tag) = name_tag.rsplit_once(':').context("NAME:TAG")?;
        let layout = self.dir.path().join(format!("layout-{seed}"));
        let (dir, t, sizes) = (layout.clone(), tag.to_owned(), layer_sizes.to_vec());
        tokio::task::spawn_blocking(move || generate_oci_layout(&dir, &t, &sizes, seed)).await??;
        self.skopeo_copy(&layout, tag, name_tag, false).await?;
        self.image(name, tag).await
    }

    /// Generates a linux/amd64 + linux/arm64 index and pushes it as `name:tag`; returns the
    /// index and its images (amd64 first), as stored.
    pub async fn push_multiarch(
        &self,
        name_tag: &str,
        layer_sizes: &[usize],
        seed: u64,
    ) -> anyhow::Result<(Pushed, Vec<Pushed>)> {
        let (name, tag) = name_tag.rsplit_once(':').context("NAME:TAG")?;
        let layout = self.dir.path().join(format!("layout-multi-{seed}"));
        let (dir, t, sizes) = (layout.clone(), tag.to_owned(), layer_sizes.to_vec());
        tokio::task::spawn_blocking(move || generate_multiarch_layout(&dir, &t, &sizes, seed)).await??;
        self.skopeo_copy(&layout, tag, name_tag, true).await?;
        let index = self.image(name, tag).await?;
        let mut images = Vec::new();
        for child in &index.children {
            images.push(self.image(name, child).await?);
        }
        Ok((index, images))
    }
}
