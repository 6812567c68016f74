//! The upstream client against a small in-process registry that does what Docker Hub does
//! and the distribution registry in the integration tests does not: bearer tokens from a
//! `WWW-Authenticate` challenge, a lying `Docker-Content-Digest`, schema 1, 429 and stalls.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use shoal_shared::digest::Digest;
use shoal_shared::hint::Hint;
use shoal_shared::store::BlobStore;
use tokio::sync::watch;

use super::{FlightGuard, InFlight, Registry, Settings, UpstreamError, Upstreams};

const LAYER: &[u8] = b"layer bytes of the fake registry";
/// Another blob of repository `r`, not referenced by the manifest.
const OTHER_LAYER: &[u8] = b"other layer bytes of the fake registry";
/// Requests for repository `bogus` are answered (404, as the registry knows no such
/// repository) this late, so a test can join a flight running under that name.
const BOGUS_DELAY: Duration = Duration::from_millis(300);
const SCHEMA1: &str = r#"{"schemaVersion": 1, "name": "r", "tag": "old", "fsLayers": []}"#;

#[derive(Default)]
struct Fake {
    realm: std::sync::Mutex<String>,
    token_calls: AtomicUsize,
    blob_gets: AtomicUsize,
    manifest_gets: AtomicUsize,
    /// Every request to `/v2/...`, answered or not.
    requests: AtomicUsize,
    throttled: AtomicBool,
    /// Requests to `/v2/...` get no answer.
    stalled: AtomicBool,
}

