//! HTTP building blocks shared by the origin's and the agent's registry endpoints: OCI error
//! bodies and streaming a blob file with `Range` support.

use std::fs::File;
use std::os::unix::fs::FileExt;

use actix_web::body::SizedStream;
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse};
use bytes::{Bytes, BytesMut};

use crate::digest::Digest;
use crate::oci::{parse_range, ErrorCode};
use crate::store::READ_CHUNK;

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

/// Answers a blob GET or HEAD from an open file of `len` bytes, honouring a single `Range`.
pub fn serve_file(
    req: &HttpRequest,
    file: File,
    len: u64,
    digest: &Digest,
    content_type: &str,
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
    builder.body(SizedStream::new(end - start, file_stream(file, start, end)))
}

/// Finishes a HEAD response that announces `len` bytes. (Setting `Content-Length` by hand
/// does not work: actix recomputes it from the body, and omits the body itself on HEAD.)
pub fn head_body(builder: &mut actix_web::HttpResponseBuilder, len: u64) -> HttpResponse {
    let empty = futures_util::stream::empty::<Result<Bytes, std::io::Error>>();
    builder.body(SizedStream::new(len, empty))
}

/// Streams `[start, end)` of `file`, read by one blocking thread a chunk ahead of the socket.
pub fn file_stream(
    file: File,
    start: u64,
    end: u64,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::task::spawn_blocking(move || {
        let mut offset = start;
        while offset < end {
            let n = (end - offset).min(READ_CHUNK as u64) as usize;
            let mut buf = BytesMut::zeroed(n);
            let item = file.read_exact_at(&mut buf, offset).map(|()| buf.freeze());
            let failed = item.is_err();
            if tx.blocking_send(item).is_err() || failed {
                return;
            }
            offset += n as u64;
        }
    });
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) })
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
