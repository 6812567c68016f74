//! What an operator installs (deploy/): the Helm chart rendered by a real Helm engine and
//! every object validated against the Kubernetes schemas, the plain manifests identical to
//! a fresh render, the systemd units verified by systemd, the container image built,
//! inspected, unpacked and run, and `containerd-config` on a node that has its own
//! `hosts.toml` (with containerd pulling through the merged file, and past a stopped agent).
//!
//! Tools: `umoci`, `skopeo`, `systemd-analyze`, `containerd`, `ctr`, `docker-registry` on
//! PATH, and a Python virtualenv with PyPI's `helm-python-sdk` (Helm v4 as a library) and
//! `kubernetes-validate` at `$SHOAL_TOOLS_VENV` (default `~/.cache/shoal/install-venv`);
//! `.ci/run` installs them all. The image and unit tests also need the three binaries:
//! `$SHOAL_BIN_DIR`, or cargo's own next to this test (`cargo test --workspace` builds
//! them; alone: `cargo build -p shoal-agent -p shoal-origin -p shoal-tracker`). The image
//! is built from those debug binaries (image.sh strips their debug info), not from a
//! release build, to keep this test to seconds. A missing tool skips its test locally and
//! fails it when `CI` is set.
//!
//! Layout: this file holds what every part shares (finding the tools and the binaries,
//! skipping or failing when one is missing, running commands); `helm` renders and checks
//! the chart, `chart` tests it and the plain manifests, `systemd` the units, `image` the
//! container image, `containerd` `containerd-config`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

mod chart;
mod containerd;
mod helm;
mod image;
mod systemd;

const MIB: usize = 1 << 20;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// Panics under CI, else prints a skip line; returns false.
fn missing(what: &str) -> bool {
    if std::env::var_os("CI").is_some() {
        panic!("{what} is required in CI but is missing");
    }
    eprintln!("SKIP: {what} missing");
    false
}

/// True if `bin` is on PATH (else see [`missing`]).
fn require(bin: &str) -> bool {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| is_executable(&dir.join(bin))))
        .unwrap_or(false);
    found || missing(&format!("{bin} (on PATH)"))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    path.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

/// The Python of the tools virtualenv, if it has the Helm engine and the validator.
fn venv_python() -> Option<PathBuf> {
    let venv = std::env::var_os("SHOAL_TOOLS_VENV").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/shoal/install-venv")
    });
    let python = venv.join("bin/python");
    let ok = Command::new(&python)
        .args(["-c", "import helm_python, kubernetes_validate, yaml"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        Some(python)
    } else {
        missing(&format!(
            "{} with helm-python-sdk and kubernetes-validate ($SHOAL_TOOLS_VENV)",
            venv.display()
        ));
        None
    }
}

/// The directory with shoal-agent, shoal-origin and shoal-tracker.
fn bin_dir() -> Option<PathBuf> {
    let dir = match std::env::var_os("SHOAL_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        // target/<profile>/deps/install-<hash> -> target/<profile>
        None => std::env::current_exe().expect("current exe").parent().and_then(Path::parent)?.to_path_buf(),
    };
    let all = ["shoal-agent", "shoal-origin", "shoal-tracker"].iter().all(|b| is_executable(&dir.join(b)));
    if all {
        Some(dir)
    } else {
        missing(&format!(
            "the shoal binaries in {} (cargo build -p shoal-agent -p shoal-origin -p shoal-tracker, or $SHOAL_BIN_DIR)",
            dir.display()
        ));
        None
    }
}

fn run(cmd: &mut Command) -> Output {
    let shown = format!("{cmd:?}");
    cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("cannot run {shown}: {e}"))
}

fn check(out: Output, what: &str) -> Output {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
