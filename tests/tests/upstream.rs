//! Pull-through from a real upstream registry (CNCF distribution, Debian `docker-registry`),
//! with and without htpasswd auth: single flight across agents (counted in the registry's
//! access log), cached tags when the upstream is down, wrong credentials, multi-arch
//! indexes, Kraken-style prefetch, and an upstream that stalls.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use futures_util::StreamExt as _;
use serde_json::json;
use sha2::{Digest as _, Sha256};
use shoal_tests::cluster::{parse_counter, Cluster, ClusterOptions, UpstreamOptions, MANIFEST_ACCEPT};
use shoal_tests::registry::Registry;

fn options(agents: usize, upstream: UpstreamOptions) -> ClusterOptions {
    ClusterOptions { agents, piece_length: 256 << 10, upstream: Some(upstream), ..Default::default() }
}

/// GET with `?ns=` the way containerd's mirror requests do; checks the digest of the body.
async fn get_verified(
    client: &reqwest::Client,
    url: &str,
    digest: Option<&str>,
) -> anyhow::Result<(Vec<u8>, String)> {
    let resp = client
        .get(url)
        .header("Accept", MANIFEST_ACCEPT)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    let status = resp.status();
    let media_type =
        resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    if !status.is_success() {
        bail!("GET {url}: {status}: {}", resp.text().await.unwrap_or_default());
    }
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        body.extend_from_slice(&chunk?);
    }
    if let Some(d) = digest {
        let actual = format!("sha256:{}", hex::encode(Sha256::digest(&body)));
        ensure!(actual == d, "{url}: content hashes to {actual}, not {d}");
    }
    Ok((body, media_type))
}

/// Pulls `name:tag` of registry `ns` through an agent: manifest, config, layers, each
/// verified. Returns the manifest digest.
async fn pull_ns(
    client: &reqwest::Client,
    agent: &str,
    name: &str,
    reference: &str,
    ns: &str,
) -> anyhow::Result<String> {
    let url = format!("{agent}/v2/{name}/manifests/{reference}?ns={ns}");
    let (bytes, _) =
        get_verified(client, &url, reference.starts_with("sha256:").then_some(reference)).await?;
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
    let manifest: serde_json::Value = serde_json::from_slice(&bytes)?;
    let layers = manifest["layers"].as_array().context("not an image manifest")?;
    for d in std::iter::once(&manifest["config"]).chain(layers) {
        let blob = d["digest"].as_str().context("digest")?;
        get_verified(client, &format!("{agent}/v2/{name}/blobs/{blob}?ns={ns}"), Some(blob)).await?;
    }
    Ok(digest)
}

