//! Pull-through over a fault-injecting upstream (the [`super::Registry`] seam), in process:
//! an upstream that lies about a digest, cuts a body short, stalls, fails or refuses, with no
//! network and no registry. What each test proves is what the origin promises: nothing
//! unverified is stored or served, a failure is reported typed and remembered for a while
//! then retried, and one blob costs one upstream fetch however many ask for it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::http::StatusCode;
use shoal_shared::digest::Digest;
use shoal_shared::hint::Hint;
use shoal_shared::oci::{ErrorCode, Reference};
use shoal_shared::store::BlobStore;

use super::memory::{Call, Fault, MemoryRegistry};
use super::{Timing, UpstreamError, Upstreams};
use crate::private::PrivateMarks;

const LAYER: &[u8] = &[7; 10_000];
const STALL: Duration = Duration::from_millis(100);
const FAILURE_MEMORY: Duration = Duration::from_millis(200);

struct Rig {
    ups: Arc<Upstreams>,
    registry: Arc<MemoryRegistry>,
    store: BlobStore,
    _dir: tempfile::TempDir,
}

/// Upstreams over one in-memory registry, with `attempts` per blob fetch.
fn rig(attempts: u32) -> Rig {
    let dir = tempfile::tempdir().expect("tmp");
    let store = BlobStore::open(dir.path()).expect("store");
    let registry = Arc::new(MemoryRegistry::new("registry.test"));
    let timing = Timing {
        tag_ttl: Duration::ZERO,
        stall: STALL,
        attempts,
        backoff: Duration::from_millis(1),
        failure_memory: FAILURE_MEMORY,
    };
    let ups = Arc::new(Upstreams::over(vec![registry.clone()], &store, 1 << 16, timing));
    Rig { ups, registry, store, _dir: dir }
}

fn hint(name: &str) -> Hint {
    Hint::new(name, None).expect("hint")
}

fn manifest(layer: &Digest, len: usize) -> Vec<u8> {
    format!(
        r#"{{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {{"mediaType": "application/vnd.oci.image.config.v1+json", "digest": "{layer}", "size": {len}}},
            "layers": [{{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": "{layer}", "size": {len}}}]}}"#
    )
    .into_bytes()
}

/// The error of a result that must have failed.
fn error<T: std::fmt::Debug>(r: Result<T, Arc<UpstreamError>>) -> Arc<UpstreamError> {
    match r {
        Err(e) => e,
        Ok(v) => panic!("expected an error, got {v:?}"),
    }
}

/// Nothing of `digest` is in the store: no blob, no metainfo, no temp file, no mark.
async fn holds_nothing(store: &BlobStore, digest: &Digest) {
    assert_eq!(store.size(digest).await, None, "{digest} is not stored");
    assert!(store.stored_metainfo(digest).await.is_none(), "{digest} has no metainfo");
    assert!(!crate::retention::is_pulled(store, digest).await, "{digest} is not marked pulled");
    assert_eq!(PrivateMarks::new(store).blob(digest).await, None, "{digest} is not marked private");
    let tmp = store.temp_path("probe");
    let tmp = tmp.parent().expect("tmp dir");
    let left = std::fs::read_dir(tmp).map(|d| d.count()).unwrap_or(0);
    assert_eq!(left, 0, "no temp file is left behind");
}

#[tokio::test]
async fn wrong_bytes_under_a_digest_are_never_stored_or_served() {
    let Rig { ups, registry, store, _dir } = rig(3);
    let digest = registry.put_blob("r", LAYER);
    registry.fail(Call::Blob, Fault::WrongBytes, 1);
    let e = error(ups.wait_blob(digest, &hint("r")).await);
    assert!(matches!(&*e, UpstreamError::Invalid(m) if m.contains(&digest.to_string())), "{e:?}");
    assert!(!e.transient(), "a lying upstream is not asked again at once");
    assert_eq!(e.http(ErrorCode::BlobUnknown).0, StatusCode::BAD_GATEWAY);
    assert_eq!(registry.calls(Call::Blob), 1, "not retried");
    holds_nothing(&store, &digest).await;
    // Served: the failure, while it is remembered, without asking the upstream again.
    assert!(matches!(*error(ups.wait_blob(digest, &hint("r")).await), UpstreamError::Invalid(_)));
    assert_eq!(registry.calls(Call::Blob), 1);
    holds_nothing(&store, &digest).await;

    // A manifest asked for by digest whose bytes are another's.
    let m = registry.put_manifest("r", Some("v1"), &manifest(&digest, LAYER.len()));
    registry.fail(Call::Manifest, Fault::WrongBytes, 1);
    let e = error(ups.pull_manifest(0, "r", &Reference::Digest(m)).await.map_err(Arc::new));
    assert!(matches!(&*e, UpstreamError::Invalid(msg) if msg.contains(&m.to_string())), "{e:?}");
    holds_nothing(&store, &m).await;
}

#[tokio::test]
async fn an_index_is_stored_only_when_every_platform_manifest_is_its_digest() {
    let Rig { ups, registry, store, _dir } = rig(1);
    let layer = registry.put_blob("r", LAYER);
    let child_body = manifest(&layer, LAYER.len());
    let child = registry.put_manifest("r", None, &child_body);
    let index = format!(
        r#"{{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "{child}",
            "size": {n}, "platform": {{"architecture": "amd64", "os": "linux"}}}}]}}"#,
        n = child_body.len()
    );
    let index = registry.put_manifest("r", Some("multi"), index.as_bytes());
    // The index is answered as it is; its platform manifest with other bytes.
    registry.fail_after(Call::Manifest, 1, Fault::WrongBytes, 1);
    let e = error(ups.resolve_tag(0, "r", "multi").await);
    assert!(matches!(&*e, UpstreamError::Invalid(m) if m.contains(&child.to_string())), "{e:?}");
    holds_nothing(&store, &child).await;
    holds_nothing(&store, &index).await;
    assert_eq!(ups.resolve_tag(0, "r", "multi").await.expect("resolved"), index);
    assert!(store.size(&child).await.is_some() && store.size(&index).await.is_some());
}

