//! In-process cluster tests: pulls through agents, single-flight downloads, peer-to-peer
//! transfer without the origin, ranges, and a foreign-CA agent.

use std::time::{Duration, Instant};

use shoal_tests::cluster::{fetch_blob, image_pieces, pull_image, Cluster, ClusterOptions};

const MIB: usize = 1 << 20;
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

async fn get_json(client: &reqwest::Client, url: &str) -> serde_json::Value {
    client.get(url).send().await.expect(url).json().await.expect("json body")
}

fn header(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_then_pull_through_agent() {
    let cluster = Cluster::start(ClusterOptions { agents: 1, piece_length: 256 << 10, ..Default::default() })
        .await
        .expect("cluster");
    let image = cluster.push_image("app/web:v1", &[3 * MIB + 123, 1000, 0], 1).await.expect("push");
    let agent = &cluster.agents[0];

    let pulled = pull_image(&cluster.client, &agent.registry_url, "app/web", "v1").await.expect("pull");
    assert_eq!(pulled.manifest_digest, image.manifest);
    assert_eq!(pulled.media_type, OCI_MANIFEST);
    let mut want = vec![(image.config.clone(), pulled.blobs[0].1)];
    want.extend(image.layers.iter().cloned());
    assert_eq!(pulled.blobs, want);

    // Headers of the manifest, by tag and by digest, GET and HEAD; containerd's mirror
    // requests add `?ns=<upstream registry>`.
    let by_tag_with_ns = "v1?ns=registry.example.com".to_string();
    for reference in ["v1", image.manifest.as_str(), by_tag_with_ns.as_str()] {
        for head in [false, true] {
            let url = format!("{}/v2/app/web/manifests/{reference}", agent.registry_url);
            let req = if head { cluster.client.head(&url) } else { cluster.client.get(&url) };
            let resp = req.header("Accept", OCI_MANIFEST).send().await.expect("manifest");
            assert_eq!(resp.status(), 200, "{url}");
            assert_eq!(header(&resp, "content-type").as_deref(), Some(OCI_MANIFEST));
            assert_eq!(header(&resp, "docker-content-digest").as_deref(), Some(image.manifest.as_str()));
            let len = image.manifest_bytes.len().to_string();
            assert_eq!(header(&resp, "content-length").as_deref(), Some(len.as_str()), "{url} head={head}");
            if !head {
                assert_eq!(resp.bytes().await.expect("body").as_ref(), image.manifest_bytes.as_slice());
            }
        }
    }

    // Tag listing, on the origin and through the agent (tracker -> origins), with pagination.
    cluster.push_image("app/web:v2", &[1000], 9).await.expect("push v2");
    for base in [&cluster.origin_url, &agent.registry_url] {
        let list = get_json(&cluster.client, &format!("{base}/v2/app/web/tags/list")).await;
        assert_eq!(list, serde_json::json!({"name": "app/web", "tags": ["v1", "v2"]}), "{base}");
        let page = get_json(&cluster.client, &format!("{base}/v2/app/web/tags/list?n=1&last=v1")).await;
        assert_eq!(page["tags"], serde_json::json!(["v2"]), "{base}");
        let missing = cluster.client.get(format!("{base}/v2/app/none/tags/list")).send().await.expect("tags");
        assert_eq!(missing.status(), 404, "{base}");
        let bad = cluster.client.get(format!("{base}/v2/app/web/tags/list?n=x")).send().await.expect("tags");
        assert_eq!(bad.status(), 400, "{base}");
    }

    // Blob headers, GET and HEAD.
    let (layer, size) = &image.layers[0];
    for head in [false, true] {
        let url = format!("{}/v2/app/web/blobs/{layer}", agent.registry_url);
        let req = if head { cluster.client.head(&url) } else { cluster.client.get(&url) };
        let resp = req.send().await.expect("blob");
        assert_eq!(resp.status(), 200);
        assert_eq!(header(&resp, "docker-content-digest").as_deref(), Some(layer.as_str()));
        assert_eq!(header(&resp, "content-length"), Some(size.to_string()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cold_pulls_download_each_piece_once() {
    let piece_length = 128 << 10;
    let cluster = Cluster::start(ClusterOptions { agents: 1, piece_length, ..Default::default() })
        .await
        .expect("cluster");
    let image =
        cluster.push_image("app/big:v1", &[4 * MIB + 7, 3 * MIB, 2 * MIB + 1], 2).await.expect("push");
    let expected = image_pieces(&image, piece_length).expect("pieces");
    assert!(expected > 70, "want many pieces, have {expected}");
    assert_eq!(cluster.origin_counter("shoal_peer_pieces_served_total").await.expect("metrics"), 0);

    let registry = cluster.agents[0].registry_url.clone();
    let pulls: Vec<_> = (0..8)
        .map(|_| {
            let (client, registry) = (cluster.client.clone(), registry.clone());
            tokio::spawn(async move { pull_image(&client, &registry, "app/big", "v1").await })
        })
        .collect();
    for pull in pulls {
        let pulled = pull.await.expect("join").expect("pull");
        assert_eq!(pulled.manifest_digest, image.manifest);
        let layers: Vec<_> = pulled.blobs[1..].to_vec();
        assert_eq!(layers, image.layers);
    }
    let served = cluster.origin_counter("shoal_peer_pieces_served_total").await.expect("metrics");
    assert_eq!(served, expected, "every piece must be fetched from the origin exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_agent_pulls_from_first_without_origin() {
    let piece_length = 256 << 10;
    let mut cluster = Cluster::start(ClusterOptions { agents: 2, piece_length, ..Default::default() })
        .await
        .expect("cluster");
    let image = cluster.push_image("app/p2p:v1", &[2 * MIB + 5, 700_000], 3).await.expect("push");
    let first =
        pull_image(&cluster.client, &cluster.agents[0].registry_url, "app/p2p", "v1").await.expect("pull");
    let served = cluster.origin_counter("shoal_peer_pieces_served_total").await.expect("metrics");
    assert_eq!(served, image_pieces(&image, piece_length).expect("pieces"));

    cluster.stop_origin().await;
    assert!(cluster.client.get(format!("{}/healthz", cluster.origin_url)).send().await.is_err());

    // Tags resolve at the origin, so without it the second agent pulls by digest.
    let started = Instant::now();
    let second = pull_image(&cluster.client, &cluster.agents[1].registry_url, "app/p2p", &image.manifest)
        .await
        .expect("pull from the first agent");
    assert_eq!(second, first);
    assert!(started.elapsed() < Duration::from_secs(45), "took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_get_from_agent() {
    let cluster = Cluster::start(ClusterOptions { agents: 1, piece_length: 64 << 10, ..Default::default() })
        .await
        .expect("cluster");
    let image = cluster.push_image("app/range:v1", &[MIB + 3], 4).await.expect("push");
    let (layer, size) = image.layers[0].clone();
    let agent = &cluster.agents[0];
    // The whole blob, to compare against.
    let url = format!("{}/v2/app/range/blobs/{layer}", agent.registry_url);
    let full = cluster.client.get(&url).send().await.expect("get").bytes().await.expect("body");
    assert_eq!(full.len() as u64, size);

    let cases: [(String, u64, u64); 3] = [
        ("bytes=100-199".into(), 100, 199),
        (format!("bytes={}-", size - 10), size - 10, size - 1),
        ("bytes=-512".into(), size - 512, size - 1),
    ];
    for (range, start, end) in cases {
        let resp = cluster.client.get(&url).header("Range", &range).send().await.expect("range get");
        assert_eq!(resp.status(), 206, "{range}");
        assert_eq!(header(&resp, "content-range"), Some(format!("bytes {start}-{end}/{size}")), "{range}");
        assert_eq!(header(&resp, "content-length"), Some((end - start + 1).to_string()), "{range}");
        let body = resp.bytes().await.expect("body");
        assert_eq!(body.as_ref(), &full[start as usize..=end as usize], "{range}");
    }
    // A cold agent answers a range too (the download happens first).
    let mut cluster = cluster;
    let idx = cluster.start_extra_agent(None).await.expect("agent");
    let url = format!("{}/v2/app/range/blobs/{layer}", cluster.agents[idx].registry_url);
    let resp = cluster.client.get(&url).header("Range", "bytes=0-9").send().await.expect("range get");
    assert_eq!(resp.status(), 206);
    assert_eq!(resp.bytes().await.expect("body").as_ref(), &full[..10]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_from_foreign_ca_gets_nothing() {
    let progress_timeout = 5;
    let mut cluster = Cluster::start(ClusterOptions {
        agents: 1,
        piece_length: 64 << 10,
        progress_timeout,
        ..Default::default()
    })
    .await
    .expect("cluster");
    let image = cluster.push_image("app/secret:v1", &[300_000], 5).await.expect("push");
    // Agent 0 holds the image too, so both the origin and a peer are offered to the intruder.
    pull_image(&cluster.client, &cluster.agents[0].registry_url, "app/secret", "v1").await.expect("pull");
    let served_before = cluster.origin_counter("shoal_peer_pieces_served_total").await.expect("metrics");

    let foreign = cluster.dir().join("foreign");
    shoal_shared::tls::init_ca(&foreign.join("ca")).expect("foreign ca");
    shoal_shared::tls::issue(
        &foreign.join("ca"),
        "intruder",
        shoal_shared::tls::Role::Agent,
        &foreign.join("tls"),
    )
    .expect("issue");
    let idx = cluster.start_extra_agent(Some(foreign.join("tls"))).await.expect("intruder agent");
    let intruder = &cluster.agents[idx];

    let (layer, _) = &image.layers[0];
    let url = format!("{}/v2/app/secret/blobs/{layer}", intruder.registry_url);
    let started = Instant::now();
    let resp = cluster.client.get(&url).send().await.expect("request ends");
    let elapsed = started.elapsed();
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    assert!(status.is_server_error() && status != 500, "{status}: {body}");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("BLOB_UNKNOWN"), "{body}");
    assert!(
        elapsed < Duration::from_secs(progress_timeout + 5),
        "request took {elapsed:?}, progress timeout is {progress_timeout}s"
    );
    let served_after = cluster.origin_counter("shoal_peer_pieces_served_total").await.expect("metrics");
    assert_eq!(served_after, served_before, "the origin served pieces to a foreign-CA agent");

    // The cluster's own agents are unaffected.
    fetch_blob(&cluster.client, &cluster.agents[0].registry_url, "app/secret", layer, None)
        .await
        .expect("agent 0 still serves");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_announces_the_blobs_it_serves_and_the_tracker_lists_them() {
    let cluster = Cluster::start(ClusterOptions::default()).await.expect("cluster");
    let image = cluster.push_image("app/seen:v1", &[100_000], 5).await.expect("push");
    let (layer, _) = &image.layers[0];
    let peers_url = format!("{}/shoal/v1/peers/{layer}", cluster.tracker_url);
    let listed = |body: &serde_json::Value, addr: &str| {
        body["peers"]
            .as_array()
            .is_some_and(|peers| peers.iter().any(|p| p["addr"] == addr && p["complete"] == true))
    };
    let origin_peer = cluster.origin_peer.to_string();
    let before: serde_json::Value =
        cluster.client.get(&peers_url).send().await.expect("peers").json().await.expect("json");
    assert!(!listed(&before, &origin_peer), "nothing fetched yet: {before}");
    assert_eq!(before["origins"], serde_json::json!([origin_peer]), "{before}");

    pull_image(&cluster.client, &cluster.agents[0].registry_url, "app/seen", "v1").await.expect("pull");
    let agent_peer = cluster.agents[0].peer_addr.to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let body: serde_json::Value =
            cluster.client.get(&peers_url).send().await.expect("peers").json().await.expect("json");
        if listed(&body, &origin_peer) && listed(&body, &agent_peer) {
            break;
        }
        assert!(Instant::now() < deadline, "origin or agent never announced: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let bad = cluster.client.get(format!("{}/shoal/v1/peers/sha256:zz", cluster.tracker_url)).send().await;
    assert_eq!(bad.expect("bad").status(), 400);
}
