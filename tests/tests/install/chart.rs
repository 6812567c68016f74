//! The Helm chart with default values and with three origins, rendered and validated, the
//! plain manifests identical to a fresh render, and every values key documented.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use crate::helm::{assert_tls_tracker, find, flag_values, flags_exist, kinds, render, strs, validate};
use crate::{bin_dir, check, repo, run, venv_python};

#[test]
fn chart_with_default_values_renders_and_validates() {
    let Some(python) = venv_python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let r = render(&python, dir.path(), &[]);
    validate(&python, &r, &[]);

    // The agent: on every node, host network, registry on loopback, QUIC on the node.
    let ds = find(&r, "DaemonSet", "shoal-agent");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(pod["tolerations"][0]["operator"], "Exists");
    let agent = &pod["containers"][0];
    let args = strs(&agent["args"]);
    assert_eq!(flag_values(&args, "--registry"), ["127.0.0.1:5050"]);
    assert_eq!(flag_values(&args, "--advertise-peer"), ["$(NODE_IP):5051"]);
    assert_eq!(flag_values(&args, "--tracker"), ["https://shoal-tracker.shoal.svc.cluster.local:5100"]);
    assert_eq!(flag_values(&args, "--tls"), ["/etc/shoal/tls"]);
    assert_eq!(flag_values(&args, "--metrics"), ["$(NODE_IP):5052"]);
    assert!(flag_values(&args, "--cache-size").is_empty(), "empty cacheSize: the agent's default");
    let node_ip = agent["env"].as_array().unwrap().iter().find(|e| e["name"] == "NODE_IP").unwrap();
    assert_eq!(node_ip["valueFrom"]["fieldRef"]["fieldPath"], "status.hostIP");
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &agent[probe]["httpGet"];
        assert_eq!(
            (&get["host"], &get["port"], &get["path"]),
            (&"127.0.0.1".into(), &5050.into(), &path.into())
        );
    }
    assert!(agent["resources"]["requests"].is_object() && agent["resources"]["limits"].is_object());
    let volumes = pod["volumes"].as_array().unwrap();
    let data = volumes.iter().find(|v| v["name"] == "data").unwrap();
    assert_eq!(data["hostPath"]["path"], "/var/lib/shoal/agent");
    let init = &pod["initContainers"][0];
    let cmd = strs(&init["command"]);
    assert_eq!(cmd[..2], ["/usr/local/bin/shoal-agent".to_owned(), "containerd-config".to_owned()]);
    assert_eq!(flag_values(&cmd, "--dir"), ["/etc/containerd/certs.d"]);
    assert_eq!(flag_values(&cmd, "--endpoint"), ["http://127.0.0.1:5050"]);
    assert!(flag_values(&cmd, "--registry")[0].split(',').any(|r| r == "_default"));

    // Trackers: 2 replicas behind a Service, given the one origin.
    let tracker = find(&r, "Deployment", "shoal-tracker");
    assert_eq!(tracker["spec"]["replicas"], 2);
    let targs = strs(&tracker["spec"]["template"]["spec"]["containers"][0]["args"]);
    // The origin's internal listener (mutual TLS), called with the tracker's certificate:
    // no upload token for trackers.
    assert_eq!(
        flag_values(&targs, "--origin"),
        ["https://shoal-origin-0.shoal-origin-headless.shoal.svc.cluster.local:5002"]
    );
    let tenv = tracker["spec"]["template"]["spec"]["containers"][0]["env"].as_array().unwrap();
    assert!(!tenv.iter().any(|e| e["name"] == "SHOAL_ORIGIN_TOKEN"), "trackers need no token: {tenv:?}");
    find(&r, "Service", "shoal-tracker");
    assert_tls_tracker(&r, "shoal-tls", false);

    // Origins: a StatefulSet with its volume claims and a headless Service; the upload
    // token from a Secret.
    let sts = find(&r, "StatefulSet", "shoal-origin");
    assert_eq!(sts["spec"]["serviceName"], "shoal-origin-headless");
    assert_eq!(sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"], "data");
    let headless = find(&r, "Service", "shoal-origin-headless");
    assert_eq!(headless["spec"]["clusterIP"], "None");
    let origin = &sts["spec"]["template"]["spec"]["containers"][0];
    let token = origin["env"].as_array().unwrap().iter().find(|e| e["name"] == "SHOAL_UPLOAD_TOKEN").unwrap();
    assert_eq!(token["valueFrom"]["secretKeyRef"]["name"], "shoal-upload-token");
    assert!(!strs(&origin["args"]).iter().any(|a| a.contains("upload-token")), "the token stays out of args");
    // The internal listener: its flag, its port on the pod and on the headless Service (the
    // names trackers and ring members dial), and the origin certificate it serves with.
    assert_eq!(flag_values(&strs(&origin["args"]), "--internal"), ["0.0.0.0:5002"]);
    assert_eq!(flag_values(&strs(&origin["args"]), "--tls"), ["/etc/shoal/tls"]);
    let ports = origin["ports"].as_array().unwrap();
    assert!(ports
        .iter()
        .any(|p| p["name"] == "internal" && p["containerPort"] == 5002 && p["protocol"] == "TCP"));
    let hports = headless["spec"]["ports"].as_array().unwrap();
    assert!(hports
        .iter()
        .any(|p| p["name"] == "internal" && p["port"] == 5002 && p["targetPort"] == "internal"));

    // Certificates by default: the pre-install Job issuing into the Secret the pods mount.
    let job = find(&r, "Job", "shoal-tls-job");
    assert_eq!(job["metadata"]["annotations"]["helm.sh/hook"], "pre-install");
    let issued: Vec<Vec<String>> = job["spec"]["template"]["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| strs(&c["command"]))
        .collect();
    assert_eq!(issued[0][1..3], ["ca".to_owned(), "init".to_owned()]);
    let roles: BTreeSet<String> = issued[1..].iter().flat_map(|c| flag_values(c, "--role")).collect();
    assert_eq!(roles, BTreeSet::from(["agent".to_owned(), "origin".to_owned(), "tracker".to_owned()]));
    let stored = strs(&job["spec"]["template"]["spec"]["containers"][0]["command"]);
    for key in ["tracker-cert.pem=/work/tracker/cert.pem", "tracker-key.pem=/work/tracker/key.pem"] {
        assert!(stored.contains(&format!("--from-file={key}")), "the Job does not store {key}: {stored:?}");
    }
    let tls = volumes.iter().find(|v| v["name"] == "tls").unwrap();
    assert_eq!(tls["secret"]["secretName"], "shoal-tls");

    // Metrics: a Service per component; no ServiceMonitor unless asked for.
    for name in ["shoal-agent-metrics", "shoal-tracker-metrics", "shoal-origin-headless"] {
        assert_eq!(find(&r, "Service", name)["metadata"]["labels"]["shoal/metrics"], "true");
    }
    assert!(!r.objects.iter().any(|o| o["kind"] == "ServiceMonitor"));

    assert!(r.notes.contains("kubectl -n shoal rollout status daemonset/shoal-agent"), "{}", r.notes);
    assert!(!r.notes.contains("form a ring"), "one origin: no ring note");
    if let Some(bins) = bin_dir() {
        flags_exist(&r, &bins);
    }
}

#[test]
fn chart_with_three_origins_renders_and_validates() {
    let Some(python) = venv_python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let values = repo().join("deploy/helm/shoal/ci/three-origins-values.yaml");
    let r = render(&python, dir.path(), &[values]);
    validate(&python, &r, &["ServiceMonitor"]);

    let sts = find(&r, "StatefulSet", "shoal-origin");
    assert_eq!(sts["spec"]["replicas"], 3);
    assert_eq!(sts["spec"]["volumeClaimTemplates"][0]["spec"]["storageClassName"], "fast-ssd");
    let origin = &sts["spec"]["template"]["spec"];
    let args = strs(&origin["containers"][0]["args"]);
    assert_eq!(
        flag_values(&args, "--upstream"),
        ["https://registry-1.docker.io", "ghcr.io=https://ghcr-mirror.example.com"]
    );
    assert_eq!(flag_values(&args, "--upstream-auth"), ["/etc/shoal/upstream/config.json"]);
    let auth = origin["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "upstream-auth").unwrap();
    assert_eq!(auth["secret"]["secretName"], "shoal-upstream-auth");

    // Every tracker is given every origin, by its stable DNS name.
    let tracker = find(&r, "Deployment", "shoal-tracker");
    assert_eq!(tracker["spec"]["replicas"], 3);
    let targs = strs(&tracker["spec"]["template"]["spec"]["containers"][0]["args"]);
    let want: Vec<String> = (0..3)
        .map(|i| format!("https://shoal-origin-{i}.shoal-origin-headless.shoal.svc.cluster.local:5002"))
        .collect();
    assert_eq!(flag_values(&targs, "--origin"), want);
    // The origins form a ring: the same members (as the trackers name them) on every origin,
    // each naming itself by its pod's stable name, two owners per blob on both sides.
    assert_eq!(flag_values(&args, "--cluster"), want);
    assert_eq!(
        flag_values(&args, "--self"),
        ["https://$(POD_NAME).shoal-origin-headless.shoal.svc.cluster.local:5002"]
    );
    assert_eq!(flag_values(&args, "--internal"), ["0.0.0.0:5002"]);
    let env = origin["containers"][0]["env"].as_array().unwrap();
    assert!(env
        .iter()
        .any(|e| e["name"] == "POD_NAME" && e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"));
    assert_eq!(flag_values(&args, "--replicas"), ["2"]);
    assert_eq!(flag_values(&targs, "--replicas"), ["2"]);
    assert_eq!(flag_values(&args, "--tracker"), ["https://shoal-tracker.shoal.svc.cluster.local:5100"]);
    assert_tls_tracker(&r, "shoal-certificates", true);

    // Operator-provided certificates: no Job, their Secret mounted (with the CRL).
    assert!(!r.objects.iter().any(|o| o["kind"] == "Job"), "{:?}", kinds(&r));
    let ds = find(&r, "DaemonSet", "shoal-agent");
    let pod = &ds["spec"]["template"]["spec"];
    let tls = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "tls").unwrap();
    assert_eq!(tls["secret"]["secretName"], "shoal-certificates");
    assert!(tls["secret"]["items"].as_array().unwrap().iter().any(|i| i["path"] == "crl.pem"));
    let data = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "data").unwrap();
    assert_eq!(data["emptyDir"]["sizeLimit"], "200Gi");
    let aargs = strs(&pod["containers"][0]["args"]);
    assert_eq!(flag_values(&aargs, "--cache-size"), ["80%"]);
    assert!(aargs.ends_with(&["--egress-limit".to_owned(), "800Mbit".to_owned()]));
    assert_eq!(
        flag_values(&strs(&pod["initContainers"][0]["command"]), "--registry"),
        ["docker.io,_default"]
    );

    let sm = find(&r, "ServiceMonitor", "shoal");
    assert_eq!(sm["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(sm["metadata"]["labels"]["release"], "prometheus");
    assert_eq!(sm["spec"]["selector"]["matchLabels"]["shoal/metrics"], "true");
    assert_eq!(sm["spec"]["endpoints"][0]["port"], "metrics");
    // Each metrics Service the ServiceMonitor selects names a port `metrics`.
    for svc in r
        .objects
        .iter()
        .filter(|o| o["kind"] == "Service" && o["metadata"]["labels"]["shoal/metrics"] == "true")
    {
        assert!(svc["spec"]["ports"].as_array().unwrap().iter().any(|p| p["name"] == "metrics"), "{svc}");
    }
    assert!(r.notes.contains("3 origins form a ring"), "{}", r.notes);
    if let Some(bins) = bin_dir() {
        flags_exist(&r, &bins);
    }
}

#[test]
fn plain_manifests_match_a_fresh_render() {
    let Some(python) = venv_python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("kubernetes");
    let venv = python.parent().and_then(Path::parent).unwrap();
    check(
        run(Command::new(repo().join("deploy/render.sh")).arg(&out).env("SHOAL_TOOLS_VENV", venv)),
        "deploy/render.sh",
    );
    let listing = |d: &Path| -> BTreeSet<String> {
        std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()
    };
    let committed = repo().join("deploy/kubernetes");
    assert_eq!(listing(&committed), listing(&out), "run deploy/render.sh and commit deploy/kubernetes");
    for name in listing(&out) {
        assert_eq!(
            std::fs::read_to_string(committed.join(&name)).unwrap(),
            std::fs::read_to_string(out.join(&name)).unwrap(),
            "deploy/kubernetes/{name} differs from a fresh render: run deploy/render.sh"
        );
    }
}

/// Every key of values.yaml has a comment right above it, or one of its parents has.
#[test]
fn every_values_key_is_documented() {
    let text = std::fs::read_to_string(repo().join("deploy/helm/shoal/values.yaml")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    // (indent, documented) of the parents of the current line.
    let mut parents: Vec<(usize, bool)> = Vec::new();
    let mut leaves = 0;
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim_start();
        if t.starts_with('#') || t.starts_with('-') || t.is_empty() {
            continue;
        }
        let (key, value) = t.split_once(':').unwrap_or_else(|| panic!("values.yaml line {}: {line}", i + 1));
        assert!(key.chars().all(|c| c.is_ascii_alphanumeric()), "line {}: {line}", i + 1);
        while parents.last().is_some_and(|(at, _)| *at >= indent(line)) {
            parents.pop();
        }
        let documented =
            (i > 0 && lines[i - 1].trim_start().starts_with('#')) || parents.iter().any(|(_, d)| *d);
        let parent = value.trim().is_empty()
            && lines[i + 1..]
                .iter()
                .find(|l| !l.trim().is_empty())
                .is_some_and(|next| indent(next) > indent(line) && !next.trim_start().starts_with('-'));
        if parent {
            parents.push((indent(line), documented));
        } else {
            leaves += 1;
            assert!(documented, "values.yaml line {}: `{key}` has no comment above it", i + 1);
        }
    }
    assert!(leaves > 40, "{leaves} documented keys");
}