fn manifest() -> String {
    let layer = Digest::of(LAYER);
    format!(
        r#"{{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {{"mediaType": "application/vnd.oci.image.config.v1+json", "digest": "{layer}", "size": {n}}},
            "layers": [{{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": "{layer}", "size": {n}}}]}}"#,
        n = LAYER.len()
    )
}

async fn token(fake: web::Data<Fake>) -> HttpResponse {
    fake.token_calls.fetch_add(1, Ordering::SeqCst);
    HttpResponse::Ok().json(serde_json::json!({"token": "tok", "expires_in": 300}))
}

async fn v2(req: HttpRequest, fake: web::Data<Fake>) -> HttpResponse {
    fake.requests.fetch_add(1, Ordering::SeqCst);
    if fake.stalled.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_secs(60)).await;
    }
    if req.path().starts_with("/v2/bogus/") {
        tokio::time::sleep(BOGUS_DELAY).await;
    }
    if fake.throttled.load(Ordering::SeqCst) {
        return HttpResponse::TooManyRequests().finish();
    }
    let authorized = req.headers().get("authorization").is_some_and(|v| v == "Bearer tok");
    if !authorized {
        let realm = fake.realm.lock().expect("lock").clone();
        return HttpResponse::Unauthorized()
            .insert_header((
                "WWW-Authenticate",
                format!("Bearer realm=\"{realm}\",service=\"fake\",scope=\"repository:r:pull\""),
            ))
            .finish();
    }
    let path = req.path();
    let lie = format!("sha256:{}", "0".repeat(64));
    if path == "/v2/r/manifests/v1" {
        if req.method() == actix_web::http::Method::GET {
            fake.manifest_gets.fetch_add(1, Ordering::SeqCst);
        }
        return HttpResponse::Ok()
            .insert_header(("Content-Type", "application/vnd.oci.image.manifest.v1+json"))
            .insert_header(("Docker-Content-Digest", lie))
            .body(manifest());
    }
    if path == "/v2/r/manifests/old" {
        return HttpResponse::Ok()
            .insert_header(("Content-Type", "application/vnd.docker.distribution.manifest.v1+prettyjws"))
            .body(SCHEMA1);
    }
    for blob in [LAYER, OTHER_LAYER] {
        if path == format!("/v2/r/blobs/{}", Digest::of(blob)) {
            fake.blob_gets.fetch_add(1, Ordering::SeqCst);
            return HttpResponse::Ok().body(blob);
        }
    }
    HttpResponse::NotFound().finish()
}

async fn start_fake() -> (SocketAddr, web::Data<Fake>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let fake = web::Data::new(Fake::default());
    *fake.realm.lock().expect("lock") = format!("http://{addr}/token");
    let data = fake.clone();
    let server = HttpServer::new(move || {
        App::new().app_data(data.clone()).route("/token", web::get().to(token)).default_service(web::to(v2))
    })
    .workers(1)
    .disable_signals()
    .listen(listener)
    .expect("listen")
    .run();
    tokio::spawn(server);
    (addr, fake)
}

/// Upstreams with the fake registry as their one upstream.
struct Setup {
    ups: Arc<Upstreams>,
    fake: web::Data<Fake>,
    store: BlobStore,
    _dir: tempfile::TempDir,
}

async fn setup(tag_ttl: Duration, stall: Duration) -> Setup {
    let (addr, fake) = start_fake().await;
    let dir = tempfile::tempdir().expect("tmp");
    let store = BlobStore::open(dir.path()).expect("store");
    let settings = Settings {
        urls: vec![format!("http://{addr}")],
        auth_file: None,
        helper_path: None,
        ca_file: None,
        tag_ttl,
        stall,
        attempts: 1,
    };
    let ups = Arc::new(Upstreams::new(&settings, &store, 1 << 16).expect("upstreams"));
    Setup { ups, fake, store, _dir: dir }
}

/// The error of a result that must have failed.
fn error<T: std::fmt::Debug>(r: &Result<T, Arc<UpstreamError>>) -> &UpstreamError {
    match r {
        Err(e) => e,
        Ok(v) => panic!("expected an error, got {v:?}"),
    }
}

#[tokio::test]
async fn bearer_tokens_are_cached_digests_computed_schema1_refused_and_429_serves_the_cached_tag() {
    let Setup { ups, fake, store, _dir } = setup(Duration::ZERO, Duration::from_secs(5)).await;

    // The digest is the one of the bytes, not the header's.
    let digest = ups.resolve_tag(0, "r", "v1").await.expect("resolve");
    assert_eq!(digest, Digest::of(manifest().as_bytes()));
    assert!(store.size(&digest).await.is_some());

    // Many requests, one token: concurrent fetches of one blob are one GET.
    let hint = Hint::new("r", None).expect("hint");
    let layer = Digest::of(LAYER);
    let waits = (0..8).map(|_| {
        let (ups, hint) = (ups.clone(), hint.clone());
        async move { ups.wait_blob(layer, &hint).await }
    });
    for r in futures_util::future::join_all(waits).await {
        r.expect("blob");
    }
    assert_eq!(fake.blob_gets.load(Ordering::SeqCst), 1);
    ups.resolve_tag(0, "r", "v1").await.expect("again");
    assert_eq!(fake.token_calls.load(Ordering::SeqCst), 1, "the token is reused until it expires");

    match error(&ups.resolve_tag(0, "r", "old").await) {
        UpstreamError::Schema1(m) => assert!(m.contains("r:old")),
        other => panic!("schema 1 must be refused, got {other:?}"),
    }

    // 429: the cached tag is served; a tag never fetched is a transient error.
    fake.throttled.store(true, Ordering::SeqCst);
    assert_eq!(ups.resolve_tag(0, "r", "v1").await.expect("cached"), digest);
    match error(&ups.resolve_tag(0, "r", "v2").await) {
        e @ UpstreamError::Status { status: 429, .. } => assert!(e.transient()),
        other => panic!("expected 429, got {other:?}"),
    }
    // A blob not held cannot be fetched while throttled: reported, not hung.
    let other = Digest::of(b"not there");
    match error(&ups.wait_blob(other, &hint).await) {
        e @ UpstreamError::Status { status: 429, .. } => assert!(e.transient()),
        other => panic!("expected 429, got {other:?}"),
    }
}

#[tokio::test]
async fn a_burst_of_cold_resolutions_of_one_tag_costs_one_manifest_get() {
    let Setup { ups, fake, _dir, .. } = setup(Duration::from_secs(60), Duration::from_secs(5)).await;
    let burst = (0..8).map(|_| {
        let ups = ups.clone();
        async move { ups.resolve_tag(0, "r", "v1").await }
    });
    for r in futures_util::future::join_all(burst).await {
        assert_eq!(r.expect("resolve"), Digest::of(manifest().as_bytes()));
    }
    assert_eq!(fake.manifest_gets.load(Ordering::SeqCst), 1);
    assert!(ups.resolving.is_empty(), "per-tag locks are dropped");
}

#[tokio::test]
async fn lookups_waiting_for_a_failing_or_stalling_resolution_share_its_outcome() {
    let stall = Duration::from_millis(400);
    let Setup { ups, fake, _dir, .. } = setup(Duration::from_secs(60), stall).await;
    let requests = || fake.requests.load(Ordering::SeqCst);
    let burst = || {
        futures_util::future::join_all((0..8).map(|_| {
            let ups = ups.clone();
            async move { ups.resolve_tag(0, "r", "v1").await }
        }))
    };

    // Failing: every lookup gets the one 429.
    fake.throttled.store(true, Ordering::SeqCst);
    for r in burst().await {
        match error(&r) {
            UpstreamError::Status { status: 429, .. } => {}
            other => panic!("expected 429, got {other:?}"),
        }
    }
    assert_eq!(requests(), 1, "one upstream request for the burst");
    assert!(ups.resolving.is_empty(), "per-tag slots are dropped");
    fake.throttled.store(false, Ordering::SeqCst);

    // Stalling: one stall timeout for the burst, not one per lookup in turn.
    fake.stalled.store(true, Ordering::SeqCst);
    let started = Instant::now();
    for r in burst().await {
        match error(&r) {
            UpstreamError::Stalled { .. } => {}
            other => panic!("expected a stall, got {other:?}"),
        }
    }
    assert_eq!(requests(), 2, "one upstream request for the burst");
    assert!(started.elapsed() < stall * 4, "waited {:?}, the stall timeout is {stall:?}", started.elapsed());
    assert!(ups.resolving.is_empty(), "per-tag slots are dropped");

    // Cancelled: a lookup dropped mid-resolution leaves no slot and no outcome behind; the
    // lookup that waited behind it resolves on its own.
    let cancelled = tokio::spawn({
        let ups = ups.clone();
        async move { tokio::time::timeout(Duration::from_millis(100), ups.resolve_tag(0, "r", "v1")).await }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(ups.resolving.len(), 1, "the cancelled lookup is resolving");
    match error(&ups.resolve_tag(0, "r", "v1").await) {
        UpstreamError::Stalled { .. } => {}
        other => panic!("expected a stall, got {other:?}"),
    }
    assert!(cancelled.await.expect("task").is_err(), "the first lookup timed out");
    assert_eq!(requests(), 4, "the waiting lookup made its own request");
    assert!(ups.resolving.is_empty(), "per-tag slots are dropped");
    assert!(tokio::time::timeout(Duration::from_millis(100), ups.resolve_tag(0, "r", "v1")).await.is_err());
    assert!(ups.resolving.is_empty(), "a cancelled lookup leaves no slot behind");

    // Once the upstream is back, lookups resolve: no failure outlives its resolution.
    fake.stalled.store(false, Ordering::SeqCst);
    assert_eq!(ups.resolve_tag(0, "r", "v1").await.expect("resolve"), Digest::of(manifest().as_bytes()));
    assert!(ups.resolving.is_empty(), "per-tag slots are dropped");
}

#[tokio::test]
async fn a_blob_failure_under_one_repository_name_does_not_fail_another() {
    let Setup { ups, fake, _dir, .. } = setup(Duration::from_secs(60), Duration::from_secs(5)).await;
    let (bogus, good) = (Hint::new("bogus", None).expect("hint"), Hint::new("r", None).expect("hint"));
    let requests = || fake.requests.load(Ordering::SeqCst);

    // The failure under a made-up name is remembered for that name only.
    let layer = Digest::of(LAYER);
    match error(&ups.wait_blob(layer, &bogus).await) {
        UpstreamError::NotFound => {}
        other => panic!("expected not found, got {other:?}"),
    }
    let before = requests();
    match error(&ups.wait_blob(layer, &bogus).await) {
        UpstreamError::NotFound => {}
        other => panic!("expected the remembered failure, got {other:?}"),
    }
    assert_eq!(requests(), before, "remembered: the upstream is not asked again");
    ups.wait_blob(layer, &good).await.expect("another name starts its own fetch");
    assert_eq!(fake.blob_gets.load(Ordering::SeqCst), 1);

    // A request that joins a flight running under a made-up name tries again under its own
    // name when that flight fails.
    let other = Digest::of(OTHER_LAYER);
    let (b, g) = tokio::join!(ups.wait_blob(other, &bogus), ups.wait_blob(other, &good));
    match error(&b) {
        UpstreamError::NotFound => {}
        other => panic!("expected not found, got {other:?}"),
    }
    g.expect("the joined flight failed under another name: fetched under its own");
    assert_eq!(fake.blob_gets.load(Ordering::SeqCst), 2);
    assert!(ups.flights.is_empty(), "flights end");
}

#[tokio::test]
async fn a_fetch_task_that_panics_ends_its_flight() {
    let Setup { ups, _dir, .. } = setup(Duration::from_secs(60), Duration::from_secs(5)).await;
    let digest = Digest::of(b"fetched by a task that panics");
    let flight = |ups: &Upstreams| {
        let (tx, rx) = watch::channel(None);
        ups.flights.insert(digest, InFlight { rx: rx.clone(), index: 0, name: "r".into() });
        (FlightGuard { flights: ups.flights.clone(), digest, rx: rx.clone(), tx }, rx)
    };
    let (guard, mut rx) = flight(&ups);
    let task = tokio::spawn(async move {
        let _guard = guard;
        panic!("the fetch task panics");
    });
    assert!(task.await.expect_err("the task panicked").is_panic());
    assert!(ups.flights.is_empty(), "the flight ended with its task");
    assert!(rx.wait_for(Option::is_some).await.is_err(), "waiters see the end");

    // A guard ends its own flight only, not a later one for the same digest.
    let (old, _) = flight(&ups);
    let (new, _) = flight(&ups);
    drop(old);
    assert_eq!(ups.flights.len(), 1, "the later flight stays");
    drop(new);
    assert!(ups.flights.is_empty());
}

#[test]
fn upstream_urls_are_checked() {
    let http = reqwest::Client::new();
    let ok = |u: &str| super::Upstream::new(u, http.clone(), None, Duration::from_secs(1)).map(|u| u.host);
    assert_eq!(ok("https://registry-1.docker.io/").as_deref(), Ok("registry-1.docker.io"));
    assert_eq!(ok("ghcr.io").as_deref(), Ok("ghcr.io"));
    assert_eq!(ok("http://127.0.0.1:5000").as_deref(), Ok("127.0.0.1:5000"));
    assert_eq!(ok("http://localhost:5000").as_deref(), Ok("localhost:5000"));
    assert!(ok("http://registry.example.com").is_err(), "plain HTTP only for localhost");
    assert!(ok("http://127.evil.example").is_err(), "plain HTTP only for localhost");
    assert!(ok("http://127.0.0.1.evil.example:5000").is_err(), "plain HTTP only for localhost");
    assert!(ok("ftp://x").is_err());
    assert!(ok("https://a/b").is_err());
    let hub = super::Upstream::new("https://registry-1.docker.io", http, None, Duration::from_secs(1))
        .expect("hub");
    assert!(hub.serves("docker.io") && hub.serves("registry-1.docker.io") && !hub.serves("ghcr.io"));
}
