//! Registry authentication: credentials from a Docker `config.json`, `WWW-Authenticate`
//! challenges, and bearer tokens cached until they expire (uncached tokens overwhelmed
//! Artifactory in Kraken #235).

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use dashmap::DashMap;
use serde::Deserialize;

/// Largest `config.json` read.
const MAX_CONFIG: u64 = 1 << 20;
/// Largest token response read.
pub const MAX_TOKEN_JSON: usize = 64 << 10;
/// Lifetime of a token whose response does not say (the distribution spec's default).
const DEFAULT_TOKEN_LIFETIME: u64 = 60;
/// Most tokens cached before the cache is dropped.
const TOKEN_CACHE: usize = 4096;

/// Why credentials could not be loaded or a token obtained.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{path}: {cause}")]
    Config { path: String, cause: String },
}

/// A user name and password. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credentials(<redacted>)")
    }
}

/// The `auths` section of a Docker `config.json`: registry host -> credentials.
#[derive(Clone, Default)]
pub struct DockerConfig {
    auths: HashMap<String, Credentials>,
}

impl std::fmt::Debug for DockerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DockerConfig").field("registries", &self.auths.keys().collect::<Vec<_>>()).finish()
    }
}

#[derive(Deserialize)]
struct ConfigFile {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
}

#[derive(Deserialize)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

/// `https://index.docker.io/v1/` and `docker.io` name the same registry as
/// `registry-1.docker.io`; keys may carry a scheme and a path.
pub fn normalize_host(key: &str) -> String {
    let key = key.strip_prefix("https://").or_else(|| key.strip_prefix("http://")).unwrap_or(key);
    let host = key.split('/').next().unwrap_or(key).to_ascii_lowercase();
    match host.as_str() {
        "docker.io" | "index.docker.io" | "registry-1.docker.io" => "docker.io".to_owned(),
        _ => host,
    }
}

impl DockerConfig {
    /// Reads the `auths` section of a Docker `config.json`.
    pub fn load(path: &Path) -> Result<Self, AuthError> {
        let err = |cause: String| AuthError::Config { path: path.display().to_string(), cause };
        let len = std::fs::metadata(path).map_err(|e| err(e.to_string()))?.len();
        if len > MAX_CONFIG {
            return Err(err(format!("larger than {MAX_CONFIG} bytes")));
        }
        let text = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        Self::parse(&text).map_err(err)
    }

    /// Parses a `config.json` document. Errors never quote the document.
    pub fn parse(text: &[u8]) -> Result<Self, String> {
        let file: ConfigFile = serde_json::from_slice(text)
            .map_err(|e| format!("not a Docker config.json (line {})", e.line()))?;
        let mut auths = HashMap::new();
        for (key, entry) in file.auths {
            let creds = match (entry.auth, entry.username, entry.password) {
                (Some(auth), _, _) if !auth.is_empty() => {
                    let decoded = base64::engine::general_purpose::STANDARD
                        .decode(auth.trim())
                        .map_err(|_| format!("auths[{key}].auth is not base64"))?;
                    let decoded =
                        String::from_utf8(decoded).map_err(|_| format!("auths[{key}].auth is not UTF-8"))?;
                    let (u, p) = decoded
                        .split_once(':')
                        .ok_or_else(|| format!("auths[{key}].auth is not base64(user:password)"))?;
                    Credentials { username: u.to_owned(), password: p.to_owned() }
                }
                (_, Some(username), Some(password)) => Credentials { username, password },
                // Entries managed by credential helpers carry no secret: nothing to use.
                _ => continue,
            };
            auths.insert(normalize_host(&key), creds);
        }
        Ok(Self { auths })
    }

    /// The credentials for a registry host (`host[:port]`).
    pub fn get(&self, host: &str) -> Option<&Credentials> {
        self.auths.get(&normalize_host(host))
    }
}

/// A `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer { realm: String, service: Option<String>, scope: Option<String> },
}

/// Parses `Basic realm="..."` or `Bearer realm="...",service="...",scope="..."`.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut params = HashMap::new();
    let mut rest = rest.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let key = key.trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (value, tail) = if let Some(quoted) = after.strip_prefix('"') {
            let end = quoted.find('"')?;
            (&quoted[..end], &quoted[end + 1..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (&after[..end], &after[end..])
        };
        params.insert(key, value.to_owned());
        rest = tail.trim_start().trim_start_matches(',').trim_start();
    }
    let realm = params.remove("realm")?;
    if !(realm.starts_with("https://") || realm.starts_with("http://")) {
        return None;
    }
    Some(Challenge::Bearer { realm, service: params.remove("service"), scope: params.remove("scope") })
}

