//! Blob handlers of the distribution API: `GET`/`HEAD` of a blob (filled from the durable
//! store, else forwarded once to an owner), cross-repository mounts, and upload sessions
//! (monolithic, chunked `PATCH`, `PUT` to finish, status and cancel).
//!
//! A request body is streamed into a [`Staged`] blob bounded by the uploads' byte budget
//! ([`Held`]); it becomes visible only through [`commit`], once its digest matches, and is
//! then replicated to the blob's owners before the push is answered.

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use shoal_shared::digest::Digest;
use shoal_shared::http::{oci_error, serve_file, DOCKER_CONTENT_DIGEST};
use shoal_shared::oci::ErrorCode;
use shoal_shared::store::{Staged, StoreError};

use crate::uploads::{Held, Upload};

use super::{bad_digest, proxied, store_failure, AppState};

pub(super) async fn get_blob(req: &HttpRequest, digest: &str, hop: bool, state: &AppState) -> HttpResponse {
    let digest: Digest = match digest.parse() {
        Ok(d) => d,
        Err(e) => return bad_digest(e),
    };
    // Filled from the durable store when the disk lacks it; a store that cannot answer is a
    // 503, not a 404 that a client would take for "no such blob".
    if let Err(e) = state.store.ensure_local(&digest).await {
        return store_failure(&e, ErrorCode::BlobUnknown);
    }
    match state.store.open_blob(&digest).await {
        Some((file, len)) => {
            // Only what is held is remembered: digests nobody has cost no memory.
            state.retention.touch(digest);
            serve_file(req, std::sync::Arc::new(file), len, &digest, "application/octet-stream", None)
        }
        None => {
            // Held by its owners: one hop to the first that answers.
            if let (Some(cluster), false) = (&state.cluster, hop) {
                let item = digest.to_string();
                let path = req.uri().path_and_query().map_or(req.path(), |p| p.as_str());
                if let Some(resp) =
                    cluster.forward(req.method(), path, item.as_bytes(), req.headers(), false).await
                {
                    return proxied(req, resp);
                }
            }
            oci_error(StatusCode::NOT_FOUND, ErrorCode::BlobUnknown, "blob unknown")
        }
    }
}

/// A cross-repository mount: content is global here, so a blob the origin holds is mounted
/// at once (201). `None` (an ordinary upload session follows, as the spec allows) when
/// there is no `mount`, it is not a digest, or the blob is not held; `from` is only checked
/// against the name grammar.
pub(super) async fn mount_blob(
    name: &str,
    mount: Option<&str>,
    from: Option<&str>,
    state: &AppState,
) -> Option<HttpResponse> {
    let digest: Digest = mount?.parse().ok()?;
    if from.is_some_and(|f| !shoal_shared::oci::valid_name(f)) {
        return Some(oci_error(StatusCode::BAD_REQUEST, ErrorCode::NameInvalid, "invalid from"));
    }
    state.store.size(&digest).await?;
    Some(
        HttpResponse::Created()
            .insert_header((header::LOCATION, format!("/v2/{name}/blobs/{digest}")))
            .insert_header((DOCKER_CONTENT_DIGEST, digest.to_string()))
            .finish(),
    )
}

/// Why a request body did not make it into a staged blob.
enum DrainError {
    /// The client's body broke off; what arrived before is kept.
    Body(HttpResponse),
    /// The store could not take the bytes, or the upload outgrew its bound: it must end.
    Store(HttpResponse),
}

impl DrainError {
    fn response(self) -> HttpResponse {
        match self {
            Self::Body(r) | Self::Store(r) => r,
        }
    }
}

/// Streams a request body into a staged blob and writes it out, so the upload's length is
/// what is on disk when the answer reports it.
async fn drain(payload: &mut web::Payload, staged: &mut Staged, held: &mut Held) -> Result<(), DrainError> {
    let mut body_error = None;
    while let Some(chunk) = payload.next().await {
        match chunk {
            Ok(chunk) if !held.grow(chunk.len() as u64) => {
                let room = held.room();
                return Err(DrainError::Store(oci_error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    ErrorCode::SizeInvalid,
                    format!("uploads in progress may hold {room} more bytes; this upload was ended"),
                )));
            }
            Ok(chunk) => staged
                .write(&chunk)
                .await
                .map_err(|e| DrainError::Store(store_failure(&e, ErrorCode::BlobUploadInvalid)))?,
            Err(e) => {
                body_error = Some(format!("body: {e}"));
                break;
            }
        }
    }
    staged.flush().await.map_err(|e| DrainError::Store(store_failure(&e, ErrorCode::BlobUploadInvalid)))?;
    match body_error {
        Some(m) => Err(DrainError::Body(oci_error(StatusCode::BAD_REQUEST, ErrorCode::BlobUploadInvalid, m))),
        None => Ok(()),
    }
}

fn parse_query_digest(query: Option<String>) -> Result<Option<Digest>, HttpResponse> {
    query.map(|q| q.parse::<Digest>().map_err(bad_digest)).transpose()
}

