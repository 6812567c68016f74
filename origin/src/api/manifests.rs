//! Manifest handlers of the distribution API: `GET`/`HEAD` (resolving a tag or digest,
//! pulling through from an upstream when allowed, forwarding to the owners in a cluster) and
//! `PUT` (size-bounded, checked for referenced blobs and digest, recording tags and
//! referrers, then replicated to the owners).

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use shoal_shared::digest::Digest;
use shoal_shared::http::{oci_error, DOCKER_CONTENT_DIGEST};
use shoal_shared::oci::{manifest_media_type, manifest_references, ErrorCode, Reference, MAX_MANIFEST};
use shoal_shared::referrers::{referrer_of, OCI_SUBJECT};

use super::{bad_digest, mark_private, proxied, store_failure, token_required, upstream_error, AppState};

/// A manifest this origin does not hold, asked of the owners (of the repository for a tag,
/// of the digest for a digest). `None`: answer locally (held here, a request from another
/// origin, no cluster, or no owner had it).
pub(super) async fn forward_manifest(
    req: &HttpRequest,
    name: &str,
    reference: &str,
    hop: bool,
    may_fetch: bool,
    state: &AppState,
) -> Option<HttpResponse> {
    let cluster = state.cluster.as_ref().filter(|_| !hop)?;
    let item = match reference.parse::<Reference>().ok()? {
        Reference::Tag(tag) if state.tags.get(name, &tag).await.is_none() => name.as_bytes().to_vec(),
        Reference::Digest(d) if state.store.size(&d).await.is_none() => d.to_string().into_bytes(),
        _ => return None,
    };
    let path = req.uri().path_and_query().map_or(req.path(), |p| p.as_str());
    let resp = cluster.forward(req.method(), path, &item, req.headers(), may_fetch).await?;
    Some(proxied(req, resp))
}

/// Resolves a reference to a manifest digest. Pull-through applies when `ns` names an
/// upstream, or without `ns` when no pushed tag matches and upstreams are configured; a
/// digest is fetched from the upstream when not held. Reaching an upstream fills the disk,
/// so it takes the upload token (`may_fetch`), as a push does.
async fn resolve(
    name: &str,
    reference: &str,
    ns: Option<&str>,
    may_fetch: bool,
    state: &AppState,
) -> Result<Digest, HttpResponse> {
    // A reference outside the grammar names no manifest: 404, as the spec's pull tests
    // expect (a PUT with one stays a 400).
    let reference = reference.parse::<Reference>().map_err(|e| {
        oci_error(StatusCode::NOT_FOUND, ErrorCode::ManifestUnknown, format!("no such manifest: {e}"))
    })?;
    let ups = &state.upstreams;
    let upstream = match ns {
        Some(ns) => ups.select(Some(ns)).ok(),
        None => match &reference {
            Reference::Tag(tag) if state.tags.get(name, tag).await.is_some() => None,
            Reference::Digest(d) if state.store.size(d).await.is_some() => None,
            _ => ups.select(None).ok(),
        },
    };
    match (reference, upstream) {
        (Reference::Digest(d), None) => Ok(d),
        (Reference::Digest(d), Some(_)) if state.store.size(&d).await.is_some() => Ok(d),
        (_, Some(_)) if !may_fetch => Err(token_required()),
        (r @ Reference::Digest(_), Some(i)) => {
            ups.pull_manifest(i, name, &r).await.map_err(|e| upstream_error(&e, ErrorCode::ManifestUnknown))
        }
        (Reference::Tag(tag), Some(i)) => {
            ups.resolve_tag(i, name, &tag).await.map_err(|e| upstream_error(&e, ErrorCode::ManifestUnknown))
        }
        (Reference::Tag(tag), None) => state.tags.get(name, &tag).await.ok_or_else(|| {
            oci_error(StatusCode::NOT_FOUND, ErrorCode::ManifestUnknown, format!("{name}:{tag} unknown"))
        }),
    }
}

pub(super) async fn get_manifest(
    name: &str,
    reference: &str,
    ns: Option<&str>,
    may_fetch: bool,
    state: &AppState,
) -> HttpResponse {
    let digest = match resolve(name, reference, ns, may_fetch, state).await {
        Ok(d) => d,
        Err(resp) => return resp,
    };
    let unknown = || oci_error(StatusCode::NOT_FOUND, ErrorCode::ManifestUnknown, "manifest unknown");
    match state.store.size(&digest).await {
        Some(len) if len <= MAX_MANIFEST as u64 => state.retention.touch(digest),
        _ => return unknown(),
    }
    let Ok(Some(bytes)) =
        state.store.read_range(&digest, 0, state.store.size(&digest).await.unwrap_or(0) as usize).await
    else {
        return unknown();
    };
    let Some(media_type) = manifest_media_type(&bytes) else { return unknown() };
    let mut resp = HttpResponse::Ok();
    resp.insert_header((header::CONTENT_TYPE, media_type))
        .insert_header((DOCKER_CONTENT_DIGEST, digest.to_string()));
    mark_private(&mut resp, &state.store, &digest).await;
    // On HEAD actix sends the headers of this body (its length) without the body.
    resp.body(bytes)
}

