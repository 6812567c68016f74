//! Per-tenant authorization (issue 14): content an origin pulled through from a private
//! upstream repository is served by an agent only to clients whose credentials that
//! upstream accepts; public pulled-through content stays open. Two real CNCF distribution
//! registries are the upstreams: one public, one behind htpasswd (private).

use sha2::Digest as _;
use shoal_tests::cluster::{Cluster, ClusterOptions, UpstreamOptions};
use shoal_tests::registry::Registry;

const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

/// GETs `url` with optional basic credentials; the status, body and challenge.
async fn get(
    client: &reqwest::Client,
    url: &str,
    creds: Option<(&str, &str)>,
) -> (u16, Vec<u8>, Option<String>) {
    let mut req = client.get(url).header("Accept", ACCEPT);
    if let Some((u, p)) = creds {
        req = req.basic_auth(u, Some(p));
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let challenge = resp.headers().get("www-authenticate").and_then(|v| v.to_str().ok()).map(str::to_owned);
    (status, resp.bytes().await.expect("body").to_vec(), challenge)
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// Requests the agent sent to a registry (its user agent is in the access log).
fn agent_requests(registry: &Registry) -> usize {
    registry.log_lines().iter().filter(|l| l.contains("shoal-agent/")).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn private_content_is_served_only_to_clients_the_upstream_accepts() {
    let public = Registry::start(None).await.expect("public registry");
    let private = Registry::start(Some(("tenant-a", "s3cret"))).await.expect("private registry");
    let open = public.push_image("team/open:v1", &[64 << 10], 31).await.expect("push public");
    let image =
        private.push_image("team/secret:v1", &[100 << 10, 300 << 10], 32).await.expect("push private");
    let dir = tempfile::tempdir().expect("tmp");
    let auth_file = dir.path().join("config.json");
    {
        use base64::Engine as _;
        let auth = base64::engine::general_purpose::STANDARD.encode("tenant-a:s3cret");
        let config = serde_json::json!({"auths": {private.host.clone(): {"auth": auth}}});
        std::fs::write(&auth_file, config.to_string()).expect("write");
    }
    let mut upstream = UpstreamOptions::new(&public.url());
    upstream.urls.push(private.url());
    upstream.auth_file = Some(auth_file);
    let cluster = Cluster::start(ClusterOptions {
        agents: 1,
        piece_length: 256 << 10,
        upstream: Some(upstream),
        ..Default::default()
    })
    .await
    .expect("cluster");
    let (client, agent, ns) = (&cluster.client, &cluster.agents[0].registry_url, private.host.clone());
    let right = Some(("tenant-a", "s3cret"));
    let manifest_url = format!("{agent}/v2/team/secret/manifests/v1?ns={ns}");

    // No credentials: 401 with the challenge that makes containerd send its own.
    let (status, body, challenge) = get(client, &manifest_url, None).await;
    assert_eq!(status, 401, "{}", String::from_utf8_lossy(&body));
    assert_eq!(challenge.as_deref(), Some("Basic realm=\"shoal\""));
    // Credentials the upstream refuses: 401, as the upstream answered.
    let (status, body, _) = get(client, &manifest_url, Some(("tenant-a", "guess"))).await;
    assert_eq!(status, 401, "{}", String::from_utf8_lossy(&body));
    assert!(!String::from_utf8_lossy(&body).contains("guess"), "credentials echoed");
    let (status, _, _) = get(client, &manifest_url, Some(("tenant-b", "s3cret"))).await;
    assert_eq!(status, 401);

    // The right credentials: the image, byte for byte.
    let (status, body, _) = get(client, &manifest_url, right).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(sha256(&body), image.manifest);
    let checks = agent_requests(&private);
    assert!(checks > 0, "the agent asked the upstream about the credentials");
    for (layer, _) in &image.layers {
        let (status, body, _) =
            get(client, &format!("{agent}/v2/team/secret/blobs/{layer}?ns={ns}"), right).await;
        assert_eq!(status, 200);
        assert_eq!(&sha256(&body), layer);
    }
    // Within 60 s the same credentials are not checked again.
    let (status, _, _) = get(client, &manifest_url, right).await;
    assert_eq!(status, 200);
    assert_eq!(agent_requests(&private), checks, "cached outcome: no new upstream request");

    // The blobs are in the agent's cache now; they stay private there.
    let layer = &image.layers[0].0;
    let blob_url = format!("{agent}/v2/team/secret/blobs/{layer}?ns={ns}");
    let (status, _, challenge) = get(client, &blob_url, None).await;
    assert_eq!(status, 401, "a cached private blob without credentials");
    assert!(challenge.is_some());
    let head = client.head(&blob_url).send().await.expect("head");
    assert_eq!(head.status().as_u16(), 401, "HEAD too");
    let (status, _, _) = get(client, &blob_url, Some(("tenant-a", "guess"))).await;
    assert_eq!(status, 401, "a cached private blob with wrong credentials");
    // By digest without its registry, or under a public repository's name: refused.
    let (status, _, _) = get(client, &format!("{agent}/v2/team/secret/blobs/{layer}"), right).await;
    assert_eq!(status, 401, "no ns: cannot be checked");
    let (status, _, _) =
        get(client, &format!("{agent}/v2/team/open/blobs/{layer}?ns={}", public.host), None).await;
    assert_eq!(status, 401, "another registry's name does not open it");
    let (status, _, _) =
        get(client, &format!("{agent}/v2/team/secret/manifests/{}?ns={ns}", image.manifest), None).await;
    assert_eq!(status, 401, "the manifest by digest");

    // A public image pulls anonymously, through the same agent.
    let (status, body, _) =
        get(client, &format!("{agent}/v2/team/open/manifests/v1?ns={}", public.host), None).await;
    assert_eq!(status, 200);
    assert_eq!(sha256(&body), open.manifest);
    for (layer, _) in &open.layers {
        let (status, body, _) =
            get(client, &format!("{agent}/v2/team/open/blobs/{layer}?ns={}", public.host), None).await;
        assert_eq!(status, 200);
        assert_eq!(&sha256(&body), layer);
    }
    assert_eq!(agent_requests(&public), 0, "public content needs no check");
}
