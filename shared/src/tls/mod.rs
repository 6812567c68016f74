//! Cluster PKI and QUIC/TLS configuration for peer-to-peer transfers.
//!
//! Every Shoal cluster has its own private certificate authority ([`ca`]): `init_ca` creates
//! it once (`ca.pem` + `ca.key`), `issue` mints a short-lived leaf certificate with a
//! [`Role`] for each node (`ca.pem`, `cert.pem`, `key.pem` in the node's TLS directory), and
//! `revoke` lists stolen ones in `crl.pem`.
//!
//! Peers talk QUIC with mutual TLS: the server demands a client certificate that chains to the
//! cluster CA, is not revoked and carries a peer role (origin or agent), and the client trusts
//! only servers that pass the same checks (the public web PKI is never consulted). Nodes
//! reload their TLS directory when it changes ([`reload`]). Since peers are usually addressed by IP, clients
//! always connect with the fixed SNI [`PEER_SERVER_NAME`], which every issued certificate
//! carries as a DNS subject alternative name.
//!
//! All rustls configuration uses the `ring` provider explicitly, so nothing depends on (or panics
//! for lack of) a process-wide default crypto provider.

pub mod ca;
pub mod http;
pub mod live;
pub mod reload;
pub mod role;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{NoInitialCipherSuite, QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, MtuDiscoveryConfig, TransportConfig, VarInt};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

pub use ca::{init_ca, issue, issue_with, revoke, RevokeTarget, DEFAULT_VALIDITY};
pub use role::{peer_role, role_of, Role};

/// The TLS server name (SNI) every peer connects with; every issued certificate carries it as
/// a DNS subject alternative name.
pub const PEER_SERVER_NAME: &str = "shoal-peer";

/// ALPN protocol identifier for the Shoal peer protocol.
pub const ALPN: &[u8] = b"shoal/1";

/// CA certificate file name (in both the CA directory and node directories).
pub const CA_CERT_FILE: &str = "ca.pem";
/// CA private key file name (CA directory only).
pub const CA_KEY_FILE: &str = "ca.key";
/// Node certificate chain file name.
pub const CERT_FILE: &str = "cert.pem";
/// Node private key file name.
pub const KEY_FILE: &str = "key.pem";
/// Certificate revocation list file name (CA directory and node directories; optional).
pub const CRL_FILE: &str = "crl.pem";

