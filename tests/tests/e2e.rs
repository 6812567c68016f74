//! End-to-end tests with real clients (containerd's `ctr`, `skopeo`) pulling through an agent
//! of an in-process cluster.
//!
//! A missing client binary skips its test locally but fails it when `CI` is set.
//!
//! External commands run with `std::process` on blocking threads, so the cluster (on this
//! test's runtime) keeps serving while they run.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};
use shoal_tests::cluster::{image_pieces, Cluster, ClusterOptions};

const MIB: usize = 1 << 20;

/// True if `bin` is on PATH. Otherwise panics under CI, or prints a skip line.
fn require(bin: &str) -> bool {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| is_executable(&dir.join(bin))))
        .unwrap_or(false);
    if !found {
        if std::env::var_os("CI").is_some() {
            panic!("{bin} is required in CI but is not on PATH");
        }
        eprintln!("SKIP: {bin} not found on PATH");
    }
    found
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    path.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

/// Runs a command to completion on a blocking thread, with a timeout; panics on failure
/// unless `allow_failure`.
async fn run(mut cmd: Command, timeout: Duration) -> Output {
    let shown = format!("{cmd:?}");
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    let pid = child.id();
    let wait = tokio::task::spawn_blocking(move || child.wait_with_output());
    match tokio::time::timeout(timeout, wait).await {
        Ok(out) => out.expect("join").unwrap_or_else(|e| panic!("{shown}: {e}")),
        Err(_) => {
            // Best effort: kill the child we started, by its pid.
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            panic!("{shown} timed out after {timeout:?}");
        }
    }
}

