//! The server processes of a benchmark cluster: spawning the real binaries with their output
//! in log files, killing them on drop, finding them next to this binary, and the helpers to
//! pick free loopback ports and wait until a server is healthy.

use std::fs::File;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};

/// One spawned server process and where its output goes; killed when dropped (tokio's
/// `kill_on_drop` needs its `process` feature, which this crate does not enable).
#[derive(Debug)]
pub(crate) struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    pub(crate) fn pid(&mut self) -> anyhow::Result<u32> {
        self.check_alive()?;
        Ok(self.child.id())
    }

    /// SIGKILLs the process (if still running) and reaps it.
    pub(crate) fn kill(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // It may exit between the check and the kill; either way it is gone after wait.
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }

    /// Fails if the process has exited.
    pub(crate) fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait().context("try_wait")? {
            bail!("{} exited early: {status}", self.name);
        }
        Ok(())
    }
}

/// The processes of one cluster; killed when dropped.
#[derive(Debug, Default)]
pub(crate) struct Cluster {
    pub(crate) procs: Vec<Proc>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Cluster {
    pub(crate) fn spawn(
        &mut self,
        name: &'static str,
        bin: &Path,
        args: &[String],
        dir: &Path,
    ) -> anyhow::Result<usize> {
        let log = dir.join(format!("{name}.log"));
        let stderr = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let stdout = stderr.try_clone().context("dup log file")?;
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .env("SHOAL_LOG", std::env::var("SHOAL_LOG").unwrap_or_else(|_| "info".into()));
        let child = cmd.spawn().with_context(|| format!("starting {}", bin.display()))?;
        self.procs.push(Proc { name, child, log });
        Ok(self.procs.len() - 1)
    }

    pub(crate) fn check_alive(&mut self) -> anyhow::Result<()> {
        self.procs.iter_mut().try_for_each(Proc::check_alive)
    }

    pub(crate) fn kill_all(&mut self) {
        self.procs.iter_mut().for_each(Proc::kill);
    }

    pub(crate) fn print_log_tails(&self, lines: usize) {
        for p in &self.procs {
            let text = std::fs::read_to_string(&p.log).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            let tail = &all[all.len().saturating_sub(lines)..];
            eprintln!("---- last {} lines of {} ({}) ----", tail.len(), p.name, p.log.display());
            for line in tail {
                eprintln!("{line}");
            }
        }
    }
}

pub(crate) fn free_tcp_port() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0").context("bind tcp :0")?.local_addr()?)
}

pub(crate) fn free_udp_port() -> anyhow::Result<SocketAddr> {
    Ok(UdpSocket::bind("127.0.0.1:0").context("bind udp :0")?.local_addr()?)
}

/// Runs a short-lived command (the CA tool) to completion.
pub(crate) fn run_tool(bin: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    ensure!(
        out.status.success(),
        "{} {} failed ({}): {}",
        bin.display(),
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

pub(crate) fn s(x: impl ToString) -> String {
    x.to_string()
}

/// The server binaries a loopback cluster runs.
pub(crate) struct Bins {
    pub(crate) origin: PathBuf,
    pub(crate) tracker: PathBuf,
    pub(crate) agent: PathBuf,
}

impl Bins {
    /// The binaries in `dir`, or next to this one.
    pub(crate) fn find(dir: Option<&Path>) -> anyhow::Result<Self> {
        let dir = match dir {
            Some(d) => d.to_path_buf(),
            None => std::env::current_exe()
                .context("current exe")?
                .parent()
                .context("current exe has no directory")?
                .to_path_buf(),
        };
        let bin = |name: &str| -> anyhow::Result<PathBuf> {
            let path = dir.join(name);
            ensure!(path.is_file(), "{} not found (build the workspace, or pass --bin-dir)", path.display());
            Ok(path)
        };
        Ok(Self { origin: bin("shoal-origin")?, tracker: bin("shoal-tracker")?, agent: bin("shoal-agent")? })
    }
}

/// Runs `body` against a fresh temp dir and process set, printing the servers' log tails
/// when it fails; the processes are killed either way.
pub(crate) async fn with_cluster<F>(keep: bool, body: F) -> anyhow::Result<()>
where
    F: AsyncFnOnce(&Path, &mut Cluster) -> anyhow::Result<()>,
{
    let tmp = tempfile::Builder::new().prefix("shoal-bench-").tempdir().context("temp dir")?;
    let dir = tmp.path().to_path_buf();
    let mut cluster = Cluster::default();
    let result = body(&dir, &mut cluster).await;
    if let Err(e) = &result {
        eprintln!("benchmark failed: {e:#}");
        cluster.print_log_tails(30);
    }
    cluster.kill_all();
    drop(cluster);
    if keep {
        let kept = tmp.keep();
        eprintln!("kept {}", kept.display());
    }
    result
}

/// Polls `url` until it answers 2xx, failing fast if a server died.
pub(crate) async fn wait_healthy(
    http: &reqwest::Client,
    url: &str,
    cluster: &mut Cluster,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        cluster.check_alive()?;
        if let Ok(resp) = http.get(url).timeout(Duration::from_secs(2)).send().await {
            if resp.status().is_success() {
                return Ok(());
            }
        }
        ensure!(Instant::now() < deadline, "{url} not healthy after 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