/// Reads a body of at most `limit` bytes.
async fn read_limited(mut payload: web::Payload, limit: usize) -> Result<Vec<u8>, HttpResponse> {
    let mut body = Vec::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| {
            oci_error(StatusCode::BAD_REQUEST, ErrorCode::ManifestInvalid, format!("body: {e}"))
        })?;
        if body.len() + chunk.len() > limit {
            return Err(oci_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::SizeInvalid,
                format!("manifest larger than {limit} bytes"),
            ));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

pub(super) async fn put_manifest(
    req: &HttpRequest,
    name: &str,
    reference: &str,
    payload: web::Payload,
    hop: bool,
    state: &AppState,
) -> HttpResponse {
    let reference_text = reference;
    let reference: Reference = match reference.parse() {
        Ok(r) => r,
        Err(e) => return oci_error(StatusCode::BAD_REQUEST, ErrorCode::ManifestInvalid, e),
    };
    let body = match read_limited(payload, MAX_MANIFEST).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    if manifest_media_type(&body).is_none() {
        return oci_error(
            StatusCode::BAD_REQUEST,
            ErrorCode::ManifestInvalid,
            "not a schema 2 / OCI manifest or index (schema 1 is not supported)",
        );
    }
    let refs = match manifest_references(&body) {
        Ok(r) => r,
        Err(e) => return oci_error(StatusCode::BAD_REQUEST, ErrorCode::ManifestInvalid, e),
    };
    // A copy from another origin was checked there: the blobs it references live on their
    // own owners, not necessarily here.
    for r in refs.into_iter().filter(|_| !hop) {
        if state.store.size(&r).await.is_none() {
            return oci_error(
                StatusCode::BAD_REQUEST,
                ErrorCode::ManifestBlobUnknown,
                format!("{r} unknown"),
            );
        }
    }
    let digest = Digest::of(&body);
    if let Reference::Digest(claimed) = &reference {
        if *claimed != digest {
            return bad_digest(format!("manifest has digest {digest}, not {claimed}"));
        }
    }
    // A subject need not exist yet (spec: referrers may be pushed before their subject).
    let referrer = match referrer_of(&body, &manifest_media_type(&body).unwrap_or_default(), digest) {
        Ok(r) => r,
        Err(e) => return oci_error(StatusCode::BAD_REQUEST, ErrorCode::ManifestInvalid, e),
    };
    let result = async {
        let mut staged = state.store.stage(state.piece_length).await?;
        staged.write(&body).await?;
        staged.commit(&digest).await
    }
    .await;
    if let Err(e) = result {
        return store_failure(&e, ErrorCode::ManifestInvalid);
    }
    if let Reference::Tag(tag) = &reference {
        if let Err(e) = state.tags.put(name, tag, &digest).await {
            tracing::error!(cause = %e, "cannot write tag");
            return oci_error(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::ManifestInvalid,
                "cannot write tag",
            );
        }
    }
    if let Some(r) = &referrer {
        match state.referrers.add(name, r).await {
            Ok(()) => {}
            Err(e @ crate::referrers::LinkError::Full { .. }) => {
                return oci_error(StatusCode::BAD_REQUEST, ErrorCode::ManifestInvalid, e)
            }
            Err(e) => {
                tracing::error!(cause = %e, "cannot write a referrer link");
                return oci_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorCode::ManifestInvalid,
                    "cannot record subject",
                );
            }
        }
    }
    tracing::info!(%name, %reference, %digest, "manifest stored");
    crate::retention::unmark_pulled(&state.store, &digest).await;
    if !hop {
        crate::private::PrivateMarks::new(&state.store).unmark_blob(&digest).await;
    }
    if let (Some(cluster), false) = (&state.cluster, hop) {
        let media_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .filter(|t| manifest_media_type(&body).as_deref() == Some(*t))
            .map(str::to_owned)
            .or_else(|| manifest_media_type(&body))
            .unwrap_or_default();
        cluster.replicate_manifest(name, reference_text, &digest, &body, &media_type).await;
    }
    let mut resp = HttpResponse::Created();
    resp.insert_header((header::LOCATION, format!("/v2/{name}/manifests/{digest}")))
        .insert_header((DOCKER_CONTENT_DIGEST, digest.to_string()));
    if let Some(r) = &referrer {
        resp.insert_header((OCI_SUBJECT, r.subject.to_string()));
    }
    resp.finish()
}
