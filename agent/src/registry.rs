//! The local registry endpoint (pull side of the OCI distribution spec) that containerd
//! pulls from. Every blob and manifest comes out of the local cache; a miss joins or starts
//! the single download of that digest.

use std::sync::Arc;

use actix_web::body::SizedStream;
use actix_web::http::{header, Method, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use prometheus_client::registry::Registry;
use shoal_shared::digest::Digest;
use shoal_shared::hint::{Hint, HintQuery};
use shoal_shared::http::{
    blob_response, check_piece_at, head_body, oci_error, serve_file, PieceCheck, DOCKER_CONTENT_DIGEST,
};
use shoal_shared::oci::{
    manifest_media_type, paginate, parse_v2_path, ErrorCode, Reference, TagList, V2Path, V2PathError,
    MAX_MANIFEST,
};
use shoal_shared::store::{Ahead, READ_CHUNK};

use crate::delivery::{Counted, Tally};
use crate::download::{Active, DownloadError, Downloads, Fetched};
use crate::tenant::{Probe, Tenants};
use shoal_shared::tracker::LookupError;

/// Handler state.
#[derive(Debug)]
pub struct AppState {
    pub downloads: Arc<Downloads>,
    pub registry: Registry,
    /// Permits for background preloads.
    pub preloads: Arc<tokio::sync::Semaphore>,
    pub started: std::time::Instant,
    /// This agent's peer address.
    pub me: std::net::SocketAddr,
    /// Who may have content pulled through from private upstream repositories.
    pub tenants: Arc<Tenants>,
}

type State = web::Data<AppState>;

/// Mounts the routes: the registry, preload, and the operations routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/v2", web::route().to(v2))
        .route("/v2/{tail:.*}", web::route().to(v2))
        .route("/shoal/v1/preload", web::post().to(crate::preload::handle));
    configure_ops(cfg);
}

/// The operations routes alone (the `--metrics` listener): metrics, liveness, readiness
/// and the status page.
pub fn configure_ops(cfg: &mut web::ServiceConfig) {
    cfg.route(
        "/metrics",
        web::get().to(|s: State| async move { shoal_shared::telemetry::metrics_response(&s.registry) }),
    )
    .route("/healthz", web::get().to(|| async { HttpResponse::Ok().body("ok") }))
    .route("/readyz", web::get().to(readyz))
    .route("/", web::get().to(crate::status::page))
    .route("/status", web::get().to(crate::status::page));
}

/// How long readiness waits for a tracker.
const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Ready when the agent can do its job: its data directory takes writes and a tracker
/// answers. 503 with the reason otherwise.
async fn readyz(state: State) -> HttpResponse {
    if !state.downloads.store.writable().await {
        return HttpResponse::ServiceUnavailable()
            .body("not ready: the data directory does not take writes\n");
    }
    match state.downloads.tracker().reachable(READY_TIMEOUT).await {
        Ok(()) => HttpResponse::Ok().body("ready\n"),
        Err(e) => HttpResponse::ServiceUnavailable().body(format!("not ready: no tracker reachable ({e})\n")),
    }
}

fn download_error(e: &DownloadError, unknown: ErrorCode) -> HttpResponse {
    match e {
        DownloadError::NotFound => oci_error(StatusCode::NOT_FOUND, unknown, "unknown to the cluster"),
        // As for a tag: a 401 without a challenge sends containerd to the registry itself.
        DownloadError::Denied(m) => oci_error(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, m),
        // Server-side failures keep their status and carry the code of what was asked for
        // (the spec has no code of its own for them; see `ErrorCode`).
        DownloadError::OutOfSpace => oci_error(StatusCode::INSUFFICIENT_STORAGE, unknown, e),
        // Everything cached is in use: the client (containerd) retries or falls back to the
        // registry; the disk is never overshot.
        DownloadError::CacheFull(m) => oci_error(StatusCode::SERVICE_UNAVAILABLE, unknown, m),
        other => oci_error(StatusCode::SERVICE_UNAVAILABLE, unknown, other),
    }
}

