//! The cluster PKI and the peer plane's TLS, end to end over real QUIC endpoints.

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
    tokio::time::timeout(WAIT, round_trip(client, addr)).await.map_err(|_| anyhow::anyhow!("timed out"))?
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
    assert!(identities[1].require_role(Role::Origin).is_err(), "an agent certificate cannot run an origin");

    let (origin, agent, tracker) = (bind(&dirs[0]), bind(&dirs[1]), bind(&dirs[2]));
    let _s = serve(origin.clone());
    let _t = serve(tracker.clone());
    // Agent and origin are peers: the agent reaches the origin and sees its role.
    assert_eq!(try_round_trip(&agent, local_addr(&origin)).await.unwrap(), b"laohs olleh");
    let conn = agent.connect(local_addr(&origin), PEER_SERVER_NAME).unwrap().await.unwrap();
    assert_eq!(peer_role(&conn), Some(Role::Origin));
    // A tracker certificate is no peer: refused as a client and as a server.
    assert!(try_round_trip(&tracker, local_addr(&origin)).await.is_err(), "tracker fetched pieces");
    assert!(try_round_trip(&agent, local_addr(&tracker)).await.is_err(), "agent trusted a tracker as a peer");
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

/// An endpoint on `dir` that reloads it every 100 ms until the token is cancelled.
fn bind_watched(dir: &Path) -> (quinn::Endpoint, tokio_util::sync::CancellationToken) {
    let endpoint = bind(dir);
    let client_tls = reload::ClientTls::new(TlsIdentity::load(dir).unwrap().client_config().unwrap());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let every = Duration::from_millis(100);
    let role = TlsIdentity::load(dir).unwrap().role();
    tokio::spawn(reload::watch(
        dir.to_path_buf(),
        role,
        endpoint.clone(),
        client_tls,
        Default::default(),
        every,
        shutdown.clone(),
    ));
    (endpoint, shutdown)
}

#[tokio::test]
async fn a_revoked_certificate_is_refused_once_the_crl_is_reloaded() {
    let (_tmp, ca, dirs) =
        pki_roles(&[("origin-1", Role::Origin), ("agent-1", Role::Agent), ("agent-2", Role::Agent)]);
    let (origin, shutdown) = bind_watched(&dirs[0]);
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
    let (origin, shutdown) = bind_watched(&dirs[0]);
    let _s = serve(origin.clone());
    let agent = bind(&dirs[1]);
    let served = || async {
        let conn = agent.connect(local_addr(&origin), PEER_SERVER_NAME).unwrap().await.unwrap();
        let chain = conn.peer_identity().unwrap().downcast::<Vec<CertificateDer<'static>>>().unwrap();
        conn.close(0u32.into(), b"done");
        chain[0].clone()
    };
    let before = served().await;
    // A certificate re-issued for the wrong role (`ca issue` without `--role`) is not taken.
    issue(&ca, "origin-1", Role::Agent, &dirs[0]).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(served().await, before, "an agent certificate was loaded into an origin");
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

#[test]
fn serials_are_compared_as_numbers() {
    let (tmp, ca, _) = pki_roles(&[("agent-1", Role::Agent)]);
    let issued = fs::read_to_string(ca.join("issued.tsv")).unwrap();
    let serial = issued.split('\t').next().unwrap().to_owned();
    // As openssl prints it: upper case, colon separated, no leading zeros.
    let printed = serial.trim_start_matches('0').to_ascii_uppercase();
    let printed: Vec<String> =
        printed.as_bytes().chunks(2).map(|c| String::from_utf8_lossy(c).into_owned()).collect();
    assert_eq!(revoke(&ca, RevokeTarget::Serial(&printed.join(":"))).unwrap(), 1);
    assert!(matches!(revoke(&ca, RevokeTarget::Serial("00ff")), Err(TlsError::NotIssued(_))));
    drop(tmp);
}
