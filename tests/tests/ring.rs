//! A cluster with no single point of failure: three origins on a ring (two owners per blob)
//! and two trackers, with an owner and a tracker killed under the pulls; membership the
//! origins disagree about; upstream fills that reach every owner; copies handed off after
//! the grace; trackers that find the origins by a DNS name; members and trackers that call
//! each other on the origins' internal listeners (mutual TLS).

use std::time::{Duration, Instant};

use shoal_tests::cluster::{parse_counter, pull_image};
use shoal_tests::registry::Registry;
use shoal_tests::ring_cluster::{RingCluster, RingOptions, TOKEN};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pulls_survive_an_owner_and_a_tracker_dying_and_repair_restores_two_copies() {
    let mut c = RingCluster::start(RingOptions::default()).await.expect("cluster");
    let image = c.push_image(0, "team/app:v1", &[3 << 20, 5 << 20], 7).await.expect("push");
    let mut blobs: Vec<String> = image.layers.iter().map(|l| l.0.clone()).collect();
    blobs.push(image.config.clone());
    blobs.push(image.manifest.clone());
    // Every blob is on its two owners before the push was answered (and on the origin it
    // was pushed through).
    for b in &blobs {
        assert!(c.holders(b).len() >= 2, "{b} on {:?}", c.holders(b));
    }

    // Kill the other owner of a blob that origin 0 owns (so one copy is left and the repair
    // has work to do), and a tracker. Owners follow the members' random ports: if origin 0
    // owns none of these blobs (about 1 run in 80), push more until it owns one.
    for seed in 8..12 {
        if blobs.iter().any(|b| c.holders(b).len() == 2) {
            break;
        }
        let more = c.push_image(0, &format!("team/more:v{seed}"), &[1 << 20], seed).await.expect("push");
        blobs.extend(more.layers.iter().map(|l| l.0.clone()));
        blobs.push(more.config.clone());
        blobs.push(more.manifest.clone());
    }
    let lonely = blobs.iter().find(|b| c.holders(b).len() == 2).expect("a blob origin 0 owns");
    let victim = *c.holders(lonely).iter().find(|&&i| i != 0).expect("an owner besides origin 0");
    c.stop_origin(victim).await;
    c.stop_tracker(0).await;

    let started = Instant::now();
    let pulls = c.agents.iter().map(|a| {
        let (client, url) = (c.client.clone(), a.registry_url.clone());
        tokio::spawn(async move { pull_image(&client, &url, "team/app", "v1").await })
    });
    for pull in futures_util::future::join_all(pulls).await {
        let pulled = pull.expect("join").expect("every pull completes with the right digests");
        assert_eq!(pulled.manifest_digest, image.manifest);
    }
    eprintln!("3 pulls with an owner and a tracker down: {:?}", started.elapsed());

    // Repair: every blob is back on two live origins.
    let live = |c: &RingCluster, b: &str| c.holders(b).into_iter().filter(|&i| i != victim).count();
    let deadline = Instant::now() + Duration::from_secs(60);
    while blobs.iter().any(|b| live(&c, b) < 2) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for b in &blobs {
        assert!(live(&c, b) >= 2, "{b} has {} live copies after repair", live(&c, b));
    }
    let mut repaired = 0;
    for (i, o) in c.origins.iter().enumerate().filter(|(i, _)| *i != victim) {
        let text = c
            .client
            .get(format!("{}/metrics", o.url))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        repaired += parse_counter(&text, "shoal_origin_cluster_repaired_total");
        assert!(text.contains("shoal_origin_cluster_repair_backlog"), "origin {i}: {text}");
    }
    assert!(repaired > 0, "the repair pass copied nothing");

    // The dead owner comes back: pulls still work and its copies count again.
    c.restart_origin(victim).await.expect("restart");
    let agent = c.agents[0].registry_url.clone();
    pull_image(&c.client, &agent, "team/app", "v1").await.expect("pull after the owner is back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn origins_that_disagree_about_membership_never_loop() {
    // Origin 0 lists both; origin 1 lists only itself.
    let options = RingOptions {
        origins: 2,
        trackers: 1,
        agents: 1,
        membership: Some(vec![vec![0, 1], vec![1]]),
        ..Default::default()
    };
    let c = RingCluster::start(options).await.expect("cluster");
    // Pushed through origin 1: it keeps it (it knows no other member).
    let image = c.push_image(1, "solo/app:v1", &[1 << 20], 3).await.expect("push");
    let layer = image.layers[0].0.clone();
    assert_eq!(c.holders(&layer), vec![1]);

    // Origin 0 does not hold it and forwards once to the owner that does.
    let url = format!("{}/v2/solo/app/blobs/{layer}", c.origins[0].url);
    let resp = c.client.get(&url).send().await.expect("GET");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.expect("body").len() as u64, image.layers[0].1);

    // A blob nobody holds: a prompt 404 from either, never a loop.
    let unknown = format!("sha256:{}", "ab".repeat(32));
    for o in &c.origins {
        let started = Instant::now();
        let resp = c.client.get(format!("{}/v2/solo/app/blobs/{unknown}", o.url)).send().await.expect("GET");
        assert_eq!(resp.status(), 404);
        assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
        let resp = c.client.get(format!("{}/v2/solo/app/manifests/nope", o.url)).send().await.expect("GET");
        assert_eq!(resp.status(), 404);
    }
    // A request that already hopped is answered from local state only.
    let resp = c.client.get(&url).header("X-Shoal-Hop", "http://elsewhere").send().await.expect("GET");
    assert_eq!(resp.status(), 404, "a hopped request is not forwarded again");
    // And the agent pulls it through the tracker from whichever origin holds it.
    pull_image(&c.client, &c.agents[0].registry_url, "solo/app", "v1").await.expect("pull");
}

