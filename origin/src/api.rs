//! The origin's HTTP API: the OCI distribution spec (pull, push, content discovery with the
//! referrers API in `referrers.rs`, content management in `delete.rs`) plus Shoal's own
//! endpoints (`/shoal/v1/metainfo/<digest>`, `/shoal/v1/info`) and `/metrics`.
//!
//! Every handler validates names, references and digests before touching the store and
//! answers bad input with OCI error JSON; uploads are streamed to a temp file and become
//! visible only once their digest matches.

use std::net::SocketAddr;
use std::sync::Arc;

use actix_web::http::{header, Method, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use shoal_shared::digest::Digest;
use shoal_shared::hint::{valid_ns, HintQuery};
use shoal_shared::http::{oci_error, serve_file, DOCKER_CONTENT_DIGEST};
use shoal_shared::oci::{
    manifest_media_type, manifest_references, paginate, parse_v2_path, ErrorCode, Reference, TagList, V2Path,
    V2PathError, MAX_MANIFEST,
};
use shoal_shared::referrers::{referrer_of, FILTERS_APPLIED, OCI_SUBJECT};
use shoal_shared::store::{BlobStore, Staged, StoreError};

use crate::cluster::Cluster;
use crate::internal::{allowed, Need};
use crate::seeder::Seeder;
use crate::tags::TagStore;
use crate::uploads::{Held, Upload, Uploads};
use crate::upstream::{UpstreamError, Upstreams};

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

/// Ready when the store takes writes (a probe file in its temp directory).
async fn readyz(state: State) -> HttpResponse {
    if state.store.writable().await {
        HttpResponse::Ok().body("ready\n")
    } else {
        HttpResponse::ServiceUnavailable().body("not ready: the store does not take writes\n")
    }
}

/// Upstreams, uploads in progress, and the blobs peers fetched recently.
async fn status(state: State) -> HttpResponse {
    use shoal_shared::status::Page;
    let mut page = Page::new(&format!("shoal-origin {}", state.peer_addr));
    let up = std::time::Duration::from_secs(state.started.elapsed().as_secs());
    page.facts(&[
        ("version", env!("CARGO_PKG_VERSION").to_owned()),
        ("up", shoal_shared::config::Span(up).to_string()),
        ("uploads in progress", state.uploads.len().to_string()),
        ("writes", if state.upload_token.is_some() { "token required".into() } else { "open".into() }),
    ]);
    if let Some(cluster) = &state.cluster {
        let rows: Vec<Vec<String>> = cluster
            .members()
            .into_iter()
            .map(|(url, up)| {
                let role = if url == cluster.me() { "this origin" } else { "" };
                vec![url, if up { "up".into() } else { "down".into() }, role.into()]
            })
            .collect();
        page.table("Ring members", &["member", "health", ""], &rows, "No member.");
    }
    let rows: Vec<Vec<String>> = state.upstream_names.iter().map(|u| vec![u.clone()]).collect();
    page.table(
        "Upstream registries",
        &["registry=url"],
        &rows,
        "None: this origin holds only what is pushed to it.",
    );
    let mut hot = state.seeder.hot_set(crate::HOT_WINDOW);
    hot.sort();
    let rows: Vec<Vec<String>> = hot.iter().take(100).map(|d| vec![d.to_string()]).collect();
    page.table("Blobs peers fetched in the last 10 minutes", &["digest"], &rows, "None.");
    page.response()
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

async fn get_blob(req: &HttpRequest, digest: &str, hop: bool, state: &AppState) -> HttpResponse {
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

/// A manifest this origin does not hold, asked of the owners (of the repository for a tag,
/// of the digest for a digest). `None`: answer locally (held here, a request from another
/// origin, no cluster, or no owner had it).
async fn forward_manifest(
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

async fn get_manifest(
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

async fn put_manifest(
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

/// A cross-repository mount: content is global here, so a blob the origin holds is mounted
/// at once (201). `None` (an ordinary upload session follows, as the spec allows) when
/// there is no `mount`, it is not a digest, or the blob is not held; `from` is only checked
/// against the name grammar.
async fn mount_blob(
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

async fn start_upload(
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

async fn patch_upload(
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

async fn finish_upload(
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

async fn upload_status(name: &str, id: &str, state: &AppState) -> HttpResponse {
    let Some(session) = state.uploads.get(id) else { return upload_unknown() };
    let guard = session.lock().await;
    let Some(upload) = guard.as_ref() else { return upload_unknown() };
    let mut resp = upload_accepted(name, id, upload.staged.len());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    resp
}

async fn cancel_upload(id: &str, state: &AppState) -> HttpResponse {
    let Some(session) = state.uploads.get(id) else { return upload_unknown() };
    state.uploads.remove(id);
    if let Some(upload) = session.lock().await.take() {
        upload.staged.abort().await;
    }
    HttpResponse::NoContent().finish()
}

/// The metainfo of a held blob. With a hint (`?name=&ns=`) and upstreams configured, a blob
/// not held is fetched from the upstream (one flight per digest) and the answer is 202 with
/// `Retry-After` until it is stored.
async fn metainfo(
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

/// Names the private repository `digest` was pulled for, if any, on an answer about it.
async fn mark_private(resp: &mut actix_web::HttpResponseBuilder, store: &BlobStore, digest: &Digest) {
    if let Some(repo) = crate::private::PrivateMarks::new(store).blob(digest).await {
        resp.insert_header((shoal_shared::tenant::PRIVATE_HEADER, repo.to_string()));
    }
}

/// How long a metainfo request for a blob being pulled through waits before answering 202.
const LONG_POLL: std::time::Duration = std::time::Duration::from_secs(20);

async fn info(state: State) -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({
        "peer": state.peer_addr,
        "piece_length": state.piece_length,
    }))
}

async fn metrics(state: State) -> HttpResponse {
    shoal_shared::telemetry::metrics_response(&state.registry)
}
