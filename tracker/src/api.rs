//! The tracker's HTTP API: announce, metainfo and tag lookups, metrics.
//!
//! With `--tls` every caller has passed mutual TLS before a handler runs (an agent or
//! origin certificate from the cluster CA, not revoked); handlers read its role from the
//! connection ([`Caller`]) where it matters: only an origin's announce lists it as an origin.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use shoal_shared::client::{
    Announce, AnnounceBatch, AnnounceBatchResponse, AnnounceResponse, BlobPeers, Leave, PeerInfo,
    TagResponse, MAX_BATCH, MAX_BATCH_DOWNLOADING,
};
use shoal_shared::digest::Digest;
use shoal_shared::hint::{valid_ns, HintQuery};
use shoal_shared::oci::{valid_name, valid_tag, TagList};
use shoal_shared::tls::http::Caller;
use shoal_shared::tls::Role;

use crate::origins::{LookupError, Origins};
use crate::swarms::{Held, Swarms};

/// Shared handler state.
#[derive(Debug)]
pub struct AppState {
    pub swarms: Arc<Swarms>,
    pub origins: Origins,
    pub interval: Duration,
    pub max_peers: usize,
    /// Record announced addresses from any IP (else only the announcer's own).
    pub trust_announced_addresses: bool,
    pub announces: Counter,
    pub registry: Registry,
    pub started: Instant,
}

type State = web::Data<AppState>;

/// Mounts the routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.app_data(web::JsonConfig::default().limit(shoal_shared::client::MAX_ANNOUNCE_JSON).error_handler(
        |err, _| {
            let resp = error(StatusCode::BAD_REQUEST, &err.to_string());
            actix_web::error::InternalError::from_response(err, resp).into()
        },
    ))
    .route("/shoal/v1/announce", web::post().to(announce))
    .route("/shoal/v1/announce/batch", web::post().to(announce_batch))
    .route("/shoal/v1/leave", web::post().to(leave))
    .route("/shoal/v1/metainfo/{digest}", web::get().to(metainfo))
    .route("/shoal/v1/peers/{digest}", web::get().to(peers))
    .route("/shoal/v1/tags/{name:.*}/{tag}", web::get().to(tag))
    .route("/shoal/v1/taglist/{name:.*}", web::get().to(tag_list))
    .route("/shoal/v1/referrers/{digest}/{name:.*}", web::get().to(referrers));
    configure_ops(cfg);
}

/// The read-only operations routes alone (the `--metrics` listener, plain HTTP even when
/// the tracker serves `--tls`): metrics, liveness, readiness and the status page. Nothing
/// here records, looks up or reveals more than the status page does.
pub fn configure_ops(cfg: &mut web::ServiceConfig) {
    cfg.route(
        "/metrics",
        web::get().to(|s: State| async move { shoal_shared::telemetry::metrics_response(&s.registry) }),
    )
    .route("/healthz", web::get().to(|| async { HttpResponse::Ok().body("ok") }))
    .route("/readyz", web::get().to(readyz))
    .route("/", web::get().to(status))
    .route("/status", web::get().to(status));
}

/// Ready when an origin answers: without one no lookup can succeed.
async fn readyz(state: State) -> HttpResponse {
    match state.origins.reachable(Duration::from_secs(2)).await {
        Ok(()) => HttpResponse::Ok().body("ready\n"),
        Err(e) => HttpResponse::ServiceUnavailable().body(format!("not ready: no origin reachable ({e})\n")),
    }
}

/// Swarms and their peer counts.
async fn status(state: State) -> HttpResponse {
    use shoal_shared::status::Page;
    let now = Instant::now();
    let mut page = Page::new("shoal-tracker");
    page.facts(&[
        ("version", env!("CARGO_PKG_VERSION").to_owned()),
        (
            "up",
            shoal_shared::config::Span(Duration::from_secs(state.started.elapsed().as_secs())).to_string(),
        ),
        ("swarms", state.swarms.len().to_string()),
        ("announces", state.announces.get().to_string()),
        ("origins", state.origins.urls().join(", ")),
    ]);
    let rows: Vec<Vec<String>> = state
        .swarms
        .largest(100, now)
        .into_iter()
        .map(|(d, seeders, downloading)| vec![d.to_string(), seeders.to_string(), downloading.to_string()])
        .collect();
    page.table("Largest swarms", &["digest", "seeders", "downloading"], &rows, "No peer has announced yet.");
    page.response()
}

fn error(status: StatusCode, message: &str) -> HttpResponse {
    HttpResponse::build(status).json(serde_json::json!({ "error": message }))
}

