//! The origin's upload token: writes need it, reads do not, and the push CLI sends it.

use shoal_tests::cluster::{pull_image, Cluster, ClusterOptions};

const TOKEN: &str = "s3cret-upload-token";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_need_the_token_and_pulls_do_not() {
    let cluster = Cluster::start(ClusterOptions { upload_token: Some(TOKEN.into()), ..Default::default() })
        .await
        .expect("cluster");
    let origin = &cluster.origin_url;
    let digest = format!("sha256:{}", hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b"blob")));
    let upload = format!("{origin}/v2/app/x/blobs/uploads/?digest={digest}");

    for auth in [None, Some("Bearer wrong-token"), Some("Bearer s3cret-upload-toke"), Some(TOKEN)] {
        let mut req = cluster.client.post(&upload).body("blob");
        if let Some(auth) = auth {
            req = req.header("Authorization", auth);
        }
        let resp = req.send().await.expect("post");
        assert_eq!(resp.status(), 401, "{auth:?}");
        assert!(resp.headers().contains_key("www-authenticate"));
        let body: serde_json::Value = resp.json().await.expect("json");
        assert_eq!(body["errors"][0]["code"], "UNAUTHORIZED");
    }
    let head = cluster.client.head(format!("{origin}/v2/app/x/blobs/{digest}")).send().await.expect("head");
    assert_eq!(head.status(), 404, "nothing was stored");

    let ok = cluster
        .client
        .post(&upload)
        .header("Authorization", format!("Bearer {TOKEN}"))
        .body("blob")
        .send()
        .await
        .expect("post");
    assert_eq!(ok.status(), 201);

    // The push CLI sends the token; pulls through an agent need none.
    let image = cluster.push_image("app/web:v1", &[4096], 3).await.expect("push with token");
    let agent = &cluster.agents[0].registry_url;
    let pulled = pull_image(&cluster.client, agent, "app/web", "v1").await.expect("pull");
    assert_eq!(pulled.manifest_digest, image.manifest);
    // Without the token the push CLI is refused with the origin's answer.
    let layout = tempfile::tempdir().expect("tmp");
    shoal_tests::image::generate_oci_layout(layout.path(), "v2", &[2048], 4).expect("layout");
    let source =
        shoal_origin::push::Source::Oci { dir: layout.path().to_path_buf(), reference: Some("v2".into()) };
    let refused =
        shoal_origin::push::push(origin, &source, "app/web:v2", shoal_origin::push::Progress::Quiet)
            .await
            .expect_err("push without the token");
    assert!(format!("{refused:#}").contains("401"), "{refused:#}");
    let tag = cluster.client.get(format!("{origin}/v2/app/web/manifests/v2")).send().await.expect("get");
    assert_eq!(tag.status(), 404, "nothing was tagged");
}

/// Prefetch fills the origin's disk from its upstreams, so it takes the token as a push does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_needs_the_token() {
    let cluster =
        Cluster::start(ClusterOptions { agents: 0, upload_token: Some(TOKEN.into()), ..Default::default() })
            .await
            .expect("cluster");
    let body = serde_json::json!({ "tag": "registry.example/app/web:v1" });
    for version in ["v1", "v2"] {
        let url = format!("{}/proxy/{version}/registry/prefetch", cluster.origin_url);
        let refused = cluster.client.post(&url).json(&body).send().await.expect("prefetch");
        assert_eq!(refused.status(), 401, "{version} without the token");
        let with_token = cluster
            .client
            .post(&url)
            .header("Authorization", format!("Bearer {TOKEN}"))
            .json(&body)
            .send()
            .await
            .expect("prefetch");
        // Past the token check: no upstream serves that registry here.
        assert_eq!(with_token.status(), 404, "{version} with the token");
    }
}

/// An origin reachable beyond loopback without a token would let anyone write: it refuses
/// to start unless told `--allow-anonymous-writes`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_origin_beyond_loopback_refuses_to_start() {
    let dir = tempfile::tempdir().expect("tmp");
    shoal_shared::tls::init_ca(&dir.path().join("ca")).expect("ca");
    shoal_shared::tls::issue(
        &dir.path().join("ca"),
        "origin",
        shoal_shared::tls::Role::Origin,
        &dir.path().join("tls"),
    )
    .expect("cert");
    let start = |allow: bool| {
        let mut config = shoal_origin::Config::new(dir.path().join("data"), dir.path().join("tls"));
        config.allow_anonymous_writes = allow;
        let listeners = shoal_origin::Listeners {
            http: std::net::TcpListener::bind("0.0.0.0:0").expect("bind"),
            peer: std::net::UdpSocket::bind("127.0.0.1:0").expect("bind"),
            internal: None,
        };
        let shutdown = tokio_util::sync::CancellationToken::new();
        (tokio::spawn(shoal_origin::run(config, listeners, shutdown.clone())), shutdown)
    };
    let (refused, _) = start(false);
    let err = refused.await.expect("join").expect_err("must refuse");
    assert!(matches!(err, shoal_origin::OriginError::AnonymousWrites(_)), "{err}");
    assert!(err.to_string().contains("--allow-anonymous-writes"), "{err}");

    let (allowed, shutdown) = start(true);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(!allowed.is_finished(), "started with --allow-anonymous-writes");
    shutdown.cancel();
    allowed.await.expect("join").expect("clean stop");
}
