//! The processes of a run: the binaries it needs, the long-running servers it starts in
//! the namespaces (logged to files, killed on drop, checked for early exits, their CPU
//! counted), and short-lived tools and health checks run to completion.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{bail, ensure, Context as _};
use tokio::process::{Child, Command};

use super::cpu::proc_cpu_secs;
use super::topology::Node;

#[derive(Debug)]
pub(super) struct Bins {
    pub(super) origin: PathBuf,
    pub(super) tracker: PathBuf,
    pub(super) agent: PathBuf,
    /// This binary, run inside the namespaces as the HTTP client.
    pub(super) bench: PathBuf,
}

impl Bins {
    pub(super) fn find(dir: Option<&Path>) -> anyhow::Result<Self> {
        let bench = std::env::current_exe().context("current exe")?;
        let dir = match dir {
            Some(d) => d.to_path_buf(),
            None => bench.parent().context("current exe has no directory")?.to_path_buf(),
        };
        let bin = |name: &str| -> anyhow::Result<PathBuf> {
            let path = dir.join(name);
            ensure!(
                path.is_file(),
                "{} not found (cargo build --release --workspace, or --bin-dir)",
                path.display()
            );
            Ok(path)
        };
        Ok(Self {
            origin: bin("shoal-origin")?,
            tracker: bin("shoal-tracker")?,
            agent: bin("shoal-agent")?,
            bench,
        })
    }
}

/// One long-running server process in a namespace; SIGKILLed when dropped.
#[derive(Debug)]
struct Proc {
    name: String,
    child: Child,
    pid: u32,
    log: PathBuf,
}

/// The server processes of the run.
#[derive(Debug, Default)]
pub(super) struct Procs {
    list: Vec<Proc>,
}

impl Procs {
    pub(super) fn spawn(
        &mut self,
        name: &str,
        ns: &str,
        bin: &Path,
        args: &[String],
        dir: &Path,
    ) -> anyhow::Result<()> {
        let log = dir.join(format!("{name}.log"));
        let stderr = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let stdout = stderr.try_clone().context("dup log file")?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .env("SHOAL_LOG", std::env::var("SHOAL_LOG").unwrap_or_else(|_| "info".into()))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let pid = child.id().context("no pid")?;
        self.list.push(Proc { name: name.to_owned(), child, pid, log });
        Ok(())
    }

    pub(super) fn check_alive(&mut self) -> anyhow::Result<()> {
        for p in &mut self.list {
            if let Some(status) = p.child.try_wait().context("try_wait")? {
                bail!("{} exited early: {status} (log: {})", p.name, p.log.display());
            }
        }
        Ok(())
    }

    /// CPU seconds used so far by the processes whose name starts with `prefix`.
    pub(super) fn cpu_secs(&self, prefix: &str) -> f64 {
        self.list
            .iter()
            .filter(|p| p.name.starts_with(prefix))
            .filter_map(|p| proc_cpu_secs(&p.pid.to_string()).ok())
            .sum()
    }

    pub(super) fn print_log_tails(&self, lines: usize) {
        for p in &self.list {
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

pub(super) fn s(x: impl ToString) -> String {
    x.to_string()
}

/// Runs a short-lived command (in `ns` when given) to completion.
pub(super) async fn run_tool(bin: &Path, ns: Option<&str>, args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    let out = cmd
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("running {}", bin.display()))?;
    ensure!(
        out.status.success(),
        "{} {} failed ({}): {}",
        bin.display(),
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8(out.stdout).context("non-UTF-8 output")
}

pub(super) async fn wait_healthy(
    bins: &Bins,
    node: &Node,
    url: &str,
    procs: &mut Procs,
) -> anyhow::Result<()> {
    procs.check_alive()?;
    run_tool(&bins.bench, Some(&node.ns), &["netns-client", "wait", "--url", url, "--timeout-secs", "30"])
        .await
        .with_context(|| format!("waiting for {url} in {}", node.ns))?;
    procs.check_alive()
}
