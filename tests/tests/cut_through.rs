//! Cut-through: an agent passes a piece on while it is still receiving it. Agent B pulls
//! slowly (its ingress is limited); agent C, pulling the same blob at full speed, is declined
//! by the origin for the pieces it has just sent to B (first copies first) and takes them
//! from B, whose relay sends each block as soon as it has passed there.

use std::time::Duration;

use shoal_tests::cluster::{fetch_blob, scrape_counter, AgentOptions, Cluster, ClusterOptions};

const MIB: usize = 1 << 20;
const RELAYED: &str = "shoal_peer_pieces_relayed_total";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_piece_moves_on_from_an_agent_before_that_agent_holds_it_whole() {
    let piece_length = 512 << 10;
    let mut c = Cluster::start(ClusterOptions {
        agents: 0,
        piece_length,
        progress_timeout: 60,
        ..Default::default()
    })
    .await
    .expect("cluster");
    let image = c.push_image("relay/chain:v1", &[32 * MIB], 31).await.expect("push");
    let (layer, size) = image.layers[0].clone();
    // B: 4 MiB/s in, so each of the pieces it has in flight takes about a second: slower
    // than C, yet fast enough to be offered before it is whole (within 4 s).
    let b =
        c.start_agent(AgentOptions { ingress_limit: 4 * MIB as u64, ..Default::default() }).await.expect("b");
    let cc = c.start_agent(AgentOptions::default()).await.expect("c");
    let (client, url, digest) = (c.client.clone(), c.agents[b].registry_url.clone(), layer.clone());
    let slow =
        tokio::spawn(async move { fetch_blob(&client, &url, "relay/chain", &digest, Some(size)).await });
    // B has pieces on the way (and offers them) before C starts.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let fast = fetch_blob(&c.client, &c.agents[cc].registry_url, "relay/chain", &layer, Some(size)).await;
    // fetch_blob checks the sha256 of every byte received.
    assert_eq!(fast.expect("C's pull"), size);
    assert_eq!(slow.await.expect("join").expect("B's pull"), size);
    let relayed = scrape_counter(&c.client, &format!("{}/metrics", c.agents[b].registry_url), RELAYED)
        .await
        .expect("B's metrics");
    eprintln!("B relayed {relayed} pieces to C before holding them");
    assert!(relayed >= 1, "no piece moved on from B before B held it whole");
}
