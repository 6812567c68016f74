//! The control plane with mutual TLS: a tracker started with `--tls` admits only callers
//! with an agent or origin certificate from the cluster CA, not revoked, and refuses every
//! other caller at the handshake, before a byte of its request is read. Agents and origins
//! call it with their node certificates; an origin's announce lists it as an origin, an
//! agent's never does.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use shoal_shared::client::{Announce, AnnounceResponse};
use shoal_shared::digest::Digest;
use shoal_shared::tls::http::{tracker_client, HttpTls};
use shoal_shared::tls::{self, RevokeTarget, Role};
use shoal_tests::cluster::{pull_image, scrape_counter, Cluster, ClusterOptions};
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

/// A cluster CA with certificates issued into `<tmp>/<name>`.
struct Pki {
    tmp: TempDir,
}

impl Pki {
    fn new() -> Self {
        let tmp = TempDir::new().expect("tmp");
        tls::init_ca(&tmp.path().join("ca")).expect("ca");
        Self { tmp }
    }

    fn ca(&self) -> PathBuf {
        self.tmp.path().join("ca")
    }

    fn issue(&self, name: &str, role: Role) -> PathBuf {
        let dir = self.tmp.path().join(name);
        tls::issue(&self.ca(), name, role, &dir).expect("issue");
        dir
    }
}

/// A tracker on loopback serving HTTPS with `tls_dir`; its one origin does not exist.
struct Tracker {
    url: String,
    addr: SocketAddr,
    /// The plain operations listener (`--metrics`).
    ops: SocketAddr,
    shutdown: CancellationToken,
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn start_tracker(tls_dir: Option<&Path>) -> Tracker {
    shoal_tests::cluster::init_tracing();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let ops_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind ops");
    let ops = ops_listener.local_addr().expect("ops addr");
    let listeners = shoal_tracker::Listeners { http: listener, metrics: Some(ops_listener) };
    // Nothing listens on port 9 of loopback: lookups fail at once, announces still work.
    let mut config = shoal_tracker::Config::new(vec!["http://127.0.0.1:9".to_owned()]);
    config.tls = tls_dir.map(Path::to_path_buf);
    let shutdown = CancellationToken::new();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move { shoal_tracker::run(config, listeners, shutdown).await.expect("tracker") }
    });
    let scheme = if tls_dir.is_some() { "https" } else { "http" };
    let tracker = Tracker { url: format!("{scheme}://{addr}"), addr, ops, shutdown };
    // Up when it accepts TCP (a handshake needs a certificate, which not every test has).
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return tracker;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("tracker did not start");
}

/// The client a node with the certificate in `dir` calls trackers with.
fn node_client(dir: &Path, role: Role) -> reqwest::Client {
    tracker_client(&HttpTls::load(dir, role).expect("load")).expect("client")
}

/// A client that trusts the cluster CA (so it would accept the tracker) but has no
/// certificate of its own.
fn anonymous_client(ca_dir: &Path) -> reqwest::Client {
    let ca = std::fs::read(ca_dir.join("ca.pem")).expect("ca.pem");
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).expect("pem"))
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

fn digest() -> Digest {
    Digest::of(b"control plane")
}

