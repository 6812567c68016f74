//! An OAuth2 token service for the distribution registry's token auth (`auth.token` in its
//! config), standing in for the one in front of Azure ACR or Docker Hub: it honours only the
//! refresh-token grant of the distribution token spec (`oauth.md`), `POST` with
//! `grant_type=refresh_token`, and answers with an `access_token` the registry verifies for
//! real: a JWT signed with ES256 by a key whose self-signed certificate is the registry's
//! `rootcertbundle`, carrying the certificate in `x5c` and the granted scope in `access`.
//! Anonymous `GET`s, and basic-auth ones but for one tenant user ([`TENANT`], a person
//! with a registry account, whose credentials an agent checks per tenant), are refused, so
//! an origin that does not send the refresh token gets nothing. It counts what it was asked.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use actix_web::{web, App, HttpResponse, HttpServer};
use anyhow::Context as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde::Deserialize;

/// What the registry is told to expect in tokens.
pub const ISSUER: &str = "shoal-test-issuer";
pub const SERVICE: &str = "shoal-test-registry";
/// The one `user:password` a basic-auth `GET` is granted a token for.
pub const TENANT: (&str, &str) = ("tenant", "tenant-password");

/// Counts of requests the service answered.
#[derive(Debug, Default)]
pub struct Seen {
    /// Refresh-token grants that produced a token.
    pub granted: AtomicUsize,
    /// Grants refused (wrong grant type, refresh token, client or service).
    pub refused: AtomicUsize,
    /// `GET`s refused (anonymous, or basic with other credentials).
    pub gets: AtomicUsize,
    /// `GET`s with the [`TENANT`]'s credentials, granted.
    pub tenant_grants: AtomicUsize,
}

/// Signs tokens.
struct Signer {
    key: EcdsaKeyPair,
    cert_der: Vec<u8>,
}

impl Signer {
    /// A JWT granting `pull` (and `push`) on each `repository:NAME:...` scope.
    fn token(&self, scopes: &[&str]) -> anyhow::Result<String> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let access: Vec<_> = scopes
            .iter()
            .filter_map(|s| {
                let mut parts = s.splitn(3, ':');
                let (kind, name) = (parts.next()?, parts.next()?);
                Some(serde_json::json!({"type": kind, "name": name, "actions": ["pull", "push"]}))
            })
            .collect();
        let header =
            serde_json::json!({"typ": "JWT", "alg": "ES256", "x5c": [STANDARD.encode(&self.cert_der)]});
        let claims = serde_json::json!({
            "iss": ISSUER, "sub": "shoal-test", "aud": SERVICE, "exp": now + 300, "nbf": now - 10,
            "iat": now, "jti": format!("{now}-{}", scopes.len()), "access": access,
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = self
            .key
            .sign(&SystemRandom::new(), signing_input.as_bytes())
            .map_err(|_| anyhow::anyhow!("signing failed"))?;
        Ok(format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref())))
    }
}

/// A running token service; stopped on drop.
pub struct TokenService {
    /// `http://127.0.0.1:<port>/token`.
    pub realm: String,
    /// The signing certificate (PEM), for the registry's `rootcertbundle`.
    pub root_pem: PathBuf,
    pub seen: Arc<Seen>,
    signer: Arc<Signer>,
    server: actix_web::dev::ServerHandle,
}

impl std::fmt::Debug for TokenService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenService").field("realm", &self.realm).finish_non_exhaustive()
    }
}

impl Drop for TokenService {
    fn drop(&mut self) {
        drop(self.server.stop(false));
    }
}

#[derive(Deserialize)]
struct Grant {
    grant_type: Option<String>,
    refresh_token: Option<String>,
    client_id: Option<String>,
    service: Option<String>,
    scope: Option<String>,
}

