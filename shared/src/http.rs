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
                // The spec has no range code: the range asked for lies outside the blob's size.
                ErrorCode::SizeInvalid,
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
                let mut buf = match read_cached(&file, offset, n) {
                    Ok(bytes) => return Ok(bytes),
                    Err(buf) => buf,
                };
                serve_read(move || file.read_exact_at(&mut buf, offset).map(|()| buf.freeze())).await
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
/// through the blocking pool. When any of them is not cached (or anything else goes wrong)
/// the buffer comes back, for the caller to read into on the blocking pool, which also
/// reports real errors.
fn read_cached(file: &File, offset: u64, n: usize) -> Result<Bytes, BytesMut> {
    let mut buf = BytesMut::zeroed(n);
    let mut done = 0;
    while done < n {
        let mut slice = [std::io::IoSliceMut::new(&mut buf[done..])];
        match rustix::io::preadv2(file, &mut slice, offset + done as u64, rustix::io::ReadWriteFlags::NOWAIT)
        {
            Ok(k) if k > 0 => done += k,
            _ => return Err(buf),
        }
    }
    Ok(buf.freeze())
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
        let m = self.check.metainfo.clone();
        let index = (offset / u64::from(m.piece_length())) as u32;
        self.started.retain(|(i, _)| *i >= index);
        let next = index + 1;
        if next < m.piece_count() && m.piece_offset(next) < self.end {
            // Kept in `started`; its task runs whether or not anyone awaits it yet.
            drop(self.start(next));
        }
        self.start(index)
    }

    /// The check of piece `index`, started now unless it already was.
    fn start(&mut self, index: u32) -> PieceVerdict {
        if let Some((_, v)) = self.started.iter().find(|(i, _)| *i == index) {
            return v.clone();
        }
        let verdict = self.spawn(index);
        self.started.push_back((index, verdict.clone()));
        verdict
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

/// Middleware (`actix_web::middleware::from_fn(request_span)`): one tracing span per
/// request, with its method and path (bounded), so every event logged while serving it,
/// JSON logs included, says which request it belongs to.
pub async fn request_span(
    req: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<impl actix_web::body::MessageBody>,
) -> Result<actix_web::dev::ServiceResponse<impl actix_web::body::MessageBody>, actix_web::Error> {
    use tracing::Instrument as _;
    let path: String = req.path().chars().take(256).collect();
    let span = tracing::info_span!("request", method = %req.method(), path = %path);
    next.call(req).instrument(span).await
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

#[cfg(test)]
mod tests {
    use std::io::Write as _;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use futures_util::StreamExt as _;

    use super::*;
    use crate::metainfo::{MetainfoBuilder, MIN_PIECE_LENGTH};

    /// A file of `pieces` pieces and a half, and its metainfo.
    fn blob(pieces: u32) -> (tempfile::NamedTempFile, Vec<u8>, Metainfo) {
        let len = (pieces * MIN_PIECE_LENGTH + MIN_PIECE_LENGTH / 2) as usize;
        let data: Vec<u8> = (0..len).map(|i| (i.wrapping_mul(31) % 251) as u8).collect();
        let mut file = tempfile::NamedTempFile::new().expect("tmp");
        file.write_all(&data).expect("write");
        let mut b = MetainfoBuilder::new(MIN_PIECE_LENGTH).expect("builder");
        b.update(&data);
        (file, data, b.finish().expect("metainfo"))
    }

    /// What the stream yields for `[start, end)`, and how many times damage was reported.
    async fn collect(
        file: &std::path::Path,
        start: u64,
        end: u64,
        m: Option<&Metainfo>,
    ) -> (Vec<u8>, bool, usize) {
        let damaged = Arc::new(AtomicUsize::new(0));
        let check = m.map(|m| PieceCheck {
            metainfo: Arc::new(m.clone()),
            on_damage: Box::new({
                let damaged = damaged.clone();
                move |_: &File| {
                    damaged.fetch_add(1, Ordering::Relaxed);
                }
            }),
        });
        let file = Arc::new(File::open(file).expect("open"));
        let mut stream = std::pin::pin!(file_stream(file, start, end, check));
        let (mut out, mut failed) = (Vec::new(), false);
        while let Some(item) = stream.next().await {
            match item {
                Ok(bytes) => {
                    assert!(bytes.len() <= SERVE_CHUNK);
                    out.extend_from_slice(&bytes);
                }
                Err(_) => failed = true,
            }
        }
        (out, failed, damaged.load(Ordering::Relaxed))
    }

    #[tokio::test]
    async fn every_range_streams_exactly_its_bytes() {
        let (file, data, m) = blob(3);
        let len = data.len() as u64;
        let p = u64::from(MIN_PIECE_LENGTH);
        for (start, end) in
            [(0, len), (1, len), (p - 1, p + 1), (p, 2 * p), (2 * p + 7, len), (5, 5), (len - 1, len)]
        {
            for check in [None, Some(&m)] {
                let (out, failed, damaged) = collect(file.path(), start, end, check).await;
                assert!(!failed && damaged == 0, "{start}..{end}");
                assert_eq!(
                    out,
                    &data[start as usize..end as usize],
                    "{start}..{end} checked: {}",
                    check.is_some()
                );
            }
        }
    }

    #[tokio::test]
    async fn a_damaged_piece_is_never_sent() {
        let (file, mut data, m) = blob(3);
        let p = MIN_PIECE_LENGTH as usize;
        data[2 * p + 10] ^= 1;
        std::fs::write(file.path(), &data).expect("damage");
        let (out, failed, damaged) = collect(file.path(), 0, data.len() as u64, Some(&m)).await;
        assert!(failed, "the body must end in an error");
        assert!(out.len() <= 2 * p, "{} bytes sent, damage starts in piece 2", out.len());
        assert_eq!(out, &data[..out.len()], "what was sent is the good prefix");
        assert!(damaged >= 1);
        // Unchecked, the same range streams what is on disk (the check is what stops it).
        let (out, failed, _) = collect(file.path(), 0, data.len() as u64, None).await;
        assert!(!failed);
        assert_eq!(out, data);
    }

    #[tokio::test]
    async fn reading_past_the_file_is_an_error_not_a_panic() {
        let (file, data, _) = blob(1);
        // The cached read fails at end of file and the blocking read reports it.
        let (out, failed, _) = collect(file.path(), 0, data.len() as u64 + 1000, None).await;
        assert!(failed);
        assert!(out.len() <= data.len());
    }
}
