//! The control plane's TLS: HTTPS with mutual TLS on the calls agents and origins make to
//! trackers, and trackers and origins make to origins' internal listeners, with the same
//! cluster CA, revocation list and roles as the QUIC peer plane.
//!
//! [`HttpTls`] holds a node's current certificate, key and verifiers in one swappable cell.
//! The rustls configurations built from it ([`HttpTls::server_config`] for actix-web's
//! `listen_rustls_0_23`, [`HttpTls::client_config`] for reqwest) never change; their
//! certificate resolvers and verifiers read the cell on every handshake, so a reload
//! ([`HttpTls::replace`], driven by [`super::reload::watch_http`]) takes effect for new
//! connections without rebuilding the server or the HTTP clients.
//!
//! Identity is the cluster CA plus the role, as on QUIC: a server certificate is checked
//! against the fixed name [`PEER_SERVER_NAME`] (every issued certificate carries it), not
//! the host of the URL, so trackers can be addressed by IP or any DNS name. The server does
//! not send the CA's name in its certificate request (the cell can change under it);
//! clients with one certificate send it regardless.
//!
//! [`record_caller`] is the `on_connect` hook that puts the verified [`Caller`] (its role)
//! and its certificate chain into each connection's data, where handlers read it with
//! `HttpRequest::conn_data`. A keep-alive connection outlives its handshake, so the
//! [`require_trusted_caller`] middleware checks the caller's chain again on every request
//! against the current CA and revocation list: a caller revoked while connected is refused
//! (403, connection closed) from the first request after the reload.

use std::any::Any;
use std::path::Path;
use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use super::role::{role_of, RoleClientVerifier, RoleServerVerifier};
use super::{provider, Role, TlsError, TlsIdentity, PEER_SERVER_NAME};

/// What one load of the TLS directory gives the control plane.
struct Material {
    key: Arc<CertifiedKey>,
    clients: Arc<dyn ClientCertVerifier>,
    servers: Arc<dyn ServerCertVerifier>,
    role: Role,
}

type Cell = Arc<RwLock<Arc<Material>>>;

fn current(cell: &Cell) -> Arc<Material> {
    cell.read().unwrap_or_else(|p| p.into_inner()).clone()
}

/// A node's control-plane TLS material, replaced when its TLS directory changes. Cheap to
/// clone (every clone sees the replacement).
#[derive(Clone)]
pub struct HttpTls(Cell);

impl std::fmt::Debug for HttpTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpTls").field("role", &current(&self.0).role).finish()
    }
}

fn material(identity: &TlsIdentity) -> Result<Material, TlsError> {
    let key = CertifiedKey::from_der(identity.chain.clone(), identity.key.clone_key(), &provider())
        .map_err(TlsError::Config)?;
    Ok(Material {
        key: Arc::new(key),
        clients: identity.client_verifier()?,
        servers: identity.server_verifier()?,
        role: identity.role(),
    })
}

impl HttpTls {
    /// The control-plane TLS of a node whose identity is `identity`.
    pub fn new(identity: &TlsIdentity) -> Result<Self, TlsError> {
        Ok(Self(Arc::new(RwLock::new(Arc::new(material(identity)?)))))
    }

    /// Loads `dir` (as [`TlsIdentity::load`]) for a node of `role`.
    pub fn load(dir: &Path, role: Role) -> Result<Self, TlsError> {
        let identity = TlsIdentity::load(dir)?;
        identity.require_role(role)?;
        Self::new(&identity)
    }

    /// Serves and dials with `identity` from the next handshake on; on an error (a key that
    /// does not match its certificate) the old material stays.
    pub fn replace(&self, identity: &TlsIdentity) -> Result<(), TlsError> {
        let m = Arc::new(material(identity)?);
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = m;
        Ok(())
    }

    /// The role of this node's certificate.
    pub fn role(&self) -> Role {
        current(&self.0).role
    }

    /// An HTTPS server configuration (TLS 1.3) that presents this node's certificate and
    /// requires a client certificate from the cluster CA, not revoked, with one of `clients`'
    /// roles: anything else is refused at the handshake.
    pub fn server_config(&self, clients: &'static [Role]) -> Result<rustls::ServerConfig, TlsError> {
        let verifier = RoleClientVerifier { inner: Arc::new(LiveClients(self.0.clone())), allowed: clients };
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Config)?
            .with_client_cert_verifier(Arc::new(verifier))
            .with_cert_resolver(Arc::new(LiveKey(self.0.clone())));
        // No session resumption: a resumed session skips the client-certificate check, so a
        // caller revoked since its first handshake would get back in with its ticket. This
        // configuration lives as long as the server (only the cell changes), so its session
        // store would outlive every reload; a full handshake per connection is cheap here.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(config)
    }

    /// An HTTPS client configuration (TLS 1.3) that trusts only servers with a certificate
    /// from the cluster CA, not revoked, with one of `servers`' roles, and presents this
    /// node's certificate.
    pub fn client_config(&self, servers: &'static [Role]) -> Result<rustls::ClientConfig, TlsError> {
        let verifier = RoleServerVerifier { inner: Arc::new(LiveServers(self.0.clone())), allowed: servers };
        Ok(rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Config)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(Arc::new(LiveKey(self.0.clone()))))
    }
}

/// The current certificate, as server and as client.
#[derive(Debug)]
struct LiveKey(Cell);

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Material").field("role", &self.role).finish_non_exhaustive()
    }
}

