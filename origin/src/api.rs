//! The origin's HTTP API: the OCI distribution spec (pull, push, content discovery with the
//! referrers API in `referrers.rs`, content management in `delete.rs`) plus Shoal's own
//! endpoints (`/shoal/v1/metainfo/<digest>`, `/shoal/v1/info`) and `/metrics`.
//!
//! Every handler validates names, references and digests before touching the store and
//! answers bad input with OCI error JSON; uploads are streamed to a temp file and become
//! visible only once their digest matches.
//!
//! This file owns the shared state, the route table, the `/v2/` dispatch and the helpers every
//! handler uses (authorization, error answers, proxying another origin's answer); the handlers
//! live by concern in `blobs` (pull, mount, uploads), `manifests` (pull and push),
//! `metainfo` (Shoal's metainfo with its pull-through long poll) and `status` (probes,
//! status page, info, metrics).

mod blobs;
mod manifests;
mod metainfo;
mod status;

use std::net::SocketAddr;
use std::sync::Arc;

use actix_web::http::{header, Method, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use shoal_shared::digest::Digest;
use shoal_shared::hint::valid_ns;
use shoal_shared::http::{oci_error, DOCKER_CONTENT_DIGEST};
use shoal_shared::oci::{paginate, parse_v2_path, ErrorCode, TagList, V2Path, V2PathError};
use shoal_shared::referrers::FILTERS_APPLIED;
use shoal_shared::store::{BlobStore, StoreError};

use crate::cluster::Cluster;
use crate::internal::{allowed, Need};
use crate::seeder::Seeder;
use crate::tags::TagStore;
use crate::uploads::Uploads;
use crate::upstream::{UpstreamError, Upstreams};

use blobs::{cancel_upload, finish_upload, get_blob, mount_blob, patch_upload, start_upload, upload_status};
use manifests::{forward_manifest, get_manifest, put_manifest};
use metainfo::metainfo;
use status::{info, metrics, readyz, status};

/// Everything the handlers share.
#[derive(Debug)]
pub struct AppState {
    pub store: BlobStore,
    pub tags: TagStore,
    /// Which manifests name which subject (the referrers API).
    pub referrers: crate::referrers::Referrers,
    pub uploads: Uploads,
    pub seeder: Arc<Seeder>,
    pub piece_length: u32,
    pub peer_addr: SocketAddr,
    pub registry: Registry,
    pub upload_token: Option<String>,
    pub upstreams: Arc<Upstreams>,
    pub prefetch_sync: bool,
    pub prefetch_sizes: crate::prefetch::SizeFilter,
    /// The origin cluster this origin is a member of, if any.
    pub cluster: Option<Arc<Cluster>>,
    /// What the origin keeps (pulled-through retention, the local bound).
    pub retention: Arc<crate::retention::Retention>,
    /// The upstream registries (`REGISTRY=URL`), for the status page.
    pub upstream_names: Vec<String>,
    pub started: std::time::Instant,
}

/// True when the request carries the upload token (or none is configured), as a bearer
/// token or as the password of Basic credentials. Handlers ask [`allowed`], which also
/// knows the internal listener's callers.
pub(crate) fn authorized(req: &HttpRequest, token: Option<&str>) -> bool {
    let Some(token) = token else { return true };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(shoal_shared::registry_auth::presented_secret)
        .unwrap_or_default();
    // Constant time in the token's length: do not leak how much of a guess was right.
    given.len() == token.len() && given.bytes().zip(token.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// Mounts the routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.app_data(web::QueryConfig::default().error_handler(|err, _| {
        let resp = oci_error(StatusCode::BAD_REQUEST, ErrorCode::Unsupported, format!("query: {err}"));
        actix_web::error::InternalError::from_response(err, resp).into()
    }))
    .route("/v2", web::route().to(v2_base))
    .route("/v2/{tail:.*}", web::route().to(v2))
    .route("/shoal/v1/metainfo/{digest}", web::get().to(metainfo))
    .route("/shoal/v1/info", web::get().to(info))
    .route("/metrics", web::get().to(metrics))
    .route("/healthz", web::get().to(|| async { HttpResponse::Ok().body("ok") }))
    .route("/readyz", web::get().to(readyz))
    .route("/", web::get().to(status))
    .route("/status", web::get().to(status));
}

type State = web::Data<AppState>;

/// The answer to a write or a fetch-triggering request without the upload token.
pub(crate) fn token_required() -> HttpResponse {
    let mut resp = oci_error(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, "upload token required");
    resp.headers_mut()
        .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer realm=\"shoal\""));
    resp
}

