//! Content management on the origin (distribution spec, "Content Management"): deleting a
//! tag, a manifest or a blob. The caller (`api::v2`) has already checked the upload token,
//! as for every write.
//!
//! Content is global in Shoal: a blob or manifest is stored once by digest and served under
//! every repository name (blob and manifest GETs by digest never looked at the name). So
//! deleting a manifest or blob deletes the content, for every repository, from the disk and
//! the durable store; a tag or a referrer link belongs to one repository. To keep every
//! other repository whole, a deletion that would break something the origin holds is
//! refused (405 `UNSUPPORTED`, see [`in_use`]):
//! - a manifest still tagged in another repository, or a child of an index the origin holds;
//! - a blob some held manifest references (its config, a layer, an index's child), or that
//!   a tag points at.
//!
//! On a ring, a deletion that succeeded here is sent to every other healthy member (a member
//! down at that moment keeps its copy, and the repair pass may bring it back).

use actix_web::http::StatusCode;
use actix_web::HttpResponse;
use shoal_shared::digest::Digest;
use shoal_shared::http::oci_error;
use shoal_shared::oci::{manifest_media_type, manifest_references, ErrorCode, Reference, MAX_MANIFEST};
use shoal_shared::referrers::referrer_of;
use shoal_shared::store::backing::{blob_key, meta_key};

use crate::api::{store_failure, AppState};
use crate::tags::TagStore;

/// `DELETE /v2/<name>/manifests/<reference>`: a tag removes the tag only; a digest removes
/// the manifest, the repository's tags pointing at it and its referrer link. 202 on success.
pub async fn manifest(name: &str, reference: &str, hop: bool, state: &AppState) -> HttpResponse {
    let unknown = || oci_error(StatusCode::NOT_FOUND, ErrorCode::ManifestUnknown, "manifest unknown");
    let digest = match reference.parse::<Reference>() {
        // A reference outside the grammar names nothing.
        Err(_) => return unknown(),
        Ok(Reference::Tag(tag)) => {
            return match state.tags.remove(name, &tag).await {
                Ok(true) => {
                    tracing::info!(%name, %tag, "tag deleted");
                    replicate(state, hop, &format!("/v2/{name}/manifests/{tag}")).await;
                    HttpResponse::Accepted().finish()
                }
                Ok(false) => unknown(),
                Err(e) => tag_failure(&e),
            };
        }
        Ok(Reference::Digest(d)) => d,
    };
    let Some(bytes) = read_manifest(state, &digest).await else { return unknown() };
    let Some(media_type) = manifest_media_type(&bytes) else { return unknown() };
    let tagged_here: Vec<String> = state
        .tags
        .pointing_at(&digest)
        .await
        .into_iter()
        .filter(|(n, _)| n == name)
        .map(|(_, t)| t)
        .collect();
    if let Some(why) = in_use(state, &digest, Some(name)).await {
        return refused(why);
    }
    for tag in &tagged_here {
        if let Err(e) = state.tags.remove(name, tag).await {
            return tag_failure(&e);
        }
    }
    if let Ok(Some(r)) = referrer_of(&bytes, &media_type, digest) {
        if let Err(e) = state.referrers.remove(name, &r.subject, &digest).await {
            tracing::error!(cause = %e, "cannot remove a referrer link");
            return oci_error(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::ManifestInvalid,
                "cannot remove referrer",
            );
        }
    }
    if let Err(resp) = remove_content(state, &digest, ErrorCode::ManifestUnknown).await {
        return resp;
    }
    tracing::info!(%name, %digest, tags = tagged_here.len(), "manifest deleted");
    replicate(state, hop, &format!("/v2/{name}/manifests/{digest}")).await;
    HttpResponse::Accepted().finish()
}

/// `DELETE /v2/<name>/blobs/<digest>`: 202 once the blob is gone, if nothing held uses it.
pub async fn blob(name: &str, digest: &str, hop: bool, state: &AppState) -> HttpResponse {
    let digest: Digest = match digest.parse() {
        Ok(d) => d,
        Err(e) => return oci_error(StatusCode::BAD_REQUEST, ErrorCode::DigestInvalid, e),
    };
    if state.store.size(&digest).await.is_none() {
        return oci_error(StatusCode::NOT_FOUND, ErrorCode::BlobUnknown, "blob unknown");
    }
    if let Some(why) = in_use(state, &digest, None).await {
        return refused(why);
    }
    if let Err(resp) = remove_content(state, &digest, ErrorCode::BlobUnknown).await {
        return resp;
    }
    tracing::info!(%name, %digest, "blob deleted");
    replicate(state, hop, &format!("/v2/{name}/blobs/{digest}")).await;
    HttpResponse::Accepted().finish()
}