async fn status_and_body(resp: reqwest::Response) -> (u16, String) {
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_agents_cause_one_upstream_get_per_blob_and_cached_tags_survive_the_upstream() {
    let mut registry = Registry::start(None).await.expect("registry");
    let image =
        registry.push_image("team/app/web:v1", &[300 << 10, 2 << 20, 700 << 10], 11).await.expect("push");
    // TTL 0: every resolution asks the upstream, so the outage below exercises the fallback.
    let mut up = UpstreamOptions::new(&registry.url());
    up.tag_ttl = 0;
    let mut cluster = Cluster::start(options(4, up)).await.expect("cluster");
    let ns = registry.host.clone();

    let pulls = cluster.agents.iter().map(|a| {
        let (client, url, ns) = (cluster.client.clone(), a.registry_url.clone(), ns.clone());
        async move { pull_ns(&client, &url, "team/app/web", "v1", &ns).await }
    });
    for result in futures_util::future::join_all(pulls).await {
        assert_eq!(result.expect("pull through an agent"), image.manifest);
    }
    for (digest, _) in image.layers.iter().chain(std::iter::once(&(image.config.clone(), 0))) {
        assert_eq!(registry.blob_gets(digest), 1, "upstream GETs of {digest}");
        // Marked as pulled through: the retention may drop it once nobody asks for it.
        let marker = cluster.dir().join("origin/data/pulled").join(digest.trim_start_matches("sha256:"));
        assert!(marker.exists(), "{digest} not marked as pulled through");
    }
    // The origin counts what it asked of the upstream, by outcome, and the bytes it got.
    let blobs_ok = cluster.origin_counter("shoal_origin_upstream_requests_total").await.expect("metrics");
    assert!(blobs_ok >= image.layers.len() as u64 + 2, "{blobs_ok} upstream requests");
    let bytes = cluster.origin_counter("shoal_origin_upstream_bytes_total").await.expect("metrics");
    assert!(bytes >= image.layers.iter().map(|l| l.1).sum::<u64>(), "{bytes} bytes from the upstream");
    // And the agents count what origins sent them of this fresh pull-through as the
    // upstream's, never as an origin's own.
    let (mut upstream, mut origin) = (0, 0);
    for a in &cluster.agents {
        let url = format!("{}/metrics", a.registry_url);
        let text = cluster.client.get(&url).send().await.expect("metrics").text().await.expect("text");
        let delivered =
            |s: &str| parse_counter(&text, &format!("shoal_agent_delivered_bytes_total{{source=\"{s}\"}}"));
        upstream += delivered("upstream");
        origin += delivered("origin");
    }
    assert!(upstream > 0 && origin == 0, "upstream {upstream}, origin {origin}");

    registry.stop().await;
    // A fresh agent (empty cache) still pulls: the tag from the origin's cache, the blobs
    // from the origin and the other agents.
    let i = cluster.start_extra_agent(None).await.expect("agent");
    let url = cluster.agents[i].registry_url.clone();
    let digest =
        pull_ns(&cluster.client, &url, "team/app/web", "v1", &ns).await.expect("pull with upstream down");
    assert_eq!(digest, image.manifest);
    // A tag never fetched cannot be served: a clear error, quickly.
    let resp = cluster
        .client
        .get(format!("{url}/v2/team/app/web/manifests/v2?ns={ns}"))
        .send()
        .await
        .expect("request");
    let (status, body) = status_and_body(resp).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("unreachable"), "{body}");
    // An `ns` that is no upstream of this cluster, and a malformed one.
    let resp = cluster
        .client
        .get(format!("{url}/v2/team/app/web/manifests/v1?ns=ghcr.io"))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status().as_u16(), 404);
    let resp = cluster
        .client
        .get(format!("{url}/v2/team/app/web/manifests/v1?ns=a/b"))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status().as_u16(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn basic_auth_pulls_and_wrong_credentials_are_a_clear_error_with_nothing_cached() {
    let registry = Registry::start(Some(("shoal", "s3cret"))).await.expect("registry");
    let image = registry.push_image("private/app:v1", &[100 << 10, 600 << 10], 21).await.expect("push");
    let dir = tempfile::tempdir().expect("tmp");
    let write_auth = |file: &str, pass: &str| {
        use base64::Engine as _;
        let path = dir.path().join(file);
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("shoal:{pass}"));
        std::fs::write(&path, json!({"auths": {registry.host.clone(): {"auth": auth}}}).to_string())
            .expect("write");
        path
    };
    let ns = registry.host.clone();

    let mut wrong = UpstreamOptions::new(&registry.url());
    wrong.auth_file = Some(write_auth("wrong.json", "guess"));
    let cluster = Cluster::start(options(1, wrong)).await.expect("cluster");
    let agent = &cluster.agents[0].registry_url;
    let resp =
        cluster.client.get(format!("{agent}/v2/private/app/manifests/v1?ns={ns}")).send().await.expect("get");
    let (status, body) = status_and_body(resp).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("UNAUTHORIZED") && body.contains("refused the credentials"), "{status}: {body}");
    assert!(!body.contains("guess"), "credentials leaked: {body}");
    // The origin itself answers 401, and holds nothing of the image.
    let resp = cluster
        .client
        .get(format!("{}/v2/private/app/manifests/v1", cluster.origin_url))
        .send()
        .await
        .expect("get");
    assert_eq!(resp.status().as_u16(), 401);
    for (d, _) in &image.layers {
        let resp = cluster
            .client
            .get(format!("{}/v2/private/app/blobs/{d}", cluster.origin_url))
            .send()
            .await
            .expect("get");
        assert_eq!(resp.status().as_u16(), 404);
    }
    let resp = cluster
        .client
        .get(format!("{}/v2/private/app/manifests/{}", cluster.origin_url, image.manifest))
        .send()
        .await
        .expect("get");
    assert_eq!(resp.status().as_u16(), 401, "digest fetch also refused, nothing cached");
    drop(cluster);

    let mut right = UpstreamOptions::new(&registry.url());
    right.auth_file = Some(write_auth("right.json", "s3cret"));
    let cluster = Cluster::start(options(2, right)).await.expect("cluster");
    // The repository is private (the registry refuses it anonymously): agents serve it to
    // clients with credentials the registry accepts (`tests/tenant.rs`).
    let tenant = shoal_tests::cluster::basic_auth_client("shoal", "s3cret");
    for a in &cluster.agents {
        let digest = pull_ns(&tenant, &a.registry_url, "private/app", "v1", &ns).await.expect("pull");
        assert_eq!(digest, image.manifest);
    }
    for (d, _) in &image.layers {
        assert_eq!(registry.blob_gets(d), 1, "upstream GETs of {d}");
    }
}

