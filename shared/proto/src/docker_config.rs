//! Docker's `config.json` as Docker and containerd read it, and the credential-helper
//! protocol's answer. Pure parsing of operator files and helper output: the origin runs the
//! helpers and sends the credentials (`origin/src/upstream/credentials.rs`).
//!
//! What a registry host's credentials are, in Docker's order (docker/cli
//! `configfile.GetCredentialsStore`): `credHelpers.<host>` names a helper for that host;
//! otherwise `credsStore` names the helper for every host; otherwise `auths.<host>` holds
//! them inline: `auth` (base64 `user:password`) or `username`/`password`, an
//! `identitytoken` (an OAuth2 refresh token, exchanged at the token service for access
//! tokens; Azure ACR hands these out) and a `registrytoken` (a bearer token sent as is).
//!
//! Keys may be written as Docker writes them (`https://index.docker.io/v1/`), as a host
//! (`ghcr.io`, `registry.local:5000`) or as a URL with a scheme and path; they are compared
//! by host, with Docker Hub's aliases (`docker.io`, `index.docker.io`,
//! `registry-1.docker.io`) one registry. Secrets never appear in `Debug` output or errors.

use std::collections::{BTreeMap, HashMap};

use base64::Engine as _;
use serde::Deserialize;

/// The server URL Docker hands helpers (and keys `auths`) for Docker Hub.
pub const DOCKER_HUB_SERVER: &str = "https://index.docker.io/v1/";
/// A helper's answer (on stdout, exit status 1) when it holds nothing for the server.
pub const HELPER_NOT_FOUND: &str = "credentials not found in native keychain";
/// The `Username` with which a helper says its `Secret` is an identity token.
const IDENTITY_TOKEN_USER: &str = "<token>";
/// Longest helper name (`docker-credential-<name>`).
const MAX_HELPER_NAME: usize = 64;

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

/// What a registry accepts from us, as Docker's `AuthConfig` holds it: basic credentials
/// (for a `Basic` challenge, and for the token service), an identity token (exchanged at the
/// token service with `grant_type=refresh_token`; preferred over basic credentials there),
/// and a registry token (sent as the bearer token itself). Never printed.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Auth {
    pub basic: Option<Credentials>,
    pub identity_token: Option<String>,
    pub registry_token: Option<String>,
}

impl Auth {
    fn is_empty(&self) -> bool {
        self.basic.is_none() && self.identity_token.is_none() && self.registry_token.is_none()
    }
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Which kinds are present, never their values.
        f.debug_struct("Auth")
            .field("basic", &self.basic.is_some())
            .field("identity_token", &self.identity_token.is_some())
            .field("registry_token", &self.registry_token.is_some())
            .finish()
    }
}

/// A credential helper to ask: run `program get` with `server_url` on stdin.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Helper {
    /// `docker-credential-<name>`.
    pub program: String,
    /// What Docker passes: [`DOCKER_HUB_SERVER`] for Docker Hub, else `host[:port]`.
    pub server_url: String,
}

/// Where a registry's credentials come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Written in the file.
    Stored(Auth),
    /// Held by a credential helper.
    Helper(Helper),
}

/// Why a `config.json` or a helper's answer was refused. Never quotes a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("not a Docker config.json (line {line}, column {column})")]
    Json { line: usize, column: usize },
    #[error("auths[{key}].{field}: {problem}")]
    Entry { key: String, field: &'static str, problem: &'static str },
    #[error("{field}: {name:?} is not a credential helper name (letters, digits, '.', '_', '-')")]
    HelperName { field: String, name: String },
    #[error("credential helper answer: {0}")]
    HelperAnswer(&'static str),
}

/// A Docker `config.json`: inline credentials by host, and the helpers that hold others.
#[derive(Clone, Default)]
pub struct DockerConfig {
    auths: HashMap<String, Auth>,
    creds_store: Option<String>,
    cred_helpers: HashMap<String, String>,
}

impl std::fmt::Debug for DockerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut registries: Vec<_> = self.auths.keys().collect();
        registries.sort();
        f.debug_struct("DockerConfig")
            .field("registries", &registries)
            .field("creds_store", &self.creds_store)
            .field("cred_helpers", &self.cred_helpers)
            .finish()
    }
}

#[derive(Deserialize)]
struct ConfigFile {
    // Ordered, so that which of two keys naming one host wins does not vary between runs.
    auths: Option<BTreeMap<String, AuthEntry>>,
    #[serde(rename = "credsStore")]
    creds_store: Option<String>,
    #[serde(rename = "credHelpers")]
    cred_helpers: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    identitytoken: Option<String>,
    registrytoken: Option<String>,
}

/// The host a key or registry name denotes: scheme and path dropped, lower case, Docker
/// Hub's aliases as `docker.io`.
pub fn normalize_host(key: &str) -> String {
    let key = key.trim();
    let key = key.strip_prefix("https://").or_else(|| key.strip_prefix("http://")).unwrap_or(key);
    let host = key.split('/').next().unwrap_or(key).to_ascii_lowercase();
    match host.as_str() {
        "docker.io" | "index.docker.io" | "registry-1.docker.io" => "docker.io".to_owned(),
        _ => host,
    }
}

/// The server URL Docker gives a helper (and looks up in `auths` first) for a registry.
pub fn server_url(host: &str) -> String {
    match normalize_host(host) {
        h if h == "docker.io" => DOCKER_HUB_SERVER.to_owned(),
        h => h,
    }
}