fn lookup_error(e: &LookupError) -> HttpResponse {
    match e {
        LookupError::NotFound => error(StatusCode::NOT_FOUND, "unknown"),
        LookupError::Unavailable(cause) => {
            tracing::warn!(%cause, "origins unavailable");
            // The cause carries an origin's registry error (e.g. an upstream refusing the
            // credentials) to the agent, so the client pulling sees why.
            error(StatusCode::SERVICE_UNAVAILABLE, &format!("origins unavailable: {cause}"))
        }
        LookupError::Denied(cause) => error(StatusCode::UNAUTHORIZED, &format!("refused: {cause}")),
        LookupError::Pending => HttpResponse::Accepted()
            .insert_header((actix_web::http::header::RETRY_AFTER, "1"))
            .json(serde_json::json!({ "status": "pulling from upstream" })),
    }
}

/// Why an announced peer address is refused: one nobody can dial, or (unless the tracker
/// trusts announced addresses) an IP other than the one the announce came from, since a
/// peer may announce only itself.
fn check_announced(peer: SocketAddr, from: Option<SocketAddr>, trust: bool) -> Result<(), HttpResponse> {
    let ip = canonical(peer.ip());
    let undialable = peer.port() == 0
        || ip.is_unspecified()
        || ip.is_multicast()
        || matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
    if undialable {
        return Err(error(StatusCode::BAD_REQUEST, &format!("announced address {peer} cannot be dialled")));
    }
    match from.map(|f| canonical(f.ip())) {
        _ if trust => Ok(()),
        Some(source) if source == ip => Ok(()),
        source => Err(error(
            StatusCode::FORBIDDEN,
            &format!(
                "announced address {peer} is not the announcer's own ({}); a peer may announce only itself",
                source.map_or_else(|| "unknown".to_owned(), |s| s.to_string())
            ),
        )),
    }
}

/// An IPv4 address seen through an IPv6 socket as the IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// What an announcer holds: a complete blob announced by a caller whose certificate
/// carries the origin role (mutual TLS) is listed as an origin; no other announce ever is.
fn held(req: &HttpRequest, complete: bool) -> Held {
    match req.conn_data::<Caller>() {
        Some(Caller { role: Role::Origin }) if complete => Held::Origin,
        _ => Held::of(complete),
    }
}

async fn announce(req: HttpRequest, body: web::Json<Announce>, state: State) -> HttpResponse {
    let mut a = body.into_inner();
    a.peer = SocketAddr::new(canonical(a.peer.ip()), a.peer.port());
    if let Err(resp) = check_announced(a.peer, req.peer_addr(), state.trust_announced_addresses) {
        return resp;
    }
    state.announces.inc();
    let peers = record(&state, a.digest, a.peer, held(&req, a.complete)).await;
    HttpResponse::Ok().json(AnnounceResponse { interval: state.interval.as_secs(), peers })
}

/// Records that `peer` holds (part of) `digest` and returns the peers it may fetch from.
async fn record(state: &AppState, digest: Digest, peer: SocketAddr, held: Held) -> Vec<PeerInfo> {
    let origins = state.origins.holders(digest).await;
    let others =
        state.swarms.announce(digest, peer, held, state.interval * 3, state.max_peers, Instant::now());
    // Origins that also announce themselves (`shoal-origin serve --tracker`) are listed once.
    origins
        .iter()
        .filter(|addr| **addr != peer)
        .map(|&addr| PeerInfo { addr, complete: true, origin: true })
        .chain(others.into_iter().filter(|p| !origins.contains(&p.addr)))
        .take(state.max_peers)
        .collect()
}

/// Every blob of one peer in one request: seeded blobs are recorded, downloading ones get
/// their peer lists back.
async fn announce_batch(req: HttpRequest, body: web::Json<AnnounceBatch>, state: State) -> HttpResponse {
    let mut batch = body.into_inner();
    batch.peer = SocketAddr::new(canonical(batch.peer.ip()), batch.peer.port());
    if let Err(resp) = check_announced(batch.peer, req.peer_addr(), state.trust_announced_addresses) {
        return resp;
    }
    let downloading = batch.blobs.iter().filter(|b| !b.complete).count();
    if batch.blobs.len() > MAX_BATCH || downloading > MAX_BATCH_DOWNLOADING {
        let msg = format!("at most {MAX_BATCH} blobs, {MAX_BATCH_DOWNLOADING} of them incomplete");
        return error(StatusCode::BAD_REQUEST, &msg);
    }
    state.announces.inc();
    let mut swarms = Vec::with_capacity(downloading);
    for blob in batch.blobs {
        if blob.complete {
            state.swarms.record(
                blob.digest,
                batch.peer,
                held(&req, true),
                state.interval * 3,
                Instant::now(),
            );
        } else {
            let peers = record(&state, blob.digest, batch.peer, Held::Part).await;
            swarms.push(BlobPeers { digest: blob.digest, peers });
        }
    }
    HttpResponse::Ok().json(AnnounceBatchResponse { interval: state.interval.as_secs(), swarms })
}

