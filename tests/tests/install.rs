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

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;
use shoal_tests::cluster::{Cluster, ClusterOptions, UpstreamOptions};
use shoal_tests::tools::{run_async, Containerd};

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

// ---------------------------------------------------------------------------------------
// Helm chart and plain manifests

/// A chart rendered with `values` (files layered on the chart's own): its objects, its
/// NOTES.txt and the path of the YAML stream.
struct Rendered {
    objects: Vec<Value>,
    notes: String,
    stream: PathBuf,
}

fn render(python: &Path, dir: &Path, values: &[PathBuf]) -> Rendered {
    let (json, notes, stream) = (dir.join("objects.json"), dir.join("NOTES.txt"), dir.join("all.yaml"));
    let mut cmd = Command::new(python);
    cmd.arg(repo().join("deploy/helm-render.py")).arg(repo().join("deploy/helm/shoal")).arg("--lint");
    for v in values {
        cmd.arg("--values").arg(v);
    }
    cmd.arg("--json").arg(&json).arg("--notes").arg(&notes);
    let out = check(run(&mut cmd), "helm render");
    std::fs::write(&stream, &out.stdout).unwrap();
    let objects: Vec<Value> = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    Rendered {
        objects: objects.into_iter().map(|o| o["object"].clone()).collect(),
        notes: std::fs::read_to_string(&notes).unwrap(),
        stream,
    }
}

/// Validates every object of the stream against the Kubernetes schemas (strict: unknown
/// fields are errors). Objects of `crd_kinds` have no schema there and are only allowed to
/// be reported as such; every other object must be reported as passed.
fn validate(python: &Path, r: &Rendered, crd_kinds: &[&str]) {
    let out = run(Command::new(python).args(["-m", "kubernetes_validate", "--strict"]).arg(&r.stream));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "kubernetes-validate failed:\n{text}");
    let passed = text.lines().filter(|l| l.contains(" passed for resource ")).count();
    for line in text.lines().filter(|l| !l.contains(" passed for resource ")) {
        let excused = crd_kinds.iter().any(|k| line.contains(&format!("Couldn't find schema for kind {k} ")));
        assert!(excused || line.trim().is_empty(), "kubernetes-validate: {line}\n{text}");
    }
    let crds = r.objects.iter().filter(|o| crd_kinds.contains(&o["kind"].as_str().unwrap_or(""))).count();
    assert_eq!(passed + crds, r.objects.len(), "every object validated:\n{text}");
}

fn find<'a>(r: &'a Rendered, kind: &str, name: &str) -> &'a Value {
    r.objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in {:?}", kinds(r)))
}

fn kinds(r: &Rendered) -> Vec<String> {
    r.objects.iter().map(|o| format!("{}/{}", o["kind"], o["metadata"]["name"])).collect()
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap_or_default().to_owned()).collect())
        .unwrap_or_default()
}

/// The value after `flag` in `args` (every one, for a repeated flag).
fn flag_values(args: &[String], flag: &str) -> Vec<String> {
    args.windows(2).filter(|w| w[0] == flag).map(|w| w[1].clone()).collect()
}

/// Every `--flag` the chart's containers give a shoal binary exists in that binary's
/// `--help`.
fn flags_exist(r: &Rendered, bins: &Path) {
    for o in &r.objects {
        let spec = &o["spec"]["template"]["spec"];
        let containers = [&spec["initContainers"], &spec["containers"]];
        for c in containers.iter().filter_map(|c| c.as_array()).flatten() {
            let mut words = strs(&c["command"]);
            words.extend(strs(&c["args"]));
            let Some(bin) = words.first().and_then(|w| w.strip_prefix("/usr/local/bin/")).map(str::to_owned)
            else {
                continue;
            };
            let sub: Vec<&str> =
                words[1..].iter().take_while(|w| !w.starts_with('-')).map(String::as_str).collect();
            let sub: Vec<&str> = sub.into_iter().take_while(|w| !w.starts_with('/')).collect();
            let help = check(run(Command::new(bins.join(&bin)).args(&sub).arg("--help")), "--help");
            let help = String::from_utf8_lossy(&help.stdout).into_owned();
            for flag in words.iter().filter(|w| w.starts_with("--")) {
                let known = help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n"));
                assert!(known, "{bin} {sub:?} has no {flag} ({} {})", o["kind"], o["metadata"]["name"]);
            }
        }
    }
}