#[tokio::test]
async fn a_failed_fill_for_a_private_repository_leaves_no_private_mark() {
    let Rig { ups, registry, store, _dir } = rig(1);
    let digest = registry.put_blob("team/secret", LAYER);
    registry.put_blob("open/app", LAYER);
    registry.make_private("team/secret");
    registry.fail(Call::Blob, Fault::WrongBytes, 1);
    error(ups.wait_blob(digest, &hint("team/secret")).await);
    holds_nothing(&store, &digest).await;
    // The same content from a public repository is public.
    ups.wait_blob(digest, &hint("open/app")).await.expect("fetched from the public repository");
    assert_eq!(store.size(&digest).await, Some(LAYER.len() as u64));
    assert_eq!(PrivateMarks::new(&store).blob(&digest).await, None, "not private to team/secret");
}

#[tokio::test]
async fn a_blob_cut_short_is_not_stored_and_a_later_fetch_is() {
    let Rig { ups, registry, store, _dir } = rig(1);
    let digest = registry.put_blob("r", LAYER);
    registry.fail(Call::Blob, Fault::CutShort { after: LAYER.len() / 2 }, 1);
    match &*error(ups.wait_blob(digest, &hint("r")).await) {
        e @ UpstreamError::Truncated { received: 5_000, declared: 10_000, .. } => assert!(e.transient()),
        other => panic!("expected a truncated body, got {other:?}"),
    }
    holds_nothing(&store, &digest).await;
    tokio::time::sleep(FAILURE_MEMORY).await;
    ups.wait_blob(digest, &hint("r")).await.expect("the whole blob");
    assert_eq!(store.size(&digest).await, Some(LAYER.len() as u64));
    assert_eq!(registry.calls(Call::Blob), 2);
}

#[tokio::test]
async fn a_stalled_body_is_cancelled_and_retried_within_the_fetch() {
    let Rig { ups, registry, store, _dir } = rig(2);
    let digest = registry.put_blob("r", LAYER);
    registry.fail(Call::Blob, Fault::Stall { after: 3_000 }, 1);
    let started = Instant::now();
    ups.wait_blob(digest, &hint("r")).await.expect("the second attempt");
    assert!(started.elapsed() < STALL * 5, "one stall timeout: {:?}", started.elapsed());
    assert_eq!(registry.calls(Call::Blob), 2);
    assert_eq!(store.size(&digest).await, Some(LAYER.len() as u64));

    // Stalling every time: a clear error, and nothing stored.
    let other = registry.put_blob("r", b"another layer");
    registry.fail(Call::Blob, Fault::Stall { after: 5 }, 2);
    match &*error(ups.wait_blob(other, &hint("r")).await) {
        e @ UpstreamError::Stalled { .. } => {
            assert!(e.transient());
            assert!(e.to_string().contains("registry.test made no progress"), "{e}");
        }
        other => panic!("expected a stall, got {other:?}"),
    }
    holds_nothing(&store, &other).await;
}

