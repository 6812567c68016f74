//! The client side of the OCI distribution-spec conformance tests (`tests/tests/conformance*.rs`):
//! a cluster whose origin takes an upload token, requests with and without it, and the
//! pushes every workflow starts from. Answers are read whole, and a 500 fails the test
//! wherever it comes from: the spec has no 500 in it.

use reqwest::header::HeaderMap;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

use crate::cluster::{Cluster, ClusterOptions};

/// The origin's upload token.
pub const TOKEN: &str = "conformance-token";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

pub fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// A tracker, an origin requiring [`TOKEN`] for writes, and one agent.
pub async fn cluster() -> Cluster {
    Cluster::start(ClusterOptions {
        agents: 1,
        piece_length: 64 << 10,
        upload_token: Some(TOKEN.into()),
        ..Default::default()
    })
    .await
    .expect("cluster")
}

/// A request to the origin with the upload token; `path` may be a `Location` (relative).
pub fn write(c: &Cluster, method: Method, path: &str) -> RequestBuilder {
    c.client.request(method, format!("{}{path}", c.origin_url)).bearer_auth(TOKEN)
}

/// Status, headers and body of an answer, which must not be a 500.
pub async fn text(resp: Response) -> (StatusCode, HeaderMap, String) {
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.text().await.unwrap_or_default();
    assert_ne!(status, StatusCode::INTERNAL_SERVER_ERROR, "500: {body}");
    (status, headers, body)
}

/// A request without the token (reads) to a full URL.
pub async fn get(c: &Cluster, method: Method, url: &str) -> (StatusCode, HeaderMap, String) {
    text(c.client.request(method, url).send().await.expect("request")).await
}

/// The first OCI error code of a body.
pub fn code(body: &str) -> Option<String> {
    let v: Value = serde_json::from_str(body).ok()?;
    v["errors"][0]["code"].as_str().map(str::to_owned)
}

/// A header's value, empty when absent.
pub fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

/// A monolithic upload (`POST ?digest=`); returns the digest.
pub async fn push_blob(c: &Cluster, name: &str, bytes: &[u8]) -> String {
    let digest = digest_of(bytes);
    let resp = write(c, Method::POST, &format!("/v2/{name}/blobs/uploads/?digest={digest}"))
        .header("Content-Type", "application/octet-stream")
        .body(bytes.to_vec())
        .send()
        .await
        .expect("post");
    let (status, headers, body) = text(resp).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(header(&headers, "Location"), format!("/v2/{name}/blobs/{digest}"));
    assert_eq!(header(&headers, "Docker-Content-Digest"), digest);
    digest
}

/// The descriptor of `bytes`.
pub fn descriptor(media_type: &str, bytes: &[u8]) -> Value {
    json!({"mediaType": media_type, "digest": digest_of(bytes), "size": bytes.len()})
}

/// A pushed manifest: its bytes and digest.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub bytes: Vec<u8>,
    pub digest: String,
}

/// `PUT /v2/<name>/manifests/<reference>` of `bytes` as `media_type`: 201, with the
/// `Location` of the manifest by digest and its `Docker-Content-Digest`. Returns the headers.
pub async fn put_manifest(
    c: &Cluster,
    name: &str,
    reference: &str,
    media_type: &str,
    bytes: &[u8],
) -> HeaderMap {
    let resp = write(c, Method::PUT, &format!("/v2/{name}/manifests/{reference}"))
        .header("Content-Type", media_type)
        .body(bytes.to_vec())
        .send()
        .await
        .expect("put");
    let (status, headers, body) = text(resp).await;
    assert_eq!(status, 201, "PUT {name}:{reference}: {body}");
    let digest = digest_of(bytes);
    assert_eq!(header(&headers, "Location"), format!("/v2/{name}/manifests/{digest}"));
    assert_eq!(header(&headers, "Docker-Content-Digest"), digest);
    headers
}

/// An image manifest over a config and one layer (both pushed first), with `extra`
/// top-level fields (a subject, an artifact type, annotations), put by `reference` (by its
/// digest when `None`).
pub async fn push_manifest(
    c: &Cluster,
    name: &str,
    reference: Option<&str>,
    config: (&str, &[u8]),
    layer: &[u8],
    extra: Value,
) -> (Manifest, HeaderMap) {
    push_blob(c, name, config.1).await;
    push_blob(c, name, layer).await;
    let mut m = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(config.0, config.1),
        "layers": [descriptor("application/vnd.oci.image.layer.v1.tar", layer)],
    });
    if let (Some(m), Some(extra)) = (m.as_object_mut(), extra.as_object()) {
        m.extend(extra.clone());
    }
    let bytes = serde_json::to_vec(&m).expect("json");
    let digest = digest_of(&bytes);
    let reference = reference.map_or(digest.clone(), str::to_owned);
    let headers = put_manifest(c, name, &reference, OCI_MANIFEST, &bytes).await;
    (Manifest { bytes, digest }, headers)
}

/// A referrers answer (which must be a 200 OCI index): its headers and the descriptors it
/// lists.
pub async fn referrers(
    c: &Cluster,
    base: &str,
    name: &str,
    subject: &str,
    filter: Option<&str>,
) -> (HeaderMap, Vec<Value>) {
    let mut url = format!("{base}/v2/{name}/referrers/{subject}");
    if let Some(t) = filter {
        url.push_str(&format!("?artifactType={}", t.replace('/', "%2F").replace('+', "%2B")));
    }
    let (status, headers, body) = get(c, Method::GET, &url).await;
    assert_eq!(status, 200, "{url}: {body}");
    assert_eq!(header(&headers, "Content-Type"), OCI_INDEX, "{url}");
    let index: Value = serde_json::from_str(&body).expect("index");
    assert_eq!(index["schemaVersion"], 2);
    assert_eq!(index["mediaType"], OCI_INDEX);
    (headers, index["manifests"].as_array().cloned().unwrap_or_default())
}