impl ResolvesServerCert for LiveKey {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(current(&self.0).key.clone())
    }
}

impl ResolvesClientCert for LiveKey {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(current(&self.0).key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The current client-certificate verifier (chain and revocation; the role is checked by
/// the [`RoleClientVerifier`] around it). Client certificates are mandatory.
#[derive(Debug)]
struct LiveClients(Cell);

impl ClientCertVerifier for LiveClients {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // The hints would borrow from material that a reload can drop; they are optional.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        current(&self.0).clients.verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        current(&self.0).clients.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        current(&self.0).clients.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        current(&self.0).clients.supported_verify_schemes()
    }
}

/// The current server-certificate verifier (chain and revocation, against the fixed name
/// [`PEER_SERVER_NAME`]; the role is checked by the [`RoleServerVerifier`] around it).
#[derive(Debug)]
struct LiveServers(Cell);

impl ServerCertVerifier for LiveServers {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let name = ServerName::try_from(PEER_SERVER_NAME)
            .map_err(|_| rustls::Error::General("server name".into()))?;
        current(&self.0).servers.verify_server_cert(end_entity, intermediates, &name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        current(&self.0).servers.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        current(&self.0).servers.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        current(&self.0).servers.supported_verify_schemes()
    }
}

/// Who is calling over one mutually authenticated HTTPS connection: the role its verified
/// certificate carries. Read it with `HttpRequest::conn_data::<Caller>()`; absent on a
/// plain-HTTP listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub role: Role,
}

/// The certificate chain a caller presented at the handshake of its connection.
#[derive(Debug, Clone)]
struct CallerChain(Arc<Vec<CertificateDer<'static>>>);

/// actix-web `on_connect` hook for a listener served with [`HttpTls::server_config`]:
/// records the connection's [`Caller`] and its certificate chain. Connections of other
/// kinds are left alone.
pub fn record_caller(conn: &dyn Any, data: &mut actix_web::dev::Extensions) {
    type Tls = actix_tls::accept::rustls_0_23::TlsStream<actix_web::rt::net::TcpStream>;
    let Some(tls) = conn.downcast_ref::<Tls>() else { return };
    let (_, session) = tls.get_ref();
    let Some(chain) = session.peer_certificates() else { return };
    if let Some(role) = chain.first().and_then(role_of) {
        data.insert(Caller { role });
    }
    data.insert(CallerChain(Arc::new(chain.iter().map(|c| c.clone().into_owned()).collect())));
}

impl HttpTls {
    /// Whether a client chain passes the current CA and revocation list (as at a handshake
    /// now; the role is not checked again: it cannot change).
    fn still_trusts(&self, chain: &[CertificateDer<'static>]) -> bool {
        let Some((leaf, rest)) = chain.split_first() else { return false };
        current(&self.0).clients.verify_client_cert(leaf, rest, UnixTime::now()).is_ok()
    }
}

/// actix-web middleware (`from_fn`) for a server with [`record_caller`] and the server's
/// [`HttpTls`] as `web::Data`: refuses a request whose connection's client certificate no
/// longer passes (revoked since the handshake) with 403 and closes the connection. Requests
/// on connections without a recorded chain (plain HTTP) pass untouched.
pub async fn require_trusted_caller(
    req: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<impl actix_web::body::MessageBody + 'static>,
) -> Result<actix_web::dev::ServiceResponse<actix_web::body::BoxBody>, actix_web::Error> {
    let chain = req.conn_data::<CallerChain>().cloned();
    let tls = req.app_data::<actix_web::web::Data<HttpTls>>().cloned();
    if let (Some(chain), Some(tls)) = (chain, tls) {
        if !tls.still_trusts(&chain.0) {
            tracing::warn!(peer = ?req.peer_addr(), "refusing a caller whose certificate is no longer trusted (revoked?)");
            let resp = actix_web::HttpResponse::Forbidden()
                .force_close()
                .json(serde_json::json!({ "error": "client certificate no longer trusted (revoked)" }));
            return Ok(req.into_response(resp));
        }
    }
    Ok(next.call(req).await?.map_into_boxed_body())
}

/// The HTTP client agents and origins call trackers with: [`crate::client::http_client`]'s
/// timeouts, and for `https://` URLs `tls`'s certificate as client identity and only
/// tracker certificates from the cluster CA trusted (never the system's roots). `http://`
/// URLs are still called in the clear.
pub fn tracker_client(tls: &HttpTls) -> Result<reqwest::Client, TlsError> {
    mtls_client(tls, &[Role::Tracker], crate::client::builder(None))
}

/// Finishes `builder` as a control-plane client: `https://` URLs are called with `tls`'s
/// certificate as client identity and trust only servers with a certificate from the
/// cluster CA carrying one of `servers`' roles (never the system's roots); `http://` URLs
/// are still called in the clear. Trackers call origins' internal listeners this way
/// (`servers`: origin), origins call the other members of their ring (origin).
pub fn mtls_client(
    tls: &HttpTls,
    servers: &'static [Role],
    builder: reqwest::ClientBuilder,
) -> Result<reqwest::Client, TlsError> {
    let config = tls.client_config(servers)?;
    builder.tls_built_in_root_certs(false).use_preconfigured_tls(config).build().map_err(TlsError::HttpClient)
}