async fn v2(req: HttpRequest, state: State) -> HttpResponse {
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        return oci_error(
            StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::Unsupported,
            "this registry is read-only",
        );
    }
    let tail = req.match_info().get("tail").unwrap_or("");
    // `?ns=<registry>` (containerd mirror requests) travels with the repository name to the
    // origins, which pull images they do not hold from that upstream registry.
    let ns = match web::Query::<HintQuery>::from_query(req.query_string()) {
        Ok(q) => q.into_inner().ns,
        Err(_) => return oci_error(StatusCode::BAD_REQUEST, ErrorCode::Unsupported, "bad query"),
    };
    let hint = |name: &str| {
        Hint::new(name, ns.as_deref())
            .map_err(|e| oci_error(StatusCode::BAD_REQUEST, ErrorCode::NameInvalid, e))
    };
    match parse_v2_path(tail) {
        Ok(V2Path::Base) => HttpResponse::Ok().json(serde_json::json!({})),
        Ok(V2Path::Blob { name, digest }) => match hint(name) {
            Ok(h) => blob(&req, digest, &h, &state).await,
            Err(resp) => resp,
        },
        Ok(V2Path::Manifest { name, reference }) => match hint(name) {
            Ok(h) => manifest(&req, reference, &h, &state).await,
            Err(resp) => resp,
        },
        Ok(V2Path::TagsList { name }) => tag_list(&req, name, &state).await,
        Ok(V2Path::Referrers { name, digest }) => referrers(&req, name, digest, &state).await,
        Ok(_) | Err(V2PathError::NotFound) => {
            oci_error(StatusCode::NOT_FOUND, ErrorCode::Unsupported, "no such endpoint")
        }
        Err(V2PathError::Name) => {
            oci_error(StatusCode::BAD_REQUEST, ErrorCode::NameInvalid, "invalid repository name")
        }
    }
}

async fn blob(req: &HttpRequest, digest: &str, hint: &Hint, state: &AppState) -> HttpResponse {
    let digest: Digest = match digest.parse() {
        Ok(d) => d,
        Err(e) => return oci_error(StatusCode::BAD_REQUEST, ErrorCode::DigestInvalid, e),
    };
    let downloads = &state.downloads;
    if req.method() == Method::HEAD && downloads.store.size(&digest).await.is_none() {
        // Answer from the metainfo; no need to download to say how large a blob is.
        return match downloads.tracker().metainfo_sourced(digest, Some(hint)).await {
            Ok(sourced) => {
                if let Some(repo) = &sourced.private {
                    if let Err(resp) = authorize(req, state, hint, repo, Probe::Blob(&digest)).await {
                        return resp;
                    }
                }
                let m = sourced.metainfo;
                head_body(
                    HttpResponse::Ok()
                        .insert_header((header::CONTENT_TYPE, "application/octet-stream"))
                        .insert_header((header::ACCEPT_RANGES, "bytes"))
                        .insert_header((DOCKER_CONTENT_DIGEST, digest.to_string())),
                    m.length(),
                )
            }
            Err(LookupError::NotFound) => {
                oci_error(StatusCode::NOT_FOUND, ErrorCode::BlobUnknown, "blob unknown")
            }
            Err(LookupError::Denied(m)) => oci_error(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, m),
            Err(e) => oci_error(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::BlobUnknown, e),
        };
    }
    // A plain GET streams the verified prefix of a download as it grows; a Range request
    // waits for the whole blob. A cached copy found damaged (or evicted meanwhile) is fetched
    // again, once.
    let mut refetched = false;
    loop {
        let tally = if req.headers().contains_key(header::RANGE) {
            match downloads.ensure(digest, Some(hint)).await {
                Ok(tally) => tally,
                Err(e) => return download_error(&e, ErrorCode::BlobUnknown),
            }
        } else {
            match downloads.fetch(digest, Some(hint)).await {
                Ok(Fetched::Cached(tally)) => tally,
                Ok(Fetched::Streaming(active)) => {
                    // The download recorded the blob's marker before its first byte.
                    if let Err(resp) = guard(req, state, hint, &digest, Probe::Blob(&digest)).await {
                        return resp;
                    }
                    let len = active.length();
                    let tally = Tally::Download(active.sources.clone());
                    let body = SizedStream::new(len, Box::pin(prefix_stream(active.clone())));
                    // The download's own hold keeps the blob cached until the body is done.
                    let delivered = downloads.metrics.delivered.clone();
                    return blob_response(StatusCode::OK, &digest, "application/octet-stream")
                        .body(Counted::new(body, 0, tally, delivered, active));
                }
                Err(e) => return download_error(&e, ErrorCode::BlobUnknown),
            }
        };
        if let Err(resp) = guard(req, state, hint, &digest, Probe::Blob(&digest)).await {
            return resp;
        }
        match serve_cached(req, digest, downloads, tally).await {
            Cached::Served(resp) => return resp,
            Cached::Damaged | Cached::Missing if !refetched => refetched = true,
            Cached::Damaged | Cached::Missing => {
                return oci_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorCode::BlobUnknown,
                    "blob evicted, retry",
                )
            }
        }
    }
}

