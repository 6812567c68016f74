//! The upstream client against a small in-process registry that does what Docker Hub does
//! and the distribution registry in the integration tests does not: bearer tokens from a
//! `WWW-Authenticate` challenge, a lying `Docker-Content-Digest`, schema 1, and 429.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use shoal_shared::digest::Digest;
use shoal_shared::hint::Hint;
use shoal_shared::store::BlobStore;

use super::{Settings, UpstreamError, Upstreams};

const LAYER: &[u8] = b"layer bytes of the fake registry";
const SCHEMA1: &str = r#"{"schemaVersion": 1, "name": "r", "tag": "old", "fsLayers": []}"#;

#[derive(Default)]
struct Fake {
    realm: std::sync::Mutex<String>,
    token_calls: AtomicUsize,
    blob_gets: AtomicUsize,
    manifest_gets: AtomicUsize,
    throttled: AtomicBool,
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
    if path == format!("/v2/r/blobs/{}", Digest::of(LAYER)) {
        fake.blob_gets.fetch_add(1, Ordering::SeqCst);
        return HttpResponse::Ok().body(LAYER);
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

#[tokio::test]
async fn bearer_tokens_are_cached_digests_computed_schema1_refused_and_429_serves_the_cached_tag() {
    let (addr, fake) = start_fake().await;
    let dir = tempfile::tempdir().expect("tmp");
    let store = BlobStore::open(dir.path()).expect("store");
    let settings = Settings {
        urls: vec![format!("http://{addr}")],
        auth_file: None,
        ca_file: None,
        tag_ttl: Duration::ZERO,
        stall: Duration::from_secs(5),
        attempts: 1,
    };
    let ups = Arc::new(Upstreams::new(&settings, &store, 1 << 16).expect("upstreams"));

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

    match ups.resolve_tag(0, "r", "old").await {
        Err(UpstreamError::Schema1(m)) => assert!(m.contains("r:old")),
        other => panic!("schema 1 must be refused, got {other:?}"),
    }

    // 429: the cached tag is served; a tag never fetched is a transient error.
    fake.throttled.store(true, Ordering::SeqCst);
    assert_eq!(ups.resolve_tag(0, "r", "v1").await.expect("cached"), digest);
    match ups.resolve_tag(0, "r", "v2").await {
        Err(e @ UpstreamError::Status { status: 429, .. }) => assert!(e.transient()),
        other => panic!("expected 429, got {other:?}"),
    }
    // A blob not held cannot be fetched while throttled: reported, not hung.
    let other = Digest::of(b"not there");
    assert!(ups.wait_blob(other, &hint).await.is_err());
}

#[tokio::test]
async fn a_burst_of_cold_resolutions_of_one_tag_costs_one_manifest_get() {
    let (addr, fake) = start_fake().await;
    let dir = tempfile::tempdir().expect("tmp");
    let store = BlobStore::open(dir.path()).expect("store");
    let settings = Settings {
        urls: vec![format!("http://{addr}")],
        auth_file: None,
        ca_file: None,
        tag_ttl: Duration::from_secs(60),
        stall: Duration::from_secs(5),
        attempts: 1,
    };
    let ups = Arc::new(Upstreams::new(&settings, &store, 1 << 16).expect("upstreams"));
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

#[test]
fn upstream_urls_are_checked() {
    let http = reqwest::Client::new();
    let ok = |u: &str| super::Upstream::new(u, http.clone(), None, Duration::from_secs(1)).map(|u| u.host);
    assert_eq!(ok("https://registry-1.docker.io/").as_deref(), Ok("registry-1.docker.io"));
    assert_eq!(ok("ghcr.io").as_deref(), Ok("ghcr.io"));
    assert_eq!(ok("http://127.0.0.1:5000").as_deref(), Ok("127.0.0.1:5000"));
    assert!(ok("http://registry.example.com").is_err(), "plain HTTP only for localhost");
    assert!(ok("ftp://x").is_err());
    assert!(ok("https://a/b").is_err());
    let hub = super::Upstream::new("https://registry-1.docker.io", http, None, Duration::from_secs(1))
        .expect("hub");
    assert!(hub.serves("docker.io") && hub.serves("registry-1.docker.io") && !hub.serves("ghcr.io"));
}