/// Errors from CA management, certificate issuance and TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Reading, writing or creating a file or directory failed.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// `init_ca` refuses to replace an existing CA key.
    #[error("refusing to overwrite existing CA key {}", path.display())]
    AlreadyExists {
        /// The existing key file.
        path: PathBuf,
    },
    /// A node name is not acceptable for a certificate.
    #[error("invalid node name {name:?}: {reason}")]
    InvalidName {
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A PEM file could not be parsed.
    #[error("cannot parse PEM file {}: {source}", path.display())]
    Pem {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// A PEM file parsed but contained no certificate.
    #[error("no certificate found in {}", path.display())]
    NoCertificate {
        /// The file involved.
        path: PathBuf,
    },
    /// Loading the CA certificate or key for signing failed.
    #[error("cannot load CA from {}: {source}", path.display())]
    CaLoad {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: rcgen::Error,
    },
    /// Generating a key or certificate failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[source] rcgen::Error),
    /// A CA certificate was rejected as a trust anchor.
    #[error("invalid CA certificate: {0}")]
    TrustAnchor(#[source] rustls::Error),
    /// Building a certificate verifier failed.
    #[error("cannot build certificate verifier: {0}")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    /// Building the rustls configuration failed (e.g. key does not match the certificate).
    #[error("invalid TLS configuration: {0}")]
    Config(#[source] rustls::Error),
    /// The rustls configuration is not usable for QUIC.
    #[error("TLS configuration unusable for QUIC: {0}")]
    Quic(#[source] NoInitialCipherSuite),
    /// No async runtime is available (must be called inside a tokio runtime).
    #[error("no async runtime found; QUIC endpoints must be created inside a tokio runtime")]
    NoRuntime,
    /// Creating the QUIC endpoint failed.
    #[error("cannot create QUIC endpoint: {0}")]
    Endpoint(#[source] io::Error),
    /// `revoke` found nothing the CA issued under that name or serial.
    #[error("the CA issued no certificate with {0}")]
    NotIssued(String),
    /// A time outside what a certificate can say.
    #[error("time {0} is out of range for a certificate")]
    TimeRange(i64),
    /// The HTTPS client for the control plane could not be built.
    #[error("cannot build the control plane's HTTPS client: {0}")]
    HttpClient(#[source] reqwest::Error),
    /// The node's certificate is another role's.
    #[error("this node needs a certificate with role {expected}, but its certificate is for {actual}")]
    WrongRole {
        /// The node's role.
        expected: Role,
        /// The certificate's.
        actual: Role,
    },
    /// The node's own certificate carries no role (issued before roles, or by another tool).
    #[error("certificate {} carries no Shoal role; issue it again with `shoal-origin ca issue --role`", path.display())]
    NoRole {
        /// The certificate file.
        path: PathBuf,
    },
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> TlsError + '_ {
    move |source| TlsError::Io { path: path.to_path_buf(), source }
}

/// Writes `contents` to `path`. Private files are created with mode 0600 (on Unix), and
/// `create_new` makes the write fail if the file already exists.
pub(crate) fn write_file(
    path: &Path,
    contents: &str,
    private: bool,
    create_new: bool,
) -> Result<(), TlsError> {
    let mut opts = OpenOptions::new();
    opts.write(true);
    if create_new {
        opts.create_new(true);
    } else {
        opts.create(true).truncate(true);
    }
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut file: File = opts.open(path).map_err(io_err(path))?;
    // `mode` only applies on creation; tighten an existing file too.
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(fs::Permissions::from_mode(0o600)).map_err(io_err(path))?;
    }
    #[cfg(not(unix))]
    let _ = private;
    file.write_all(contents.as_bytes()).map_err(io_err(path))?;
    file.sync_all().map_err(io_err(path))
}

pub(crate) fn read_string(path: &Path) -> Result<String, TlsError> {
    fs::read_to_string(path).map_err(io_err(path))
}

pub(crate) fn create_dir(dir: &Path) -> Result<(), TlsError> {
    fs::create_dir_all(dir).map_err(io_err(dir))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// QUIC transport parameters tuned for bulk transfer on a LAN.
fn transport_config() -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    // A stream carries one piece (1 MiB by default, at most 64 MiB); the connection window bounds
    // what a fast sender can make us buffer.
    t.stream_receive_window(VarInt::from_u32(6 << 20))
        .receive_window(VarInt::from_u32(16 << 20))
        .send_window(64 << 20)
        .max_concurrent_bidi_streams(VarInt::from_u32(256))
        .keep_alive_interval(Some(Duration::from_secs(5)))
        .max_idle_timeout(Some(IdleTimeout::from(VarInt::from_u32(30_000))))
        .mtu_discovery_config(Some(mtu_discovery()))
        .ack_frequency_config(Some(ack_frequency()));
    Arc::new(t)
}

/// Largest UDP payload a peer sends or accepts; MTU discovery finds what the path allows up
/// to this. quinn's defaults stop at 1452 (a 1500-byte Ethernet path), which is still what a
/// connection settles on over such a path, after a few lost probes when it starts; jumbo-frame
/// links and loopback get larger packets.
///
/// Larger packets cost less CPU per byte: on loopback, 6144 halved the CPU-seconds per GiB of
/// both ends of a raw QUIC transfer and of the origin serving a cold pull. The bound is this
/// low because quinn 0.11 sends up to 10 datagrams in one GSO batch and the kernel takes at
/// most 64 KiB per send: with 8192 the batches fail, quinn turns segmentation offload off and
/// the transfer fell back to the speed of 1452-byte packets.
const MAX_UDP_PAYLOAD: u16 = 6144;

/// Asks the peer (through QUIC's ACK-frequency extension) to acknowledge every
/// `ACK_ELICITING_THRESHOLD + 1` ack-eliciting packets rather than every second one; its ack
/// delay still bounds how long an ACK waits, and a packet out of order is still acknowledged
/// at once. On a 1500-byte path, where each packet carries ~1.4 KB, ACKs were a large share of
/// the packets each side handles: ten agents swarming a 128 MiB blob in the netns benchmark
/// spent 10-12% less CPU with it (docs/ARCHITECTURE.md, "Performance on this machine").
fn ack_frequency() -> quinn::AckFrequencyConfig {
    let mut a = quinn::AckFrequencyConfig::default();
    a.ack_eliciting_threshold(VarInt::from_u32(ACK_ELICITING_THRESHOLD));
    a
}

/// Ack-eliciting packets a peer may receive before it must acknowledge them.
const ACK_ELICITING_THRESHOLD: u32 = 9;

fn mtu_discovery() -> MtuDiscoveryConfig {
    let mut mtu = MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_UDP_PAYLOAD);
    mtu
}

/// A node's TLS identity: the cluster CA certificate(s), the revocation list, its own
/// certificate chain and key, and the role its certificate carries.
#[derive(Clone, Debug)]
pub struct TlsIdentity {
    ca: Vec<CertificateDer<'static>>,
    crls: Vec<CertificateRevocationListDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    role: Role,
}

impl TlsIdentity {
    /// Loads `dir/ca.pem`, `dir/cert.pem`, `dir/key.pem` (as written by [`issue`]) and
    /// `dir/crl.pem` if present. The certificate must carry a role.
    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        let ca = load_certs(&dir.join(CA_CERT_FILE))?;
        let cert_path = dir.join(CERT_FILE);
        let chain = load_certs(&cert_path)?;
        let key_path = dir.join(KEY_FILE);
        // Read separately so a missing file reports as an I/O error with its path.
        let key_pem = fs::read(&key_path).map_err(io_err(&key_path))?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|source| TlsError::Pem { path: key_path, source })?;
        let crl_path = dir.join(CRL_FILE);
        let crls = match fs::read(&crl_path) {
            Ok(pem) => CertificateRevocationListDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|source| TlsError::Pem { path: crl_path, source })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io_err(&crl_path)(e)),
        };
        let role = role_of(&chain[0]).ok_or(TlsError::NoRole { path: cert_path })?;
        Ok(Self { ca, crls, chain, key: Arc::new(key), role })
    }

    /// The role this node's certificate carries.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Refuses to run a node with another role's certificate.
    pub fn require_role(&self, role: Role) -> Result<(), TlsError> {
        if self.role == role {
            return Ok(());
        }
        Err(TlsError::WrongRole { expected: role, actual: self.role })
    }

    /// When this node's certificate expires (Unix seconds).
    pub fn expires_at(&self) -> Option<i64> {
        let (_, cert) = x509_parser::parse_x509_certificate(self.chain.first()?.as_ref()).ok()?;
        Some(cert.validity().not_after.timestamp())
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, TlsError> {
        let mut roots = RootCertStore::empty();
        for cert in &self.ca {
            roots.add(cert.clone()).map_err(TlsError::TrustAnchor)?;
        }
        Ok(Arc::new(roots))
    }

    /// Checks a client's chain against the cluster CA and the revocation list (end entity),
    /// not its role: callers wrap it in a [`role::RoleClientVerifier`].
    fn client_verifier(&self) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
        let mut builder = WebPkiClientVerifier::builder_with_provider(self.roots()?, provider());
        if !self.crls.is_empty() {
            builder = builder.with_crls(self.crls.clone()).only_check_end_entity_revocation();
        }
        builder.build().map_err(TlsError::Verifier)
    }

    /// Checks a server's chain against the cluster CA and the revocation list (end entity),
    /// not its role: callers wrap it in a [`role::RoleServerVerifier`].
    fn server_verifier(&self) -> Result<Arc<dyn rustls::client::danger::ServerCertVerifier>, TlsError> {
        let mut builder = WebPkiServerVerifier::builder_with_provider(self.roots()?, provider());
        if !self.crls.is_empty() {
            builder = builder.with_crls(self.crls.clone()).only_check_end_entity_revocation();
        }
        let verifier: Arc<dyn rustls::client::danger::ServerCertVerifier> =
            builder.build().map_err(TlsError::Verifier)?;
        Ok(verifier)
    }

    /// QUIC server configuration: presents this node's certificate and requires a client
    /// certificate chaining to the cluster CA, not revoked, with a peer role (mutual TLS).
    /// ALPN `shoal/1`.
    pub fn server_config(&self) -> Result<quinn::ServerConfig, TlsError> {
        let provider = provider();
        let verifier =
            Arc::new(role::RoleClientVerifier { inner: self.client_verifier()?, allowed: Role::PEERS });
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Config)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(TlsError::Config)?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let quic = QuicServerConfig::try_from(tls).map_err(TlsError::Quic)?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
        config.transport_config(transport_config());
        Ok(config)
    }

    /// QUIC client configuration: trusts only servers chaining to the cluster CA, not revoked,
    /// with a peer role, and presents this node's certificate. ALPN `shoal/1`. Connect with
    /// [`PEER_SERVER_NAME`] as server name.
    pub fn client_config(&self) -> Result<quinn::ClientConfig, TlsError> {
        let provider = provider();
        let verifier =
            Arc::new(role::RoleServerVerifier { inner: self.server_verifier()?, allowed: Role::PEERS });
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Config)?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(TlsError::Config)?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let quic = QuicClientConfig::try_from(tls).map_err(TlsError::Quic)?;
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        config.transport_config(transport_config());
        Ok(config)
    }
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = fs::read(path).map_err(io_err(path))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem { path: path.to_path_buf(), source })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: path.to_path_buf() });
    }
    Ok(certs)
}

