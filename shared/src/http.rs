//! HTTP building blocks shared by the origin's and the agent's registry endpoints: OCI error
//! bodies and streaming a blob file with `Range` support.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use actix_web::body::SizedStream;
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse};
use bytes::{Bytes, BytesMut};

use crate::digest::Digest;
use crate::metainfo::Metainfo;
use crate::oci::{parse_range, ErrorCode};
use crate::store::piece_intact;

/// An OCI error response: `{"errors":[{"code","message"}]}`.
pub fn oci_error(status: StatusCode, code: ErrorCode, message: impl std::fmt::Display) -> HttpResponse {
    let body = serde_json::json!({
        "errors": [{ "code": code.as_str(), "message": message.to_string() }]
    });
    HttpResponse::build(status).json(body)
}

/// Header name clients read the content digest from.
pub const DOCKER_CONTENT_DIGEST: &str = "Docker-Content-Digest";

/// A response builder with the headers every blob answer carries.
pub fn blob_response(
    status: StatusCode,
    digest: &Digest,
    content_type: &str,
) -> actix_web::HttpResponseBuilder {
    let mut builder = HttpResponse::build(status);
    builder
        .insert_header((header::CONTENT_TYPE, content_type))
        .insert_header((header::ACCEPT_RANGES, "bytes"))
        .insert_header((DOCKER_CONTENT_DIGEST, digest.to_string()))
        .insert_header((header::ETAG, format!("\"{digest}\"")));
    builder
}

/// Answers a blob GET or HEAD from an open file of `len` bytes, honouring a single `Range`;
/// with a `check`, every piece sent is verified first.
pub fn serve_file(
    req: &HttpRequest,
    file: Arc<File>,
    len: u64,
    digest: &Digest,
    content_type: &str,
    check: Option<PieceCheck>,
) -> HttpResponse {
    let range = req.headers().get(header::RANGE).and_then(|v| v.to_str().ok());
    let range = match parse_range(range, len) {
        Ok(r) => r,
        Err(()) => {
            let mut resp = oci_error(
                StatusCode::RANGE_NOT_SATISFIABLE,
                ErrorCode::RangeInvalid,
                format!("range not satisfiable for a blob of {len} bytes"),
            );
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                resp.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return resp;
        }
    };
    let (status, start, end) = match range {
        Some(r) => (StatusCode::PARTIAL_CONTENT, r.start, r.end),
        None => (StatusCode::OK, 0, len),
    };
    let mut builder = blob_response(status, digest, content_type);
    if range.is_some() {
        builder.insert_header((header::CONTENT_RANGE, format!("bytes {start}-{}/{len}", end - 1)));
    }
    if req.method() == actix_web::http::Method::HEAD {
        return head_body(&mut builder, end - start);
    }
    builder.body(SizedStream::new(end - start, file_stream(file, start, end, check)))
}

/// Finishes a HEAD response that announces `len` bytes. (Setting `Content-Length` by hand
/// does not work: actix recomputes it from the body, and omits the body itself on HEAD.)
pub fn head_body(builder: &mut actix_web::HttpResponseBuilder, len: u64) -> HttpResponse {
    let empty = futures_util::stream::empty::<Result<Bytes, std::io::Error>>();
    builder.body(SizedStream::new(len, empty))
}

/// Bytes read from disk per chunk of a served blob. A chunk is read only when the socket took
/// the previous one, so a client that stops reading holds at most one chunk (plus actix's
/// 32 KiB write buffer) and no thread.
pub const SERVE_CHUNK: usize = 128 << 10;

/// Most blocking reads for serving at once, whatever the number of responses: serving can
/// never take the blocking pool from the store (uploads, downloads, metainfo).
const SERVE_READERS: usize = 16;
static SERVE_READS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(SERVE_READERS);

/// What a served file is checked against as it is read: every piece is hashed against the
/// metainfo before a byte of it is sent, so a blob damaged on disk is never served as its
/// digest.
pub struct PieceCheck {
    pub metainfo: Arc<Metainfo>,
    /// Called (once) when a piece fails: the owner drops the blob and stops offering it.
    pub on_damage: Box<dyn Fn() + Send + Sync>,
}

