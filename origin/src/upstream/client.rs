//! One upstream registry over HTTP, the real [`Registry`]: authenticated requests (auth
//! challenges answered, bearer tokens cached), each round trip and each chunk of a manifest
//! or token body bounded by the stall timeout, manifests read within [`MAX_MANIFEST`].
//! Whatever comes back is hostile, and this module only fetches it: checking and storing it
//! is `super::fill`'s, the same for every implementation; content is addressed by the digest
//! computed there, never by a `Docker-Content-Digest` header.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use reqwest::header::{HeaderValue, ACCEPT, AUTHORIZATION, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode};
use shoal_shared::digest::Digest;
use shoal_shared::oci::{DOCKER_LIST, DOCKER_MANIFEST, MAX_MANIFEST, OCI_INDEX, OCI_MANIFEST};

use super::auth::{self, Auth, Challenge, TokenCache};
use super::credentials::Keychain;
use super::registry::{status_error, BlobBody, Registry};
use super::UpstreamError;

/// What a manifest request accepts: schema 2 and OCI only (schema 1 is refused).
fn manifest_accept() -> String {
    [OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST].join(", ")
}

/// One configured upstream registry.
#[derive(Debug)]
pub struct Upstream {
    /// `scheme://host[:port]`, no trailing slash.
    base: String,
    /// `host[:port]`, what containerd's `?ns=` names.
    pub host: String,
    http: reqwest::Client,
    credentials: Option<Keychain>,
    tokens: Arc<TokenCache>,
    /// Repositories this upstream refused without credentials and served with them, as
    /// learned by the first request for each (bounded; the durable record is
    /// `crate::private`).
    private: moka::sync::Cache<String, ()>,
    stall: Duration,
}

/// Most repositories remembered as private in memory.
const MAX_PRIVATE: u64 = 65_536;

impl Upstream {
    /// `url` is `https://host[:port]` (or `http://` for a registry on localhost); a bare
    /// `host[:port]` means https.
    pub fn new(
        url: &str,
        http: reqwest::Client,
        credentials: Option<Keychain>,
        stall: Duration,
    ) -> Result<Self, String> {
        // `REGISTRY=URL`: the registry named REGISTRY (what `ns` and image references say)
        // is served at URL (a mirror, or a registry on this machine).
        let parsed = shoal_shared::registry_client::UpstreamUrl::parse(url)?;
        Ok(Self {
            base: parsed.base,
            host: parsed.registry,
            http,
            credentials,
            tokens: Arc::new(TokenCache::default()),
            private: moka::sync::Cache::new(MAX_PRIVATE),
            stall,
        })
    }

    /// The credentials to answer a challenge with; a helper is asked only now.
    async fn auth(&self) -> Result<Option<Auth>, UpstreamError> {
        match &self.credentials {
            Some(keychain) => Ok(keychain.get().await?),
            None => Ok(None),
        }
    }

    fn scope_key(name: &str) -> String {
        format!("repository:{name}:pull")
    }

