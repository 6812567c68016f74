//! Cluster PKI and QUIC/TLS configuration for peer-to-peer transfers.
//!
//! Every Shoal cluster has its own private certificate authority. `init_ca` creates it once
//! (`ca.pem` + `ca.key`), and `issue` mints a leaf certificate for each node, signed by that CA
//! (`ca.pem`, `cert.pem`, `key.pem` in the node's TLS directory).
//!
//! Peers talk QUIC with mutual TLS: the server demands a client certificate that chains to the
//! cluster CA, and the client only trusts servers whose certificate chains to the cluster CA
//! (the public web PKI is never consulted). Since peers are usually addressed by IP, clients
//! always connect with the fixed SNI [`PEER_SERVER_NAME`], which every issued certificate
//! carries as a DNS subject alternative name.
//!
//! All rustls configuration uses the `ring` provider explicitly, so nothing depends on (or panics
//! for lack of) a process-wide default crypto provider.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use quinn::crypto::rustls::{NoInitialCipherSuite, QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

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

/// Approximate certificate validity, in years.
const VALIDITY_YEARS: i32 = 10;
/// Maximum length of a node name (the maximum length of a DNS name).
const MAX_NAME_LEN: usize = 253;

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
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> TlsError + '_ {
    move |source| TlsError::Io { path: path.to_path_buf(), source }
}

/// Writes `contents` to `path`. Private files are created with mode 0600 (on Unix), and
/// `create_new` makes the write fail if the file already exists.
fn write_file(path: &Path, contents: &str, private: bool, create_new: bool) -> Result<(), TlsError> {
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

fn read_string(path: &Path) -> Result<String, TlsError> {
    fs::read_to_string(path).map_err(io_err(path))
}

fn create_dir(dir: &Path) -> Result<(), TlsError> {
    fs::create_dir_all(dir).map_err(io_err(dir))
}

/// Sets a validity window of roughly [`VALIDITY_YEARS`] years starting at the beginning of the
/// previous year (tolerates clock skew between nodes).
fn set_validity(params: &mut CertificateParams) {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    // Average Gregorian year length; exactness does not matter here.
    let year = 1970 + i32::try_from(secs / 31_556_952).unwrap_or(0);
    params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + VALIDITY_YEARS, 1, 1);
}

fn validate_name(name: &str) -> Result<(), TlsError> {
    let reason = if name.is_empty() {
        "name is empty"
    } else if name.len() > MAX_NAME_LEN {
        "name is longer than 253 characters"
    } else if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-') {
        "name may only contain ASCII letters, digits, '.' and '-'"
    } else {
        return Ok(());
    };
    Err(TlsError::InvalidName { name: name.to_string(), reason })
}