impl std::fmt::Debug for PieceCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PieceCheck").field("digest", &self.metainfo.digest()).finish_non_exhaustive()
    }
}

/// Runs blocking file work for serving, holding one of [`SERVE_READERS`] permits.
async fn serve_read<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    let _permit = SERVE_READS.acquire().await.map_err(std::io::Error::other)?;
    tokio::task::spawn_blocking(f).await.map_err(std::io::Error::other)?
}

/// Checks the piece of `check` that holds byte `offset`; returns where it ends. Calls
/// `on_damage` and fails when it does not match its hash.
pub async fn check_piece_at(file: &Arc<File>, check: &PieceCheck, offset: u64) -> std::io::Result<u64> {
    let m = check.metainfo.clone();
    let index = (offset / u64::from(m.piece_length())) as u32;
    let piece_end = m.piece_offset(index) + u64::from(m.piece_size(index).map_err(std::io::Error::other)?);
    let file = file.clone();
    if serve_read(move || piece_intact(&file, &m, index)).await? {
        return Ok(piece_end);
    }
    tracing::error!(digest = %check.metainfo.digest(), piece = index, "stored piece does not match its hash");
    (check.on_damage)();
    Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "stored blob is damaged"))
}

/// Streams `[start, end)` of `file`. Pull-driven: each chunk is read (off the executor, with
/// one of [`SERVE_READERS`] permits) when the response asks for it. With a `check`, each
/// piece is verified before its first byte is read for sending (a second read, from the page
/// cache: a checked piece is never held whole in memory).
pub fn file_stream(
    file: Arc<File>,
    start: u64,
    end: u64,
    check: Option<PieceCheck>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + 'static {
    let check = check.map(Arc::new);
    // (next offset, end of the checked region)
    futures_util::stream::unfold((start, start), move |(offset, mut checked)| {
        let (file, check) = (file.clone(), check.clone());
        async move {
            if offset >= end {
                return None;
            }
            if let Some(check) = &check {
                if offset >= checked {
                    match check_piece_at(&file, check, offset).await {
                        Ok(piece_end) => checked = piece_end,
                        // Ends the stream: the client sees a short body, never wrong bytes.
                        Err(e) => return Some((Err(e), (end, end))),
                    }
                }
            }
            let limit = if check.is_some() { checked.min(end) } else { end };
            let n = (limit - offset).min(SERVE_CHUNK as u64) as usize;
            let read = serve_read(move || {
                let mut buf = BytesMut::zeroed(n);
                file.read_exact_at(&mut buf, offset).map(|()| buf.freeze())
            });
            Some(match read.await {
                Ok(bytes) => (Ok(bytes), (offset + n as u64, checked)),
                Err(e) => (Err(e), (end, end)),
            })
        }
    })
}

/// How long a response may make no progress into a client's socket before the connection
/// is dropped (`TCP_USER_TIMEOUT`: the kernel aborts a connection whose sent bytes stay
/// unacknowledged, or whose peer keeps a zero window, for this long).
pub const SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// For `HttpServer::on_connect`: gives every accepted TCP connection a send timeout, so a
/// client that stops reading costs a socket for at most `timeout`.
pub fn set_send_timeout(conn: &dyn std::any::Any, timeout: std::time::Duration) {
    if let Some(tcp) = conn.downcast_ref::<actix_web::rt::net::TcpStream>() {
        if let Err(e) = socket2::SockRef::from(tcp).set_tcp_user_timeout(Some(timeout)) {
            tracing::warn!(cause = %e, "cannot set the send timeout of a connection");
        }
    }
}

/// Runs an actix server until `shutdown` fires, then stops it gracefully. If the server
/// stops on its own, `shutdown` is fired so the node's other tasks stop too.
pub async fn run_server(
    server: actix_web::dev::Server,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    let handle = server.handle();
    let stopper = tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            shutdown.cancelled().await;
            handle.stop(true).await;
        }
    });
    let result = server.await;
    shutdown.cancel();
    let _ = stopper.await;
    result
}

/// Calls `tick` every `period` until `shutdown` fires.
pub async fn every<F, Fut>(
    period: std::time::Duration,
    shutdown: tokio_util::sync::CancellationToken,
    mut tick: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut interval = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = interval.tick() => tick().await,
        }
    }
}
