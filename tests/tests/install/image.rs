//! The container image built from the debug binaries, inspected, unpacked and run.

use std::process::Command;

use serde_json::Value;

use crate::{bin_dir, check, repo, require, run};

#[test]
fn image_builds_inspects_unpacks_and_runs() {
    if !require("umoci") || !require("skopeo") || !require("strip") || !require("ldd") {
        return;
    }
    let Some(bins) = bin_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    check(
        run(Command::new(repo().join("deploy/image.sh"))
            .arg(&layout)
            .env("SHOAL_BIN_DIR", &bins)
            .env("SHOAL_IMAGE_TAG", "test")),
        "deploy/image.sh",
    );
    let image = format!("oci:{}:test", layout.display());
    let out = check(run(Command::new("skopeo").args(["inspect", &image])), "skopeo inspect");
    let inspect: Value = serde_json::from_slice(&out.stdout).unwrap();
    let version = env!("CARGO_PKG_VERSION");
    let labels = &inspect["Labels"];
    assert_eq!(labels["org.opencontainers.image.version"], version);
    assert_eq!(labels["org.opencontainers.image.title"], "shoal");
    assert_eq!(labels["org.opencontainers.image.licenses"], "Apache-2.0");
    for key in ["revision", "created", "source", "description"] {
        assert!(
            labels[format!("org.opencontainers.image.{key}")].as_str().is_some_and(|s| !s.is_empty()),
            "{key}"
        );
    }
    assert_eq!(inspect["Os"], "linux");
    assert_eq!(inspect["Layers"].as_array().unwrap().len(), 1);
    let out =
        check(run(Command::new("skopeo").args(["inspect", "--config", &image])), "skopeo inspect --config");
    let config: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(config["config"]["Entrypoint"], serde_json::json!(["/usr/local/bin/shoal-agent"]));

    let bundle = dir.path().join("bundle");
    let mut unpack = Command::new("umoci");
    unpack.arg("unpack");
    let root = run(Command::new("id").arg("-u")).stdout == b"0\n";
    if !root {
        unpack.arg("--rootless");
    }
    check(run(unpack.arg("--image").arg(format!("{}:test", layout.display())).arg(&bundle)), "umoci unpack");
    let rootfs = bundle.join("rootfs");
    // No base image: no shell, only the binaries, their libraries and a few files.
    assert!(!rootfs.join("bin/sh").exists() && !rootfs.join("usr/bin/sh").exists());
    assert!(rootfs.join("etc/ssl/certs/ca-certificates.crt").is_file());
    for bin in ["shoal-agent", "shoal-origin", "shoal-tracker"] {
        // Inside the unpacked tree only (chroot): a library the image lacks fails here.
        let mut cmd = if root { Command::new("chroot") } else { Command::new("unshare") };
        if !root {
            cmd.args(["--map-root-user", "chroot"]);
        }
        let out = check(run(cmd.arg(&rootfs).arg(format!("/usr/local/bin/{bin}")).arg("--version")), bin);
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("{bin} {version}"));
    }
}