impl TokenService {
    /// Starts the service; `refresh_token` is the one identity token it accepts. The
    /// certificate is written into `dir`.
    pub async fn start(refresh_token: &str, dir: &Path) -> anyhow::Result<TokenService> {
        let key = rcgen::KeyPair::generate().context("key")?;
        let cert = rcgen::CertificateParams::new(vec!["shoal-test-token-signer".to_owned()])?
            .self_signed(&key)
            .context("certificate")?;
        let root_pem = dir.join("token-root.pem");
        std::fs::write(&root_pem, cert.pem())?;
        let signer = Arc::new(Signer {
            key: EcdsaKeyPair::from_pkcs8(
                &ECDSA_P256_SHA256_FIXED_SIGNING,
                &key.serialize_der(),
                &SystemRandom::new(),
            )
            .map_err(|e| anyhow::anyhow!("signing key: {e}"))?,
            cert_der: cert.der().to_vec(),
        });
        let seen = Arc::new(Seen::default());
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let realm = format!("http://{}/token", listener.local_addr()?);
        let (s, sg, expected) = (seen.clone(), signer.clone(), refresh_token.to_owned());
        let server = HttpServer::new(move || {
            let (seen, signer, expected) = (s.clone(), sg.clone(), expected.clone());
            let (gets, tenant_signer) = (s.clone(), sg.clone());
            App::new()
                .route(
                    "/token",
                    web::post().to(move |form: web::Form<Grant>| {
                        let (seen, signer, expected) = (seen.clone(), signer.clone(), expected.clone());
                        async move { grant(&form, &expected, &seen, &signer) }
                    }),
                )
                .route(
                    "/token",
                    web::get().to(move |req: actix_web::HttpRequest| {
                        let (seen, signer) = (gets.clone(), tenant_signer.clone());
                        async move { tenant_grant(&req, &seen, &signer) }
                    }),
                )
        })
        .workers(1)
        .listen(listener)?
        .run();
        let handle = server.handle();
        tokio::spawn(server);
        Ok(TokenService { realm, root_pem, seen, signer, server: handle })
    }

    /// An access token for `scopes`, as the service would grant it (for `registrytoken`).
    pub fn access_token(&self, scopes: &[&str]) -> anyhow::Result<String> {
        self.signer.token(scopes)
    }
}

/// A basic-auth `GET`: a token for the [`TENANT`], nothing for anyone else.
fn tenant_grant(req: &actix_web::HttpRequest, seen: &Seen, signer: &Signer) -> HttpResponse {
    let expected = format!("Basic {}", STANDARD.encode(format!("{}:{}", TENANT.0, TENANT.1)));
    let given = req.headers().get("Authorization").and_then(|v| v.to_str().ok());
    if given != Some(expected.as_str()) {
        seen.gets.fetch_add(1, Ordering::SeqCst);
        return HttpResponse::Unauthorized().json(serde_json::json!({"error": "unauthorized"}));
    }
    let query = web::Query::<std::collections::HashMap<String, String>>::from_query(req.query_string())
        .map(web::Query::into_inner)
        .unwrap_or_default();
    let scopes: Vec<&str> = query.get("scope").map(|s| s.split(' ').collect()).unwrap_or_default();
    match signer.token(&scopes) {
        Ok(token) => {
            seen.tenant_grants.fetch_add(1, Ordering::SeqCst);
            HttpResponse::Ok().json(serde_json::json!({"token": token, "expires_in": 300}))
        }
        Err(e) => HttpResponse::InternalServerError().body(e.to_string()),
    }
}

fn grant(form: &Grant, expected: &str, seen: &Seen, signer: &Signer) -> HttpResponse {
    let valid = form.grant_type.as_deref() == Some("refresh_token")
        && form.refresh_token.as_deref() == Some(expected)
        && form.client_id.as_deref().is_some_and(|c| !c.is_empty())
        && form.service.as_deref() == Some(SERVICE);
    if !valid {
        seen.refused.fetch_add(1, Ordering::SeqCst);
        return HttpResponse::Unauthorized().json(serde_json::json!({"error": "invalid_grant"}));
    }
    let scopes: Vec<&str> =
        form.scope.as_deref().unwrap_or("").split(' ').filter(|s| !s.is_empty()).collect();
    match signer.token(&scopes) {
        Ok(token) => {
            seen.granted.fetch_add(1, Ordering::SeqCst);
            HttpResponse::Ok().json(serde_json::json!({
                "access_token": token, "expires_in": 300, "scope": scopes.join(" "),
            }))
        }
        Err(e) => HttpResponse::InternalServerError().body(e.to_string()),
    }
}
