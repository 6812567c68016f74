//! Registry authentication as the distribution spec defines it: `WWW-Authenticate`
//! challenges, token responses and the headers sent back. Where credentials come from (a
//! Docker `config.json`, credential helpers) is [`crate::docker_config`], re-exported here.
//! Pure parsing of untrusted text (every function is fuzzed); the origin's upstream client
//! does the I/O around it.

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine as _;
use serde::Deserialize;

pub use crate::docker_config::{normalize_host, Auth, Credentials, DockerConfig};

/// Largest token response read.
pub const MAX_TOKEN_JSON: usize = 64 << 10;
/// Lifetime of a token whose response does not say (the distribution spec's default).
const DEFAULT_TOKEN_LIFETIME: u64 = 60;

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

#[derive(Deserialize)]
struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

/// The `Authorization` value for HTTP basic.
pub fn basic_header(creds: &Credentials) -> String {
    let raw = format!("{}:{}", creds.username, creds.password);
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(raw))
}

/// The secret an `Authorization` header presents to a registry that takes one static
/// secret: a `Bearer` token, or the password of `Basic` credentials (whatever the
/// username), which is how a client configured with a username and password (the OCI
/// conformance suite's) may send it, unasked, with every request. `None` for any other
/// scheme or a malformed value.
pub fn presented_secret(authorization: &str) -> Option<String> {
    let (scheme, value) = authorization.trim().split_once(' ')?;
    let value = value.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(value.to_owned());
    }
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD.decode(value).ok()?;
    let (_, password) = std::str::from_utf8(&raw).ok()?.split_once(':')?;
    Some(password.to_owned())
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
    fn presented_secrets() {
        let basic = |raw: &str| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(raw));
        assert_eq!(presented_secret("Bearer s3cret").as_deref(), Some("s3cret"));
        assert_eq!(presented_secret("bearer  s3cret ").as_deref(), Some("s3cret"));
        assert_eq!(presented_secret(&basic("anyone:s3cret")).as_deref(), Some("s3cret"));
        assert_eq!(presented_secret(&basic("anyone:s3:cret")).as_deref(), Some("s3:cret"));
        assert_eq!(presented_secret(&basic(":")).as_deref(), Some(""));
        for bad in ["s3cret", "Bearer", "Digest s3cret", "Basic !!notbase64", &basic("no-colon")] {
            assert_eq!(presented_secret(bad), None, "{bad}");
        }
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
    fn tokens() {
        let (h, life) = bearer_from_response(br#"{"token": "abc", "expires_in": 300}"#).expect("token");
        assert_eq!(h, "Bearer abc");
        assert_eq!(life, Duration::from_secs(270));
        let (h, life) = bearer_from_response(br#"{"access_token": "xyz"}"#).expect("token");
        assert_eq!((h.as_str(), life), ("Bearer xyz", Duration::from_secs(48)));
        assert!(bearer_from_response(br#"{"token": ""}"#).is_err());
        assert!(bearer_from_response(br#"{"token": "a\nb"}"#).is_err());
    }
}