/// POSTs an announce of `digest()` by `peer` (complete) to the tracker at `url`.
async fn announce(
    client: &reqwest::Client,
    url: &str,
    peer: SocketAddr,
) -> Result<reqwest::Response, String> {
    let body = Announce { digest: digest(), peer, complete: true };
    client.post(format!("{url}/shoal/v1/announce")).json(&body).send().await.map_err(|e| error_chain(&e))
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// The peers the tracker recorded for `digest()`, asked with a valid agent certificate.
async fn recorded(tracker: &Tracker, reader: &reqwest::Client) -> Vec<serde_json::Value> {
    let url = format!("{}/shoal/v1/peers/{}", tracker.url, digest());
    let body: serde_json::Value = reader.get(&url).send().await.expect("peers").json().await.expect("json");
    body["peers"].as_array().cloned().unwrap_or_default()
}

fn peer(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Asserts that `result` is a refusal during the TLS handshake (a fatal alert, no HTTP
/// status), naming one of `alerts`.
fn assert_refused(who: &str, result: Result<reqwest::Response, String>, alerts: &[&str]) {
    match result {
        Ok(resp) => panic!("{who}: the tracker answered {} instead of refusing the handshake", resp.status()),
        Err(e) => assert!(
            alerts.iter().any(|a| e.contains(&format!("fatal alert: {a}"))),
            "{who}: expected a TLS alert {alerts:?}, got: {e}"
        ),
    }
}

/// Only cluster members with a caller's role get in: no certificate, another CA's, a
/// revoked one and a tracker's are refused at the handshake, and plain HTTP gets nothing.
/// Nothing any of them sent is recorded; the agent's announce is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_agents_and_origins_of_the_cluster_get_past_the_handshake() {
    let pki = Pki::new();
    let stolen = pki.issue("stolen", Role::Agent);
    tls::revoke(&pki.ca(), RevokeTarget::Name("stolen")).expect("revoke");
    // Issued after the revocation, so the tracker's directory carries the CA's crl.pem.
    let tracker_dir = pki.issue("tracker", Role::Tracker);
    assert!(tracker_dir.join("crl.pem").exists());
    let agent = pki.issue("agent", Role::Agent);
    let other_tracker = pki.issue("tracker-2", Role::Tracker);
    // A certificate and key from another CA, next to this cluster's ca.pem (so the caller
    // trusts the tracker and only the tracker's check of the caller can stop it).
    let foreign = Pki::new();
    let foreign_dir = foreign.issue("foreign", Role::Agent);
    std::fs::copy(pki.ca().join("ca.pem"), foreign_dir.join("ca.pem")).expect("copy ca");

    let tracker = start_tracker(Some(&tracker_dir)).await;
    let url = tracker.url.clone();

    let anonymous = announce(&anonymous_client(&pki.ca()), &url, peer(1001)).await;
    assert_refused("no certificate", anonymous, &["CertificateRequired"]);
    // Both CAs have the same name: the foreign certificate's signature fails against this
    // cluster's CA key (DecryptError); a CA of another name would be UnknownCA.
    let foreign = announce(&node_client(&foreign_dir, Role::Agent), &url, peer(1002)).await;
    assert_refused("another CA", foreign, &["DecryptError", "UnknownCA"]);
    let revoked = announce(&node_client(&stolen, Role::Agent), &url, peer(1003)).await;
    assert_refused("revoked", revoked, &["CertificateRevoked"]);
    let tracker_role = announce(&node_client(&other_tracker, Role::Tracker), &url, peer(1004)).await;
    assert_refused("tracker role", tracker_role, &["AccessDenied"]);
    let plain = format!("http://{}", tracker.addr);
    if let Ok(resp) = announce(&reqwest::Client::new(), &plain, peer(1005)).await {
        assert!(!resp.status().is_success(), "plain HTTP announce answered {}", resp.status());
    }

    let agent_client = node_client(&agent, Role::Agent);
    let resp = announce(&agent_client, &url, peer(1006)).await.expect("agent announce");
    assert!(resp.status().is_success(), "agent announce: {}", resp.status());
    let _: AnnounceResponse = resp.json().await.expect("answer");

    let peers = recorded(&tracker, &agent_client).await;
    let ports: Vec<u64> =
        peers.iter().filter_map(|p| p["addr"].as_str()?.rsplit(':').next()?.parse().ok()).collect();
    assert_eq!(ports, vec![1006], "recorded peers: {peers:?}");
    let announces = scrape_counter(&agent_client, &format!("{url}/metrics"), "shoal_tracker_announces_total")
        .await
        .expect("metrics");
    assert_eq!(announces, 1);
}

/// A tracker with `--tls` admits no caller without a certificate on its main port, so
/// probes and scrapers use its plain operations listener (`--metrics`): liveness, metrics
/// and the status page answer there without a certificate, and nothing of the control
/// plane (announces, lookups, the peer table) is served on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_tracker_answers_probes_and_scrapes_on_its_plain_ops_listener() {
    let pki = Pki::new();
    let tracker = start_tracker(Some(&pki.issue("tracker", Role::Tracker))).await;
    let plain = reqwest::Client::new();
    let ops = format!("http://{}", tracker.ops);
    let get = |path: &str| plain.get(format!("{ops}{path}")).send();
    let healthz = get("/healthz").await.expect("healthz");
    assert_eq!(healthz.status(), 200);
    let metrics = get("/metrics").await.expect("metrics").text().await.expect("body");
    assert!(metrics.contains("shoal_tracker_announces"), "{metrics}");
    assert!(get("/status").await.expect("status").status().is_success());
    // Its one origin does not exist: not ready, and it says so (503, not a TLS refusal).
    assert_eq!(get("/readyz").await.expect("readyz").status(), 503);
    // The control plane is not on the ops listener.
    let announce_plain = announce(&plain, &ops, peer(3001)).await.expect("answered");
    assert_eq!(announce_plain.status(), 404);
    let peers = get(&format!("/shoal/v1/peers/{}", digest())).await.expect("peers");
    assert_eq!(peers.status(), 404);
    // The main port still requires a certificate, for the operations routes too.
    assert_refused(
        "no certificate",
        announce(&anonymous_client(&pki.ca()), &tracker.url, peer(3002)).await,
        &["CertificateRequired"],
    );
    let healthz_tls = anonymous_client(&pki.ca()).get(format!("{}/healthz", tracker.url)).send().await;
    assert!(healthz_tls.is_err(), "the TLS port answered a caller without a certificate");
}

/// With mutual TLS the tracker knows who announces: an origin's certificate lists it as an
/// origin, an agent's announce of a whole blob makes it a seeder and nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_an_origin_certificate_is_listed_as_an_origin() {
    let pki = Pki::new();
    let tracker_dir = pki.issue("tracker", Role::Tracker);
    let origin = node_client(&pki.issue("origin", Role::Origin), Role::Origin);
    let agent = node_client(&pki.issue("agent", Role::Agent), Role::Agent);
    let tracker = start_tracker(Some(&tracker_dir)).await;

    for (client, port) in [(&origin, 2001), (&agent, 2002)] {
        let resp = announce(client, &tracker.url, peer(port)).await.expect("announce");
        assert!(resp.status().is_success(), "announce: {}", resp.status());
    }
    let peers = recorded(&tracker, &agent).await;
    let origin_of = |port: u16| {
        peers
            .iter()
            .find(|p| p["addr"].as_str() == Some(&peer(port).to_string()))
            .and_then(|p| p["origin"].as_bool())
            .unwrap_or_else(|| panic!("{port} not recorded: {peers:?}"))
    };
    assert!(origin_of(2001), "the origin's announce is not listed as an origin: {peers:?}");
    assert!(!origin_of(2002), "an agent's announce is listed as an origin: {peers:?}");
}