/// A peer that no longer holds some blobs (evicted from its cache) leaves their swarms.
async fn leave(req: HttpRequest, body: web::Json<Leave>, state: State) -> HttpResponse {
    let mut leave = body.into_inner();
    leave.peer = SocketAddr::new(canonical(leave.peer.ip()), leave.peer.port());
    if let Err(resp) = check_announced(leave.peer, req.peer_addr(), state.trust_announced_addresses) {
        return resp;
    }
    if leave.digests.len() > MAX_BATCH {
        return error(StatusCode::BAD_REQUEST, &format!("at most {MAX_BATCH} digests"));
    }
    let left = leave.digests.iter().filter(|d| state.swarms.remove(d, leave.peer)).count();
    HttpResponse::Ok().json(serde_json::json!({ "left": left }))
}

async fn metainfo(digest: web::Path<String>, query: web::Query<HintQuery>, state: State) -> HttpResponse {
    let Ok(digest) = digest.parse::<Digest>() else {
        return error(StatusCode::BAD_REQUEST, "invalid digest");
    };
    let hint = match query.hint() {
        Ok(h) => h,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    match state.origins.metainfo_sourced(digest, hint.as_ref()).await {
        Ok(sourced) => {
            let mut resp = HttpResponse::Ok();
            if sourced.pulled_through {
                resp.insert_header((shoal_shared::client::PULLED_THROUGH_HEADER, "1"));
            }
            // Passed on: the agent serves private content only to clients the upstream
            // accepts.
            if let Some(repo) = &sourced.private {
                resp.insert_header((shoal_shared::tenant::PRIVATE_HEADER, repo.to_string()));
            }
            resp.json(&*sourced.metainfo)
        }
        Err(e) => lookup_error(&e),
    }
}

async fn tag(path: web::Path<(String, String)>, query: web::Query<HintQuery>, state: State) -> HttpResponse {
    let (name, tag) = path.into_inner();
    if !valid_name(&name) || !valid_tag(&tag) {
        return error(StatusCode::BAD_REQUEST, "invalid name or tag");
    }
    if query.ns.as_deref().is_some_and(|ns| !valid_ns(ns)) {
        return error(StatusCode::BAD_REQUEST, "invalid ns");
    }
    match state.origins.tag(&name, &tag, query.ns.as_deref()).await {
        Ok((digest, private)) => {
            let mut resp = HttpResponse::Ok();
            if let Some(repo) = private {
                resp.insert_header((shoal_shared::tenant::PRIVATE_HEADER, repo.to_string()));
            }
            resp.json(TagResponse { digest })
        }
        Err(e) => lookup_error(&e),
    }
}

async fn tag_list(name: web::Path<String>, state: State) -> HttpResponse {
    let name = name.into_inner();
    if !valid_name(&name) {
        return error(StatusCode::BAD_REQUEST, "invalid name");
    }
    match state.origins.tag_list(&name).await {
        Ok(tags) => HttpResponse::Ok().json(TagList { name, tags }),
        Err(e) => lookup_error(&e),
    }
}

#[derive(serde::Deserialize)]
struct ReferrersQuery {
    #[serde(rename = "artifactType")]
    artifact_type: Option<String>,
}

/// The referrers of a manifest, merged from the origins (agents serve this as
/// `GET /v2/<name>/referrers/<digest>`).
async fn referrers(
    path: web::Path<(String, String)>,
    query: web::Query<ReferrersQuery>,
    state: State,
) -> HttpResponse {
    let (digest, name) = path.into_inner();
    if !valid_name(&name) {
        return error(StatusCode::BAD_REQUEST, "invalid name");
    }
    let Ok(digest) = digest.parse::<Digest>() else {
        return error(StatusCode::BAD_REQUEST, "invalid digest");
    };
    let artifact_type = query.into_inner().artifact_type;
    if artifact_type.as_deref().is_some_and(|t| !shoal_shared::referrers::valid_artifact_type(t)) {
        return error(StatusCode::BAD_REQUEST, "invalid artifactType");
    }
    match state.origins.referrers(&name, &digest, artifact_type.as_deref()).await {
        Ok(index) => HttpResponse::Ok().json(index),
        Err(e) => lookup_error(&e),
    }
}

/// Who has a blob: the origins known (from lookups) to hold it, and the live peers that
/// announced it. For operators ("which hosts have this layer?"); records nothing.
async fn peers(digest: web::Path<String>, state: State) -> HttpResponse {
    let Ok(digest) = digest.parse::<Digest>() else {
        return error(StatusCode::BAD_REQUEST, "invalid digest");
    };
    let origins = state.origins.holders(digest).await;
    let announced = state.swarms.peers(&digest, 1000, Instant::now());
    HttpResponse::Ok().json(serde_json::json!({ "digest": digest, "origins": origins, "peers": announced }))
}