    /// Sends a request, answering an auth challenge once. `Unauthorized` when the registry
    /// refuses what we have.
    async fn send(
        &self,
        method: Method,
        url: &str,
        name: &str,
        accept: Option<&str>,
    ) -> Result<reqwest::Response, UpstreamError> {
        let key = Self::scope_key(name);
        let build = |auth: Option<&str>| {
            let mut req = self.http.request(method.clone(), url);
            if let Some(a) = accept {
                req = req.header(ACCEPT, a);
            }
            if let Some(a) = auth.and_then(|a| HeaderValue::from_str(a).ok()) {
                let mut a = a;
                a.set_sensitive(true);
                req = req.header(AUTHORIZATION, a);
            }
            req
        };
        let cached = self.tokens.get(&key);
        // Without a cached header the request goes out anonymously: what the upstream says
        // to it tells a public repository from a private one.
        let anonymous = cached.is_none();
        let resp = self.timed(build(cached.as_deref()).send()).await?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        self.tokens.remove(&key);
        let challenge = resp
            .headers()
            .get(WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(auth::parse_challenge)
            .ok_or_else(|| {
                UpstreamError::Unauthorized(format!("{}: 401 without a usable challenge", self.host))
            })?;
        let (header, lifetime, with_credentials) = match challenge {
            Challenge::Basic => {
                let auth = self.auth().await?;
                let creds = auth.as_ref().and_then(|a| a.basic.as_ref()).ok_or_else(|| {
                    UpstreamError::Unauthorized(format!(
                        "{} asks for credentials and none are configured",
                        self.host
                    ))
                })?;
                (auth::basic_header(creds), Duration::from_secs(3600), true)
            }
            Challenge::Bearer { realm, service, scope } => {
                let scope = scope.as_deref().unwrap_or(&key);
                // An anonymous token first, unless the repository is known private: a public
                // repository on a registry that always challenges (Docker Hub) opens with
                // one; a private one does not (no token, or one that is refused or does not
                // show the repository).
                if self.credentials.is_none() || !self.private.contains_key(name) {
                    match self.token(&realm, service.as_deref(), scope, false).await {
                        Ok((h, l)) => {
                            let resp = self.timed(build(Some(&h)).send()).await?;
                            let refused = matches!(
                                resp.status(),
                                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::NOT_FOUND
                            );
                            if self.credentials.is_none() || !refused {
                                if resp.status() == StatusCode::UNAUTHORIZED {
                                    return Err(UpstreamError::Unauthorized(format!(
                                        "{} refused the credentials",
                                        self.host
                                    )));
                                }
                                self.tokens.put(key, h, l);
                                return Ok(resp);
                            }
                        }
                        Err(UpstreamError::Unauthorized(_)) if self.credentials.is_some() => {}
                        Err(e) => return Err(e),
                    }
                }
                let (h, l) = self.token(&realm, service.as_deref(), scope, true).await?;
                (h, l, true)
            }
        };
        let resp = self.timed(build(Some(&header)).send()).await?;
        if resp.status() == StatusCode::UNAUTHORIZED {
            return Err(UpstreamError::Unauthorized(format!("{} refused the credentials", self.host)));
        }
        // Refused without credentials, served with them: private.
        if anonymous && with_credentials && resp.status().is_success() {
            self.private.insert(name.to_owned(), ());
        }
        self.tokens.put(key, header, lifetime);
        Ok(resp)
    }

    /// A bearer token: the configured `registrytoken` as is, or one from the challenge's
    /// realm (asked with an identity token or basic credentials if configured; see
    /// [`auth::token_request`]). A plain-HTTP realm is refused unless it is on this machine or the upstream itself is
    /// plain HTTP: the credentials would cross the network in cleartext.
    async fn token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: &str,
        with_credentials: bool,
    ) -> Result<(String, Duration), UpstreamError> {
        let creds = if with_credentials { self.auth().await? } else { None };
        if let Some(token) = creds.as_ref().and_then(|a| a.registry_token.as_deref()) {
            return Ok((format!("Bearer {token}"), auth::REGISTRY_TOKEN_LIFETIME));
        }
        if !auth::realm_allowed(realm, self.base.starts_with("http://")) {
            return Err(UpstreamError::Unauthorized(format!(
                "{}: token service {realm} is plain HTTP on another host; refusing to send credentials in cleartext",
                self.host
            )));
        }
        let req = auth::token_request(&self.http, realm, service, scope, creds.as_ref());
        let resp = self.timed(req.send()).await?;
        match resp.status() {
            s if s.is_success() => {}
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                return Err(UpstreamError::Unauthorized(format!(
                    "{}: token service refused the credentials",
                    self.host
                )))
            }
            s => return Err(UpstreamError::Status { host: self.host.clone(), status: s.as_u16() }),
        }
        let body = self.read_limited(resp, auth::MAX_TOKEN_JSON).await?;
        auth::bearer_from_response(&body).map_err(|e| UpstreamError::Invalid(format!("{}: {e}", self.host)))
    }

    /// Awaits a request's response headers, at most the stall timeout.
    async fn timed(
        &self,
        fut: impl std::future::Future<Output = reqwest::Result<reqwest::Response>>,
    ) -> Result<reqwest::Response, UpstreamError> {
        match tokio::time::timeout(self.stall, fut).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(UpstreamError::Unreachable(format!("{}: {}", self.host, without_url(&e)))),
            Err(_) => Err(UpstreamError::Stalled { host: self.host.clone(), secs: self.stall.as_secs() }),
        }
    }

    /// Turns error statuses into typed errors.
    fn check(&self, resp: reqwest::Response) -> Result<reqwest::Response, UpstreamError> {
        match resp.status() {
            s if s.is_success() => Ok(resp),
            s => Err(status_error(&self.host, s.as_u16())),
        }
    }

    /// Reads a body of at most `limit` bytes, each chunk within the stall timeout.
    async fn read_limited(&self, resp: reqwest::Response, limit: usize) -> Result<Vec<u8>, UpstreamError> {
        if resp.content_length().is_some_and(|n| n > limit as u64) {
            return Err(UpstreamError::TooLarge { limit });
        }
        let mut body = Vec::new();
        let mut stream = std::pin::pin!(resp.bytes_stream());
        while let Some(chunk) = self.next_chunk(&mut stream).await? {
            if body.len() + chunk.len() > limit {
                return Err(UpstreamError::TooLarge { limit });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    async fn next_chunk(
        &self,
        stream: &mut (impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin),
    ) -> Result<Option<bytes::Bytes>, UpstreamError> {
        match tokio::time::timeout(self.stall, stream.next()).await {
            Ok(None) => Ok(None),
            Ok(Some(Ok(c))) => Ok(Some(c)),
            Ok(Some(Err(e))) => {
                Err(UpstreamError::Unreachable(format!("{}: {}", self.host, without_url(&e))))
            }
            Err(_) => Err(UpstreamError::Stalled { host: self.host.clone(), secs: self.stall.as_secs() }),
        }
    }

    /// The digest the registry says `name:reference` has (HEAD).
    async fn head(&self, name: &str, reference: &str) -> Result<Option<Digest>, UpstreamError> {
        let url = format!("{}/v2/{name}/manifests/{reference}", self.base);
        let resp = self.check(self.send(Method::HEAD, &url, name, Some(&manifest_accept())).await?)?;
        Ok(resp
            .headers()
            .get("Docker-Content-Digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok()))
    }

    /// A manifest's bytes, at most [`MAX_MANIFEST`].
    async fn manifest(&self, name: &str, reference: &str) -> Result<Vec<u8>, UpstreamError> {
        let url = format!("{}/v2/{name}/manifests/{reference}", self.base);
        let resp = self.check(self.send(Method::GET, &url, name, Some(&manifest_accept())).await?)?;
        self.read_limited(resp, MAX_MANIFEST).await
    }

    /// A blob's body; the manifests endpoint when the blobs endpoint does not know the
    /// digest (a platform manifest asked for by digest).
    async fn blob(&self, name: &str, digest: &Digest) -> Result<BlobBody, UpstreamError> {
        let url = format!("{}/v2/{name}/blobs/{digest}", self.base);
        let resp = match self.check(self.send(Method::GET, &url, name, None).await?) {
            Err(UpstreamError::NotFound) => {
                let url = format!("{}/v2/{name}/manifests/{digest}", self.base);
                self.check(self.send(Method::GET, &url, name, Some(&manifest_accept())).await?)?
            }
            other => other?,
        };
        let (host, length) = (self.host.clone(), resp.content_length());
        let chunks = resp.bytes_stream().map(move |chunk| {
            chunk.map_err(|e| UpstreamError::Unreachable(format!("{host}: {}", without_url(&e))))
        });
        Ok(BlobBody { length, chunks: chunks.boxed() })
    }
}

impl Registry for Upstream {
    fn host(&self) -> &str {
        &self.host
    }

    /// The first request for a repository is always sent without credentials, so this is
    /// learned before any of its content is stored.
    fn learned_private(&self, name: &str) -> bool {
        self.private.contains_key(name)
    }

    fn head_manifest<'a>(
        &'a self,
        name: &'a str,
        reference: &'a str,
    ) -> BoxFuture<'a, Result<Option<Digest>, UpstreamError>> {
        Box::pin(self.head(name, reference))
    }

    fn get_manifest<'a>(
        &'a self,
        name: &'a str,
        reference: &'a str,
    ) -> BoxFuture<'a, Result<Vec<u8>, UpstreamError>> {
        Box::pin(self.manifest(name, reference))
    }

    fn get_blob<'a>(
        &'a self,
        name: &'a str,
        digest: &'a Digest,
    ) -> BoxFuture<'a, Result<BlobBody, UpstreamError>> {
        Box::pin(self.blob(name, digest))
    }
}

/// A reqwest error's text without its URL (which could carry a token in a query).
fn without_url(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    if let Some(url) = e.url() {
        text = text.replace(url.as_str(), "<url>");
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
