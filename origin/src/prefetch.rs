//! Kraken-compatible prefetch: `POST /proxy/v1/registry/prefetch` and
//! `POST /proxy/v2/registry/prefetch`, body `{"tag": "<registry>/<repository>:<tag>",
//! "trace_id": "..."}`.
//!
//! v1 downloads the image's blobs into the origin (waiting for them when `prefetch_sync` is
//! set, else in the background); v2 starts what is missing and returns at once. Both are
//! idempotent: blob fetches join the single flight of their digest.

use std::sync::Arc;

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::stream::{self, StreamExt};
use serde::{Deserialize, Serialize};
use shoal_shared::digest::Digest;
use shoal_shared::hint::Hint;
use shoal_shared::image::ImageRef;
use shoal_shared::manifest::{Descriptor, Manifest};
use shoal_shared::oci::{ErrorCode, Reference};

use crate::api::{token_required, AppState};
use crate::internal::{allowed, Need};
use crate::upstream::{child_manifests, BlobState, UpstreamError};

/// Largest request body.
const MAX_BODY: usize = 16 << 10;
/// Most blobs one prefetch starts.
const MAX_BLOBS: usize = 4096;
/// Most blob fetches one synchronous prefetch waits for at once.
const SYNC_FLIGHTS: usize = 16;

/// Which blobs are worth prefetching, by size.
#[derive(Debug, Clone, Copy)]
pub struct SizeFilter {
    pub min: u64,
    pub max: u64,
}

#[derive(Deserialize)]
struct Request {
    tag: String,
    #[serde(default)]
    trace_id: Option<String>,
}

/// The answer, in Kraken's shape.
#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    pub tag: String,
    pub prefetched: bool,
    pub status: String,
    pub message: String,
    pub trace_id: String,
}

fn answer(status: StatusCode, tag: &str, trace_id: &str, prefetched: bool, message: String) -> HttpResponse {
    let outcome = if status.is_success() { "success" } else { "failure" };
    HttpResponse::build(status).json(Response {
        tag: tag.to_owned(),
        prefetched,
        status: outcome.to_owned(),
        message,
        trace_id: trace_id.to_owned(),
    })
}

/// Parses the `tag` of a prefetch: `<registry>/<repository>(:<tag>|@<digest>)`, with the
/// registry and the tag or digest required (Kraken's form) and Docker Hub's rules
/// (`docker.io/alpine:3` is `library/alpine`), by the one image-reference parser.
pub fn parse_image(s: &str) -> Result<ImageRef, String> {
    let image = ImageRef::parse(s).map_err(|e| e.to_string())?;
    if image.registry.is_none() {
        return Err("expected <registry>/<repository>:<tag>".into());
    }
    if !image.tagged {
        return Err("missing :<tag> or @<digest>".into());
    }
    Ok(image)
}

/// Mounts the routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/proxy/v1/registry/prefetch", web::post().to(v1))
        .route("/proxy/v2/registry/prefetch", web::post().to(v2));
}

// Prefetch fills the origin's disk from its upstreams: it takes the upload token, as a push.
async fn v1(req: HttpRequest, body: web::Bytes, state: web::Data<AppState>) -> HttpResponse {
    if !allowed(&req, state.upload_token.as_deref(), Need::Write) {
        return token_required();
    }
    prefetch(&body, &state, state.prefetch_sync).await
}

async fn v2(req: HttpRequest, body: web::Bytes, state: web::Data<AppState>) -> HttpResponse {
    if !allowed(&req, state.upload_token.as_deref(), Need::Write) {
        return token_required();
    }
    prefetch(&body, &state, false).await
}