/// A held manifest's bytes (filled from the durable store when the disk lacks it).
async fn read_manifest(state: &AppState, digest: &Digest) -> Option<Vec<u8>> {
    let size = state.store.size(digest).await.filter(|s| *s <= MAX_MANIFEST as u64)?;
    state.store.read_range(digest, 0, size as usize).await.ok()?.map(|b| b.to_vec())
}

/// What still uses `digest`, if anything: a tag (other than `own_repo`'s, which a manifest
/// deletion removes with it) or a manifest the origin holds. Reads every tag file and
/// every manifest-sized blob on the local disk: deletions are rare, and an index of
/// references would be one more thing to keep right. Manifests held only in the durable
/// store (not on this disk) are not seen (docs/ARCHITECTURE.md, "Not built yet").
async fn in_use(state: &AppState, digest: &Digest, own_repo: Option<&str>) -> Option<String> {
    let pushed = state.tags.pointing_at(digest).await;
    if let Some((n, t)) = pushed.iter().find(|(n, _)| Some(n.as_str()) != own_repo) {
        return Some(format!("{digest} is tagged {n}:{t}; delete that tag first"));
    }
    let pulled = TagStore::in_dir(&state.store, "upstream-tags").pointing_at(digest).await;
    if let Some((n, t)) = pulled.first() {
        return Some(format!("{digest} is the pulled-through tag {n}:{t}"));
    }
    let usage = {
        let store = state.store.clone();
        tokio::task::spawn_blocking(move || store.usage()).await.ok().and_then(Result::ok).unwrap_or_default()
    };
    // A manifest's allocated bytes are at most its length rounded up to blocks, plus its
    // metainfo: anything larger is no manifest.
    let bound = MAX_MANIFEST as u64 + (1 << 20);
    for u in usage.into_iter().filter(|u| u.complete && u.bytes <= bound && u.digest != *digest) {
        let Some(bytes) = read_manifest(state, &u.digest).await else { continue };
        if manifest_media_type(&bytes).is_none() {
            continue;
        }
        if manifest_references(&bytes).is_ok_and(|refs| refs.contains(digest)) {
            return Some(format!("{digest} is referenced by manifest {}", u.digest));
        }
    }
    None
}

/// The answer to a deletion that would break what the origin holds. The spec lets a
/// registry answer a deletion it does not do with 405 (or 400) and `UNSUPPORTED`, which the
/// conformance suite and clients treat as "deletion not possible here"; 409 and `DENIED`
/// would tell a client its credentials lack a right, which is not the case.
fn refused(why: String) -> HttpResponse {
    oci_error(StatusCode::METHOD_NOT_ALLOWED, ErrorCode::Unsupported, why)
}

fn tag_failure(e: &std::io::Error) -> HttpResponse {
    tracing::error!(cause = %e, "cannot delete a tag");
    oci_error(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::ManifestInvalid, "cannot delete the tag")
}

/// Deletes a blob (or manifest) and its metainfo from the durable store first, then from
/// the disk, so nothing deleted is filled back from the store.
async fn remove_content(state: &AppState, digest: &Digest, code: ErrorCode) -> Result<(), HttpResponse> {
    if let Some(backing) = state.store.backing() {
        for key in [blob_key(digest), meta_key(digest)] {
            if let Err(e) = backing.delete(&key).await {
                return Err(store_failure(&shoal_shared::store::StoreError::Backing(e), code));
            }
        }
    }
    state.store.remove(digest);
    crate::retention::unmark_pulled(&state.store, digest).await;
    Ok(())
}

/// Sends a deletion made here to the other members of the ring (unless it came from one).
async fn replicate(state: &AppState, hop: bool, path: &str) {
    if let (Some(cluster), false) = (&state.cluster, hop) {
        cluster.replicate_delete(path).await;
    }
}
