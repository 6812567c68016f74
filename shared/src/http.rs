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
    /// Called when a piece fails, with the file it was read from: the owner drops the blob
    /// (if that file is still the one stored) and stops offering it.
    pub on_damage: Box<dyn Fn(&File) + Send + Sync>,
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
    let read = file.clone();
    if serve_read(move || piece_intact(&read, &m, index)).await? {
        return Ok(piece_end);
    }
    tracing::error!(digest = %check.metainfo.digest(), piece = index, "stored piece does not match its hash");
    (check.on_damage)(file);
    Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "stored blob is damaged"))
}

/// Streams `[start, end)` of `file`. Pull-driven: a chunk is read (off the executor, with one
/// of [`SERVE_READERS`] permits) when the response asks for it, with one more read ahead so
/// the disk and the socket overlap; a client that stops reading holds at most two chunks.
/// With a `check`, chunks stop at piece boundaries and each piece is verified (a separate
/// read, from the page cache: a piece is never held whole in memory) before any chunk of it
/// is read for sending; the check of the next piece runs while this one is sent.
pub fn file_stream(
    file: Arc<File>,
    start: u64,
    end: u64,
    check: Option<PieceCheck>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + 'static {
    use futures_util::StreamExt as _;
    let mut checks = check.map(|c| PieceChecks::new(file.clone(), Arc::new(c), end));
    let piece_length = checks.as_ref().map(|c| u64::from(c.check.metainfo.piece_length()));
    let chunks = std::iter::successors((start < end).then_some(start), move |&offset| {
        let next = offset + chunk_len(offset, end, piece_length);
        (next < end).then_some(next)
    });
    futures_util::stream::iter(chunks)
        .map(move |offset| {
            let n = chunk_len(offset, end, piece_length) as usize;
            let verified = checks.as_mut().map(|c| c.for_offset(offset));
            let file = file.clone();
            async move {
                if let Some(verified) = verified {
                    verified.await.map_err(|e| std::io::Error::new(e.kind(), e.to_string()))?;
                }
                if let Some(bytes) = read_cached(&file, offset, n) {
                    return Ok(bytes);
                }
                serve_read(move || {
                    let mut buf = BytesMut::zeroed(n);
                    file.read_exact_at(&mut buf, offset).map(|()| buf.freeze())
                })
                .await
            }
        })
        .buffered(2)
        // The first error ends the body: the client sees it cut short, never a wrong byte.
        .scan(false, |failed, item| {
            let out = (!*failed).then(|| {
                *failed = item.is_err();
                item
            });
            futures_util::future::ready(out)
        })
}

/// Reads `n` bytes at `offset` right here when the page cache holds them all
/// (`preadv2(RWF_NOWAIT)` never waits for the disk): a hot blob is served without a trip
/// through the blocking pool. `None` when any of them is not cached (or anything else goes
/// wrong): the caller reads on the blocking pool, which also reports real errors.
fn read_cached(file: &File, offset: u64, n: usize) -> Option<Bytes> {
    let mut buf = BytesMut::zeroed(n);
    let mut done = 0;
    while done < n {
        let mut slice = [std::io::IoSliceMut::new(&mut buf[done..])];
        match rustix::io::preadv2(file, &mut slice, offset + done as u64, rustix::io::ReadWriteFlags::NOWAIT)
        {
            Ok(k) if k > 0 => done += k,
            _ => return None,
        }
    }
    Some(buf.freeze())
}

/// Bytes in the chunk at `offset`: at most [`SERVE_CHUNK`], never past `end` nor, when pieces
/// are checked, past the piece's end.
fn chunk_len(offset: u64, end: u64, piece_length: Option<u64>) -> u64 {
    let piece_end = piece_length.map_or(end, |l| (offset / l + 1) * l);
    (SERVE_CHUNK as u64).min(end - offset).min(piece_end - offset)
}

type PieceVerdict =
    futures_util::future::Shared<futures_util::future::BoxFuture<'static, Result<(), Arc<std::io::Error>>>>;

/// The piece checks of one response: each runs once as its own task, started one piece
/// ahead of the chunks being sent.
struct PieceChecks {
    file: Arc<File>,
    check: Arc<PieceCheck>,
    end: u64,
    started: std::collections::VecDeque<(u32, PieceVerdict)>,
}

impl PieceChecks {
    fn new(file: Arc<File>, check: Arc<PieceCheck>, end: u64) -> Self {
        Self { file, check, end, started: std::collections::VecDeque::new() }
    }

    fn spawn(&self, index: u32) -> PieceVerdict {
        use futures_util::FutureExt as _;
        let (file, check) = (self.file.clone(), self.check.clone());
        let offset = self.check.metainfo.piece_offset(index);
        let task = tokio::spawn(async move { check_piece_at(&file, &check, offset).await.map(|_| ()) });
        async move {
            match task.await {
                Ok(result) => result.map_err(Arc::new),
                Err(e) => Err(Arc::new(std::io::Error::other(e))),
            }
        }
        .boxed()
        .shared()
    }

    /// The verdict on the piece holding `offset`; starts the next piece's check too.
    fn for_offset(&mut self, offset: u64) -> PieceVerdict {
        let m = &self.check.metainfo;
        let index = (offset / u64::from(m.piece_length())) as u32;
        self.started.retain(|(i, _)| *i >= index);
        for i in [index, index + 1] {
            let wanted = i == index || (i < m.piece_count() && m.piece_offset(i) < self.end);
            if wanted && !self.started.iter().any(|(s, _)| *s == i) {
                let verdict = self.spawn(i);
                self.started.push_back((i, verdict));
            }
        }
        self.started
            .iter()
            .find(|(i, _)| *i == index)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| self.spawn(index))
    }
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