async fn metrics(c: &RingCluster, i: usize) -> String {
    let url = format!("{}/metrics", c.origins[i].url);
    c.client.get(url).send().await.expect("metrics").text().await.expect("text")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prefetched_blobs_reach_every_owner_and_copies_no_longer_owned_are_handed_off() {
    let registry = Registry::start(None).await.expect("registry");
    let image = registry.push_image("team/pf:v1", &[1 << 20, 2 << 20, 512 << 10], 23).await.expect("push");
    let options = RingOptions {
        trackers: 1,
        agents: 1,
        handoff_grace: Duration::from_secs(1),
        upstream: Some(registry.url()),
        ..Default::default()
    };
    let c = RingCluster::start(options).await.expect("cluster");
    let mut blobs: Vec<String> = image.layers.iter().map(|l| l.0.clone()).collect();
    blobs.push(image.config.clone());
    blobs.push(image.manifest.clone());

    // Prefetched through an origin that does not own the first layer (each blob has two
    // owners of three).
    let via = (0..3).find(|o| !c.owners(&blobs[0]).contains(o)).expect("a non-owner");
    let tag = format!("{}/team/pf:v1", registry.host);
    let resp = c
        .client
        .post(format!("{}/proxy/v1/registry/prefetch", c.origins[via].url))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({"tag": tag, "trace_id": "ring"}))
        .send()
        .await
        .expect("prefetch");
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(body["prefetched"], true, "{body}");

    // Every owner receives each fill as it lands, not at the next repair pass: the copies
    // are counted as replication (the repair counts its own).
    let deadline = Instant::now() + Duration::from_secs(20);
    let on_owners = |c: &RingCluster, b: &String| c.owners(b).iter().all(|o| c.holders(b).contains(o));
    while !blobs.iter().all(|b| on_owners(&c, b)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for b in &blobs {
        assert!(on_owners(&c, b), "{b}: owners {:?}, holders {:?}", c.owners(b), c.holders(b));
    }
    let replicated = parse_counter(&metrics(&c, via).await, "shoal_origin_cluster_replicated_total");
    assert!(replicated > 0, "fills were not replicated by the origin that fetched them");

    // After the grace, that origin drops what it does not own; the owners keep it, and the
    // copy on the owners is still a pulled-through one (subject to the retention).
    let deadline = Instant::now() + Duration::from_secs(40);
    let exact = |c: &RingCluster, b: &String| c.holders(b) == c.owners(b);
    while !blobs.iter().all(|b| exact(&c, b)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for b in &blobs {
        assert_eq!(c.holders(b), c.owners(b), "{b}: copies beyond the owners after the grace");
        for o in c.owners(b) {
            let mark = c.origins[o].data.join("pulled").join(b.trim_start_matches("sha256:"));
            assert!(mark.exists(), "{b} on origin {o} is not marked pulled through");
        }
    }
    let handed = parse_counter(&metrics(&c, via).await, "shoal_origin_cluster_handed_off_total");
    assert!(handed > 0, "the fetching origin dropped nothing");

    // And the image pulls through an agent.
    pull_image(&c.client, &c.agents[0].registry_url, "team/pf", "v1").await.expect("pull");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn trackers_find_origins_by_dns_name() {
    // One origin, reached by the trackers only through `dns:localhost:PORT` (every address
    // of the name; ::1 may be among them and answers nothing: the next one is asked).
    let options = RingOptions {
        origins: 1,
        trackers: 1,
        agents: 1,
        replicas: 1,
        tracker_origins: Some("dns:localhost:{port}".into()),
        ..Default::default()
    };
    let c = RingCluster::start(options).await.expect("cluster");
    let image = c.push_image(0, "dns/app:v1", &[1 << 20], 5).await.expect("push");
    let pulled = pull_image(&c.client, &c.agents[0].registry_url, "dns/app", "v1").await.expect("pull");
    assert_eq!(pulled.manifest_digest, image.manifest);
}

/// A referrer pushed through one origin is listed by every member (the owners of the
/// repository got the PUT; the others ask them) and through an agent; deleting it on the
/// origin it was pushed through removes it, and its content, from every member.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn referrers_and_deletions_reach_every_member() {
    use sha2::{Digest as _, Sha256};
    let digest_of = |b: &[u8]| format!("sha256:{}", hex::encode(Sha256::digest(b)));
    // Over the internal listeners: the manifest PUTs, the referrers lookups and the
    // deletions between members carry certificates, not the token.
    let options = RingOptions { agents: 1, internal: true, ..Default::default() };
    let c = RingCluster::start(options).await.expect("cluster");
    let image = c.push_image(0, "team/app:v1", &[100_000], 5).await.expect("push");
    let origin = c.origins[0].url.clone();
    for blob in [&b"{}"[..], b"a signature"] {
        let url = format!("{origin}/v2/team/app/blobs/uploads/?digest={}", digest_of(blob));
        let resp = c.client.post(url).bearer_auth(TOKEN).body(blob.to_vec()).send().await.expect("blob");
        assert_eq!(resp.status(), 201);
    }
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/vnd.example.sig",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": digest_of(b"{}"), "size": 2},
        "layers": [{"mediaType": "application/octet-stream", "digest": digest_of(b"a signature"), "size": 11}],
        "subject": {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": image.manifest, "size": 1},
    }))
    .expect("json");
    let referrer = digest_of(&manifest);
    let resp = c
        .client
        .put(format!("{origin}/v2/team/app/manifests/{referrer}"))
        .bearer_auth(TOKEN)
        .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest)
        .send()
        .await
        .expect("put");
    assert_eq!(resp.status(), 201);
    assert_eq!(
        resp.headers().get("OCI-Subject").and_then(|v| v.to_str().ok()),
        Some(image.manifest.as_str())
    );

    let listed = |base: String| {
        let (client, url) = (c.client.clone(), format!("{base}/v2/team/app/referrers/{}", image.manifest));
        async move {
            let resp = client.get(&url).send().await.expect("referrers");
            assert_eq!(resp.status(), 200, "{url}");
            let index: serde_json::Value = resp.json().await.expect("index");
            index["manifests"].as_array().cloned().unwrap_or_default()
        }
    };
    let mut bases: Vec<String> = c.origins.iter().map(|o| o.url.clone()).collect();
    bases.push(c.agents[0].registry_url.clone());
    for base in &bases {
        let found = listed(base.clone()).await;
        assert_eq!(found.len(), 1, "{base}: {found:?}");
        assert_eq!(found[0]["digest"], referrer.as_str());
    }

    let resp = c
        .client
        .delete(format!("{origin}/v2/team/app/manifests/{referrer}"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("delete");
    assert_eq!(resp.status(), 202);
    assert!(c.holders(&referrer).is_empty(), "deleted on every member: {:?}", c.holders(&referrer));
    for base in &bases {
        assert!(listed(base.clone()).await.is_empty(), "{base}");
    }
}

/// Ring members named by their internal listeners (`https://`, `--internal`): a push lands
/// on every owner (copies made with the member's certificate; no token is sent there, so a
/// listener that wanted one would refuse them), a read of a blob an origin does not hold is
/// forwarded to an owner, and agents pull through trackers that ask the origins there with
/// tracker certificates.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn members_and_trackers_call_the_internal_listeners() {
    let options = RingOptions { agents: 2, internal: true, ..Default::default() };
    let c = RingCluster::start(options).await.expect("cluster");
    assert!(c.origins.iter().all(|o| o.member.starts_with("https://")));
    let image = c.push_image(0, "secure/app:v1", &[2 << 20, 300_000], 11).await.expect("push");
    let mut blobs: Vec<String> = image.layers.iter().map(|l| l.0.clone()).collect();
    blobs.push(image.config.clone());
    blobs.push(image.manifest.clone());
    for b in &blobs {
        assert!(c.holders(b).len() >= 2, "{b} replicated to {:?} only", c.holders(b));
    }
    // The origin that holds none of a blob forwards its read to an owner.
    let (blob, stranger) = blobs
        .iter()
        .find_map(|b| (0..c.origins.len()).find(|i| !c.holders(b).contains(i)).map(|i| (b.clone(), i)))
        .expect("a blob some origin does not hold");
    let url = format!("{}/v2/secure/app/blobs/{blob}", c.origins[stranger].url);
    let resp = c.client.get(&url).send().await.expect("GET");
    assert_eq!(resp.status(), 200, "{url}");
    let body = resp.bytes().await.expect("body");
    use sha2::{Digest as _, Sha256};
    assert_eq!(format!("sha256:{}", hex::encode(Sha256::digest(&body))), blob);
    assert!(parse_counter(&metrics(&c, stranger).await, "shoal_origin_cluster_forwarded_total") >= 1);
    for a in &c.agents {
        let pulled = pull_image(&c.client, &a.registry_url, "secure/app", "v1").await.expect("pull");
        assert_eq!(pulled.manifest_digest, image.manifest);
    }
}