/// The `GOARCH` name of this host's architecture.
fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_multi_arch_index_pulls_for_the_hosts_platform() {
    let mut registry = Registry::start(None).await.expect("registry");
    let (index, images) =
        registry.push_multiarch("multi/tool:1.0", &[200 << 10, 300 << 10], 31).await.expect("push");
    let cluster = Cluster::start(options(1, UpstreamOptions::new(&registry.url()))).await.expect("cluster");
    let (agent, ns) = (&cluster.agents[0].registry_url, &registry.host);
    let (bytes, media_type) = get_verified(
        &cluster.client,
        &format!("{agent}/v2/multi/tool/manifests/1.0?ns={ns}"),
        Some(&index.manifest),
    )
    .await
    .expect("index");
    assert_eq!(media_type, "application/vnd.oci.image.index.v1+json");
    let parsed: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
    let platform = parsed["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .find(|m| m["platform"]["architecture"] == host_arch() && m["platform"]["os"] == "linux")
        .expect("a manifest for this host");
    let manifest = platform["digest"].as_str().expect("digest");
    let digest = pull_ns(&cluster.client, agent, "multi/tool", manifest, ns).await.expect("platform pull");
    assert!(images.iter().any(|i| i.manifest == digest));
    // push_multiarch returns the platforms in index order: amd64, then arm64.
    let host = ["amd64", "arm64"].iter().position(|&a| a == host_arch()).expect("a platform for this host");
    assert_eq!(digest, images[host].manifest, "the {} image", host_arch());
    assert_ne!(images[0].manifest, images[1].manifest, "the platforms' images differ");
    // Every platform's manifest is reachable by digest, even with the upstream gone: the
    // origin stored them all when it fetched the index (only this host's was asked for).
    registry.stop().await;
    for image in &images {
        let url = format!("{}/v2/multi/tool/manifests/{}", cluster.origin_url, image.manifest);
        get_verified(&cluster.client, &url, Some(&image.manifest))
            .await
            .expect("platform manifest at the origin");
    }
}

async fn prefetch(
    client: &reqwest::Client,
    origin: &str,
    version: u8,
    body: &str,
) -> (u16, serde_json::Value) {
    let resp = client
        .post(format!("{origin}/proxy/v{version}/registry/prefetch"))
        .header("Content-Type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .expect("prefetch request");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("prefetch answers JSON"))
}

async fn origin_has(client: &reqwest::Client, origin: &str, name: &str, digest: &str) -> bool {
    let url = format!("{origin}/v2/{name}/blobs/{digest}");
    client.head(url).send().await.is_ok_and(|r| r.status().is_success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prefetch_v1_and_v2_good_and_bad_bodies() {
    let registry = Registry::start(None).await.expect("registry");
    let small = registry.push_image("deep/a/b/c:v1", &[100 << 10, 200 << 10], 41).await.expect("push");
    let big = registry.push_image("deep/other:v2", &[100 << 10, 3 << 20], 42).await.expect("push");
    let mut up = UpstreamOptions::new(&registry.url());
    up.prefetch_sync = true;
    up.prefetch_max_size = 2 << 20;
    let cluster = Cluster::start(options(1, up)).await.expect("cluster");
    let (client, origin, host) = (&cluster.client, cluster.origin_url.as_str(), registry.host.as_str());

    // v1, synchronous: every blob is at the origin when it answers.
    let tag = format!("{host}/deep/a/b/c:v1");
    let (status, body) =
        prefetch(client, origin, 1, &json!({"tag": tag, "trace_id": "t-1"}).to_string()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "success");
    assert_eq!(body["prefetched"], true);
    assert_eq!(body["tag"], tag.as_str());
    assert_eq!(body["trace_id"], "t-1");
    for (d, _) in &small.layers {
        assert!(origin_has(client, origin, "deep/a/b/c", d).await, "{d} prefetched");
    }
    assert!(origin_has(client, origin, "deep/a/b/c", &small.config).await);

    // v2 returns at once and fetches in the background; the 3 MiB layer is above the
    // configured maximum and skipped. Asking again is harmless.
    let tag = format!("{host}/deep/other:v2");
    let (status, body) =
        prefetch(client, origin, 2, &json!({"tag": tag, "trace_id": "t-2"}).to_string()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "success");
    // As Kraken answers: started is a success, and a success says prefetched.
    assert_eq!(body["prefetched"], true, "{body}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !origin_has(client, origin, "deep/other", &big.layers[0].0).await {
        assert!(Instant::now() < deadline, "v2 prefetch did not complete");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, body) = prefetch(client, origin, 2, &json!({"tag": tag}).to_string()).await;
    assert_eq!(status, 200, "{body}");
    // v1 is synchronous here: it answers once every blob it wants is at the origin, joining
    // the flights v2 started. Had the size filter let the 3 MiB layer through, it would be
    // fetched by now; had v2 started a second flight of a held blob, it is over.
    let (status, body) = prefetch(client, origin, 1, &json!({"tag": tag}).to_string()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["prefetched"], true, "{body}");
    assert!(body["message"].as_str().is_some_and(|m| m.contains("1 skipped by size")), "{body}");
    // The registry's access log is read in the background: give late lines a moment, and
    // check that nothing changes meanwhile.
    let quiet = Instant::now() + Duration::from_millis(1500);
    loop {
        assert_eq!(registry.blob_gets(&big.layers[0].0), 1);
        assert!(!origin_has(client, origin, "deep/other", &big.layers[1].0).await, "skipped by size");
        assert_eq!(registry.blob_gets(&big.layers[1].0), 0);
        if Instant::now() >= quiet {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Bad bodies and tags: 400 with status "failure"; unresolvable tags: an error status.
    for bad in ["not json", "{}", r#"{"tag": 5}"#, r#"{"tag": "alpine"}"#, r#"{"tag": "docker.io/Alpine:1"}"#]
    {
        for version in [1, 2] {
            let (status, body) = prefetch(client, origin, version, bad).await;
            assert_eq!(status, 400, "v{version} {bad}: {body}");
            assert_eq!(body["status"], "failure");
            assert_eq!(body["prefetched"], false);
        }
    }
    let missing = json!({"tag": format!("{host}/deep/a/b/c:nope"), "trace_id": "t-3"}).to_string();
    let (status, body) = prefetch(client, origin, 2, &missing).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["status"], "failure");
    assert_eq!(body["trace_id"], "t-3");
    assert!(body["message"].as_str().is_some_and(|m| m.contains("not found")), "{body}");
    let (status, body) = prefetch(client, origin, 1, &json!({"tag": "ghcr.io/x/y:1"}).to_string()).await;
    assert_eq!(status, 404, "{body}");
    assert!(body["message"].as_str().is_some_and(|m| m.contains("not an upstream")), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_upstream_is_a_clear_error_not_a_hang() {
    // An upstream that accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let mut up = UpstreamOptions::new(&format!("http://{addr}"));
    up.stall = 1;
    let cluster = Cluster::start(options(1, up)).await.expect("cluster");
    let started = Instant::now();
    let agent = &cluster.agents[0].registry_url;
    let resp = cluster
        .client
        .get(format!("{agent}/v2/slow/image/manifests/v1?ns={addr}"))
        .send()
        .await
        .expect("get");
    let (status, body) = status_and_body(resp).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("made no progress for 1s"), "{body}");
    assert!(started.elapsed() < Duration::from_secs(20), "took {:?}", started.elapsed());
    // A blob asked for by digest: the origin retries, then the agent gets the error.
    let digest = format!("sha256:{}", "b".repeat(64));
    let resp = cluster
        .client
        .get(format!("{agent}/v2/slow/image/blobs/{digest}?ns={addr}"))
        .send()
        .await
        .expect("get");
    let (status, body) = status_and_body(resp).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("made no progress"), "{body}");
    assert!(started.elapsed() < Duration::from_secs(40), "took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_https_upstream_with_a_custom_ca() {
    let dir = tempfile::tempdir().expect("tmp");
    let (ca, certs) = (dir.path().join("ca"), dir.path().join("registry-tls"));
    shoal_shared::tls::init_ca(&ca).expect("ca");
    shoal_shared::tls::issue(&ca, "127.0.0.1", shoal_shared::tls::Role::Origin, &certs).expect("cert");
    let registry = Registry::start_with(None, Some(&certs)).await.expect("registry");
    let image = registry.push_image("secure/app:v1", &[50 << 10], 51).await.expect("push");
    let ns = registry.host.clone();

    let mut up = UpstreamOptions::new(&registry.url());
    up.ca_file = Some(ca.join("ca.pem"));
    let cluster = Cluster::start(options(1, up)).await.expect("cluster");
    let digest = pull_ns(&cluster.client, &cluster.agents[0].registry_url, "secure/app", "v1", &ns)
        .await
        .expect("pull");
    assert_eq!(digest, image.manifest);
    drop(cluster);

    // Without the CA the upstream is not trusted: an error, not a pull.
    let cluster = Cluster::start(options(1, UpstreamOptions::new(&registry.url()))).await.expect("cluster");
    let agent = &cluster.agents[0].registry_url;
    let resp =
        cluster.client.get(format!("{agent}/v2/secure/app/manifests/v1?ns={ns}")).send().await.expect("get");
    let (status, body) = status_and_body(resp).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("certificate") || body.contains("Certificate") || body.contains("UnknownIssuer"),
        "{body}"
    );
}

/// One image-reference parser with Docker Hub's rules, and `--upstream REGISTRY=URL`: a
/// prefetch of `docker.io/alpine:3` served by a registry on this machine asks it for
/// `library/alpine` (the origin's own parser used to ask for `alpine`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prefetch_of_a_docker_hub_image_asks_for_library() {
    let registry = Registry::start(None).await.expect("registry");
    let image = registry.push_image("library/alpine:3", &[64 << 10], 43).await.expect("push");
    let mut up = UpstreamOptions::new(&format!("docker.io={}", registry.url()));
    up.prefetch_sync = true;
    let cluster = Cluster::start(options(1, up)).await.expect("cluster");
    let (client, origin) = (&cluster.client, cluster.origin_url.as_str());

    let (status, body) = prefetch(client, origin, 1, &json!({"tag": "docker.io/alpine:3"}).to_string()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "success", "{body}");
    assert!(origin_has(client, origin, "library/alpine", &image.layers[0].0).await);
    let asked_for_library = registry.log_lines().iter().any(|l| {
        l.contains("\"HEAD /v2/library/alpine/manifests/3 ")
            || l.contains("\"GET /v2/library/alpine/manifests/3 ")
    });
    assert!(asked_for_library, "the upstream was not asked for library/alpine");
    assert_eq!(registry.blob_gets(&image.layers[0].0), 1);

    // Pulls name the registry with `ns` as containerd does, and the same rule applies.
    let agent = &cluster.agents[0].registry_url;
    let digest = pull_ns(client, agent, "library/alpine", "3", "docker.io").await.expect("pull");
    assert_eq!(digest, image.manifest);
}

/// Issue "hostile world", item 4: reads that make the origin pull from an upstream fill its
/// disk like a push, so with an upload token they take it. Agents pull through the tracker,
/// which carries the token (`--origin-token`); a stranger at the origin's port cannot.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pull_through_reads_take_the_token() {
    const TOKEN: &str = "pull-through-token";
    let registry = Registry::start(None).await.expect("registry");
    let image = registry.push_image("team/tokened:v1", &[64 << 10], 44).await.expect("push");
    let mut opts = options(1, UpstreamOptions::new(&registry.url()));
    opts.upload_token = Some(TOKEN.into());
    let cluster = Cluster::start(opts).await.expect("cluster");
    let (client, origin, host) = (&cluster.client, cluster.origin_url.as_str(), registry.host.as_str());

    // (skopeo's push asked for the manifest itself: count only what comes after.)
    let asked = |l: &String| {
        l.contains("\"GET /v2/team/tokened/manifests/") || l.contains("\"HEAD /v2/team/tokened/manifests/")
    };
    let asked_before = registry.log_lines().iter().filter(|l| asked(l)).count();
    let manifest = format!("{origin}/v2/team/tokened/manifests/v1?ns={host}");
    let layer = &image.layers[0].0;
    let metainfo = format!("{origin}/shoal/v1/metainfo/{layer}?name=team/tokened&ns={host}");
    for url in [&manifest, &metainfo] {
        let anonymous = client.get(url.as_str()).send().await.expect("get");
        assert_eq!(anonymous.status(), 401, "{url}");
    }
    assert_eq!(registry.blob_gets(layer), 0, "nothing was fetched for a stranger");
    let asked_after = registry.log_lines().iter().filter(|l| asked(l)).count();
    assert_eq!(asked_after, asked_before, "the upstream was asked for a stranger");

    // Through an agent (and so the tracker, which has the token) the pull works.
    let agent = &cluster.agents[0].registry_url;
    let digest = pull_ns(client, agent, "team/tokened", "v1", host).await.expect("pull");
    assert_eq!(digest, image.manifest);
    let with_token = client.get(&manifest).bearer_auth(TOKEN).header("Accept", MANIFEST_ACCEPT).send().await;
    assert_eq!(with_token.expect("get").status(), 200);
}