/// Binds a QUIC endpoint on an already-bound UDP socket, acting as both server (accepting peers
/// with certificates from the cluster CA) and client (default client config from `identity`).
///
/// Must be called inside a tokio runtime.
pub fn endpoint(socket: UdpSocket, identity: &TlsIdentity) -> Result<quinn::Endpoint, TlsError> {
    grow_socket_buffers(&socket);
    let server = identity.server_config()?;
    let client = identity.client_config()?;
    let runtime = quinn::default_runtime().ok_or(TlsError::NoRuntime)?;
    let mut config = quinn::EndpointConfig::default();
    // Advertised to peers as the largest packet this endpoint takes (default 1472).
    config.max_udp_payload_size(MAX_UDP_PAYLOAD).expect("MAX_UDP_PAYLOAD is within 1200..=65527");
    let mut endpoint =
        quinn::Endpoint::new(config, Some(server), socket, runtime).map_err(TlsError::Endpoint)?;
    endpoint.set_default_client_config(client);
    Ok(endpoint)
}

/// Socket buffer size asked for on the peer socket.
const SOCKET_BUFFER: usize = 16 << 20;

/// Asks for large UDP socket buffers. With the kernel's ~200 KiB default, a burst of
/// datagrams that arrives while the receiving task is busy overflows the buffer; QUIC reads
/// the drops as congestion and halves its window, which caps throughput far below the link.
/// The kernel caps the request at `net.core.rmem_max` / `wmem_max`; the result is logged so
/// an operator can see when raising those sysctls would help.
fn grow_socket_buffers(socket: &UdpSocket) {
    let sock = socket2::SockRef::from(socket);
    let _ = sock.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = sock.set_send_buffer_size(SOCKET_BUFFER);
    let recv = sock.recv_buffer_size().unwrap_or(0);
    let send = sock.send_buffer_size().unwrap_or(0);
    if recv < SOCKET_BUFFER {
        tracing::info!(
            recv,
            send,
            wanted = SOCKET_BUFFER,
            "UDP buffers capped by net.core.rmem_max/wmem_max"
        );
    } else {
        tracing::debug!(recv, send, "UDP buffers");
    }
}

#[cfg(test)]
mod tests;
