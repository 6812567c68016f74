//! Bad input against the agent's registry endpoint, the origin's HTTP API and the origin's
//! QUIC peer endpoint. Every answer must be a clean 4xx (never a 500), and the nodes must keep
//! serving afterwards.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use sha2::{Digest as _, Sha256};
use shoal_tests::cluster::{pull_image, Cluster, ClusterOptions};

fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

async fn cluster() -> Cluster {
    Cluster::start(ClusterOptions { agents: 1, piece_length: 64 << 10, ..Default::default() })
        .await
        .expect("cluster")
}

/// Sends a request; asserts it is not a 500 and returns status and body.
async fn send(req: reqwest::RequestBuilder) -> (StatusCode, String) {
    let resp = req.send().await.expect("request");
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    assert_ne!(status, StatusCode::INTERNAL_SERVER_ERROR, "500: {body}");
    (status, body)
}

/// The first OCI error code of a body, if any.
fn code(body: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    v["errors"][0]["code"].as_str().map(str::to_owned)
}

async fn expect(c: &Cluster, method: Method, url: &str, status: u16, want_code: Option<&str>) {
    let (got, body) = send(c.client.request(method.clone(), url)).await;
    assert_eq!(got.as_u16(), status, "{method} {url}: {body}");
    if let Some(want) = want_code.filter(|_| method == Method::GET) {
        assert_eq!(code(&body).as_deref(), Some(want), "{method} {url}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_paths_on_agent_and_origin() {
    let c = cluster().await;
    let image = c.push_image("app/bad:v1", &[200_000], 11).await.expect("push");
    let (layer, size) = image.layers[0].clone();
    let unknown = digest_of(b"nobody has this");

    for base in [c.agents[0].registry_url.clone(), c.origin_url.clone()] {
        for method in [Method::GET, Method::HEAD] {
            // Malformed digests.
            for bad in ["sha256:xyz", "sha256:", "md5:0123", "sha256:ABCDEF", "nodigest"] {
                let url = format!("{base}/v2/app/bad/blobs/{bad}");
                expect(&c, method.clone(), &url, 400, Some("DIGEST_INVALID")).await;
            }
            // Invalid repository names.
            for name in ["UPPER", "a//b", "..a", "a..b/c", "a/-b", "a_"] {
                for path in [format!("blobs/{layer}"), "manifests/x".to_owned()] {
                    let url = format!("{base}/v2/{name}/{path}");
                    let (got, body) = send(c.client.request(method.clone(), &url)).await;
                    assert!(got == 400 || got == 404, "{method} {url}: {got} {body}");
                    if got == 400 && method == Method::GET {
                        assert_eq!(code(&body).as_deref(), Some("NAME_INVALID"), "{url}: {body}");
                    }
                }
            }
            // Unknown blob and tag.
            let url = format!("{base}/v2/app/bad/blobs/{unknown}");
            expect(&c, method.clone(), &url, 404, Some("BLOB_UNKNOWN")).await;
            let url = format!("{base}/v2/app/bad/manifests/nosuchtag");
            expect(&c, method.clone(), &url, 404, Some("MANIFEST_UNKNOWN")).await;
            let url = format!("{base}/v2/app/other/manifests/v1");
            expect(&c, method.clone(), &url, 404, Some("MANIFEST_UNKNOWN")).await;
            // A bad reference.
            let url = format!("{base}/v2/app/bad/manifests/-bad-tag");
            expect(&c, method.clone(), &url, 404, Some("MANIFEST_UNKNOWN")).await;
        }
        // Unsatisfiable ranges.
        let url = format!("{base}/v2/app/bad/blobs/{layer}");
        for range in [format!("bytes={size}-"), "bytes=5-2".to_owned(), "bytes=-0".to_owned()] {
            let (got, body) = send(c.client.get(&url).header("Range", &range)).await;
            assert_eq!(got, 416, "{range}: {body}");
            assert_eq!(code(&body).as_deref(), Some("SIZE_INVALID"), "{range}: {body}");
        }
        // A satisfiable one still works afterwards.
        let (got, _) = send(c.client.get(&url).header("Range", "bytes=0-0")).await;
        assert_eq!(got, 206);
        // Writes to the agent are refused; unknown endpoints are 404.
        let (got, _) = send(c.client.get(format!("{base}/v2/app/bad/catalog/{layer}"))).await;
        assert_eq!(got, 404);
        // The referrers API never answers 404; a bad digest or filter is a 400.
        let (got, body) = send(c.client.get(format!("{base}/v2/app/bad/referrers/{layer}"))).await;
        assert_eq!(got, 200, "{body}");
        let (got, body) = send(c.client.get(format!("{base}/v2/app/bad/referrers/sha256:nothex"))).await;
        assert_eq!(got, 400, "{body}");
        assert_eq!(code(&body).as_deref(), Some("DIGEST_INVALID"), "{body}");
        let url = format!("{base}/v2/app/bad/referrers/{layer}?artifactType=no%20slash");
        let (got, body) = send(c.client.get(url)).await;
        assert_eq!(got, 400, "{body}");
    }
    let (got, body) =
        send(c.client.delete(format!("{}/v2/app/bad/blobs/{layer}", c.agents[0].registry_url))).await;
    assert_eq!(got, 405, "{body}");
    let (got, body) =
        send(c.client.post(format!("{}/v2/app/bad/blobs/uploads/", c.agents[0].registry_url))).await;
    assert_eq!(got, 405, "{body}");

    // Bad digests in Shoal's own endpoint.
    let (got, _) = send(c.client.get(format!("{}/shoal/v1/metainfo/sha256:nothex", c.origin_url))).await;
    assert_eq!(got, 400);
    let (got, _) = send(c.client.get(format!("{}/shoal/v1/metainfo/{unknown}", c.origin_url))).await;
    assert_eq!(got, 404);

    // Everything still works.
    pull_image(&c.client, &c.agents[0].registry_url, "app/bad", "v1").await.expect("pull after bad input");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_uploads_validate_digests_and_references() {
    let c = cluster().await;
    let origin = &c.origin_url;

    // Monolithic upload with a wrong digest: refused, nothing stored under either digest.
    let body = b"the real content".to_vec();
    let claimed = digest_of(b"something else");
    let actual = digest_of(&body);
    let (got, resp) =
        send(c.client.post(format!("{origin}/v2/x/blobs/uploads/?digest={claimed}")).body(body.clone()))
            .await;
    assert_eq!(got, 400, "{resp}");
    assert_eq!(code(&resp).as_deref(), Some("DIGEST_INVALID"), "{resp}");
    for digest in [&claimed, &actual] {
        let (got, _) = send(c.client.head(format!("{origin}/v2/x/blobs/{digest}"))).await;
        assert_eq!(got, 404, "{digest} must not exist");
    }
    // A malformed digest query.
    let (got, resp) =
        send(c.client.post(format!("{origin}/v2/x/blobs/uploads/?digest=sha256:zz")).body(body.clone()))
            .await;
    assert_eq!(got, 400, "{resp}");
    assert_eq!(code(&resp).as_deref(), Some("DIGEST_INVALID"), "{resp}");

    // Monolithic upload with the right digest works.
    let (got, resp) =
        send(c.client.post(format!("{origin}/v2/x/blobs/uploads/?digest={actual}")).body(body.clone())).await;
    assert_eq!(got, 201, "{resp}");
    let fetched = c.client.get(format!("{origin}/v2/x/blobs/{actual}")).send().await.expect("get");
    assert_eq!(fetched.bytes().await.expect("body").as_ref(), body.as_slice());

    // Chunked upload: POST, PATCH chunks, PUT with the digest.
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let data_digest = digest_of(&data);
    let resp = c.client.post(format!("{origin}/v2/x/blobs/uploads/")).send().await.expect("post");
    assert_eq!(resp.status(), 202);
    let mut location = resp.headers()["location"].to_str().expect("location").to_owned();
    let mut offset = 0usize;
    for chunk in data.chunks(100_000) {
        let url = if location.starts_with('/') { format!("{origin}{location}") } else { location.clone() };
        let end = offset + chunk.len() - 1;
        let resp = c
            .client
            .patch(&url)
            .header("Content-Type", "application/octet-stream")
            .header("Content-Range", format!("{offset}-{end}"))
            .body(chunk.to_vec())
            .send()
            .await
            .expect("patch");
        assert_eq!(resp.status(), 202);
        assert_eq!(resp.headers()["range"].to_str().expect("range"), format!("0-{end}"));
        location = resp.headers()["location"].to_str().expect("location").to_owned();
        offset += chunk.len();
    }
    // A chunk that does not continue where the upload is: 416.
    let url = if location.starts_with('/') { format!("{origin}{location}") } else { location.clone() };
    let (got, _) = send(c.client.patch(&url).header("Content-Range", "5-9").body(vec![0u8; 5])).await;
    assert_eq!(got, 416);
    let sep = if url.contains('?') { '&' } else { '?' };
    let (got, resp) = send(c.client.put(format!("{url}{sep}digest={data_digest}"))).await;
    assert_eq!(got, 201, "{resp}");
    let fetched = c.client.get(format!("{origin}/v2/x/blobs/{data_digest}")).send().await.expect("get");
    assert_eq!(fetched.bytes().await.expect("body").as_ref(), data.as_slice());
    // The finished session is gone.
    let (got, resp) = send(c.client.patch(&url).body(vec![1u8])).await;
    assert_eq!(got, 404, "{resp}");
    assert_eq!(code(&resp).as_deref(), Some("BLOB_UPLOAD_UNKNOWN"));

    // Manifests referencing a missing blob are refused.
    let missing = digest_of(b"missing layer");
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": actual, "size": body.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": missing, "size": 10}],
    });
    let (got, resp) = send(
        c.client
            .put(format!("{origin}/v2/x/manifests/v1"))
            .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
            .body(serde_json::to_vec(&manifest).expect("json")),
    )
    .await;
    assert_eq!(got, 400, "{resp}");
    assert_eq!(code(&resp).as_deref(), Some("MANIFEST_BLOB_UNKNOWN"), "{resp}");
    // Posing as another origin of a ring changes nothing on a standalone origin.
    let (got, resp) = send(
        c.client
            .put(format!("{origin}/v2/x/manifests/v1"))
            .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
            .header("X-Shoal-Hop", "http://127.0.0.1:1")
            .body(serde_json::to_vec(&manifest).expect("json")),
    )
    .await;
    assert_eq!(got, 400, "{resp}");
    assert_eq!(code(&resp).as_deref(), Some("MANIFEST_BLOB_UNKNOWN"), "{resp}");

    // Schema 1 and garbage manifests are refused.
    let schema1 = serde_json::json!({
        "schemaVersion": 1, "name": "x", "tag": "v1", "architecture": "amd64",
        "fsLayers": [{"blobSum": actual}], "history": [{"v1Compatibility": "{}"}],
    });
    for bad in [serde_json::to_vec(&schema1).expect("json"), b"not json at all".to_vec(), Vec::new()] {
        let (got, resp) = send(
            c.client
                .put(format!("{origin}/v2/x/manifests/v1"))
                .header("Content-Type", "application/vnd.docker.distribution.manifest.v1+prettyjws")
                .body(bad),
        )
        .await;
        assert_eq!(got, 400, "{resp}");
        assert_eq!(code(&resp).as_deref(), Some("MANIFEST_INVALID"), "{resp}");
    }
    let (got, _) = send(c.client.get(format!("{origin}/v2/x/manifests/v1"))).await;
    assert_eq!(got, 404, "no tag was written");

    // A manifest pushed under a digest that does not match it.
    let good = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": actual, "size": body.len()},
        "layers": [],
    });
    let (got, resp) = send(
        c.client
            .put(format!("{origin}/v2/x/manifests/{missing}"))
            .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
            .body(serde_json::to_vec(&good).expect("json")),
    )
    .await;
    assert_eq!(got, 400, "{resp}");
    assert_eq!(code(&resp).as_deref(), Some("DIGEST_INVALID"), "{resp}");
}

