//! Shoal's `/shoal/v1/metainfo/<digest>`: the piece hashes of a held blob, or, with a
//! pull-through hint, a long poll while the blob is fetched from its upstream (202 with
//! `Retry-After` when it takes longer than [`LONG_POLL`]).

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use shoal_shared::digest::Digest;
use shoal_shared::hint::HintQuery;
use shoal_shared::http::oci_error;
use shoal_shared::oci::ErrorCode;
use shoal_shared::store::BlobStore;

use crate::internal::{allowed, Need};

use super::{bad_digest, mark_private, token_required, upstream_error, State};

/// The metainfo of a held blob. With a hint (`?name=&ns=`) and upstreams configured, a blob
/// not held is fetched from the upstream (one flight per digest) and the answer is 202 with
/// `Retry-After` until it is stored.
pub(super) async fn metainfo(
    req: HttpRequest,
    digest: web::Path<String>,
    query: web::Query<HintQuery>,
    state: State,
) -> HttpResponse {
    let digest: Digest = match digest.parse() {
        Ok(d) => d,
        Err(e) => return bad_digest(e),
    };
    let hint = match query.hint() {
        Ok(h) => h,
        Err(e) => return oci_error(StatusCode::BAD_REQUEST, ErrorCode::NameInvalid, e),
    };
    if let Some(m) = state.seeder.metainfo(digest).await {
        return metainfo_answer(&state.store, &m).await;
    }
    let unknown = || oci_error(StatusCode::NOT_FOUND, ErrorCode::BlobUnknown, "blob unknown");
    let Some(hint) = hint.filter(|_| !state.upstreams.is_empty()) else { return unknown() };
    // Fetching from an upstream fills the disk: it takes the upload token, as a push does
    // (or, on the internal listener, a tracker's certificate).
    if !allowed(&req, state.upload_token.as_deref(), Need::Fetch) {
        return token_required();
    }
    // Long poll: answer as soon as the blob is stored, rather than after the next
    // `Retry-After`; well within the 60 s timeout of the tracker's client. The fetch goes on
    // when the wait times out.
    match tokio::time::timeout(LONG_POLL, state.upstreams.wait_blob(digest, &hint)).await {
        Ok(Ok(())) => match state.seeder.metainfo(digest).await {
            Some(m) => metainfo_answer(&state.store, &m).await,
            None => unknown(),
        },
        Ok(Err(e)) => upstream_error(&e, ErrorCode::BlobUnknown),
        Err(_) => HttpResponse::Accepted()
            .insert_header((header::RETRY_AFTER, "1"))
            .json(serde_json::json!({ "status": "pulling from upstream" })),
    }
}

/// A metainfo answer, saying whether the blob was pulled through lately (so agents count
/// the bytes they get from origins as the upstream's).
/// A blob pulled for a private repository names it ([`shoal_shared::tenant::PRIVATE_HEADER`]).
async fn metainfo_answer(store: &BlobStore, m: &shoal_shared::metainfo::Metainfo) -> HttpResponse {
    use shoal_shared::client::{PULLED_THROUGH_HEADER, PULLED_THROUGH_RECENT};
    let mut resp = HttpResponse::Ok();
    if crate::retention::pulled_within(store, &m.digest(), PULLED_THROUGH_RECENT).await {
        resp.insert_header((PULLED_THROUGH_HEADER, "1"));
    }
    mark_private(&mut resp, store, &m.digest()).await;
    resp.json(m)
}

/// How long a metainfo request for a blob being pulled through waits before answering 202.
const LONG_POLL: std::time::Duration = std::time::Duration::from_secs(20);
