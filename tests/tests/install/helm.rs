//! The Helm chart rendered by a real Helm engine (helm-python-sdk) and its objects checked:
//! schema validation, lookups by kind and name, every flag a container passes exists in the
//! binary's `--help`, and the trackers' TLS wiring.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::{check, repo, run};

/// A chart rendered with `values` (files layered on the chart's own): its objects, its
/// NOTES.txt and the path of the YAML stream.
pub(crate) struct Rendered {
    pub(crate) objects: Vec<Value>,
    pub(crate) notes: String,
    pub(crate) stream: PathBuf,
}

pub(crate) fn render(python: &Path, dir: &Path, values: &[PathBuf]) -> Rendered {
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
pub(crate) fn validate(python: &Path, r: &Rendered, crd_kinds: &[&str]) {
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

pub(crate) fn find<'a>(r: &'a Rendered, kind: &str, name: &str) -> &'a Value {
    r.objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in {:?}", kinds(r)))
}

pub(crate) fn kinds(r: &Rendered) -> Vec<String> {
    r.objects.iter().map(|o| format!("{}/{}", o["kind"], o["metadata"]["name"])).collect()
}

pub(crate) fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap_or_default().to_owned()).collect())
        .unwrap_or_default()
}

/// The value after `flag` in `args` (every one, for a repeated flag).
pub(crate) fn flag_values(args: &[String], flag: &str) -> Vec<String> {
    args.windows(2).filter(|w| w[0] == flag).map(|w| w[1].clone()).collect()
}

/// Every `--flag` the chart's containers give a shoal binary exists in that binary's
/// `--help`.
pub(crate) fn flags_exist(r: &Rendered, bins: &Path) {
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
pub(crate) fn assert_tls_tracker(r: &Rendered, secret: &str, crl: bool) {
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