/// A certificate revoked while the tracker runs is refused once the tracker has reloaded
/// its directory (every 10 s), without a restart: new connections at the handshake, and a
/// keep-alive connection made before (which the handshake no longer guards) at its next
/// request, with 403 and the connection closed. Other callers are not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_revoked_while_the_tracker_runs_is_refused_after_reload() {
    let pki = Pki::new();
    let tracker_dir = pki.issue("tracker", Role::Tracker);
    let agent = pki.issue("agent", Role::Agent);
    let other = node_client(&pki.issue("other", Role::Agent), Role::Agent);
    let tracker = start_tracker(Some(&tracker_dir)).await;
    let healthz = format!("{}/healthz", tracker.url);
    let fresh = || node_client(&agent, Role::Agent).get(&healthz).send();
    assert!(fresh().await.expect("before revocation").status().is_success());
    // One client, so one pooled keep-alive connection, made before the revocation.
    let kept = node_client(&agent, Role::Agent);
    assert!(kept.get(&healthz).send().await.expect("kept, before").status().is_success());

    tls::revoke(&pki.ca(), RevokeTarget::Name("agent")).expect("revoke");
    std::fs::copy(pki.ca().join("crl.pem"), tracker_dir.join("crl.pem")).expect("hand out crl.pem");
    let deadline = tokio::time::Instant::now() + tls::reload::RELOAD_INTERVAL * 2 + Duration::from_secs(5);
    // The kept connection is used every 500 ms, so it never idles out: only a check of
    // each request can stop it.
    loop {
        let resp = kept.get(&healthz).send().await.expect("kept connection");
        if resp.status() == reqwest::StatusCode::FORBIDDEN {
            let body = resp.text().await.unwrap_or_default();
            assert!(body.contains("no longer trusted"), "{body}");
            break;
        }
        assert!(resp.status().is_success(), "kept: {}", resp.status());
        assert!(
            tokio::time::Instant::now() < deadline,
            "a revoked caller's keep-alive connection still served"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The tracker closed that connection: the next request needs a handshake, refused.
    let again = kept.get(&healthz).send().await.map_err(|e| error_chain(&e));
    assert_refused("revoked, reconnecting", again, &["CertificateRevoked"]);
    assert_refused(
        "revoked, new client",
        fresh().await.map_err(|e| error_chain(&e)),
        &["CertificateRevoked"],
    );
    assert!(other.get(&healthz).send().await.expect("other").status().is_success());
}

/// A whole cluster through an mTLS tracker: agents and the origin call it with their
/// certificates (`https://`), the image is pulled through two agents, the tracker has
/// recorded both agents, and the origin (announcing its hot set) is listed as an origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_announce_and_pull_through_an_mtls_tracker() {
    let c = Cluster::start(ClusterOptions {
        agents: 2,
        piece_length: 64 << 10,
        tracker_tls: true,
        ..Default::default()
    })
    .await
    .expect("cluster");
    assert!(c.tracker_url.starts_with("https://"));
    let image = c.push_image("app/mtls:v1", &[300 << 10, 200 << 10], 7).await.expect("push");
    for agent in &c.agents {
        let pulled = pull_image(&c.client, &agent.registry_url, "app/mtls", "v1").await.expect("pull");
        assert_eq!(pulled.manifest_digest, image.manifest);
    }
    let (layer, _) = image.layers[0].clone();
    let url = format!("{}/shoal/v1/peers/{layer}", c.tracker_url);
    let agent_peers: Vec<String> = c.agents.iter().map(|a| a.peer_addr.to_string()).collect();
    let origin_peer = c.origin_peer.to_string();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let body: serde_json::Value =
            c.tracker_client.get(&url).send().await.expect("peers").json().await.expect("json");
        let peers = body["peers"].as_array().cloned().unwrap_or_default();
        let listed = |addr: &str| peers.iter().find(|p| p["addr"].as_str() == Some(addr));
        let agents_in = agent_peers.iter().all(|a| listed(a).is_some_and(|p| p["origin"] == false));
        let origin_in = listed(&origin_peer).is_some_and(|p| p["origin"] == true);
        if agents_in && origin_in {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "tracker lists {peers:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // A client without a certificate gets nothing out of the tracker.
    assert!(c.client.get(&url).send().await.is_err());
}

/// A cluster whose tracker asks the origin on its internal listener (`--internal`,
/// `https://`) with the tracker's certificate and no upload token: the tag and every blob's
/// metainfo come from there, and two agents pull the image end to end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tracker_asks_the_origin_on_its_internal_listener() {
    let c = Cluster::start(ClusterOptions {
        agents: 2,
        piece_length: 64 << 10,
        tracker_tls: true,
        origin_internal: true,
        upload_token: Some("internal-test-token".into()),
        ..Default::default()
    })
    .await
    .expect("cluster");
    let internal = c.origin_internal_url.clone().expect("internal listener");
    assert!(internal.starts_with("https://"));
    assert_eq!(c.tracker_origin_url, internal, "the tracker is told the internal listener only");
    let image = c.push_image("app/internal:v1", &[300 << 10, 100 << 10], 3).await.expect("push");
    for agent in &c.agents {
        let pulled = pull_image(&c.client, &agent.registry_url, "app/internal", "v1").await.expect("pull");
        assert_eq!(pulled.manifest_digest, image.manifest);
    }
    // The tracker got the metainfo (and cached it): it answers for the layer.
    let (layer, _) = image.layers[0].clone();
    let resp = c
        .tracker_client
        .get(format!("{}/shoal/v1/metainfo/{layer}", c.tracker_url))
        .send()
        .await
        .expect("get");
    assert!(resp.status().is_success(), "tracker metainfo: {}", resp.status());
}