fn bad_digest(e: impl std::fmt::Display) -> HttpResponse {
    oci_error(StatusCode::BAD_REQUEST, ErrorCode::DigestInvalid, e)
}

/// A store error as the client sees it: a full disk is 507, anything else 503; never a path
/// of the host. `code` is that of what the request was about (see [`ErrorCode`]).
pub(crate) fn store_failure(e: &StoreError, code: ErrorCode) -> HttpResponse {
    tracing::error!(cause = %e, "store failure");
    if e.is_out_of_space() {
        return oci_error(
            StatusCode::INSUFFICIENT_STORAGE,
            code,
            "the origin is out of disk space; nothing of this upload was kept",
        );
    }
    oci_error(StatusCode::SERVICE_UNAVAILABLE, code, "storage unavailable")
}

async fn v2_base() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({}))
}

#[derive(Deserialize)]
struct DigestQuery {
    digest: Option<String>,
    n: Option<usize>,
    last: Option<String>,
    /// The upstream registry of a pull-through request (containerd's mirror `?ns=`).
    ns: Option<String>,
    /// A cross-repository mount (`POST .../blobs/uploads/?mount=<digest>&from=<name>`).
    mount: Option<String>,
    from: Option<String>,
    /// The referrers API's filter.
    #[serde(rename = "artifactType")]
    artifact_type: Option<String>,
}

async fn v2(
    req: HttpRequest,
    tail: web::Path<String>,
    query: web::Query<DigestQuery>,
    payload: web::Payload,
    state: State,
) -> HttpResponse {
    let path = match parse_v2_path(&tail) {
        Ok(p) => p,
        Err(V2PathError::Name) => {
            return oci_error(StatusCode::BAD_REQUEST, ErrorCode::NameInvalid, "invalid repository name")
        }
        Err(V2PathError::NotFound) => {
            return oci_error(StatusCode::NOT_FOUND, ErrorCode::Unsupported, "no such endpoint")
        }
    };
    let method = req.method().clone();
    let writes = matches!(method, Method::PUT | Method::POST | Method::PATCH | Method::DELETE);
    if writes && !allowed(&req, state.upload_token.as_deref(), Need::Write) {
        return token_required();
    }
    let DigestQuery { digest: query, n, last, ns, mount, from, artifact_type } = query.into_inner();
    if ns.as_deref().is_some_and(|ns| !valid_ns(ns)) {
        return oci_error(StatusCode::BAD_REQUEST, ErrorCode::Unsupported, "invalid ns");
    }
    // A request from another origin is answered from local state only.
    // Only a member of a cluster honours the header: on a standalone origin it would let a
    // writer skip the "referenced blobs are here" check of a manifest PUT.
    let hop = state.cluster.is_some() && Cluster::is_hop(&req);
    match (path, method) {
        (V2Path::Base, _) => v2_base().await,
        (V2Path::Blob { digest, .. }, Method::GET | Method::HEAD) => {
            get_blob(&req, digest, hop, &state).await
        }
        (V2Path::Manifest { name, reference }, Method::GET | Method::HEAD) => {
            let may_fetch = allowed(&req, state.upload_token.as_deref(), Need::Fetch);
            if let Some(resp) = forward_manifest(&req, name, reference, hop, may_fetch, &state).await {
                return resp;
            }
            get_manifest(name, reference, ns.as_deref(), may_fetch, &state).await
        }
        (V2Path::Manifest { name, reference }, Method::PUT) => {
            put_manifest(&req, name, reference, payload, hop, &state).await
        }
        (V2Path::UploadStart { name }, Method::POST) => {
            if let Some(resp) = mount_blob(name, mount.as_deref(), from.as_deref(), &state).await {
                return resp;
            }
            // A ring member's copy of a blob it pulled through stays subject to the
            // pull-through retention here too.
            let pulled = hop && req.headers().contains_key(shoal_shared::client::PULLED_THROUGH_HEADER);
            let copied = query.clone().filter(|_| pulled).and_then(|q| q.parse::<Digest>().ok());
            // ...and a copy of private content stays private (a member's word, over mTLS
            // with the upload token).
            let private = req
                .headers()
                .get(shoal_shared::tenant::PRIVATE_HEADER)
                .filter(|_| hop)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| shoal_shared::tenant::PrivateRepo::parse(v).ok());
            // Marked before the copy is visible; a copy that cannot be marked is refused.
            let target = query.as_deref().and_then(|q| q.parse::<Digest>().ok());
            if let (Some(digest), Some(repo)) = (target, private) {
                if let Err(e) =
                    crate::private::PrivateMarks::new(&state.store).mark_blob(&digest, &repo).await
                {
                    tracing::error!(%digest, cause = %e, "cannot mark a private copy");
                    return oci_error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        ErrorCode::BlobUploadInvalid,
                        "cannot mark",
                    );
                }
            }
            let resp = start_upload(name, query, payload, hop, &state).await;
            if let (Some(digest), StatusCode::CREATED) = (copied, resp.status()) {
                crate::retention::mark_pulled(&state.store, &digest).await;
            }
            resp
        }
        (V2Path::Manifest { name, reference }, Method::DELETE) => {
            crate::delete::manifest(name, reference, hop, &state).await
        }
        (V2Path::Blob { name, digest }, Method::DELETE) => {
            crate::delete::blob(name, digest, hop, &state).await
        }
        (V2Path::Referrers { name, digest }, Method::GET | Method::HEAD) => {
            crate::referrers::get(&req, name, digest, artifact_type.as_deref(), hop, &state).await
        }
        (V2Path::Upload { name, id }, Method::PATCH) => patch_upload(&req, name, id, payload, &state).await,
        (V2Path::Upload { name, id }, Method::PUT) => {
            finish_upload(name, id, query, payload, hop, &state).await
        }
        (V2Path::Upload { name, id }, Method::GET) => upload_status(name, id, &state).await,
        (V2Path::Upload { id, .. }, Method::DELETE) => cancel_upload(id, &state).await,
        (V2Path::TagsList { name }, Method::GET) => match state.tags.list(name).await {
            Some(tags) => {
                let tags = paginate(&tags, last.as_deref(), n);
                HttpResponse::Ok().json(TagList { name: name.to_owned(), tags })
            }
            None => oci_error(StatusCode::NOT_FOUND, ErrorCode::NameUnknown, format!("{name} has no tags")),
        },
        _ => oci_error(StatusCode::METHOD_NOT_ALLOWED, ErrorCode::Unsupported, "method not allowed"),
    }
}