/// Whether a bearer challenge's `realm` may be asked for a token (with the credentials):
/// https always; plain HTTP only on a loopback host, or when the upstream itself is plain
/// HTTP (which only a registry on localhost may be).
pub fn realm_allowed(realm: &str, upstream_plain_http: bool) -> bool {
    let Ok(url) = reqwest::Url::parse(realm) else { return false };
    match url.scheme() {
        "https" => true,
        "http" => {
            // The parser normalizes IP addresses (`127.1` is `127.0.0.1`, IPv6 in brackets).
            let host = url.host_str().unwrap_or("");
            let ip = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
            upstream_plain_http
                || host.eq_ignore_ascii_case("localhost")
                || ip.parse::<std::net::IpAddr>().is_ok_and(|a| a.is_loopback())
        }
        _ => false,
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

/// A token and the scheme it is sent with.
#[derive(Clone)]
struct Cached {
    header: String,
    expires: Instant,
}

/// Authorization headers by scope, reused until they expire. Never printed.
#[derive(Default)]
pub struct TokenCache {
    tokens: DashMap<String, Cached>,
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache").field("tokens", &self.tokens.len()).finish()
    }
}

impl TokenCache {
    /// A cached `Authorization` header for `key`, if still valid.
    pub fn get(&self, key: &str) -> Option<String> {
        let entry = self.tokens.get(key)?;
        (entry.expires > Instant::now()).then(|| entry.header.clone())
    }

    pub fn put(&self, key: String, header: String, lifetime: Duration) {
        if self.tokens.len() >= TOKEN_CACHE {
            self.tokens.clear();
        }
        self.tokens.insert(key, Cached { header, expires: Instant::now() + lifetime });
    }

    pub fn remove(&self, key: &str) {
        self.tokens.remove(key);
    }
}

/// The `Authorization` value for HTTP basic.
pub fn basic_header(creds: &Credentials) -> String {
    let raw = format!("{}:{}", creds.username, creds.password);
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(raw))
}

/// Decodes a token response into a `Bearer` header and how long to reuse it: its lifetime
/// less a margin, so a token is never sent just as it expires.
pub fn bearer_from_response(body: &[u8]) -> Result<(String, Duration), String> {
    let r: TokenResponse =
        serde_json::from_slice(body).map_err(|e| format!("malformed token response: {e}"))?;
    let token =
        r.token.or(r.access_token).filter(|t| !t.is_empty()).ok_or("token response without a token")?;
    if token.len() > MAX_TOKEN_JSON || token.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err("token response with an invalid token".into());
    }
    let lifetime = r.expires_in.unwrap_or(DEFAULT_TOKEN_LIFETIME).clamp(1, 24 * 3600);
    let margin = (lifetime / 5).min(30);
    Ok((format!("Bearer {token}"), Duration::from_secs(lifetime - margin)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_json_auths() {
        let json = br#"{"auths": {
            "https://index.docker.io/v1/": {"auth": "dXNlcjpwYXNzOndvcmQ="},
            "ghcr.io": {"username": "u", "password": "p"},
            "helper.example": {}
        }}"#;
        let c = DockerConfig::parse(json).expect("config");
        let hub = c.get("registry-1.docker.io").expect("hub");
        assert_eq!((hub.username.as_str(), hub.password.as_str()), ("user", "pass:word"));
        assert_eq!(c.get("ghcr.io").map(|c| c.username.as_str()), Some("u"));
        assert!(c.get("helper.example").is_none());
        assert!(!format!("{c:?} {hub:?}").contains("pass"));
        assert!(DockerConfig::parse(br#"{"auths": {"x": {"auth": "!!"}}}"#).is_err());
        let err = DockerConfig::parse(br#"{"auths": {"x": {"auth": "c2VjcmV0"}}}"#).expect_err("no colon");
        assert!(!err.contains("secret"));
    }

    #[test]
    fn challenges() {
        assert_eq!(parse_challenge("Basic realm=\"Registry\""), Some(Challenge::Basic));
        assert_eq!(
            parse_challenge(
                "Bearer realm=\"https://auth.docker.io/token\",service=\"registry.docker.io\",scope=\"repository:library/alpine:pull\""
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/alpine:pull".into()),
            })
        );
        assert_eq!(parse_challenge("Bearer service=\"x\""), None);
        assert_eq!(parse_challenge("Bearer realm=\"file:///etc/passwd\""), None);
        assert_eq!(parse_challenge("Negotiate abc"), None);
        assert_eq!(parse_challenge("Bearer realm=\"https://a"), None);
    }

    #[test]
    fn plain_http_realms_only_on_this_machine() {
        assert!(realm_allowed("https://auth.docker.io/token", false));
        assert!(!realm_allowed("http://auth.example.com/token", false), "credentials in cleartext");
        assert!(!realm_allowed("http://127.evil.example/token", false));
        assert!(!realm_allowed("http://127.0.0.1.evil.example/token", false));
        assert!(realm_allowed("http://127.0.0.1:5001/token", false));
        assert!(realm_allowed("http://localhost/token", false));
        assert!(realm_allowed("http://[::1]:5001/token", false));
        // A plain-HTTP (localhost) upstream is in cleartext already.
        assert!(realm_allowed("http://auth.example.com/token", true));
        assert!(!realm_allowed("ftp://auth.example.com/token", true));
        assert!(!realm_allowed("not a url", true));
    }

    #[test]
    fn tokens() {
        let (h, life) = bearer_from_response(br#"{"token": "abc", "expires_in": 300}"#).expect("token");
        assert_eq!(h, "Bearer abc");
        assert_eq!(life, Duration::from_secs(270));
        let (h, life) = bearer_from_response(br#"{"access_token": "xyz"}"#).expect("token");
        assert_eq!((h.as_str(), life), ("Bearer xyz", Duration::from_secs(48)));
        assert!(bearer_from_response(br#"{"token": ""}"#).is_err());
        assert!(bearer_from_response(br#"{"token": "a\nb"}"#).is_err());
        let cache = TokenCache::default();
        cache.put("k".into(), "Bearer t".into(), Duration::from_secs(60));
        assert_eq!(cache.get("k").as_deref(), Some("Bearer t"));
        cache.put("old".into(), "Bearer t".into(), Duration::ZERO);
        assert_eq!(cache.get("old"), None);
    }
}
