//! Node roles carried by certificates, and the verifiers that check them.
//!
//! A certificate names its node's role as a URI subject alternative name
//! (`urn:shoal:role:agent`, `...:origin`, `...:tracker`). The peer plane's TLS verifiers
//! wrap the webpki ones: after the chain (and revocation) checks pass, the role must be one
//! the endpoint admits, so a tracker's certificate cannot fetch or serve pieces and a
//! certificate without a role (issued before roles existed, or by hand) is refused. Whether
//! a peer listed as an origin really is one is checked after the handshake
//! ([`peer_role`]), where the caller knows what the peer claimed to be.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

/// What a node is allowed to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Holds authoritative copies; seeds them over QUIC.
    Origin,
    /// Coordinates swarms; never on the peer plane.
    Tracker,
    /// A host's agent: downloads and seeds what it holds.
    Agent,
}

/// Prefix of the URI SAN that names a role.
const ROLE_URI: &str = "urn:shoal:role:";

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Origin => "origin",
            Self::Tracker => "tracker",
            Self::Agent => "agent",
        }
    }

    /// The URI subject alternative name a certificate of this role carries.
    pub fn uri(self) -> String {
        format!("{ROLE_URI}{}", self.as_str())
    }

    /// Roles admitted on the QUIC peer plane, as client or as server.
    pub const PEERS: &'static [Role] = &[Role::Origin, Role::Agent];
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role name that is not one of `origin`, `tracker`, `agent`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role {0:?}: expected origin, tracker or agent")]
pub struct UnknownRole(String);

impl FromStr for Role {
    type Err = UnknownRole;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "origin" => Ok(Self::Origin),
            "tracker" => Ok(Self::Tracker),
            "agent" => Ok(Self::Agent),
            other => Err(UnknownRole(other.to_owned())),
        }
    }
}

/// The role a DER certificate carries: `None` for no role, an unknown one, or more than one.
pub fn role_of(cert: &CertificateDer<'_>) -> Option<Role> {
    use x509_parser::extensions::GeneralName;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let sans = parsed.subject_alternative_name().ok()??;
    let mut roles = sans.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(uri) => uri.strip_prefix(ROLE_URI),
        _ => None,
    });
    let role = roles.next()?.parse().ok()?;
    roles.next().is_none().then_some(role)
}

/// The role of the peer at the other end of a QUIC connection.
pub fn peer_role(conn: &quinn::Connection) -> Option<Role> {
    let identity = conn.peer_identity()?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    role_of(chain.first()?)
}

fn admit(cert: &CertificateDer<'_>, allowed: &[Role]) -> Result<(), rustls::Error> {
    match role_of(cert) {
        Some(role) if allowed.contains(&role) => Ok(()),
        _ => Err(rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)),
    }
}

/// A client-certificate verifier that also requires one of `allowed` roles.
#[derive(Debug)]
pub struct RoleClientVerifier {
    pub inner: Arc<dyn ClientCertVerifier>,
    pub allowed: &'static [Role],
}

impl ClientCertVerifier for RoleClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        admit(end_entity, self.allowed)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A server-certificate verifier that also requires one of `allowed` roles.
#[derive(Debug)]
pub struct RoleServerVerifier {
    pub inner: Arc<dyn ServerCertVerifier>,
    pub allowed: &'static [Role],
}

impl ServerCertVerifier for RoleServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified =
            self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        admit(end_entity, self.allowed)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
