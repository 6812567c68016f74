//! The systemd units verified by `systemd-analyze` and the example configs loaded by the
//! binaries.

use std::path::Path;
use std::process::Command;

use crate::{bin_dir, check, repo, require, run};

#[test]
fn systemd_units_verify_and_configs_load() {
    let units = repo().join("deploy/systemd");
    // The example configurations parse with each binary's own configuration types.
    #[derive(serde::Serialize)]
    struct NoFlags {}
    let agent: shoal_agent::config::Config =
        shoal_shared::config::layered(&NoFlags {}, Some(&units.join("agent.toml"))).expect("agent.toml");
    let origin: shoal_origin::config::Config =
        shoal_shared::config::layered(&NoFlags {}, Some(&units.join("origin.toml"))).expect("origin.toml");
    let tracker: shoal_tracker::config::Config =
        shoal_shared::config::layered(&NoFlags {}, Some(&units.join("tracker.toml"))).expect("tracker.toml");
    assert_eq!(agent.data, Path::new("/var/lib/shoal/agent"));
    assert_eq!(origin.data, Path::new("/var/lib/shoal/origin"));
    assert_eq!(tracker.origin.len(), 2);
    assert!(tracker.tls.is_some(), "the example tracker serves mutual TLS");
    assert_eq!(tracker.metrics, Some("0.0.0.0:5101".parse().unwrap()), "and plain ops for probes");

    for name in ["agent", "origin", "tracker"] {
        let unit = std::fs::read_to_string(units.join(format!("shoal-{name}.service"))).unwrap();
        assert!(unit.contains(&format!(
            "ExecStart=/usr/local/bin/shoal-{name} serve --config /etc/shoal/{name}.toml\n"
        )));
        for line in [
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "PrivateTmp=yes",
            "Restart=always",
            "LimitNOFILE=",
        ] {
            assert!(unit.contains(line), "shoal-{name}.service lacks {line}");
        }
        if name != "tracker" {
            assert!(unit.contains(&format!("StateDirectory=shoal/{name}\n")), "shoal-{name}.service");
        }
    }

    if !require("systemd-analyze") {
        return;
    }
    let Some(bins) = bin_dir() else { return };
    // systemd checks that ExecStart exists: point copies of the units at the built binaries.
    let dir = tempfile::tempdir().unwrap();
    let mut copies = Vec::new();
    for name in ["agent", "origin", "tracker"] {
        let unit = std::fs::read_to_string(units.join(format!("shoal-{name}.service"))).unwrap();
        let unit = unit.replace("/usr/local/bin/", &format!("{}/", bins.display()));
        let path = dir.path().join(format!("shoal-{name}.service"));
        std::fs::write(&path, unit).unwrap();
        copies.push(path);
    }
    let out =
        check(run(Command::new("systemd-analyze").arg("verify").args(&copies)), "systemd-analyze verify");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("shoal-"), "systemd-analyze verify warned:\n{stderr}");
    // A unit with a typo is caught the same way (so the check above can fail).
    let bad = dir.path().join("shoal-typo.service");
    std::fs::write(
        &bad,
        std::fs::read_to_string(&copies[0]).unwrap().replace("ProtectSystem=", "ProtectSytem="),
    )
    .unwrap();
    let out = run(Command::new("systemd-analyze").arg("verify").arg(&bad));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ProtectSytem"), "a typo goes unnoticed");

    // The hardening keeps each unit's exposure low.
    for copy in &copies {
        let out = run(Command::new("systemd-analyze").args(["security", "--offline=yes"]).arg(copy));
        let text = String::from_utf8_lossy(&out.stdout);
        let level: f64 = text
            .lines()
            .find_map(|l| l.split("Overall exposure level for ").nth(1))
            .and_then(|rest| rest.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
        assert!(level <= 2.0, "{}: exposure {level}\n{text}", copy.display());
    }
}