/// What [`serve_cached`] found.
enum Cached {
    Served(HttpResponse),
    /// The first piece no longer matches its hash; the blob was dropped.
    Damaged,
    /// Not in the cache (evicted, or dropped as damaged by another request).
    Missing,
}

/// Answers from the cache, every piece checked against the metainfo before it is sent. The
/// first piece is checked before answering, so a damaged blob is usually fetched again
/// instead of being cut short; damage further in ends the body early.
async fn serve_cached(req: &HttpRequest, digest: Digest, downloads: &Arc<Downloads>, tally: Tally) -> Cached {
    let store = &downloads.store;
    // Pinned first, so the cache cannot evict it between the open and the last byte sent.
    let hold = downloads.cache.hold(digest);
    let Some((file, len)) = store.open_blob(&digest).await else { return Cached::Missing };
    let file = Arc::new(file);
    // A blob whose metainfo is gone, or whose length is not the metainfo's, cannot be
    // checked piece by piece: it is dropped and fetched again like a damaged one.
    let metainfo = match store.stored_metainfo(&digest).await {
        Some(m) if m.length() == len => m,
        _ => {
            downloads.quarantine(digest, &file);
            return Cached::Damaged;
        }
    };
    let check = PieceCheck {
        metainfo: Arc::new(metainfo),
        on_damage: Box::new({
            let downloads = downloads.clone();
            move |file: &std::fs::File| downloads.quarantine(digest, file)
        }),
    };
    let whole_get = req.method() == Method::GET && !req.headers().contains_key(header::RANGE);
    if whole_get && len > 0 && check_piece_at(&file, &check, 0).await.is_err() {
        return Cached::Damaged;
    }
    let resp = serve_file(req, file, len, &digest, "application/octet-stream", Some(check));
    let start = body_start(&resp);
    let delivered = downloads.metrics.delivered.clone();
    Cached::Served(
        resp.map_body(|_, body| Counted::new(body, start, tally, delivered, hold)).map_into_boxed_body(),
    )
}