/// The origin's internal listener admits only tracker and origin certificates of the
/// cluster, not revoked: an agent's certificate, no certificate and a revoked tracker's are
/// refused at the handshake; a tracker's gets metainfo and info but may not write; a
/// tracker certificate revoked while its keep-alive connection is open gets 403 once the
/// origin reloaded its directory, then cannot connect again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_internal_listener_admits_only_trackers_and_origins_of_the_cluster() {
    let c = Cluster::start(ClusterOptions {
        agents: 0,
        piece_length: 64 << 10,
        tracker_tls: true,
        origin_internal: true,
        upload_token: Some("internal-test-token".into()),
        ..Default::default()
    })
    .await
    .expect("cluster");
    let internal = c.origin_internal_url.clone().expect("internal listener");
    let image = c.push_image("app/guarded:v1", &[100 << 10], 9).await.expect("push");
    let (layer, _) = image.layers[0].clone();
    let metainfo = format!("{internal}/shoal/v1/metainfo/{layer}");
    let issue = |name: &str, role: Role| {
        let dir = c.ca_dir.parent().expect("cluster dir").join(name);
        tls::issue(&c.ca_dir, name, role, &dir).expect("issue");
        dir
    };
    let client_of = |dir: &Path, role: Role| {
        let tls = HttpTls::load(dir, role).expect("load");
        shoal_shared::tls::http::mtls_client(&tls, &[Role::Origin], reqwest::Client::builder())
            .expect("client")
    };

    // A tracker: reads, not writes.
    let tracker = client_of(&issue("tracker-ok", Role::Tracker), Role::Tracker);
    let resp = tracker.get(&metainfo).send().await.expect("tracker metainfo");
    assert_eq!(resp.status(), 200);
    let info: serde_json::Value = tracker
        .get(format!("{internal}/shoal/v1/info"))
        .send()
        .await
        .expect("info")
        .json()
        .await
        .expect("json");
    assert_eq!(info["peer"].as_str(), Some(c.origin_peer.to_string().as_str()));
    let put = tracker
        .put(format!("{internal}/v2/app/guarded/manifests/hijack"))
        .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
        .body(b"{}".to_vec())
        .send()
        .await
        .expect("put");
    assert_eq!(put.status(), 401, "a tracker certificate wrote a tag");

    // An agent, nobody, and the public port's plain HTTP on the internal listener.
    let agent = client_of(&issue("agent-x", Role::Agent), Role::Agent);
    assert_refused(
        "agent role",
        agent.get(&metainfo).send().await.map_err(|e| error_chain(&e)),
        &["AccessDenied"],
    );
    let anonymous = anonymous_client(&c.ca_dir).get(&metainfo).send().await.map_err(|e| error_chain(&e));
    assert_refused("no certificate", anonymous, &["CertificateRequired"]);
    let plain = reqwest::Client::new().get(metainfo.replacen("https://", "http://", 1)).send().await;
    assert!(plain.map_or(true, |r| !r.status().is_success()), "plain HTTP on the internal listener");

    // A tracker certificate revoked while connected.
    let doomed = issue("tracker-doomed", Role::Tracker);
    let kept = client_of(&doomed, Role::Tracker);
    assert_eq!(kept.get(&metainfo).send().await.expect("before").status(), 200);
    tls::revoke(&c.ca_dir, RevokeTarget::Name("tracker-doomed")).expect("revoke");
    std::fs::copy(c.ca_dir.join("crl.pem"), c.origin_tls_dir().join("crl.pem")).expect("hand out crl.pem");
    let deadline = tokio::time::Instant::now() + tls::reload::RELOAD_INTERVAL * 2 + Duration::from_secs(5);
    loop {
        let resp = kept.get(&metainfo).send().await.expect("kept connection");
        if resp.status() == reqwest::StatusCode::FORBIDDEN {
            break;
        }
        assert_eq!(resp.status(), 200);
        assert!(tokio::time::Instant::now() < deadline, "a revoked tracker's connection still served");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let again = client_of(&doomed, Role::Tracker).get(&metainfo).send().await.map_err(|e| error_chain(&e));
    assert_refused("revoked tracker", again, &["CertificateRevoked"]);
    // The others are unaffected.
    assert_eq!(tracker.get(&metainfo).send().await.expect("tracker after").status(), 200);
}