/// A token that can go into an HTTP header or a form as it is.
fn header_safe(token: &str) -> bool {
    !token.is_empty() && token.bytes().all(|b| b.is_ascii_graphic())
}

fn helper_name(field: String, name: String) -> Result<Option<String>, ConfigError> {
    if name.is_empty() {
        return Ok(None);
    }
    let valid = name.len() <= MAX_HELPER_NAME
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !valid {
        let name: String = name.chars().take(MAX_HELPER_NAME).collect();
        return Err(ConfigError::HelperName { field, name });
    }
    Ok(Some(format!("docker-credential-{name}")))
}

impl AuthEntry {
    fn into_auth(self, key: &str) -> Result<Auth, ConfigError> {
        let bad = |field, problem| ConfigError::Entry { key: key.to_owned(), field, problem };
        let basic = match (self.auth.filter(|a| !a.trim().is_empty()), self.username, self.password) {
            (Some(auth), _, _) => {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(auth.trim())
                    .map_err(|_| bad("auth", "not base64"))?;
                let decoded = String::from_utf8(decoded).map_err(|_| bad("auth", "not UTF-8"))?;
                let (u, p) = decoded.split_once(':').ok_or(bad("auth", "not base64(user:password)"))?;
                Some(Credentials { username: u.to_owned(), password: p.to_owned() })
            }
            (None, Some(username), Some(password)) if !username.is_empty() || !password.is_empty() => {
                Some(Credentials { username, password })
            }
            _ => None,
        };
        let token = |value: Option<String>, field| match value.filter(|t| !t.is_empty()) {
            Some(t) if header_safe(&t) => Ok(Some(t)),
            Some(_) => Err(bad(field, "contains spaces or control characters")),
            None => Ok(None),
        };
        Ok(Auth {
            basic,
            identity_token: token(self.identitytoken, "identitytoken")?,
            registry_token: token(self.registrytoken, "registrytoken")?,
        })
    }
}

impl DockerConfig {
    /// Parses a `config.json` document. Errors never quote the document's secrets.
    pub fn parse(text: &[u8]) -> Result<Self, ConfigError> {
        let file: ConfigFile = serde_json::from_slice(text)
            .map_err(|e| ConfigError::Json { line: e.line(), column: e.column() })?;
        let mut auths = HashMap::new();
        for (key, entry) in file.auths.unwrap_or_default() {
            let auth = entry.into_auth(&key)?;
            if auth.is_empty() {
                // Entries that helpers manage carry no secret.
                continue;
            }
            let host = normalize_host(&key);
            // Docker looks up the exact key first, then any key naming the same host.
            let exact = key == server_url(&host);
            if exact || !auths.contains_key(&host) {
                auths.insert(host, auth);
            }
        }
        let creds_store = match file.creds_store {
            Some(name) => helper_name("credsStore".into(), name)?,
            None => None,
        };
        let mut cred_helpers = HashMap::new();
        for (key, name) in file.cred_helpers.unwrap_or_default() {
            if let Some(program) = helper_name(format!("credHelpers[{key}]"), name)? {
                cred_helpers.insert(normalize_host(&key), program);
            }
        }
        Ok(Self { auths, creds_store, cred_helpers })
    }

    /// Where the credentials for a registry (`host[:port]`, or any key form) come from:
    /// `credHelpers`, then `credsStore`, then `auths`, as Docker decides.
    pub fn source(&self, host: &str) -> Option<Source> {
        let host = normalize_host(host);
        let helper = self.cred_helpers.get(&host).or(self.creds_store.as_ref());
        if let Some(program) = helper {
            return Some(Source::Helper(Helper { program: program.clone(), server_url: server_url(&host) }));
        }
        self.auths.get(&host).cloned().map(Source::Stored)
    }

    /// The credentials written in the file for a registry, ignoring helpers.
    pub fn get(&self, host: &str) -> Option<&Auth> {
        self.auths.get(&normalize_host(host))
    }
}

#[derive(Deserialize)]
struct HelperAnswer {
    #[serde(rename = "Username", default)]
    username: String,
    #[serde(rename = "Secret", default)]
    secret: String,
}

/// Decodes what `docker-credential-<name> get` printed on success
/// (`{"ServerURL": ..., "Username": ..., "Secret": ...}`); `None` when it holds nothing.
/// A `Username` of `<token>` says the secret is an identity token.
pub fn parse_helper_output(stdout: &[u8]) -> Result<Option<Auth>, ConfigError> {
    let answer: HelperAnswer =
        serde_json::from_slice(stdout).map_err(|_| ConfigError::HelperAnswer("not credentials JSON"))?;
    if answer.secret.is_empty() {
        return Ok(None);
    }
    if answer.username == IDENTITY_TOKEN_USER {
        if !header_safe(&answer.secret) {
            return Err(ConfigError::HelperAnswer("identity token contains spaces or control characters"));
        }
        return Ok(Some(Auth { identity_token: Some(answer.secret), ..Auth::default() }));
    }
    let basic = Credentials { username: answer.username, password: answer.secret };
    Ok(Some(Auth { basic: Some(basic), ..Auth::default() }))
}

/// Whether a helper that failed said only that it holds nothing for the server.
pub fn helper_not_found(output: &[u8]) -> bool {
    String::from_utf8_lossy(output).trim() == HELPER_NOT_FOUND
}

#[cfg(test)]
mod tests;
