//! In-process swarm: several agents pulling the same blob at once share it among
//! themselves, so the origin serves little more than one copy.

use shoal_tests::cluster::{fetch_blob, pieces, scrape_counter, Cluster, ClusterOptions};

const MIB: usize = 1 << 20;
const SERVED: &str = "shoal_peer_pieces_served_total";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn six_agents_pull_one_blob_as_a_swarm() {
    let piece_length = 64 << 10;
    let cluster = Cluster::start(ClusterOptions { agents: 6, piece_length, ..Default::default() })
        .await
        .expect("cluster");
    let size = 24 * MIB + 3;
    let image = cluster.push_image("app/swarm:v1", &[size], 21).await.expect("push");
    let (layer, layer_size) = image.layers[0].clone();
    let blob_pieces = pieces(layer_size, piece_length);
    assert_eq!(cluster.origin_counter(SERVED).await.expect("metrics"), 0);

    let pulls: Vec<_> = cluster
        .agents
        .iter()
        .map(|agent| {
            let (client, url, layer) = (cluster.client.clone(), agent.registry_url.clone(), layer.clone());
            tokio::spawn(
                async move { fetch_blob(&client, &url, "app/swarm", &layer, Some(layer_size)).await },
            )
        })
        .collect();
    for pull in pulls {
        // fetch_blob checks the sha256 of every byte received.
        assert_eq!(pull.await.expect("join").expect("pull"), layer_size);
    }

    let origin = cluster.origin_counter(SERVED).await.expect("metrics");
    let mut between_agents = Vec::new();
    for agent in &cluster.agents {
        let url = format!("{}/metrics", agent.registry_url);
        between_agents.push(scrape_counter(&cluster.client, &url, SERVED).await.expect("agent metrics"));
    }
    let shared: u64 = between_agents.iter().sum();
    eprintln!("pieces {blob_pieces}; origin served {origin}; agents served {between_agents:?}");
    assert!(origin >= blob_pieces, "the origin is the only first source");
    // Without sharing the origin would serve 6 copies. The goal is 1.2x; on a loaded
    // 2-core machine, where all seven nodes share the cores, this measured 1.5x to 3.2x with
    // earlier agents, 1.0x to 1.15x now (also with both cores otherwise busy).
    assert!(
        origin * 2 <= blob_pieces * 9,
        "origin served {origin} pieces of a {blob_pieces}-piece blob to 6 agents (> 4.5x)"
    );
    // Conservation: the six copies came from the origin or from agents.
    assert!(
        shared >= 5 * blob_pieces - (origin - blob_pieces),
        "agents served each other: {between_agents:?}"
    );
    // Sharing: at least half of the six copies went from agent to agent, so the origin
    // served at most 3x (with room for a loaded machine over today's figures).
    assert!(
        shared >= 3 * blob_pieces && origin <= 3 * blob_pieces,
        "origin served {origin} pieces ({:.2}x), agents {shared} ({:.2}x): too little sharing",
        origin as f64 / blob_pieces as f64,
        shared as f64 / blob_pieces as f64
    );
    assert!(between_agents.iter().filter(|&&n| n > 0).count() >= 3, "served by many: {between_agents:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_announce_records_every_blob_and_answers_the_downloading_ones() {
    let cluster = Cluster::start(ClusterOptions { agents: 0, ..Default::default() }).await.expect("cluster");
    let url = format!("{}/shoal/v1/announce/batch", cluster.tracker_url);
    let seeded = format!("sha256:{}", "a".repeat(64));
    let wanted = format!("sha256:{}", "b".repeat(64));
    let batch = serde_json::json!({
        "peer": "127.0.0.1:4000",
        "blobs": [{"digest": seeded, "complete": true}, {"digest": wanted, "complete": false}],
    });
    let resp = cluster.client.post(&url).json(&batch).send().await.expect("batch");
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(body["swarms"].as_array().map(Vec::len), Some(1), "{body}");
    assert_eq!(body["swarms"][0]["digest"], serde_json::json!(wanted));
    // Another peer downloading the seeded blob is told about the first.
    let other = serde_json::json!({
        "peer": "127.0.0.1:4001",
        "blobs": [{"digest": seeded, "complete": false}],
    });
    let body: serde_json::Value =
        cluster.client.post(&url).json(&other).send().await.expect("batch").json().await.expect("json");
    let peers = &body["swarms"][0]["peers"];
    assert_eq!(peers[0]["addr"], "127.0.0.1:4000", "{body}");
    assert_eq!(peers[0]["complete"], true);

    // Bounds and garbage are 400s.
    let too_many: Vec<_> = (0..65)
        .map(|i| serde_json::json!({"digest": format!("sha256:{i:064x}"), "complete": false}))
        .collect();
    let over = serde_json::json!({"peer": "127.0.0.1:4000", "blobs": too_many});
    assert_eq!(cluster.client.post(&url).json(&over).send().await.expect("batch").status(), 400);
    let bad =
        serde_json::json!({"peer": "127.0.0.1:4000", "blobs": [{"digest": "sha256:zz", "complete": true}]});
    assert_eq!(cluster.client.post(&url).json(&bad).send().await.expect("batch").status(), 400);
}
