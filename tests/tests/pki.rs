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