/// The trackers run with `--tls` (the tracker certificate from `secret`, with the CRL when
/// `crl`) and a plain operations listener (`--metrics`) that the probes and the metrics
/// Service use; agents and origins call them at `https://` URLs with their certificates.
fn assert_tls_tracker(r: &Rendered, secret: &str, crl: bool) {
    let tracker = find(r, "Deployment", "shoal-tracker");
    let pod = &tracker["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let args = strs(&c["args"]);
    assert_eq!(flag_values(&args, "--tls"), ["/etc/shoal/tls"]);
    assert_eq!(flag_values(&args, "--metrics"), ["0.0.0.0:5101"]);
    assert_eq!(flag_values(&args, "--http"), ["0.0.0.0:5100"]);
    let port = |name: &str| {
        c["ports"].as_array().unwrap().iter().find(|p| p["name"] == name).map(|p| p["containerPort"].clone())
    };
    assert_eq!(port("metrics"), Some(5101.into()));
    assert_eq!(port("http"), Some(5100.into()));
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &c[probe]["httpGet"];
        assert_eq!((&get["port"], &get["path"]), (&"metrics".into(), &path.into()), "{probe}");
        assert!(get["scheme"].is_null() || get["scheme"] == "HTTP", "{probe}");
    }
    let mount = c["volumeMounts"].as_array().unwrap().iter().find(|m| m["name"] == "tls").unwrap();
    assert_eq!(mount["mountPath"], "/etc/shoal/tls");
    let tls = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "tls").unwrap();
    assert_eq!(tls["secret"]["secretName"], secret);
    let items: BTreeSet<(String, String)> = tls["secret"]["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["key"].as_str().unwrap().to_owned(), i["path"].as_str().unwrap().to_owned()))
        .collect();
    let mut want: BTreeSet<(String, String)> =
        [("ca.pem", "ca.pem"), ("tracker-cert.pem", "cert.pem"), ("tracker-key.pem", "key.pem")]
            .iter()
            .map(|(k, p)| (k.to_string(), p.to_string()))
            .collect();
    if crl {
        want.insert(("crl.pem".to_owned(), "crl.pem".to_owned()));
    }
    assert_eq!(items, want);
    // The metrics Service (what the ServiceMonitor scrapes) targets the plain port.
    let svc = find(r, "Service", "shoal-tracker-metrics");
    let p = &svc["spec"]["ports"][0];
    assert_eq!(
        (&p["name"], &p["port"], &p["targetPort"]),
        (&"metrics".into(), &5101.into(), &"metrics".into())
    );
    // Agents and origins call the trackers over HTTPS.
    let agent = find(r, "DaemonSet", "shoal-agent");
    let origin = find(r, "StatefulSet", "shoal-origin");
    for o in [agent, origin] {
        let args = strs(&o["spec"]["template"]["spec"]["containers"][0]["args"]);
        let urls = flag_values(&args, "--tracker");
        assert!(!urls.is_empty() && urls.iter().all(|u| u.starts_with("https://")), "{urls:?}");
        assert_eq!(flag_values(&args, "--tls"), ["/etc/shoal/tls"]);
    }
}

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

// ---------------------------------------------------------------------------------------
// systemd

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

// ---------------------------------------------------------------------------------------
// Container image

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

// ---------------------------------------------------------------------------------------
// containerd-config on a node with its own hosts.toml

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
