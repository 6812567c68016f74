//! Bounded HTTP client calls between Shoal components (agent -> tracker -> origin).
//!
//! Responses from other nodes are still untrusted input: bodies are read with a size cap,
//! and every call has a timeout.

use std::time::Duration;

use futures_util::StreamExt;
use serde::de::DeserializeOwned;

/// Why a call to another component failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{url}: {cause}")]
    Transport { url: String, cause: String },
    #[error("{url}: not found")]
    NotFound { url: String },
    #[error("{url}: status {status}: {body}")]
    Status { url: String, status: u16, body: String },
    #[error("{url}: response larger than {limit} bytes")]
    TooLarge { url: String, limit: usize },
    #[error("{url}: malformed response: {cause}")]
    Malformed { url: String, cause: String },
}

/// A client with the timeouts Shoal uses between its components.
pub fn http_client() -> reqwest::Client {
    http_client_with_token(None)
}

/// [`http_client`] that sends `token` as a bearer token with every request (never logged:
/// the header is marked sensitive).
pub fn http_client_with_token(token: Option<&str>) -> reqwest::Client {
    builder(token).build().unwrap_or_default()
}

/// The client builder behind [`http_client_with_token`], for callers that add TLS settings
/// (`tls::http::tracker_client`).
pub fn builder(token: Option<&str>) -> reqwest::ClientBuilder {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(mut value) =
        token.and_then(|t| reqwest::header::HeaderValue::from_str(&format!("Bearer {t}")).ok())
    {
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    reqwest::Client::builder()
        .default_headers(headers)
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(60))
        .pool_idle_timeout(Duration::from_secs(30))
}

/// Reads a response body of at most `limit` bytes.
/// Whether one of `bases` answers `GET <base>/healthz` with a 2xx within `timeout`; the
/// error says why none did (`what` names them when there are none).
pub async fn any_healthy(
    http: &reqwest::Client,
    bases: &[String],
    timeout: std::time::Duration,
    what: &str,
) -> Result<(), String> {
    let mut last = format!("no {what} configured");
    for base in bases {
        let url = format!("{base}/healthz");
        match http.get(&url).timeout(timeout).send().await {
            Ok(r) if r.status().is_success() => return Ok(()),
            Ok(r) => last = format!("{url}: {}", r.status()),
            Err(e) => last = format!("{url}: {e}"),
        }
    }
    Err(last)
}

pub async fn read_limited(resp: reqwest::Response, limit: usize) -> Result<Vec<u8>, ClientError> {
    let url = resp.url().to_string();
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(ClientError::TooLarge { url, limit });
    }
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ClientError::Transport { url: url.clone(), cause: e.to_string() })?;
        if body.len() + chunk.len() > limit {
            return Err(ClientError::TooLarge { url, limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Checks the status of `resp`, turning 404 and other failures into errors.
pub async fn check(resp: reqwest::Response) -> Result<reqwest::Response, ClientError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let url = resp.url().to_string();
    if status == reqwest::StatusCode::NOT_FOUND {
        return Err(ClientError::NotFound { url });
    }
    let body = read_limited(resp, 4096).await.unwrap_or_default();
    let body = String::from_utf8_lossy(&body).chars().take(1024).collect();
    Err(ClientError::Status { url, status: status.as_u16(), body })
}

/// GET `url` and decode a JSON body of at most `limit` bytes.
pub async fn get_json<T: DeserializeOwned>(
    client: &reqwest::Client,
    url: &str,
    limit: usize,
) -> Result<T, ClientError> {
    let transport = |e: reqwest::Error| ClientError::Transport { url: url.to_owned(), cause: e.to_string() };
    let resp = check(client.get(url).send().await.map_err(transport)?).await?;
    let body = read_limited(resp, limit).await?;
    serde_json::from_slice(&body)
        .map_err(|e| ClientError::Malformed { url: url.to_owned(), cause: e.to_string() })
}

/// The private repository a node's answer names ([`crate::tenant::PRIVATE_HEADER`]), if
/// any. A header that is there but breaks the grammar (or is repeated) is an error: content
/// must never become open because its marker was mangled.
pub fn private_repo(
    url: &str,
    headers: &reqwest::header::HeaderMap,
) -> Result<Option<crate::tenant::PrivateRepo>, ClientError> {
    let mut values = headers.get_all(crate::tenant::PRIVATE_HEADER).iter();
    let Some(value) = values.next() else { return Ok(None) };
    let malformed =
        || ClientError::Malformed { url: url.to_owned(), cause: "bad private-repository marker".into() };
    if values.next().is_some() {
        return Err(malformed());
    }
    let text = value.to_str().map_err(|_| malformed())?;
    crate::tenant::PrivateRepo::parse(text).map(Some).map_err(|_| malformed())
}

pub use shoal_proto::messages::*;