async fn prefetch(body: &[u8], state: &AppState, wait: bool) -> HttpResponse {
    if body.len() > MAX_BODY {
        return answer(StatusCode::BAD_REQUEST, "", "", false, format!("body larger than {MAX_BODY} bytes"));
    }
    let req: Request = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return answer(StatusCode::BAD_REQUEST, "", "", false, format!("invalid body: {e}")),
    };
    let trace_id = req.trace_id.unwrap_or_default();
    let trace_id: String = trace_id.chars().filter(|c| !c.is_control()).take(256).collect();
    let tag = req.tag;
    let image = match parse_image(&tag) {
        Ok(i) => i,
        Err(e) => {
            return answer(StatusCode::BAD_REQUEST, &tag, &trace_id, false, format!("invalid tag: {e}"))
        }
    };
    let fail = |e: &UpstreamError| {
        let (status, _) = e.http(ErrorCode::ManifestUnknown);
        answer(status, &tag, &trace_id, false, format!("cannot resolve {tag}: {e}"))
    };
    let ups = &state.upstreams;
    let index = match ups.select(image.registry.as_deref()) {
        Ok(i) => i,
        Err(e) => return fail(&e),
    };
    let root = match &image.reference {
        Reference::Tag(t) => ups.resolve_tag(index, &image.name, t).await,
        Reference::Digest(d) if state.store.size(d).await.is_some() => Ok(*d),
        Reference::Digest(_) => {
            ups.pull_manifest(index, &image.name, &image.reference).await.map_err(Arc::new)
        }
    };
    let root = match root {
        Ok(d) => d,
        Err(e) => return fail(&e),
    };
    let blobs = match image_blobs(state, root).await {
        Ok(b) => b,
        Err(e) => return answer(StatusCode::BAD_GATEWAY, &tag, &trace_id, false, e),
    };
    let filter = state.prefetch_sizes;
    let (wanted, skipped): (Vec<_>, Vec<_>) =
        blobs.into_iter().partition(|d| (filter.min..=filter.max).contains(&d.size));
    let hint = match Hint::new(&image.name, image.registry.as_deref()) {
        Ok(h) => h,
        Err(e) => return answer(StatusCode::BAD_REQUEST, &tag, &trace_id, false, e.to_string()),
    };
    let held = wanted.iter().filter(|d| state.store.blob_path(&d.digest).exists()).count();
    tracing::info!(%tag, %trace_id, blobs = wanted.len(), held, skipped = skipped.len(), wait, "prefetch");
    if !wait {
        // Starting the flights is all v2 (and background v1) does; their outcomes are logged.
        let (mut held, mut fetching, mut failed) = (0, 0, Vec::new());
        for d in &wanted {
            match ups.blob(d.digest, &hint) {
                BlobState::Held => held += 1,
                BlobState::Pending(_) => fetching += 1,
                BlobState::Failed(e) => failed.push(e),
            }
        }
        let mut message = format!(
            "{} blobs: {held} held, {fetching} being fetched, {} failed; {} skipped by size",
            wanted.len(),
            failed.len(),
            skipped.len()
        );
        // Every blob held or on its way: a success, `prefetched: true` as Kraken answers (a
        // client written against Kraken reads `false` as a failure).
        let Some(first) = failed.first() else {
            return answer(StatusCode::OK, &tag, &trace_id, true, message);
        };
        // Busy or a recent failure: the client should retry (prefetch is idempotent).
        message.push_str(&format!("; first failure: {first}"));
        let (status, _) = first.http(ErrorCode::BlobUnknown);
        return answer(status, &tag, &trace_id, false, message);
    }
    // Bounded, so one image's blobs cannot take every flight (past the limit they fail Busy).
    let results: Vec<_> = stream::iter(&wanted)
        .map(|d| ups.wait_blob(d.digest, &hint))
        .buffer_unordered(SYNC_FLIGHTS)
        .collect()
        .await;
    let failed: Vec<_> = results.into_iter().filter_map(Result::err).collect();
    if let Some(first) = failed.first() {
        let (status, _) = first.http(ErrorCode::BlobUnknown);
        let message = format!(
            "prefetch of {tag} failed: {} of {} blobs failed; first failure: {first}",
            failed.len(),
            wanted.len()
        );
        return answer(status, &tag, &trace_id, false, message);
    }
    let message = format!("{} blobs prefetched; {} skipped by size", wanted.len(), skipped.len());
    answer(StatusCode::OK, &tag, &trace_id, true, message)
}

/// The config and layers of the image `root` names, across every platform of an index.
async fn image_blobs(state: &AppState, root: Digest) -> Result<Vec<Descriptor>, String> {
    let read = |d: Digest| async move {
        let size = state.store.size(&d).await.ok_or_else(|| format!("manifest {d} not stored"))?;
        let bytes = state
            .store
            .read_range(&d, 0, size.min(shoal_shared::oci::MAX_MANIFEST as u64) as usize)
            .await
            .ok()
            .flatten()
            .ok_or_else(|| format!("manifest {d} unreadable"))?;
        Ok::<_, String>(bytes)
    };
    let root_bytes = read(root).await?;
    let children = child_manifests(&root_bytes);
    let manifests = if children.is_empty() { vec![root] } else { children };
    let mut out: Vec<Descriptor> = Vec::new();
    for m in manifests {
        let manifest = Manifest::parse(&read(m).await?).map_err(|e| format!("manifest {m}: {e}"))?;
        for d in manifest.config.into_iter().chain(manifest.layers) {
            if !out.iter().any(|o| o.digest == d.digest) {
                out.push(d);
            }
        }
        if out.len() > MAX_BLOBS {
            return Err(format!("image has more than {MAX_BLOBS} blobs"));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_refs() {
        let r = parse_image("127.0.0.1:5000/a/b/c:v1").expect("ref");
        assert_eq!(r.registry.as_deref(), Some("127.0.0.1:5000"));
        assert_eq!(r.name, "a/b/c");
        assert_eq!(r.reference, Reference::Tag("v1".into()));
        let d = format!("sha256:{}", "a".repeat(64));
        let r = parse_image(&format!("ghcr.io/x@{d}")).expect("digest ref");
        assert_eq!(r.reference, Reference::Digest(d.parse().expect("digest")));
        // Docker Hub's official images, as docker names them.
        let r = parse_image("docker.io/alpine:3").expect("hub ref");
        assert_eq!((r.registry.as_deref(), r.name.as_str()), (Some("docker.io"), "library/alpine"));
        for bad in [
            "",
            "alpine",
            "alpine:3",
            "docker.io/alpine",
            "docker.io/Alpine:1",
            "bad host/x:1",
            "docker.io/x:",
            "docker.io/x@sha256:zz",
        ] {
            assert!(parse_image(bad).is_err(), "{bad}");
        }
    }
}
