//! Certificates with roles on a running cluster: a peer the tracker lists as an origin must
//! prove it with an origin's certificate.

use std::net::SocketAddr;
use std::time::Duration;

use actix_web::{web, App, HttpResponse, HttpServer};
use shoal_shared::store::BlobStore;
use shoal_tests::cluster::{Cluster, ClusterOptions};

/// An origin's HTTP face that answers metainfo lookups with `metainfo` (JSON) but gives
/// `peer` as its QUIC address: what an attacker who can answer for an origin would do.
fn lying_origin(metainfo: Vec<u8>, peer: SocketAddr) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            let server = HttpServer::new(move || {
                let metainfo = metainfo.clone();
                App::new()
                    .route(
                        "/shoal/v1/info",
                        web::get().to(move || async move {
                            HttpResponse::Ok()
                                .json(serde_json::json!({ "peer": peer, "piece_length": 65536 }))
                        }),
                    )
                    .route(
                        "/shoal/v1/metainfo/{digest}",
                        web::get().to(move || {
                            let metainfo = metainfo.clone();
                            async move { HttpResponse::Ok().content_type("application/json").body(metainfo) }
                        }),
                    )
            })
            .workers(1)
            .disable_signals()
            .bind(("127.0.0.1", 0))
            .expect("bind");
            tx.send(server.addrs()[0]).expect("send addr");
            server.run().await
        })
    });
    format!("http://{}", rx.recv().expect("lying origin address"))
}

/// Before roles, any cluster certificate could stand in for an origin: a peer listed as one
/// got the origin's treatment and was fetched from. Now an agent's certificate listed as an
/// origin is refused, and not a byte is taken from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_certificate_cannot_pose_as_an_origin() {
    let mut c = Cluster::start(ClusterOptions {
        agents: 0,
        piece_length: 64 << 10,
        progress_timeout: 4,
        ..Default::default()
    })
    .await
    .expect("cluster");
    let image = c.push_image("app/pose:v1", &[512 << 10], 3).await.expect("push");
    let (layer, _) = image.layers[0].clone();

    // The impostor holds the real bytes, so only the role check stops it being used.
    let copy = c.dir().join("impostor-data");
    for sub in ["blobs", "meta"] {
        std::fs::create_dir_all(copy.join(sub)).expect("mkdir");
        for entry in std::fs::read_dir(c.dir().join("origin/data").join(sub)).expect("origin data") {
            let entry = entry.expect("entry");
            std::fs::copy(entry.path(), copy.join(sub).join(entry.file_name())).expect("copy");
        }
    }
    let store = BlobStore::open(&copy).expect("store");
    let digest: shoal_shared::digest::Digest = layer.parse().expect("digest");
    let metainfo = store.metainfo(&digest, 64 << 10).await.expect("metainfo").expect("held");
    let seeder = shoal_origin::seeder::Seeder::new(store, 64 << 10);
    let impostor = c.start_rogue_peer("impostor", seeder, Vec::new()).await.expect("impostor");
    assert_eq!(
        shoal_shared::tls::TlsIdentity::load(&c.dir().join("rogue-impostor")).expect("tls").role(),
        shoal_shared::tls::Role::Agent
    );
    // The real origin is never asked (so never announces itself): only the impostor can serve.
    let lying = lying_origin(serde_json::to_vec(&metainfo).expect("json"), impostor.addr);
    c.restart_tracker_with(Duration::ZERO, vec![lying]).await.expect("tracker");
    let agent = c.start_extra_agent(None).await.expect("agent");

    let url = format!("{}/v2/app/pose/blobs/{layer}", c.agents[agent].registry_url);
    let resp = c.client.get(&url).send().await.expect("get");
    let status = resp.status();
    let body = resp.bytes().await;
    assert!(
        !status.is_success() || body.is_err(),
        "the blob came from a peer posing as an origin ({status})"
    );
    let served = impostor.stats.bytes_served.get();
    assert_eq!(served, 0, "the impostor served {served} piece bytes");
}

/// Serves nothing: the revocation tests need connections, not pieces.
struct Empty;

impl shoal_shared::peer::PieceSource for Empty {
    async fn bitfield(
        &self,
        _digest: shoal_shared::digest::Digest,
    ) -> Option<shoal_shared::bitfield::Bitfield> {
        None
    }
    async fn piece(&self, _digest: shoal_shared::digest::Digest, _index: u32) -> Option<bytes::Bytes> {
        None
    }
}

/// A QUIC node on loopback with the certificate in `dir`: a peer server and a peer client
/// whose connections are recorded, and the TLS directory reloaded every 100 ms.
struct Node {
    addr: SocketAddr,
    client: shoal_shared::peer::PeerClient,
    _stop: tokio_util::sync::DropGuard,
}

