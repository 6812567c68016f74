//! `containerd-config` on a node that has its own `hosts.toml`: the merge keeps the
//! operator's entries and is undone cleanly, and containerd pulls through the merged file,
//! via the agent, then past a stopped agent.

use std::process::Command;
use std::time::Duration;

use shoal_tests::cluster::{Cluster, ClusterOptions, UpstreamOptions};
use shoal_tests::tools::{run_async, Containerd};

use crate::{bin_dir, check, require, run, MIB};

/// The CLI merges into the operator's file and keeps every entry, a second run changes no
/// byte, and removal gives their file back.
#[test]
fn containerd_config_merges_into_an_operators_file() {
    let Some(bins) = bin_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("certs.d");
    let theirs = hosts.join("docker.io/hosts.toml");
    let original = "# corp mirror, then Docker Hub\n\
                    server = \"https://registry-1.docker.io\"\n\n\
                    [host.\"https://mirror.corp.example\"]\n  capabilities = [\"pull\", \"resolve\"]\n  ca = \"/etc/corp-ca.pem\"\n\n\
                    [host.\"https://mirror.corp.example\".header]\n  authorization = [\"Basic abc\"]\n";
    std::fs::create_dir_all(theirs.parent().unwrap()).unwrap();
    std::fs::write(&theirs, original).unwrap();
    let config = |registries: &str| {
        let mut cmd = Command::new(bins.join("shoal-agent"));
        cmd.arg("containerd-config").arg("--dir").arg(&hosts).args(["--registry", registries]);
        check(run(&mut cmd), "shoal-agent containerd-config")
    };
    config("docker.io,_default");
    let merged = std::fs::read_to_string(&theirs).unwrap();
    let agent = merged.find("[host.\"http://127.0.0.1:5050\"]").expect("agent host");
    let mirror = merged.find("[host.\"https://mirror.corp.example\"]").expect("their mirror kept");
    assert!(agent < mirror, "the agent is the first host:\n{merged}");
    assert!(merged.contains("dial_timeout = \"200ms\""), "{merged}");
    assert!(
        merged.contains("authorization = [\"Basic abc\"]") && merged.contains("ca = \"/etc/corp-ca.pem\"")
    );
    let default = std::fs::read_to_string(hosts.join("_default/hosts.toml")).unwrap();

    config("docker.io,_default");
    assert_eq!(std::fs::read_to_string(&theirs).unwrap(), merged, "a second run changes nothing");
    assert_eq!(std::fs::read_to_string(hosts.join("_default/hosts.toml")).unwrap(), default);

    let registries = ["docker.io".to_owned(), "_default".to_owned()];
    shoal_agent::containerd::remove(&hosts, &registries).expect("remove");
    assert_eq!(std::fs::read_to_string(&theirs).unwrap(), original, "removal restores their file");
    assert!(!hosts.join("_default").exists(), "the file it created is gone");
}

/// containerd pulls through the merged file, via the agent, and when the agent is stopped
/// falls back to the operator's registry; removal restores their file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_through_a_merged_file_and_falls_back_when_the_agent_stops() {
    if !require("containerd") || !require("ctr") || !require("docker-registry") || !require("skopeo") {
        return;
    }
    let registry = shoal_tests::registry::Registry::start(None).await.expect("registry");
    let first = registry.push_image("team/one:1", &[MIB + 17, 90_000], 81).await.expect("push");
    let second = registry.push_image("team/two:1", &[MIB + 33, 70_000], 82).await.expect("push");
    let mut cluster = Cluster::start(ClusterOptions {
        agents: 1,
        piece_length: 256 << 10,
        upstream: Some(UpstreamOptions::new(&registry.url())),
        ..Default::default()
    })
    .await
    .expect("cluster");

    // The operator's file: their registry over plain HTTP, listed as a host of its own.
    let dir = tempfile::tempdir().expect("tempdir");
    let hosts_dir = dir.path().join("certs.d");
    let theirs = hosts_dir.join(&registry.host).join("hosts.toml");
    let original = format!(
        "# our registry, plain HTTP on this host\nserver = \"http://{h}\"\n\n[host.\"http://{h}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
        h = registry.host
    );
    std::fs::create_dir_all(theirs.parent().unwrap()).unwrap();
    std::fs::write(&theirs, &original).unwrap();
    let agent_url = cluster.agents[0].registry_url.clone();
    shoal_agent::containerd::apply(&hosts_dir, std::slice::from_ref(&registry.host), &agent_url)
        .expect("merge");
    let merged = std::fs::read_to_string(&theirs).unwrap();
    assert!(merged.contains(&format!("[host.\"http://{}\"]", registry.host)), "{merged}");

    let containerd = Containerd::start(dir.path()).await;
    let hosts_arg = hosts_dir.display().to_string();
    let pull = |reference: String| {
        let cmd = containerd.ctr(&[
            "images",
            "pull",
            "--hosts-dir",
            &hosts_arg,
            "--snapshotter",
            "native",
            &reference,
        ]);
        run_async(cmd, Duration::from_secs(60))
    };

    // Through the agent: the layers land in its cache, and the registry served each once
    // (to the origin).
    let out = pull(format!("{}/team/one:1", registry.host)).await;
    assert!(out.status.success(), "pull through the agent: {}", String::from_utf8_lossy(&out.stderr));
    for (layer, _) in &first.layers {
        let hex = layer.strip_prefix("sha256:").unwrap();
        assert!(
            cluster.agents[0].data_dir.join("blobs").join(hex).is_file(),
            "{layer} not in the agent's cache"
        );
        assert_eq!(registry.blob_gets(layer), 1, "upstream GETs of {layer}");
    }

    // Agent stopped: containerd goes to the next host, the operator's registry.
    cluster.agents[0].stop().await.expect("stop agent");
    let started = std::time::Instant::now();
    let out = pull(format!("{}/team/two:1", registry.host)).await;
    assert!(out.status.success(), "pull past a stopped agent: {}", String::from_utf8_lossy(&out.stderr));
    assert!(started.elapsed() < Duration::from_secs(30), "fallback took {:?}", started.elapsed());
    for (layer, _) in &second.layers {
        let hex = layer.strip_prefix("sha256:").unwrap();
        assert!(
            !cluster.agents[0].data_dir.join("blobs").join(hex).exists(),
            "{layer} came through the agent"
        );
        assert_eq!(registry.blob_gets(layer), 1, "containerd fetched {layer} from the registry");
    }
    let out = run_async(containerd.ctr(&["images", "ls", "-q"]), Duration::from_secs(10)).await;
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(listing.contains("team/one:1") && listing.contains("team/two:1"), "{listing}");
    drop(containerd);

    shoal_agent::containerd::remove(&hosts_dir, std::slice::from_ref(&registry.host)).expect("remove");
    assert_eq!(std::fs::read_to_string(&theirs).unwrap(), original);
}