async fn commit(staged: Staged, digest: &Digest, name: &str, hop: bool, state: &AppState) -> HttpResponse {
    match staged.commit(digest).await {
        Ok(_) => {
            crate::retention::unmark_pulled(&state.store, digest).await;
            if !hop {
                crate::private::PrivateMarks::new(&state.store).unmark_blob(digest).await;
            }
            // On every healthy owner before the push is answered.
            if let (Some(cluster), false) = (&state.cluster, hop) {
                cluster.replicate_blob(&state.store, digest).await;
            }
            HttpResponse::Created()
                .insert_header((header::LOCATION, format!("/v2/{name}/blobs/{digest}")))
                .insert_header((DOCKER_CONTENT_DIGEST, digest.to_string()))
                .finish()
        }
        Err(StoreError::DigestMismatch { expected, actual }) => {
            bad_digest(format!("content has digest {actual}, expected {expected}; nothing stored"))
        }
        Err(StoreError::SizeMismatch { expected, actual }) => oci_error(
            StatusCode::BAD_REQUEST,
            ErrorCode::BlobUploadInvalid,
            format!("upload holds {actual} bytes on disk, {expected} were sent; nothing stored"),
        ),
        Err(e) => store_failure(&e, ErrorCode::BlobUploadInvalid),
    }
}

fn upload_accepted(name: &str, id: &str, len: u64) -> HttpResponse {
    let mut resp = HttpResponse::Accepted();
    resp.insert_header((header::LOCATION, format!("/v2/{name}/blobs/uploads/{id}")))
        .insert_header(("Docker-Upload-UUID", id.to_owned()))
        .insert_header((header::RANGE, format!("0-{}", len.saturating_sub(1))))
        .insert_header((header::CONTENT_LENGTH, 0));
    resp.finish()
}

pub(super) async fn start_upload(
    name: &str,
    query: Option<String>,
    mut payload: web::Payload,
    hop: bool,
    state: &AppState,
) -> HttpResponse {
    let digest = match parse_query_digest(query) {
        Ok(d) => d,
        Err(resp) => return resp,
    };
    let mut staged = match state.store.stage(state.piece_length).await {
        Ok(s) => s,
        Err(e) => return store_failure(&e, ErrorCode::BlobUploadInvalid),
    };
    if let Some(digest) = digest {
        // Monolithic upload in one request.
        let mut held = state.uploads.hold();
        if let Err(e) = drain(&mut payload, &mut staged, &mut held).await {
            staged.abort().await;
            return e.response();
        }
        return commit(staged, &digest, name, hop, state).await;
    }
    match state.uploads.open(Upload { staged, held: state.uploads.hold() }) {
        Ok(id) => upload_accepted(name, &id, 0),
        Err(upload) => {
            upload.staged.abort().await;
            oci_error(
                StatusCode::TOO_MANY_REQUESTS,
                ErrorCode::TooManyRequests,
                "too many uploads in progress",
            )
        }
    }
}

fn upload_unknown() -> HttpResponse {
    oci_error(StatusCode::NOT_FOUND, ErrorCode::BlobUploadUnknown, "upload unknown")
}

pub(super) async fn patch_upload(
    req: &HttpRequest,
    name: &str,
    id: &str,
    mut payload: web::Payload,
    state: &AppState,
) -> HttpResponse {
    let Some(session) = state.uploads.get(id) else { return upload_unknown() };
    let mut guard = session.lock().await;
    let Some(Upload { staged, held }) = guard.as_mut() else { return upload_unknown() };
    // Chunks must arrive in order: a Content-Range, if given, must start where we are.
    if let Some(start) = req
        .headers()
        .get(header::CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim_start_matches("bytes ").split('-').next()?.trim().parse::<u64>().ok())
    {
        if start != staged.len() {
            return oci_error(
                StatusCode::RANGE_NOT_SATISFIABLE,
                ErrorCode::BlobUploadInvalid,
                format!("chunk starts at {start}, upload has {} bytes", staged.len()),
            );
        }
    }
    match drain(&mut payload, staged, held).await {
        Ok(()) => upload_accepted(name, id, staged.len()),
        Err(DrainError::Body(resp)) => resp,
        Err(DrainError::Store(resp)) => {
            // What the file holds is unknown after a failed write: end the upload and free
            // its bytes, so no client resumes it into a short blob.
            guard.take();
            state.uploads.remove(id);
            resp
        }
    }
}

pub(super) async fn finish_upload(
    name: &str,
    id: &str,
    query: Option<String>,
    mut payload: web::Payload,
    hop: bool,
    state: &AppState,
) -> HttpResponse {
    let digest = match parse_query_digest(query) {
        Ok(Some(d)) => d,
        Ok(None) => return bad_digest("digest query parameter required"),
        Err(resp) => return resp,
    };
    let Some(session) = state.uploads.get(id) else { return upload_unknown() };
    let mut guard = session.lock().await;
    let Some(Upload { mut staged, mut held }) = guard.take() else { return upload_unknown() };
    state.uploads.remove(id);
    if let Err(e) = drain(&mut payload, &mut staged, &mut held).await {
        staged.abort().await;
        return e.response();
    }
    commit(staged, &digest, name, hop, state).await
}

pub(super) async fn upload_status(name: &str, id: &str, state: &AppState) -> HttpResponse {
    let Some(session) = state.uploads.get(id) else { return upload_unknown() };
    let guard = session.lock().await;
    let Some(upload) = guard.as_ref() else { return upload_unknown() };
    let mut resp = upload_accepted(name, id, upload.staged.len());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    resp
}

pub(super) async fn cancel_upload(id: &str, state: &AppState) -> HttpResponse {
    let Some(session) = state.uploads.get(id) else { return upload_unknown() };
    state.uploads.remove(id);
    if let Some(upload) = session.lock().await.take() {
        upload.staged.abort().await;
    }
    HttpResponse::NoContent().finish()
}