#[tokio::test]
async fn a_5xx_is_retried_reported_remembered_then_retried_later() {
    let Rig { ups, registry, store, _dir } = rig(2);
    let digest = registry.put_blob("r", LAYER);
    registry.fail(Call::Blob, Fault::Status(503), 2);
    let e = error(ups.wait_blob(digest, &hint("r")).await);
    assert!(matches!(*e, UpstreamError::Status { status: 503, .. }), "{e:?}");
    assert!(e.transient());
    assert_eq!(e.http(ErrorCode::BlobUnknown), (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::BlobUnknown));
    assert_eq!(registry.calls(Call::Blob), 2, "both attempts");
    holds_nothing(&store, &digest).await;

    // Remembered: reported without asking the upstream.
    assert!(matches!(
        *error(ups.wait_blob(digest, &hint("r")).await),
        UpstreamError::Status { status: 503, .. }
    ));
    assert_eq!(registry.calls(Call::Blob), 2);

    // Forgotten: the next request fetches, and the upstream is back.
    tokio::time::sleep(FAILURE_MEMORY).await;
    ups.wait_blob(digest, &hint("r")).await.expect("fetched");
    assert_eq!(registry.calls(Call::Blob), 3);
    assert_eq!(store.size(&digest).await, Some(LAYER.len() as u64));
}

#[tokio::test]
async fn a_refusal_is_reported_as_such_and_not_retried() {
    let Rig { ups, registry, store, _dir } = rig(3);
    let digest = registry.put_blob("r", LAYER);
    registry.fail(Call::Blob, Fault::Status(401), 1);
    let e = error(ups.wait_blob(digest, &hint("r")).await);
    assert!(matches!(*e, UpstreamError::Unauthorized(_)), "{e:?}");
    assert_eq!(e.http(ErrorCode::BlobUnknown), (StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized));
    assert_eq!(registry.calls(Call::Blob), 1, "a refusal is not retried");

    let unknown = Digest::of(b"not upstream");
    let e = error(ups.wait_blob(unknown, &hint("r")).await);
    assert_eq!(e.http(ErrorCode::BlobUnknown), (StatusCode::NOT_FOUND, ErrorCode::BlobUnknown));
    assert_eq!(registry.calls(Call::Blob), 2, "not retried");
    holds_nothing(&store, &digest).await;
    holds_nothing(&store, &unknown).await;
}

#[tokio::test]
async fn concurrent_requests_for_one_blob_make_one_upstream_fetch() {
    let Rig { ups, registry, store, _dir } = rig(1);
    let digest = registry.put_blob("r", LAYER);
    registry.delay_blobs(Duration::from_millis(50));
    let burst = |ups: &Arc<Upstreams>| {
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let ups = ups.clone();
                tokio::spawn(async move { ups.wait_blob(digest, &hint("r")).await })
            })
            .collect();
        futures_util::future::join_all(tasks)
    };
    for r in burst(&ups).await {
        r.expect("task").expect("blob");
    }
    assert_eq!(registry.calls(Call::Blob), 1, "one upstream fetch for the burst");
    assert_eq!(store.size(&digest).await, Some(LAYER.len() as u64));

    // A failing fetch is one too, and every request gets its error.
    let other = registry.put_blob("r", b"another layer");
    registry.fail(Call::Blob, Fault::Status(500), 1);
    let other_burst: Vec<_> = (0..16)
        .map(|_| {
            let ups = ups.clone();
            tokio::spawn(async move { ups.wait_blob(other, &hint("r")).await })
        })
        .collect();
    for r in futures_util::future::join_all(other_burst).await {
        assert!(matches!(*error(r.expect("task")), UpstreamError::Status { status: 500, .. }));
    }
    assert_eq!(registry.calls(Call::Blob), 2, "one upstream fetch for the failing burst");
    assert!(ups.flights.is_empty(), "flights end");
}

#[tokio::test]
async fn a_failing_or_stalling_upstream_serves_cached_tags_and_fails_cold_ones() {
    let Rig { ups, registry, store, _dir } = rig(1);
    let layer = registry.put_blob("r", LAYER);
    let m = registry.put_manifest("r", Some("v1"), &manifest(&layer, LAYER.len()));
    registry.put_manifest("r", Some("v2"), &manifest(&layer, LAYER.len() + 1));
    assert_eq!(ups.resolve_tag(0, "r", "v1").await.expect("resolved"), m);
    assert!(store.size(&m).await.is_some(), "the manifest is stored");

    for fault in [Fault::Status(502), Fault::Stall { after: 0 }] {
        registry.fail(Call::Head, fault, 1);
        assert_eq!(ups.resolve_tag(0, "r", "v1").await.expect("cached"), m, "{fault:?}");
        registry.fail(Call::Head, fault, 1);
        let e = error(ups.resolve_tag(0, "r", "v2").await);
        assert!(e.transient(), "{fault:?}: {e:?}");
    }
    // A refusal is not the upstream being down: the cached tag is not served.
    registry.fail(Call::Head, Fault::Status(401), 1);
    assert!(matches!(*error(ups.resolve_tag(0, "r", "v1").await), UpstreamError::Unauthorized(_)));
    // Once the upstream answers, cold tags resolve.
    ups.resolve_tag(0, "r", "v2").await.expect("resolved");
}