/// Creates a new cluster CA in `dir`: writes `dir/ca.pem` (certificate) and `dir/ca.key`
/// (private key, mode 0600). Creates `dir` if needed. Refuses to overwrite an existing `ca.key`.
pub fn init_ca(dir: &Path) -> Result<(), TlsError> {
    create_dir(dir)?;
    let key_path = dir.join(CA_KEY_FILE);
    if key_path.exists() {
        return Err(TlsError::AlreadyExists { path: key_path });
    }

    let key = KeyPair::generate().map_err(TlsError::Generate)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Shoal");
    dn.push(DnType::CommonName, "Shoal cluster CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    set_validity(&mut params);
    let cert = params.self_signed(&key).map_err(TlsError::Generate)?;

    // Key first, with create_new, so a concurrent init cannot clobber an existing CA.
    write_file(&key_path, &key.serialize_pem(), true, true).map_err(|e| match e {
        TlsError::Io { path, source } if source.kind() == io::ErrorKind::AlreadyExists => {
            TlsError::AlreadyExists { path }
        }
        e => e,
    })?;
    write_file(&dir.join(CA_CERT_FILE), &cert.pem(), false, false)?;
    tracing::info!(dir = %dir.display(), "created cluster CA");
    Ok(())
}

/// Issues a node certificate signed by the CA in `ca_dir`, writing `out/ca.pem` (copy of the CA
/// certificate), `out/cert.pem` and `out/key.pem` (mode 0600). Creates `out` if needed and
/// overwrites previous node files.
///
/// Subject alternative names: `name` (as an IP SAN if it is an IP address, as a DNS SAN if it is
/// a valid DNS name, omitted otherwise), [`PEER_SERVER_NAME`], `localhost` and `127.0.0.1`.
/// The certificate is valid for both TLS server and client authentication for about ten years.
///
/// `name` must be non-empty, at most 253 characters, and consist of `[A-Za-z0-9.-]`.
pub fn issue(ca_dir: &Path, name: &str, out: &Path) -> Result<(), TlsError> {
    validate_name(name)?;

    let ca_cert_path = ca_dir.join(CA_CERT_FILE);
    let ca_key_path = ca_dir.join(CA_KEY_FILE);
    let ca_cert_pem = read_string(&ca_cert_path)?;
    let ca_key_pem = read_string(&ca_key_path)?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)
        .map_err(|source| TlsError::CaLoad { path: ca_key_path.clone(), source })?;
    let issuer = Issuer::from_ca_cert_pem(&ca_cert_pem, ca_key)
        .map_err(|source| TlsError::CaLoad { path: ca_cert_path.clone(), source })?;

    let mut sans: Vec<SanType> = Vec::new();
    let mut push = |san: SanType| {
        if !sans.contains(&san) {
            sans.push(san);
        }
    };
    let dns = |s: &str| -> Result<SanType, TlsError> {
        Ok(SanType::DnsName(s.try_into().map_err(TlsError::Generate)?))
    };
    match ServerName::try_from(name) {
        Ok(ServerName::IpAddress(ip)) => push(SanType::IpAddress(IpAddr::from(ip))),
        Ok(ServerName::DnsName(_)) => push(dns(name)?),
        Ok(_) | Err(_) => {
            tracing::debug!(name, "node name is not a valid DNS name; no SAN added for it")
        }
    }
    push(dns(PEER_SERVER_NAME)?);
    push(dns("localhost")?);
    push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));

    let mut params = CertificateParams::default();
    params.subject_alt_names = sans;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Shoal");
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages =
        vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params);

    let key = KeyPair::generate().map_err(TlsError::Generate)?;
    let cert = params.signed_by(&key, &issuer).map_err(TlsError::Generate)?;

    create_dir(out)?;
    write_file(&out.join(CA_CERT_FILE), &ca_cert_pem, false, false)?;
    write_file(&out.join(KEY_FILE), &key.serialize_pem(), true, false)?;
    write_file(&out.join(CERT_FILE), &cert.pem(), false, false)?;
    tracing::info!(name, out = %out.display(), "issued node certificate");
    Ok(())
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

/// A node's TLS identity: the cluster CA certificate(s), its own certificate chain and key.
#[derive(Clone, Debug)]
pub struct TlsIdentity {
    ca: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
}

impl TlsIdentity {
    /// Loads `dir/ca.pem`, `dir/cert.pem` and `dir/key.pem` (as written by [`issue`]).
    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        let ca = load_certs(&dir.join(CA_CERT_FILE))?;
        let chain = load_certs(&dir.join(CERT_FILE))?;
        let key_path = dir.join(KEY_FILE);
        // Read separately so a missing file reports as an I/O error with its path.
        let key_pem = fs::read(&key_path).map_err(io_err(&key_path))?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|source| TlsError::Pem { path: key_path, source })?;
        Ok(Self { ca, chain, key: Arc::new(key) })
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, TlsError> {
        let mut roots = RootCertStore::empty();
        for cert in &self.ca {
            roots.add(cert.clone()).map_err(TlsError::TrustAnchor)?;
        }
        Ok(Arc::new(roots))
    }

    /// QUIC server configuration: presents this node's certificate and requires a client
    /// certificate chaining to the cluster CA (mutual TLS). ALPN `shoal/1`.
    pub fn server_config(&self) -> Result<quinn::ServerConfig, TlsError> {
        let provider = provider();
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots()?, provider.clone())
            .build()
            .map_err(TlsError::Verifier)?;
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

    /// QUIC client configuration: trusts only servers chaining to the cluster CA and presents
    /// this node's certificate. ALPN `shoal/1`. Connect with [`PEER_SERVER_NAME`] as server name.
    pub fn client_config(&self) -> Result<quinn::ClientConfig, TlsError> {
        let provider = provider();
        let verifier = WebPkiServerVerifier::builder_with_provider(self.roots()?, provider.clone())
            .build()
            .map_err(TlsError::Verifier)?;
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Config)?
            .with_webpki_verifier(verifier)
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
                issue(&ca, name, &out).unwrap();
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
            let err = issue(&ca, bad, &out).unwrap_err();
            assert!(matches!(err, TlsError::InvalidName { .. }), "{bad:?}: {err}");
            assert!(!out.join(KEY_FILE).exists());
        }

        // Valid names, including an IP and one that is not a valid DNS name, work.
        for good in ["node-1.example", "192.168.1.10", "a".repeat(253).as_str()] {
            let out = tmp.path().join("good");
            issue(&ca, good, &out).unwrap();
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
}