fn node(dir: &std::path::Path, role: shoal_shared::tls::Role) -> Node {
    use shoal_shared::tls::{self, live::LiveConnections, reload};
    let identity = tls::TlsIdentity::load(dir).expect("identity");
    let endpoint =
        tls::endpoint(std::net::UdpSocket::bind("127.0.0.1:0").expect("udp"), &identity).expect("endpoint");
    let addr = endpoint.local_addr().expect("addr");
    let client_tls = reload::ClientTls::new(identity.client_config().expect("client config"));
    let live = LiveConnections::default();
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(shoal_shared::peer::serve(
        endpoint.clone(),
        std::sync::Arc::new(Empty),
        Default::default(),
        shoal_shared::peer::UploadLimits { budget: 1 << 20, queue: 4 },
        live.clone(),
        stop.clone(),
    ));
    tokio::spawn(reload::watch(
        dir.to_path_buf(),
        role,
        endpoint.clone(),
        client_tls.clone(),
        live.clone(),
        Duration::from_millis(100),
        stop.clone(),
    ));
    let client =
        shoal_shared::peer::PeerClient::new(endpoint).with_client_tls(client_tls).with_live_connections(live);
    Node { addr, client, _stop: stop.drop_guard() }
}

/// How the connection ended, waiting at most a few reloads for it.
async fn closed_within(conn: &quinn::Connection, wait: Duration) -> Option<quinn::ConnectionError> {
    tokio::time::timeout(wait, conn.closed()).await.ok()
}

/// Revoking a certificate reaches the connections already open with it, on both ends: the
/// seeder closes the open connection of an agent whose certificate the new CRL lists, and
/// an agent's connection pool closes its connection to a seeder whose certificate it lists.
/// Other connections stay. (Before, established connections kept their handshake's checks
/// and ran on until idle for 30 s or a restart.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_closes_the_revoked_peers_open_connections() {
    use shoal_shared::tls::{self, live::NO_LONGER_TRUSTED, RevokeTarget, Role, CRL_FILE};
    let tmp = tempfile::TempDir::new().expect("tmp");
    let ca = tmp.path().join("ca");
    tls::init_ca(&ca).expect("ca");
    let issue = |name: &str, role: Role| {
        let dir = tmp.path().join(name);
        tls::issue(&ca, name, role, &dir).expect("issue");
        dir
    };
    let (seeder_dir, stolen_dir, honest_dir) =
        (issue("seeder", Role::Origin), issue("stolen", Role::Agent), issue("honest", Role::Agent));
    let seeder = node(&seeder_dir, Role::Origin);
    let stolen = node(&stolen_dir, Role::Agent);
    let honest = node(&honest_dir, Role::Agent);
    let stolen_conn = stolen.client.connection(seeder.addr).await.expect("stolen connects");
    let honest_conn = honest.client.connection(seeder.addr).await.expect("honest connects");
    // Both stay up across a quiet spell (keep-alives every 5 s; idle timeout 30 s).
    assert!(closed_within(&stolen_conn, Duration::from_millis(500)).await.is_none());

    // The seeder is handed a CRL listing the stolen agent: its open connection is closed.
    tls::revoke(&ca, RevokeTarget::Name("stolen")).expect("revoke");
    std::fs::copy(ca.join(CRL_FILE), seeder_dir.join(CRL_FILE)).expect("hand out crl.pem");
    match closed_within(&stolen_conn, Duration::from_secs(5)).await {
        Some(quinn::ConnectionError::ApplicationClosed(close)) => {
            assert_eq!(close.error_code, quinn::VarInt::from_u32(NO_LONGER_TRUSTED))
        }
        other => panic!("the revoked agent's connection was not closed by the seeder: {other:?}"),
    }
    assert!(honest_conn.close_reason().is_none(), "an honest agent's connection was closed");
    // Nor can it come back: a new handshake is refused (in TLS 1.3 the client may count
    // its side done before the server has checked its certificate; the server then closes).
    if let Ok(again) = stolen.client.connection(seeder.addr).await {
        match closed_within(&again, Duration::from_secs(2)).await {
            Some(quinn::ConnectionError::ConnectionClosed(close)) => {
                assert!(format!("{close:?}").to_lowercase().contains("revoked"), "{close:?}")
            }
            other => panic!("the revoked agent reconnected: {other:?}"),
        }
    }

    // The other direction: the seeder's certificate is revoked and the honest agent gets
    // the list; its pool closes the connection it holds to the seeder.
    tls::revoke(&ca, RevokeTarget::Name("seeder")).expect("revoke seeder");
    std::fs::copy(ca.join(CRL_FILE), honest_dir.join(CRL_FILE)).expect("hand out crl.pem");
    match closed_within(&honest_conn, Duration::from_secs(5)).await {
        Some(quinn::ConnectionError::LocallyClosed) => {}
        other => panic!("the agent kept its connection to a revoked seeder: {other:?}"),
    }
    // And it does not dial the revoked seeder again.
    assert!(honest.client.connection(seeder.addr).await.is_err(), "a revoked seeder was dialled");
}