/// Where a blob response's body starts in the blob: the first byte of its `Content-Range`,
/// else 0.
fn body_start(resp: &HttpResponse) -> u64 {
    resp.headers()
        .get(header::CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes "))
        .and_then(|v| v.split('-').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Serves content private to a repository (its marker, [`crate::tenant::marker`]) only to
/// a client the upstream accepts for it.
async fn guard(
    req: &HttpRequest,
    state: &AppState,
    hint: &Hint,
    digest: &Digest,
    probe: Probe<'_>,
) -> Result<(), HttpResponse> {
    match crate::tenant::marker(&state.downloads.store, digest).await {
        Ok(None) => Ok(()),
        Ok(Some(repo)) => authorize(req, state, hint, &repo, probe).await,
        Err(e) => {
            tracing::error!(%digest, cause = %e.kind(), "cannot read a blob's private marker");
            Err(oci_error(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unauthorized, "cannot check access"))
        }
    }
}

/// Checks the client's credentials for private `repo` (never logged).
async fn authorize(
    req: &HttpRequest,
    state: &AppState,
    hint: &Hint,
    repo: &shoal_shared::tenant::PrivateRepo,
    probe: Probe<'_>,
) -> Result<(), HttpResponse> {
    let auth = req.headers().get(header::AUTHORIZATION);
    state.tenants.authorize(auth, hint.ns.as_deref(), &hint.name, repo, probe).await.map_err(|refusal| {
        tracing::info!(%repo, %refusal, "private content refused");
        refusal.response()
    })
}

async fn manifest(req: &HttpRequest, reference: &str, hint: &Hint, state: &AppState) -> HttpResponse {
    let name = hint.name.as_str();
    let downloads = &state.downloads;
    let digest = match reference.parse::<Reference>() {
        Ok(Reference::Digest(d)) => d,
        Ok(Reference::Tag(tag)) => {
            match downloads.tracker().tag_sourced(name, &tag, hint.ns.as_deref()).await {
                // A tag of a private repository: checked before its manifest is fetched.
                Ok((d, Some(repo))) => {
                    match authorize(req, state, hint, &repo, Probe::Manifest(&tag)).await {
                        Ok(()) => d,
                        Err(resp) => return resp,
                    }
                }
                Ok((d, None)) => d,
                Err(LookupError::NotFound) => {
                    return oci_error(
                        StatusCode::NOT_FOUND,
                        ErrorCode::ManifestUnknown,
                        format!("{name}:{tag} unknown"),
                    )
                }
                // The upstream refused the cluster's credentials: a 401 (without a challenge, as
                // the client cannot fix it) tells containerd to fall back to the registry itself.
                Err(LookupError::Denied(m)) => {
                    return oci_error(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, m)
                }
                Err(e) => return oci_error(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::ManifestUnknown, e),
            }
        }
        // A reference outside the grammar names no manifest (the spec's pull tests: 404).
        Err(e) => {
            return oci_error(
                StatusCode::NOT_FOUND,
                ErrorCode::ManifestUnknown,
                format!("no such manifest: {e}"),
            )
        }
    };
    let tally = match downloads.ensure(digest, Some(hint)).await {
        Ok(tally) => tally,
        Err(e) => return download_error(&e, ErrorCode::ManifestUnknown),
    };
    let probe =
        if reference.parse::<Digest>().is_ok() { Probe::Manifest(reference) } else { Probe::Repository };
    if let Err(resp) = guard(req, state, hint, &digest, probe).await {
        return resp;
    }
    let unknown = || oci_error(StatusCode::NOT_FOUND, ErrorCode::ManifestUnknown, "not a manifest");
    let size = match downloads.store.size(&digest).await {
        Some(s) if s <= MAX_MANIFEST as u64 => s as usize,
        _ => return unknown(),
    };
    let Ok(Some(bytes)) = downloads.store.read_range(&digest, 0, size).await else { return unknown() };
    let Some(media_type) = manifest_media_type(&bytes) else { return unknown() };
    let mut resp = HttpResponse::Ok();
    resp.insert_header((header::CONTENT_TYPE, media_type))
        .insert_header((DOCKER_CONTENT_DIGEST, digest.to_string()));
    if req.method() == Method::GET {
        tally.count(&downloads.metrics.delivered, 0, bytes.len() as u64);
    }
    // On HEAD actix sends the headers of this body (its length) without the body.
    resp.body(bytes)
}

#[derive(serde::Deserialize)]
struct ReferrersQuery {
    #[serde(rename = "artifactType")]
    artifact_type: Option<String>,
}

/// `GET /v2/<name>/referrers/<digest>`: asked of the tracker, which merges what the origins
/// list (as for tags: nothing is cached, so a deleted referrer is gone at once).
async fn referrers(req: &HttpRequest, name: &str, digest: &str, state: &AppState) -> HttpResponse {
    use shoal_shared::referrers::{valid_artifact_type, FILTERS_APPLIED};
    let subject: Digest = match digest.parse() {
        Ok(d) => d,
        Err(e) => return oci_error(StatusCode::BAD_REQUEST, ErrorCode::DigestInvalid, e),
    };
    let Ok(query) = web::Query::<ReferrersQuery>::from_query(req.query_string()) else {
        return oci_error(StatusCode::BAD_REQUEST, ErrorCode::Unsupported, "bad query");
    };
    let artifact_type = query.into_inner().artifact_type;
    if artifact_type.as_deref().is_some_and(|t| !valid_artifact_type(t)) {
        return oci_error(StatusCode::BAD_REQUEST, ErrorCode::Unsupported, "invalid artifactType");
    }
    match state.downloads.tracker().referrers(name, &subject, artifact_type.as_deref()).await {
        Ok(index) => {
            let mut resp = HttpResponse::Ok();
            resp.insert_header((header::CONTENT_TYPE, shoal_shared::oci::OCI_INDEX));
            if artifact_type.is_some() {
                resp.insert_header((FILTERS_APPLIED, "artifactType"));
            }
            resp.body(serde_json::to_vec(&index).unwrap_or_default())
        }
        Err(LookupError::Denied(m)) => oci_error(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, m),
        // The spec forbids a 404 from a registry that serves the referrers API.
        Err(e) => oci_error(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::ManifestUnknown, e),
    }
}

#[derive(serde::Deserialize)]
struct Page {
    n: Option<usize>,
    last: Option<String>,
}

async fn tag_list(req: &HttpRequest, name: &str, state: &AppState) -> HttpResponse {
    let Ok(page) = web::Query::<Page>::from_query(req.query_string()) else {
        return oci_error(StatusCode::BAD_REQUEST, ErrorCode::Unsupported, "bad n or last parameter");
    };
    match state.downloads.tracker().tag_list(name).await {
        Ok(tags) => {
            let tags = paginate(&tags, page.last.as_deref(), page.n);
            HttpResponse::Ok().json(TagList { name: name.to_owned(), tags })
        }
        Err(LookupError::NotFound) => {
            oci_error(StatusCode::NOT_FOUND, ErrorCode::NameUnknown, "repository unknown")
        }
        Err(e) => oci_error(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::NameUnknown, e),
    }
}

/// The bytes of a download in progress, in order, each chunk sent as soon as the verified
/// prefix covers it. Ends with an error (the client sees a short body) if the download fails.
///
/// Pieces written while the client streams come from memory ([`Ahead`]): the verified bytes
/// themselves, which never passed through the disk. The others (written before the client
/// came, or not kept) are read from the file, and each is checked against its hash just
/// before: pieces were verified when they arrived, but the file is the cache's once
/// committed (and may be damaged there), so no byte read from it leaves unless its piece
/// matches now, as on the cached path.
fn prefix_stream(
    active: Arc<Active>,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, std::io::Error>> {
    let state = Streaming {
        rx: active.subscribe(),
        written: active.written.subscribe(),
        ahead: Ahead::new(active.partial.metainfo().piece_length()),
        blocks: std::collections::VecDeque::new(),
        offset: 0,
        checked: 0,
        active,
    };
    futures_util::stream::unfold(Some(state), |state| async move {
        let mut st = state?;
        let length = st.active.length();
        loop {
            // A piece from memory, block by block (`offset` is already past it).
            if let Some(block) = st.blocks.pop_front() {
                let last = st.blocks.is_empty() && st.offset >= length;
                // The download (and its hold on the cache) is let go with the last chunk:
                // the server may keep a finished body around for a while.
                return Some((Ok(block), (!last).then_some(st)));
            }
            if st.offset >= length {
                return None;
            }
            while let Ok(piece) = st.written.try_recv() {
                st.ahead.offer(piece, st.offset);
            }
            let prefix = *st.rx.borrow_and_update();
            if prefix.bytes > st.offset {
                if st.offset >= st.checked {
                    // At a piece's start: `checked` is where the last piece checked ended.
                    if let Some(piece) = st.ahead.take(st.offset) {
                        st.offset += piece.len() as u64;
                        st.checked = st.offset;
                        st.blocks.extend(piece.blocks().iter().cloned());
                        continue;
                    }
                    let m = st.active.partial.metainfo();
                    let index = (st.offset / u64::from(m.piece_length())) as u32;
                    // `offset` is inside the blob, so its piece exists; were it not, the
                    // stream ends here rather than send empty chunks forever.
                    let end = match m.piece_size(index) {
                        Ok(size) => m.piece_offset(index) + u64::from(size),
                        Err(e) => return Some((Err(std::io::Error::other(e)), None)),
                    };
                    match st.active.partial.piece_intact(index).await {
                        Ok(true) => st.checked = end,
                        Ok(false) => {
                            tracing::error!(digest = %m.digest(), piece = index, "a downloaded piece no longer matches its hash; response cut");
                            return Some((Err(std::io::Error::other("stored piece is damaged")), None));
                        }
                        Err(e) => return Some((Err(std::io::Error::other(e)), None)),
                    }
                }
                let n = (prefix.bytes.min(st.checked) - st.offset).min(READ_CHUNK as u64) as usize;
                let next = st.offset + n as u64;
                return Some(match st.active.partial.read_at(st.offset, n).await {
                    Ok(bytes) if next >= length => (Ok(bytes), None),
                    Ok(bytes) => {
                        st.offset = next;
                        (Ok(bytes), Some(st))
                    }
                    Err(e) => (Err(std::io::Error::other(e)), None),
                });
            }
            if prefix.failed {
                return Some((Err(std::io::Error::other("download failed")), None));
            }
            tokio::select! {
                changed = st.rx.changed() => {
                    if changed.is_err() {
                        return Some((Err(std::io::Error::other("download failed")), None));
                    }
                }
                Some(piece) = st.written.recv() => st.ahead.offer(piece, st.offset),
            }
        }
    })
}

/// Where a [`prefix_stream`] is.
struct Streaming {
    active: Arc<Active>,
    rx: tokio::sync::watch::Receiver<crate::download::Prefix>,
    /// Pieces as they are written, and those kept until the stream gets to them.
    written: tokio::sync::mpsc::Receiver<shoal_shared::metainfo::VerifiedPiece>,
    ahead: Ahead,
    /// The rest of a piece taken from memory, to send.
    blocks: std::collections::VecDeque<bytes::Bytes>,
    /// Bytes handed out (or, with `blocks`, taken to send).
    offset: u64,
    /// The end of the last piece known good: checked on disk, or taken from memory.
    checked: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn download_errors_map_to_statuses() {
        let status = |e: DownloadError| download_error(&e, ErrorCode::BlobUnknown).status();
        assert_eq!(status(DownloadError::NotFound), StatusCode::NOT_FOUND);
        // An upstream refusing the cluster's credentials is a 401, as on the tag path.
        assert_eq!(status(DownloadError::Denied("refused".into())), StatusCode::UNAUTHORIZED);
        assert_eq!(status(DownloadError::Unavailable("down".into())), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(status(DownloadError::Store("disk".into())), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(status(DownloadError::OutOfSpace), StatusCode::INSUFFICIENT_STORAGE);
    }
}