/// Opens a QUIC connection to the origin's peer port with a valid cluster certificate, sends
/// `bytes` on a bi stream and returns whether the origin then closed the connection.
async fn send_garbage(c: &Cluster, name: &str, bytes: &[u8]) -> anyhow::Result<bool> {
    let tls = c.dir().join(name);
    shoal_shared::tls::issue(&c.ca_dir, name, shoal_shared::tls::Role::Agent, &tls)?;
    let identity = shoal_shared::tls::TlsIdentity::load(&tls)?;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let endpoint = shoal_shared::tls::endpoint(socket, &identity)?;
    let conn = endpoint.connect(c.origin_peer, shoal_shared::tls::PEER_SERVER_NAME)?.await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(bytes).await?;
    let _ = send.finish();
    let mut buf = vec![0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(5), recv.read(&mut buf)).await;
    // No response may come back: either the read fails because the connection is gone, or
    // the stream ends empty just before the close arrives.
    match read {
        Ok(Err(e)) => eprintln!("read after garbage: {e}"),
        Ok(Ok(None)) => eprintln!("read after garbage: stream finished without a response"),
        Ok(Ok(Some(n))) => anyhow::bail!("origin answered garbage with {n} bytes"),
        Err(_) => anyhow::bail!("origin neither answered nor closed within 5 s"),
    }
    // The whole connection is closed by the origin, as a protocol violation.
    let reason = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
    let Ok(reason) = reason else { return Ok(false) };
    let reason = format!("{reason:?}");
    eprintln!("connection closed: {reason}");
    // A stateless reset: the origin had closed and forgotten the connection, and its close
    // frame was lost on a loaded machine (seen once in CI); the origin's protocol-error
    // counter, checked by the caller, says why it closed.
    if reason == "Reset" {
        return Ok(true);
    }
    anyhow::ensure!(
        reason.contains("ApplicationClosed") && reason.contains("protocol violation"),
        "{reason}"
    );
    // And the next read on it errors.
    let (mut send, mut recv) = match conn.open_bi().await {
        Ok(s) => s,
        Err(_) => return Ok(true),
    };
    let write_failed = send.write_all(b"x").await.is_err();
    let read_failed = recv.read(&mut buf).await.is_err();
    endpoint.close(0u32.into(), b"done");
    Ok(write_failed && read_failed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_over_quic_closes_the_connection() {
    let c = cluster().await;
    c.push_image("app/quic:v1", &[150_000], 12).await.expect("push");
    assert_eq!(c.origin_counter("shoal_peer_protocol_errors_total").await.expect("metrics"), 0);

    // A header announcing a 4 GiB frame.
    assert!(send_garbage(&c, "fuzzer-1", &0xFFFF_FFFFu32.to_be_bytes()).await.expect("quic"));
    assert!(c.origin_counter("shoal_peer_protocol_errors_total").await.expect("metrics") >= 1);

    // A small header followed by bytes that are not a request.
    let mut frame = 16u32.to_be_bytes().to_vec();
    frame.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef].repeat(4));
    assert!(send_garbage(&c, "fuzzer-2", &frame).await.expect("quic"));
    assert!(c.origin_counter("shoal_peer_protocol_errors_total").await.expect("metrics") >= 2);

    // The origin keeps serving peers.
    pull_image(&c.client, &c.agents[0].registry_url, "app/quic", "v1").await.expect("pull after garbage");
    assert!(c.origin_counter("shoal_peer_pieces_served_total").await.expect("metrics") > 0);
}
