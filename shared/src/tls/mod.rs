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
pub mod reload;
pub mod role;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{NoInitialCipherSuite, QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};
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
    // A stream carries one piece (at most 4 MiB by default); the connection window bounds
    // what a fast sender can make us buffer.
    t.stream_receive_window(VarInt::from_u32(6 << 20))
        .receive_window(VarInt::from_u32(16 << 20))
        .send_window(64 << 20)
        .max_concurrent_bidi_streams(VarInt::from_u32(256))
        .keep_alive_interval(Some(Duration::from_secs(5)))
        .max_idle_timeout(Some(IdleTimeout::from(VarInt::from_u32(30_000))));
    Arc::new(t)
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

    /// QUIC server configuration: presents this node's certificate and requires a client
    /// certificate chaining to the cluster CA, not revoked, with a peer role (mutual TLS).
    /// ALPN `shoal/1`.
    pub fn server_config(&self) -> Result<quinn::ServerConfig, TlsError> {
        let provider = provider();
        let mut builder = WebPkiClientVerifier::builder_with_provider(self.roots()?, provider.clone());
        if !self.crls.is_empty() {
            builder = builder.with_crls(self.crls.clone()).only_check_end_entity_revocation();
        }
        let webpki = builder.build().map_err(TlsError::Verifier)?;
        let verifier = Arc::new(role::RoleClientVerifier { inner: webpki, allowed: Role::PEERS });
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
        let mut builder = WebPkiServerVerifier::builder_with_provider(self.roots()?, provider.clone());
        if !self.crls.is_empty() {
            builder = builder.with_crls(self.crls.clone()).only_check_end_entity_revocation();
        }
        let webpki = builder.build().map_err(TlsError::Verifier)?;
        let verifier = Arc::new(role::RoleServerVerifier { inner: webpki, allowed: Role::PEERS });
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
    let mut endpoint = quinn::Endpoint::new(quinn::EndpointConfig::default(), Some(server), socket, runtime)
        .map_err(TlsError::Endpoint)?;
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
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use tempfile::TempDir;

    const WAIT: Duration = Duration::from_secs(5);

    /// Creates a CA and issues certificates for `names`; returns the CA dir and node dirs.
    fn pki(names: &[&str]) -> (TempDir, Vec<PathBuf>) {
        let tmp = TempDir::new().unwrap();
        let ca = tmp.path().join("ca");
        init_ca(&ca).unwrap();
        let nodes = names
            .iter()
            .map(|name| {
                let out = tmp.path().join(name);
                issue(&ca, name, Role::Agent, &out).unwrap();
                out
            })
            .collect();
        (tmp, nodes)
    }

    fn bind(dir: &Path) -> quinn::Endpoint {
        let identity = TlsIdentity::load(dir).unwrap();
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        endpoint(socket, &identity).unwrap()
    }

    /// Accepts connections forever; each bi stream gets its data echoed back reversed.
    fn serve(endpoint: quinn::Endpoint) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                tokio::spawn(async move {
                    let Ok(conn) = incoming.await else { return };
                    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                        let Ok(mut data) = recv.read_to_end(1 << 20).await else {
                            return;
                        };
                        data.reverse();
                        if send.write_all(&data).await.is_err() {
                            return;
                        }
                        let _ = send.finish();
                    }
                });
            }
        })
    }

    async fn round_trip(client: &quinn::Endpoint, addr: SocketAddr) -> anyhow::Result<Vec<u8>> {
        let conn = client.connect(addr, PEER_SERVER_NAME)?.await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(b"hello shoal").await?;
        send.finish()?;
        let reply = recv.read_to_end(1 << 20).await?;
        conn.close(0u32.into(), b"done");
        Ok(reply)
    }

    fn local_addr(endpoint: &quinn::Endpoint) -> SocketAddr {
        endpoint.local_addr().unwrap()
    }

    #[tokio::test]
    async fn peers_with_same_ca_exchange_bytes() {
        let (_tmp, nodes) = pki(&["node-a", "10.0.0.7"]);
        let a = bind(&nodes[0]);
        let b = bind(&nodes[1]);
        let (a_addr, b_addr) = (local_addr(&a), local_addr(&b));
        let _sa = serve(a.clone());
        let _sb = serve(b.clone());

        let reply = tokio::time::timeout(WAIT, round_trip(&a, b_addr))
            .await
            .expect("a -> b timed out")
            .expect("a -> b failed");
        assert_eq!(reply, b"laohs olleh");
        let reply = tokio::time::timeout(WAIT, round_trip(&b, a_addr))
            .await
            .expect("b -> a timed out")
            .expect("b -> a failed");
        assert_eq!(reply, b"laohs olleh");
    }

    #[tokio::test]
    async fn server_rejects_client_from_foreign_ca() {
        let (_tmp, nodes) = pki(&["server"]);
        let (_tmp2, foreign) = pki(&["intruder"]);
        let server = bind(&nodes[0]);
        let addr = local_addr(&server);
        let _s = serve(server);

        // The intruder trusts the cluster CA (so its own verification passes) but presents a
        // certificate from another CA.
        let intruder = TlsIdentity::load(&foreign[0]).unwrap();
        let cluster = TlsIdentity::load(&nodes[0]).unwrap();
        let identity = TlsIdentity { ca: cluster.ca.clone(), ..intruder };
        let client = endpoint(UdpSocket::bind("127.0.0.1:0").unwrap(), &identity).unwrap();

        let result = tokio::time::timeout(WAIT, round_trip(&client, addr))
            .await
            .expect("rejection should be prompt, not a timeout");
        assert!(result.is_err(), "foreign client was accepted: {result:?}");
    }

    #[tokio::test]
    async fn client_rejects_server_from_foreign_ca() {
        let (_tmp, nodes) = pki(&["client"]);
        let (_tmp2, foreign) = pki(&["impostor"]);
        // The impostor trusts the cluster CA (so it would accept the client) but presents a
        // certificate from another CA.
        let impostor = TlsIdentity::load(&foreign[0]).unwrap();
        let cluster = TlsIdentity::load(&nodes[0]).unwrap();
        let identity = TlsIdentity { ca: cluster.ca.clone(), ..impostor };
        let server = endpoint(UdpSocket::bind("127.0.0.1:0").unwrap(), &identity).unwrap();
        let addr = local_addr(&server);
        let _s = serve(server);

        let client = bind(&nodes[0]);
        let result = tokio::time::timeout(WAIT, round_trip(&client, addr))
            .await
            .expect("rejection should be prompt, not a timeout");
        assert!(result.is_err(), "foreign server was accepted: {result:?}");
    }

    #[test]
    fn issue_rejects_bad_names_and_init_ca_refuses_overwrite() {
        let tmp = TempDir::new().unwrap();
        let ca = tmp.path().join("ca");
        init_ca(&ca).unwrap();
        let key_before = fs::read(ca.join(CA_KEY_FILE)).unwrap();

        let err = init_ca(&ca).unwrap_err();
        assert!(matches!(err, TlsError::AlreadyExists { .. }), "{err}");
        assert_eq!(fs::read(ca.join(CA_KEY_FILE)).unwrap(), key_before);

        let long = "a".repeat(254);
        for bad in ["", "bad name", "node_1", "../etc", "nöde", long.as_str()] {
            let out = tmp.path().join("out");
            let err = issue(&ca, bad, Role::Agent, &out).unwrap_err();
            assert!(matches!(err, TlsError::InvalidName { .. }), "{bad:?}: {err}");
            assert!(!out.join(KEY_FILE).exists());
        }

        // Valid names, including an IP and one that is not a valid DNS name, work.
        for good in ["node-1.example", "192.168.1.10", "a".repeat(253).as_str()] {
            let out = tmp.path().join("good");
            issue(&ca, good, Role::Origin, &out).unwrap();
            TlsIdentity::load(&out).unwrap().server_config().unwrap();
        }

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: PathBuf| fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(ca.join(CA_KEY_FILE)), 0o600);
            assert_eq!(mode(tmp.path().join("good").join(KEY_FILE)), 0o600);
        }

        let err = TlsIdentity::load(&tmp.path().join("missing")).unwrap_err();
        assert!(matches!(err, TlsError::Io { .. }), "{err}");
        assert!(err.to_string().contains("missing"), "{err}");
    }

    /// A CA with one node of each `(name, role)`; returns the CA dir and node dirs.
    fn pki_roles(nodes: &[(&str, Role)]) -> (TempDir, PathBuf, Vec<PathBuf>) {
        let tmp = TempDir::new().unwrap();
        let ca = tmp.path().join("ca");
        init_ca(&ca).unwrap();
        let dirs = nodes
            .iter()
            .map(|(name, role)| {
                let out = tmp.path().join(name);
                issue(&ca, name, *role, &out).unwrap();
                out
            })
            .collect();
        (tmp, ca, dirs)
    }

    async fn try_round_trip(client: &quinn::Endpoint, addr: SocketAddr) -> anyhow::Result<Vec<u8>> {
        tokio::time::timeout(WAIT, round_trip(client, addr))
            .await
            .map_err(|_| anyhow::anyhow!("timed out"))?
    }

    #[tokio::test]
    async fn roles_are_carried_and_checked_on_both_sides() {
        let (_tmp, _ca, dirs) =
            pki_roles(&[("origin-1", Role::Origin), ("agent-1", Role::Agent), ("tracker-1", Role::Tracker)]);
        let identities: Vec<TlsIdentity> = dirs.iter().map(|d| TlsIdentity::load(d).unwrap()).collect();
        assert_eq!(
            identities.iter().map(TlsIdentity::role).collect::<Vec<_>>(),
            [Role::Origin, Role::Agent, Role::Tracker]
        );
        assert!(
            identities[1].require_role(Role::Origin).is_err(),
            "an agent certificate cannot run an origin"
        );

        let (origin, agent, tracker) = (bind(&dirs[0]), bind(&dirs[1]), bind(&dirs[2]));
        let _s = serve(origin.clone());
        let _t = serve(tracker.clone());
        // Agent and origin are peers: the agent reaches the origin and sees its role.
        assert_eq!(try_round_trip(&agent, local_addr(&origin)).await.unwrap(), b"laohs olleh");
        let conn = agent.connect(local_addr(&origin), PEER_SERVER_NAME).unwrap().await.unwrap();
        assert_eq!(peer_role(&conn), Some(Role::Origin));
        // A tracker certificate is no peer: refused as a client and as a server.
        assert!(try_round_trip(&tracker, local_addr(&origin)).await.is_err(), "tracker fetched pieces");
        assert!(
            try_round_trip(&agent, local_addr(&tracker)).await.is_err(),
            "agent trusted a tracker as a peer"
        );
    }

    #[tokio::test]
    async fn a_certificate_without_a_role_is_refused() {
        // A node certificate from before roles existed: same CA, no role SAN.
        let (_tmp, ca, dirs) = pki_roles(&[("origin-1", Role::Origin)]);
        let legacy = _tmp.path().join("legacy");
        let ca_pem = fs::read_to_string(ca.join(CA_CERT_FILE)).unwrap();
        let ca_key = rcgen::KeyPair::from_pem(&fs::read_to_string(ca.join(CA_KEY_FILE)).unwrap()).unwrap();
        let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
        let mut params = rcgen::CertificateParams::new(vec![PEER_SERVER_NAME.to_string()]).unwrap();
        params.extended_key_usages =
            vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        fs::create_dir_all(&legacy).unwrap();
        fs::write(legacy.join(CA_CERT_FILE), &ca_pem).unwrap();
        fs::write(legacy.join(CERT_FILE), cert.pem()).unwrap();
        fs::write(legacy.join(KEY_FILE), key.serialize_pem()).unwrap();
        assert!(matches!(TlsIdentity::load(&legacy), Err(TlsError::NoRole { .. })));

        // Even forced into a client, the server refuses it.
        let origin = bind(&dirs[0]);
        let _s = serve(origin.clone());
        let good = TlsIdentity::load(&dirs[0]).unwrap();
        let chain = load_certs(&legacy.join(CERT_FILE)).unwrap();
        let key = PrivateKeyDer::from_pem_slice(&fs::read(legacy.join(KEY_FILE)).unwrap()).unwrap();
        let forged = TlsIdentity { chain, key: Arc::new(key), ..good };
        let client = endpoint(UdpSocket::bind("127.0.0.1:0").unwrap(), &forged).unwrap();
        assert!(
            try_round_trip(&client, local_addr(&origin)).await.is_err(),
            "a role-less certificate was accepted"
        );
    }

    #[tokio::test]
    async fn a_revoked_certificate_is_refused_once_the_crl_is_reloaded() {
        let (_tmp, ca, dirs) =
            pki_roles(&[("origin-1", Role::Origin), ("agent-1", Role::Agent), ("agent-2", Role::Agent)]);
        let origin = bind(&dirs[0]);
        let client_tls =
            reload::ClientTls::new(TlsIdentity::load(&dirs[0]).unwrap().client_config().unwrap());
        let shutdown = tokio_util::sync::CancellationToken::new();
        let _watch = tokio::spawn(reload::watch(
            dirs[0].clone(),
            origin.clone(),
            client_tls,
            Duration::from_millis(100),
            shutdown.clone(),
        ));
        let _s = serve(origin.clone());
        let (agent1, agent2) = (bind(&dirs[1]), bind(&dirs[2]));
        assert!(try_round_trip(&agent2, local_addr(&origin)).await.is_ok());

        assert!(matches!(revoke(&ca, RevokeTarget::Name("nobody")), Err(TlsError::NotIssued(_))));
        assert_eq!(revoke(&ca, RevokeTarget::Name("agent-2")).unwrap(), 1);
        assert_eq!(revoke(&ca, RevokeTarget::Name("agent-2")).unwrap(), 0, "already revoked");
        // The operator hands the new list to the origin; it reloads it without a restart.
        fs::copy(ca.join(CRL_FILE), dirs[0].join(CRL_FILE)).unwrap();
        let deadline = std::time::Instant::now() + WAIT;
        while try_round_trip(&agent2, local_addr(&origin)).await.is_ok() {
            assert!(std::time::Instant::now() < deadline, "revoked agent still accepted");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(try_round_trip(&agent1, local_addr(&origin)).await.is_ok(), "others still get in");
        // Certificates issued after a revocation carry the list.
        issue(&ca, "agent-3", Role::Agent, &_tmp.path().join("agent-3")).unwrap();
        assert!(_tmp.path().join("agent-3").join(CRL_FILE).exists());
        shutdown.cancel();
    }

    #[tokio::test]
    async fn a_reissued_certificate_is_served_without_a_restart() {
        let (_tmp, ca, dirs) = pki_roles(&[("origin-1", Role::Origin), ("agent-1", Role::Agent)]);
        let origin = bind(&dirs[0]);
        let client_tls =
            reload::ClientTls::new(TlsIdentity::load(&dirs[0]).unwrap().client_config().unwrap());
        let shutdown = tokio_util::sync::CancellationToken::new();
        let _watch = tokio::spawn(reload::watch(
            dirs[0].clone(),
            origin.clone(),
            client_tls,
            Duration::from_millis(100),
            shutdown.clone(),
        ));
        let _s = serve(origin.clone());
        let agent = bind(&dirs[1]);
        let served = || async {
            let conn = agent.connect(local_addr(&origin), PEER_SERVER_NAME).unwrap().await.unwrap();
            let chain = conn.peer_identity().unwrap().downcast::<Vec<CertificateDer<'static>>>().unwrap();
            conn.close(0u32.into(), b"done");
            chain[0].clone()
        };
        let before = served().await;
        // Rotation: a new certificate for the same node, valid one day.
        issue_with(&ca, "origin-1", Role::Origin, Duration::from_secs(86400), &dirs[0]).unwrap();
        let rotated = load_certs(&dirs[0].join(CERT_FILE)).unwrap().remove(0);
        assert_ne!(before, rotated);
        let deadline = std::time::Instant::now() + WAIT;
        while served().await != rotated {
            assert!(std::time::Instant::now() < deadline, "the new certificate was not picked up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let left = TlsIdentity::load(&dirs[0]).unwrap().expires_at().unwrap()
            - std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        assert!((86_000..=86_400).contains(&left), "{left}");
        shutdown.cancel();
    }
}
