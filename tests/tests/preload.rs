//! Agent-side preload (`POST /shoal/v1/preload`): an image pulled into one agent's cache
//! ahead of a rollout, platform selection in an index, and the bad requests.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use shoal_tests::cluster::{Cluster, ClusterOptions};

const MIB: usize = 1 << 20;

fn cached(data_dir: &Path, digest: &str) -> bool {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    data_dir.join("blobs").join(hex).is_file()
}

async fn preload(cluster: &Cluster, body: Value) -> (u16, Value) {
    let url = format!("{}/shoal/v1/preload", cluster.agents[0].registry_url);
    let resp = cluster.client.post(&url).json(&body).send().await.expect("POST preload");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("JSON answer"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preload_caches_the_whole_image_then_serves_it_without_the_origin() {
    let mut cluster =
        Cluster::start(ClusterOptions { agents: 1, piece_length: 256 << 10, ..Default::default() })
            .await
            .expect("cluster");
    let image = cluster.push_image("team/app:v1", &[MIB + 17, 300_000], 5).await.expect("push");
    let host = cluster.origin_url.trim_start_matches("http://").to_owned();

    // A registry host in the reference (as in a rollout's image name) is accepted.
    let (status, answer) = preload(&cluster, json!({ "image": format!("{host}/team/app:v1") })).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["status"], "done");
    assert_eq!(answer["digest"], image.manifest.as_str());
    assert_eq!(answer["blobs"], 2 + image.layers.len() as u64, "{answer}");
    let data = &cluster.agents[0].data_dir;
    for digest in [&image.manifest, &image.config].into_iter().chain(image.layers.iter().map(|(d, _)| d)) {
        assert!(cached(data, digest), "{digest} not cached after preload");
    }
    let layer_bytes: u64 = image.layers.iter().map(|(_, s)| s).sum();
    assert!(answer["bytes"].as_u64().unwrap() > layer_bytes, "{answer}");

    // With the origin gone, the image still pulls by digest from this agent's cache.
    cluster.stop_origin().await;
    let pulled = shoal_tests::cluster::pull_image(
        &cluster.client,
        &cluster.agents[0].registry_url,
        "team/app",
        &image.manifest,
    )
    .await
    .expect("pull from cache");
    assert_eq!(pulled.manifest_digest, image.manifest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_preload_and_platform_selection_in_an_index() {
    let cluster = Cluster::start(ClusterOptions { agents: 1, piece_length: 256 << 10, ..Default::default() })
        .await
        .expect("cluster");
    let amd = cluster.push_image("multi/app:amd64", &[400_000], 1).await.expect("push amd64");
    let arm = cluster.push_image("multi/app:arm64", &[500_000, 70_000], 2).await.expect("push arm64");
    let entry = |image: &shoal_tests::image::GeneratedImage, arch: &str| {
        json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": image.manifest,
            "size": image.manifest_bytes.len(),
            "platform": { "os": "linux", "architecture": arch },
        })
    };
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [entry(&amd, "amd64"), entry(&arm, "arm64")],
    }))
    .unwrap();
    let resp = cluster
        .client
        .put(format!("{}/v2/multi/app/manifests/v1", cluster.origin_url))
        .header("Content-Type", "application/vnd.oci.image.index.v1+json")
        .body(index)
        .send()
        .await
        .expect("PUT index");
    assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap_or_default());

    // In the background: 202 at once, the arm64 image's blobs arrive, the amd64 ones don't.
    let (status, answer) =
        preload(&cluster, json!({ "image": "multi/app:v1", "platform": "linux/arm64", "wait": false })).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["status"], "started");
    let data = cluster.agents[0].data_dir.clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !arm.layers.iter().all(|(d, _)| cached(&data, d)) {
        assert!(tokio::time::Instant::now() < deadline, "background preload did not finish");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(cached(&data, &arm.manifest) && cached(&data, &arm.config));
    assert!(!cached(&data, &amd.manifest) && !amd.layers.iter().any(|(d, _)| cached(&data, d)));

    // An index with no manifest for the platform asked for.
    let (status, answer) =
        preload(&cluster, json!({ "image": "multi/app:v1", "platform": "linux/s390x" })).await;
    assert_eq!(status, 404, "{answer}");
    assert_eq!(answer["status"], "failure");
    assert!(answer["error"].as_str().unwrap().contains("linux/s390x"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_preload_requests_get_clear_errors() {
    let cluster = Cluster::start(ClusterOptions::default()).await.expect("cluster");
    cluster.push_image("team/app:v1", &[1000], 3).await.expect("push");
    let url = format!("{}/shoal/v1/preload", cluster.agents[0].registry_url);
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (b"not json".to_vec(), 400, "bad body"),
        (br#"{"image": 7}"#.to_vec(), 400, "bad body"),
        (br#"{"image": "team/app:v1", "extra": 1}"#.to_vec(), 400, "unknown field"),
        (br#"{"image": "Team/App:v1"}"#.to_vec(), 400, "invalid image reference"),
        (br#"{"image": "team/app@sha256:abc"}"#.to_vec(), 400, "invalid image reference"),
        (br#"{"image": "team/app:v1", "platform": "linux"}"#.to_vec(), 400, "invalid platform"),
        (br#"{"image": "team/app:nope"}"#.to_vec(), 404, "unknown to the cluster"),
        (br#"{"image": "no/such:v1"}"#.to_vec(), 404, "unknown to the cluster"),
        (format!(r#"{{"image": "{}"}}"#, "a".repeat(5000)).into_bytes(), 413, "body over"),
    ];
    for (body, want, text) in cases {
        let resp = cluster
            .client
            .post(&url)
            .header("Content-Type", "application/json")
            .body(body.clone())
            .send()
            .await
            .expect("POST");
        let status = resp.status().as_u16();
        let answer: Value = resp.json().await.expect("JSON error body");
        let shown = String::from_utf8_lossy(&body);
        assert_eq!(status, want, "{shown}: {answer}");
        assert_eq!(answer["status"], "failure", "{shown}");
        assert!(answer["error"].as_str().unwrap().contains(text), "{shown}: {answer}");
    }
    // GET is not a preload.
    let resp = cluster.client.get(&url).send().await.expect("GET");
    assert!(resp.status().is_client_error());
}