fn check(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A private containerd, killed when dropped.
struct Containerd {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Containerd {
    async fn start(dir: &Path) -> Containerd {
        let socket = dir.join("containerd.sock");
        let config = dir.join("config.toml");
        let (root, state) = (dir.join("root"), dir.join("state"));
        std::fs::write(
            &config,
            format!(
                "version = 2\n\
                 root = {root:?}\n\
                 state = {state:?}\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 \n\
                 [grpc]\n  address = {sock:?}\n\
                 \n\
                 [ttrpc]\n  address = {ttrpc:?}\n\
                 \n\
                 [plugins.\"io.containerd.internal.v1.opt\"]\n  path = {opt:?}\n",
                sock = socket.display().to_string(),
                ttrpc = dir.join("containerd.sock.ttrpc").display().to_string(),
                opt = dir.join("opt").display().to_string(),
                root = root.display().to_string(),
                state = state.display().to_string(),
            ),
        )
        .expect("write containerd config");
        let log = dir.join("containerd.log");
        let log_file = std::fs::File::create(&log).expect("log file");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .arg("--root")
            .arg(&root)
            .arg("--state")
            .arg(&state)
            .arg("--address")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log"))
            .stderr(log_file)
            .spawn()
            .expect("start containerd");
        let containerd = Containerd { child, socket, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if containerd.socket.exists() {
                let out = run(containerd.ctr(&["version"]), Duration::from_secs(10)).await;
                if out.status.success() {
                    break;
                }
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(&containerd.log).unwrap_or_default();
                panic!("containerd did not come up:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        containerd
    }

    fn ctr(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address").arg(&self.socket).arg("--namespace").arg("shoal-e2e").args(args);
        cmd
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_through_agent() {
    if !require("containerd") || !require("ctr") {
        return;
    }
    let cluster = Cluster::start(ClusterOptions { agents: 1, piece_length: 256 << 10, ..Default::default() })
        .await
        .expect("cluster");
    let image = cluster.push_image("e2e/app:v1", &[2 * MIB + 3, 300_000], 21).await.expect("push");
    let dir = tempfile::tempdir().expect("tempdir");
    let containerd = Containerd::start(dir.path()).await;

    let reference = format!("{}/e2e/app:v1", cluster.agents[0].registry_host());
    let out = run(
        containerd.ctr(&["images", "pull", "--plain-http", "--snapshotter", "native", &reference]),
        Duration::from_secs(40),
    )
    .await;
    check(&out, "ctr images pull");

    let out = run(containerd.ctr(&["images", "ls"]), Duration::from_secs(10)).await;
    check(&out, "ctr images ls");
    let listing = String::from_utf8_lossy(&out.stdout);
    let line = listing.lines().find(|l| l.starts_with(&reference)).unwrap_or_else(|| panic!("{listing}"));
    assert!(line.contains(&image.manifest), "{line}");

    // The layers are in containerd's content store under their digests.
    let out = run(containerd.ctr(&["content", "ls", "-q"]), Duration::from_secs(10)).await;
    check(&out, "ctr content ls");
    let content = String::from_utf8_lossy(&out.stdout);
    for (layer, _) in &image.layers {
        assert!(content.contains(layer.as_str()), "{layer} missing from {content}");
    }
    assert!(content.contains(&image.config));
    drop(containerd);
}

/// containerd reads the `hosts.toml` that `shoal-agent containerd-config` writes and pulls an
/// image named after another registry through the agent (the mirror), never touching that
/// registry (it does not exist).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_through_hosts_toml_from_containerd_config() {
    if !require("containerd") || !require("ctr") {
        return;
    }
    let cluster = Cluster::start(ClusterOptions { agents: 1, piece_length: 256 << 10, ..Default::default() })
        .await
        .expect("cluster");
    let image = cluster.push_image("team/web:v2", &[MIB + 5, 40_000], 33).await.expect("push");
    let dir = tempfile::tempdir().expect("tempdir");
    let hosts_dir = dir.path().join("certs.d");
    let upstream = "registry.shoal.invalid:5000";
    let written =
        shoal_agent::containerd::write(&hosts_dir, &[upstream.to_owned()], &cluster.agents[0].registry_url)
            .expect("containerd-config");
    assert_eq!(written, vec![hosts_dir.join(upstream).join("hosts.toml")]);
    let containerd = Containerd::start(dir.path()).await;

    let reference = format!("{upstream}/team/web:v2");
    let hosts_arg = hosts_dir.display().to_string();
    let out = run(
        containerd.ctr(&["images", "pull", "--hosts-dir", &hosts_arg, "--snapshotter", "native", &reference]),
        Duration::from_secs(40),
    )
    .await;
    check(&out, "ctr images pull --hosts-dir");
    let out = run(containerd.ctr(&["images", "ls"]), Duration::from_secs(10)).await;
    let listing = String::from_utf8_lossy(&out.stdout);
    let line = listing.lines().find(|l| l.starts_with(&reference)).unwrap_or_else(|| panic!("{listing}"));
    assert!(line.contains(&image.manifest), "{line}");
    drop(containerd);
}

/// The README's promise: containerd, pointed at an agent by `containerd-config`, pulls an
/// image that exists only in an upstream registry (the CNCF distribution registry); the
/// upstream sees one GET per blob and the layers land in the agent's cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_an_upstream_image_through_the_agent() {
    if !require("containerd") || !require("ctr") || !require("docker-registry") || !require("skopeo") {
        return;
    }
    let registry = shoal_tests::registry::Registry::start(None).await.expect("registry");
    let pushed =
        registry.push_image("library/busy:1.0", &[MIB + 99, 200_000], 71).await.expect("push upstream");
    let cluster = Cluster::start(ClusterOptions {
        agents: 1,
        piece_length: 256 << 10,
        upstream: Some(shoal_tests::cluster::UpstreamOptions::new(&registry.url())),
        ..Default::default()
    })
    .await
    .expect("cluster");
    let dir = tempfile::tempdir().expect("tempdir");
    let hosts_dir = dir.path().join("certs.d");
    shoal_agent::containerd::write(
        &hosts_dir,
        std::slice::from_ref(&registry.host),
        &cluster.agents[0].registry_url,
    )
    .expect("containerd-config");
    let containerd = Containerd::start(dir.path()).await;

    // The fallback `server` is https://<registry>, which this plain-HTTP registry cannot
    // answer: the pull can only succeed through the agent.
    let reference = format!("{}/library/busy:1.0", registry.host);
    let hosts_arg = hosts_dir.display().to_string();
    let out = run(
        containerd.ctr(&["images", "pull", "--hosts-dir", &hosts_arg, "--snapshotter", "native", &reference]),
        Duration::from_secs(60),
    )
    .await;
    check(&out, "ctr images pull (upstream through the agent)");
    let out = run(containerd.ctr(&["images", "ls"]), Duration::from_secs(10)).await;
    let listing = String::from_utf8_lossy(&out.stdout);
    let line = listing.lines().find(|l| l.starts_with(&reference)).unwrap_or_else(|| panic!("{listing}"));
    assert!(line.contains(&pushed.manifest), "{line}");
    for (layer, _) in &pushed.layers {
        assert_eq!(registry.blob_gets(layer), 1, "upstream GETs of {layer}");
        let hex = layer.strip_prefix("sha256:").unwrap();
        assert!(
            cluster.agents[0].data_dir.join("blobs").join(hex).is_file(),
            "{layer} not in the agent's cache"
        );
    }
    drop(containerd);
}

fn skopeo_copy(registry_host: &str, out: &Path) -> Command {
    let mut cmd = Command::new("skopeo");
    cmd.arg("--insecure-policy")
        .arg("copy")
        .arg("--src-tls-verify=false")
        // Keep the layers as they are (skopeo compresses uncompressed layers for `oci:`).
        .arg("--dest-oci-accept-uncompressed-layers")
        .arg("--preserve-digests")
        .arg(format!("docker://{registry_host}/e2e/app:v1"))
        .arg(format!("oci:{}:v1", out.display()));
    cmd
}

/// Checks that every blob of an OCI layout hashes to its name, and returns the layer digests
/// of the manifest `v1` points at.
fn verify_layout(out: &Path) -> Vec<String> {
    let blobs = out.join("blobs/sha256");
    for entry in std::fs::read_dir(&blobs).expect("blobs dir") {
        let entry = entry.expect("entry");
        let name = entry.file_name().into_string().expect("name");
        let bytes = std::fs::read(entry.path()).expect("blob");
        assert_eq!(hex::encode(Sha256::digest(&bytes)), name, "blob {name} is corrupt");
    }
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("index.json")).expect("index")).expect("json");
    let manifest = index["manifests"][0]["digest"].as_str().expect("manifest digest");
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(blobs.join(manifest.trim_start_matches("sha256:"))).expect("manifest"),
    )
    .expect("json");
    manifest["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l["digest"].as_str().expect("digest").to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_copies_through_agent() {
    if !require("skopeo") {
        return;
    }
    let cluster = Cluster::start(ClusterOptions { agents: 1, piece_length: 256 << 10, ..Default::default() })
        .await
        .expect("cluster");
    let image = cluster.push_image("e2e/app:v1", &[2 * MIB + 3, 1000, 0], 22).await.expect("push");
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out");
    let output = run(skopeo_copy(cluster.agents[0].registry_host(), &out), Duration::from_secs(40)).await;
    check(&output, "skopeo copy");
    let layers = verify_layout(&out);
    let pushed: Vec<String> = image.layers.iter().map(|(d, _)| d.clone()).collect();
    assert_eq!(layers, pushed);
    assert!(out.join("blobs/sha256").join(image.config.trim_start_matches("sha256:")).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_skopeo_copies_single_flight() {
    if !require("skopeo") {
        return;
    }
    let piece_length = 256 << 10;
    let cluster = Cluster::start(ClusterOptions { agents: 1, piece_length, ..Default::default() })
        .await
        .expect("cluster");
    let image = cluster.push_image("e2e/app:v1", &[3 * MIB + 11, 2 * MIB], 23).await.expect("push");
    let expected = image_pieces(&image, piece_length).expect("pieces");
    let dir = tempfile::tempdir().expect("tempdir");
    let host = cluster.agents[0].registry_host().to_owned();
    let copies: Vec<_> = (0..8)
        .map(|i| {
            let out = dir.path().join(format!("out-{i}"));
            let cmd = skopeo_copy(&host, &out);
            tokio::spawn(async move { (run(cmd, Duration::from_secs(50)).await, out) })
        })
        .collect();
    let pushed: Vec<String> = image.layers.iter().map(|(d, _)| d.clone()).collect();
    for copy in copies {
        let (output, out) = copy.await.expect("join");
        check(&output, "skopeo copy");
        assert_eq!(verify_layout(&out), pushed);
    }
    let served = cluster.origin_counter("shoal_peer_pieces_served_total").await.expect("metrics");
    assert_eq!(served, expected, "each piece must leave the origin exactly once");
}
