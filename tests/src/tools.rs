//! External tools the tests drive: commands run off the async runtime with a timeout, and
//! a private containerd.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// Runs a command on a blocking thread with a timeout (the cluster keeps serving).
pub async fn run_async(mut cmd: Command, timeout: Duration) -> Output {
    let shown = format!("{cmd:?}");
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    let pid = child.id();
    let wait = tokio::task::spawn_blocking(move || child.wait_with_output());
    match tokio::time::timeout(timeout, wait).await {
        Ok(out) => out.expect("join").unwrap_or_else(|e| panic!("{shown}: {e}")),
        Err(_) => {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            panic!("{shown} timed out after {timeout:?}");
        }
    }
}

/// A private containerd (no CRI) with its state under one directory, killed when dropped;
/// `ctr` talks to it in the `shoal-tests` namespace.
#[derive(Debug)]
pub struct Containerd {
    child: std::process::Child,
    socket: PathBuf,
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Containerd {
    /// Starts it with root, state and sockets under `dir` and waits until it answers.
    pub async fn start(dir: &Path) -> Containerd {
        let socket = dir.join("containerd.sock");
        let config = dir.join("config.toml");
        let path = |p: &str| dir.join(p).display().to_string();
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = {root:?}\nstate = {state:?}\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\n\
                 [grpc]\n  address = {sock:?}\n\n[ttrpc]\n  address = {ttrpc:?}\n\n\
                 [plugins.\"io.containerd.internal.v1.opt\"]\n  path = {opt:?}\n",
                root = path("root"),
                state = path("state"),
                sock = socket.display().to_string(),
                ttrpc = path("containerd.sock.ttrpc"),
                opt = path("opt"),
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start containerd");
        let containerd = Containerd { child, socket };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if containerd.socket.exists()
                && run_async(containerd.ctr(&["version"]), Duration::from_secs(10)).await.status.success()
            {
                return containerd;
            }
            if std::time::Instant::now() > deadline {
                panic!(
                    "containerd did not come up:\n{}",
                    std::fs::read_to_string(dir.join("containerd.log")).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `ctr` against this containerd.
    pub fn ctr(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address").arg(&self.socket).arg("--namespace").arg("shoal-tests").args(args);
        cmd
    }
}