/// Another origin's answer, passed on: status, the registry headers and the body, streamed.
pub(crate) fn proxied(req: &HttpRequest, resp: reqwest::Response) -> HttpResponse {
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut builder = HttpResponse::build(status);
    for name in [
        header::CONTENT_TYPE,
        header::CONTENT_RANGE,
        header::ACCEPT_RANGES,
        header::ETAG,
        header::WWW_AUTHENTICATE,
        header::RETRY_AFTER,
    ] {
        if let Some(v) = resp.headers().get(name.as_str()).and_then(|v| v.to_str().ok()) {
            builder.insert_header((name, v.to_owned()));
        }
    }
    if let Some(v) = resp.headers().get(DOCKER_CONTENT_DIGEST).and_then(|v| v.to_str().ok()) {
        builder.insert_header((DOCKER_CONTENT_DIGEST, v.to_owned()));
    }
    if let Some(v) = resp.headers().get(FILTERS_APPLIED).and_then(|v| v.to_str().ok()) {
        builder.insert_header((FILTERS_APPLIED, v.to_owned()));
    }
    let len = resp
        .content_length()
        .or_else(|| resp.headers().get(reqwest::header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok());
    match (req.method() == Method::HEAD, len) {
        (true, Some(len)) => shoal_shared::http::head_body(&mut builder, len),
        (true, None) => builder.finish(),
        (false, Some(len)) => builder.body(actix_web::body::SizedStream::new(
            len,
            resp.bytes_stream().map(|r| r.map_err(std::io::Error::other)),
        )),
        (false, None) => builder.streaming(resp.bytes_stream().map(|r| r.map_err(std::io::Error::other))),
    }
}

fn upstream_error(e: &UpstreamError, unknown: ErrorCode) -> HttpResponse {
    let (status, code) = e.http(unknown);
    oci_error(status, code, e)
}

/// Names the private repository `digest` was pulled for, if any, on an answer about it.
async fn mark_private(resp: &mut actix_web::HttpResponseBuilder, store: &BlobStore, digest: &Digest) {
    if let Some(repo) = crate::private::PrivateMarks::new(store).blob(digest).await {
        resp.insert_header((shoal_shared::tenant::PRIVATE_HEADER, repo.to_string()));
    }
}
