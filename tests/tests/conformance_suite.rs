//! The OCI distribution-spec v1.1.1 conformance suite's workflows, item by item, run as the
//! suite runs them: pull, push, content discovery and content management one after the
//! other on one repository of one origin (with the upload token), each with its setup and
//! teardown, so what one workflow leaves behind (a shared layer, tags, referrers) meets the
//! next. The pull workflow is also run through an agent, as the suite runs it against a
//! registry it does not push to (its setup skipped, the tag and digests given).
//! docs/CONFORMANCE.md maps each of the suite's checks to the test that makes it.
//!
//! Where the suite accepts several answers (201 or 202, 404 or 400...), the test asserts
//! the one Shoal gives, so a change of behaviour is seen; the checks the suite does not make
//! strictly (its `last` pagination check, for one) are made strictly here.

use base64::Engine as _;
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde::Serialize as _;
use serde_json::{json, Value};
use shoal_tests::cluster::Cluster;
use shoal_tests::conformance::{
    cluster, code, digest_of, get, header, put_manifest, referrers, text, write, Manifest, OCI_INDEX,
    OCI_MANIFEST,
};

const NAME: &str = "conformance/suite";
/// The suite's tag for the image of the pull, discovery and management workflows.
const TAG: &str = "tagtest0";
/// A digest nothing has.
const DUMMY: &str = "sha256:b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9";
const CONFIG_TYPE: &str = "application/vnd.oci.image.config.v1+json";
const LAYER_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const EMPTY_TYPE: &str = "application/vnd.oci.empty.v1+json";
const ANNOTATION: &str = "org.opencontainers.conformance.test";
const ARTIFACT_A: &str = "application/vnd.example.conformance.a";
const ARTIFACT_B: &str = "application/vnd.example.conformance.b";
const ARTIFACT_INDEX: &str = "application/vnd.example.conformance.index";

/// JSON indented with tabs, as the suite's documents are: a registry must keep a
/// manifest's bytes as they were pushed, whitespace included.
fn tabbed(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(
        &mut out,
        serde_json::ser::PrettyFormatter::with_indent(b"\t"),
    );
    v.serialize(&mut ser).expect("json");
    out
}

/// What the workflows push: one image config per workflow (told apart by their author), a
/// layer they share, and one image manifest per config. A config descriptor carries the
/// config inline (`data`) and a field no spec defines, which the registry must keep.
#[derive(Debug)]
struct Fixtures {
    configs: Vec<Vec<u8>>,
    layer: Vec<u8>,
    manifests: Vec<Manifest>,
}

impl Fixtures {
    fn new() -> Self {
        let configs: Vec<Vec<u8>> = ["pull", "push", "discovery", "management", "referrers"]
            .iter()
            .map(|w| {
                tabbed(&json!({
                    "author": format!("shoal-conformance-{w}"),
                    "architecture": "amd64",
                    "os": "linux",
                    "rootfs": {"type": "layers", "diff_ids": []},
                }))
            })
            .collect();
        let layer: Vec<u8> = (0..3000u32).map(|i| (i * 7 % 256) as u8).collect();
        let manifests = configs
            .iter()
            .map(|config| {
                let bytes = tabbed(&json!({
                    "schemaVersion": 2,
                    "mediaType": OCI_MANIFEST,
                    "config": config_descriptor(config),
                    "layers": [{"mediaType": LAYER_TYPE, "digest": digest_of(&layer), "size": layer.len(),
                                "newUnspecifiedField": null}],
                }));
                Manifest { digest: digest_of(&bytes), bytes }
            })
            .collect();
        Self { configs, layer, manifests }
    }
}

fn config_descriptor(config: &[u8]) -> Value {
    json!({
        "mediaType": CONFIG_TYPE,
        "digest": digest_of(config),
        "size": config.len(),
        "data": base64::engine::general_purpose::STANDARD.encode(config),
        "newUnspecifiedField": base64::engine::general_purpose::STANDARD.encode("hello world"),
    })
}

/// A query value encoded as Go's `url.Values` encodes it (the suite's client): `:` and `/`
/// percent-encoded.
fn query_value(v: &str) -> String {
    v.replace(':', "%3A").replace('/', "%2F")
}

/// `location` with the `digest` parameter added, as the suite's client adds it.
fn with_digest(location: &str, digest: &str) -> String {
    let sep = if location.contains('?') { '&' } else { '?' };
    format!("{location}{sep}digest={}", query_value(digest))
}

/// `POST` a session (202 with a `Location`), its headers.
async fn open_session(c: &Cluster, name: &str) -> HeaderMap {
    let resp = write(c, Method::POST, &format!("/v2/{name}/blobs/uploads/"))
        .header("Content-Length", "0")
        .send()
        .await
        .expect("post");
    let (status, headers, body) = text(resp).await;
    assert_eq!(status, 202, "POST {name}: {body}");
    assert!(header(&headers, "Location").starts_with(&format!("/v2/{name}/blobs/uploads/")), "{headers:?}");
    headers
}

/// A session, then `PUT <location>?digest=` with the whole blob: 201 with its `Location`.
async fn upload_in_session(c: &Cluster, name: &str, bytes: &[u8]) {
    let session = open_session(c, name).await;
    let digest = digest_of(bytes);
    let resp = write(c, Method::PUT, &with_digest(header(&session, "Location"), &digest))
        .header("Content-Type", "application/octet-stream")
        .body(bytes.to_vec())
        .send()
        .await
        .expect("put");
    let (status, headers, body) = text(resp).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(header(&headers, "Location"), format!("/v2/{name}/blobs/{digest}"));
}

/// A blob is served whole, with its digest.
async fn assert_blob(c: &Cluster, base: &str, name: &str, bytes: &[u8]) {
    let url = format!("{base}/v2/{name}/blobs/{}", digest_of(bytes));
    let (status, headers, _) = get(c, Method::HEAD, &url).await;
    assert_eq!(status, 200, "HEAD {url}");
    assert_eq!(header(&headers, "Docker-Content-Digest"), digest_of(bytes), "HEAD {url}");
    let resp = c.client.get(&url).send().await.expect("get");
    assert_eq!(resp.status(), 200, "GET {url}");
    assert_eq!(resp.bytes().await.expect("body").as_ref(), bytes, "GET {url}");
}

/// A write answered 202 (deletions).
async fn delete(c: &Cluster, path: &str, expect: u16) {
    let (status, _, body) = text(write(c, Method::DELETE, path).send().await.expect("delete")).await;
    assert_eq!(status, expect, "DELETE {path}: {body}");
}

/// The suite's pull checks against `base`: blobs and manifests, present and absent.
async fn pull_checks(c: &Cluster, base: &str, f: &Fixtures) {
    // "HEAD/GET request to nonexistent blob should result in 404 response".
    let url = format!("{base}/v2/{NAME}/blobs/{DUMMY}");
    let (status, _, _) = get(c, Method::HEAD, &url).await;
    assert_eq!(status, 404, "HEAD {url}");
    let (status, _, body) = get(c, Method::GET, &url).await;
    assert_eq!(status, 404, "GET {url}");
    assert_eq!(code(&body).as_deref(), Some("BLOB_UNKNOWN"), "{url}");
    // "HEAD/GET request to existing blob should yield 200" (with its digest).
    assert_blob(c, base, NAME, &f.configs[0]).await;

    // "HEAD/GET request to nonexistent manifest should return 404".
    let url = format!("{base}/v2/{NAME}/manifests/.INVALID_MANIFEST_NAME");
    for method in [Method::HEAD, Method::GET] {
        let (status, _, _) = get(c, method.clone(), &url).await;
        assert_eq!(status, 404, "{method} {url}");
    }
    // "HEAD/GET request to manifest[0] (digest), manifest[1] (digest, pushed by digest
    // only), manifest (tag) should yield 200", with the digest; the bytes as pushed.
    let (m0, m1) = (&f.manifests[0], &f.manifests[1]);
    for (reference, m) in [(m0.digest.as_str(), m0), (m1.digest.as_str(), m1), (TAG, m0)] {
        let url = format!("{base}/v2/{NAME}/manifests/{reference}");
        for method in [Method::HEAD, Method::GET] {
            let resp = c.client.request(method.clone(), &url).header("Accept", OCI_MANIFEST).send().await;
            let resp = resp.expect("manifest");
            assert_eq!(resp.status(), 200, "{method} {url}");
            assert_eq!(header(resp.headers(), "Docker-Content-Digest"), m.digest, "{method} {url}");
            assert_eq!(header(resp.headers(), "Content-Type"), OCI_MANIFEST, "{method} {url}");
            if method == Method::GET {
                assert_eq!(resp.bytes().await.expect("body").as_ref(), &m.bytes[..], "{url}");
            }
        }
    }

    // "400 response body should contain OCI-conforming JSON message": a GET (with a body)
    // of a malformed digest; the suite takes 400 with a spec code, or 404.
    let url = format!("{base}/v2/{NAME}/manifests/sha256:totallywrong");
    let resp = c.client.get(&url).header("Content-Type", OCI_MANIFEST).body("blablabla").send().await;
    let (status, _, body) = text(resp.expect("get")).await;
    assert_eq!(status, 404, "{url}: {body}");
    assert_eq!(code(&body).as_deref(), Some("MANIFEST_UNKNOWN"), "{url}");
}

/// Workflow 1, pull: setup by sessions and manifest PUTs, the checks on the origin and
/// through the agent, then the teardown (manifests before blobs, the suite's default).
async fn pull(c: &Cluster, f: &Fixtures) {
    for blob in [&f.configs[0], &f.configs[1], &f.layer] {
        upload_in_session(c, NAME, blob).await;
    }
    put_manifest(c, NAME, TAG, OCI_MANIFEST, &f.manifests[0].bytes).await;
    put_manifest(c, NAME, &f.manifests[1].digest, OCI_MANIFEST, &f.manifests[1].bytes).await;

    pull_checks(c, &c.origin_url, f).await;
    pull_checks(c, &c.agents[0].registry_url, f).await;

    for m in &f.manifests[..2] {
        delete(c, &format!("/v2/{NAME}/manifests/{}", m.digest), 202).await;
    }
    for blob in [&f.configs[0], &f.configs[1], &f.layer] {
        delete(c, &format!("/v2/{NAME}/blobs/{}", digest_of(blob)), 202).await;
    }
}

/// Workflow 2, push: streamed, monolithic and chunked uploads, cross-repository mounts,
/// manifest uploads (with no layers too), then the teardown.
async fn push(c: &Cluster, f: &Fixtures) {
    // Blob Upload Streamed: a PATCH without Content-Range (202), then an empty PUT with the
    // digest (201 with a Location).
    let blob_a: Vec<u8> = (0..42u32).map(|i| (i * 31 % 251) as u8).collect();
    let session = open_session(c, NAME).await;
    let resp = write(c, Method::PATCH, header(&session, "Location"))
        .header("Content-Type", "application/octet-stream")
        .body(blob_a.clone())
        .send()
        .await
        .expect("patch");
    let (status, headers, body) = text(resp).await;
    assert_eq!(status, 202, "streamed PATCH: {body}");
    let resp = write(c, Method::PUT, &with_digest(header(&headers, "Location"), &digest_of(&blob_a)))
        .header("Content-Type", "application/octet-stream")
        .body(Vec::new())
        .send()
        .await
        .expect("put");
    let (status, headers, body) = text(resp).await;
    assert_eq!(status, 201, "PUT closing a streamed upload: {body}");
    assert_eq!(header(&headers, "Location"), format!("/v2/{NAME}/blobs/{}", digest_of(&blob_a)));
    assert_blob(c, &c.origin_url, NAME, &blob_a).await;

    // Blob Upload Monolithic: a POST with the digest and the blob (201 with a Location, the
    // blob then served), a session (202) then a PUT with the blob (201), the layer alike.
    let (status, _, _) = get(c, Method::GET, &format!("{}/v2/{NAME}/blobs/{DUMMY}", c.origin_url)).await;
    assert_eq!(status, 404);
    let config = &f.configs[1];
    let resp =
        write(c, Method::POST, &with_digest(&format!("/v2/{NAME}/blobs/uploads/"), &digest_of(config)))
            .header("Content-Type", "application/octet-stream")
            .body(config.clone())
            .send()
            .await
            .expect("post");
    let (status, headers, body) = text(resp).await;
    assert_eq!(status, 201, "POST with the digest: {body}");
    assert_eq!(header(&headers, "Location"), format!("/v2/{NAME}/blobs/{}", digest_of(config)));
    assert_blob(c, &c.origin_url, NAME, config).await;
    upload_in_session(c, NAME, config).await;
    assert_blob(c, &c.origin_url, NAME, config).await;
    upload_in_session(c, NAME, &f.layer).await;
    assert_blob(c, &c.origin_url, NAME, &f.layer).await;

    chunked(c).await;
    cross_mount(c, &blob_a).await;

    // Manifest Upload: a nonexistent one is 404; one manifest under four tags, each 201
    // with a Location; a manifest with no layers (and no mediaType); the first by digest.
    let url = format!("{}/v2/{NAME}/manifests/.INVALID_MANIFEST_NAME", c.origin_url);
    assert_eq!(get(c, Method::GET, &url).await.0, 404);
    let m1 = &f.manifests[1];
    for i in 0..4 {
        put_manifest(c, NAME, &format!("test{i}"), OCI_MANIFEST, &m1.bytes).await;
    }
    let empty_layers =
        tabbed(&json!({"schemaVersion": 2, "config": config_descriptor(config), "layers": []}));
    put_manifest(c, NAME, "emptylayer", OCI_MANIFEST, &empty_layers).await;
    let url = format!("{}/v2/{NAME}/manifests/emptylayer", c.origin_url);
    let (status, headers, body) = get(c, Method::GET, &url).await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "Content-Type"), OCI_MANIFEST, "the type of a manifest without mediaType");
    assert_eq!(body.as_bytes(), &empty_layers[..]);
    let url = format!("{}/v2/{NAME}/manifests/{}", c.origin_url, m1.digest);
    let resp = c.client.get(&url).header("Accept", OCI_MANIFEST).send().await.expect("get");
    assert_eq!(resp.status(), 200);

    // Teardown: the manifest (and with it the four tags), the one with no layers, blobs.
    delete(c, &format!("/v2/{NAME}/manifests/{}", m1.digest), 202).await;
    delete(c, &format!("/v2/{NAME}/manifests/{}", digest_of(&empty_layers)), 202).await;
    delete(c, &format!("/v2/{NAME}/blobs/{}", digest_of(config)), 202).await;
    delete(c, &format!("/v2/{NAME}/blobs/{}", digest_of(&f.layer)), 202).await;
}

/// Blob Upload Chunked, with the suite's 42-byte blob in chunks of 22 and 20 bytes.
async fn chunked(c: &Cluster) {
    let blob: Vec<u8> = (0..42u32).map(|i| (i * 97 % 253) as u8).collect();
    let (one, two) = blob.split_at(22);
    let patch = |location: &str, chunk: &[u8], range: &str| {
        write(c, Method::PATCH, location)
            .header("Content-Type", "application/octet-stream")
            .header("Content-Range", range)
            .body(chunk.to_vec())
    };
    // "Out-of-order blob upload should return 416": a fresh session's first chunk must
    // start at 0. No minimum chunk length is asked for (OCI-Chunk-Min-Length).
    let session = open_session(c, NAME).await;
    assert!(session.get("OCI-Chunk-Min-Length").is_none());
    let resp = patch(header(&session, "Location"), two, "22-41").send().await.expect("patch");
    assert_eq!(resp.status(), StatusCode::RANGE_NOT_SATISFIABLE, "a first chunk not at 0");

    // "PATCH request with first chunk should return 202" with the Range taken.
    let session = open_session(c, NAME).await;
    let first = header(&session, "Location").to_owned();
    let (status, headers, body) = text(patch(&first, one, "0-21").send().await.expect("patch")).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(header(&headers, "Range"), "0-21");
    // "Retry previous blob chunk should return 416", at the session's first Location.
    let resp = patch(&first, one, "0-21").send().await.expect("patch");
    assert_eq!(resp.status(), StatusCode::RANGE_NOT_SATISFIABLE, "a chunk sent twice");
    // "Get on stale blob upload should return 204 with a range and location".
    let (status, headers, _) = text(write(c, Method::GET, &first).send().await.expect("get")).await;
    assert_eq!(status, 204);
    assert_eq!(header(&headers, "Range"), "0-21");
    let location = header(&headers, "Location").to_owned();
    assert!(!location.is_empty());
    // "PATCH request with second chunk should return 202" with a Location.
    let (status, headers, body) = text(patch(&location, two, "22-41").send().await.expect("patch")).await;
    assert_eq!(status, 202, "{body}");
    let location = header(&headers, "Location").to_owned();
    assert!(!location.is_empty());
    // "PUT request with digest should return 201": no body, the chunks make the blob.
    let resp = write(c, Method::PUT, &with_digest(&location, &digest_of(&blob)))
        .header("Content-Type", "application/octet-stream")
        .header("Content-Length", "0")
        .send()
        .await
        .expect("put");
    let (status, headers, body) = text(resp).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(header(&headers, "Location"), format!("/v2/{NAME}/blobs/{}", digest_of(&blob)));
    assert_blob(c, &c.origin_url, NAME, &blob).await;
}

/// Cross-Repository Blob Mount into a repository of its own.
async fn cross_mount(c: &Cluster, blob: &[u8]) {
    let other = "conformance-0f6b54e2-1c7d-4b8e-9a55-3d3c1e2f4a61";
    let digest = digest_of(blob);
    // "Cross-mounting of a blob without the from argument should yield session id".
    let resp = write(c, Method::POST, &format!("/v2/{other}/blobs/uploads/?mount={DUMMY}")).send().await;
    let (status, headers, body) = text(resp.expect("post")).await;
    assert_eq!(status, 202, "{body}");
    assert!(header(&headers, "Location").starts_with(&format!("/v2/{other}/blobs/uploads/")));
    // "POST request to mount another repository's blob should return 201 or 202": 201, at
    // the blob's Location in the new repository, where it is then served.
    let (mount, from) = (query_value(&digest), query_value(NAME));
    let resp = write(c, Method::POST, &format!("/v2/{other}/blobs/uploads/?mount={mount}&from={from}"));
    let (status, headers, body) = text(resp.send().await.expect("post")).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(header(&headers, "Location"), format!("/v2/{other}/blobs/{digest}"));
    assert_blob(c, &c.origin_url, other, blob).await;
    // Automatic content discovery (OCI_AUTOMATIC_CROSSMOUNT=true): without `from`, a held
    // blob is mounted all the same (content is global here).
    let resp = write(c, Method::POST, &format!("/v2/{other}/blobs/uploads/?mount={digest}")).send().await;
    assert_eq!(resp.expect("post").status(), 201);
}

/// Workflow 3, content discovery: tags listed and paginated, referrers listed and filtered
/// (five referrers of one image, of three kinds, some pushed before it, one to an image
/// never pushed), on the origin and (referrers) through the agent; then the teardown.
async fn discovery(c: &Cluster, f: &Fixtures) {
    upload_in_session(c, NAME, &f.configs[2]).await;
    upload_in_session(c, NAME, &f.layer).await;
    for i in 0..4 {
        put_manifest(c, NAME, &format!("test{i}"), OCI_MANIFEST, &f.manifests[2].bytes).await;
    }

    // References setup. The empty JSON blob has the digest the image spec gives it.
    let empty = b"{}".to_vec();
    assert_eq!(digest_of(&empty), "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a");
    let empty_desc = json!({"mediaType": EMPTY_TYPE, "digest": digest_of(&empty), "size": 2});
    upload_in_session(c, NAME, &empty).await;
    let (ref_a, ref_b) = (b"a referrer's blob, pushed first".to_vec(), b"and one pushed after".to_vec());
    let subject = &f.manifests[4];
    let missing = &f.manifests[3];
    let subject_of =
        |m: &Manifest| json!({"mediaType": OCI_MANIFEST, "digest": m.digest, "size": m.bytes.len()});
    // A referrer whose artifact type is its config's media type, and one with an
    // artifactType and the empty config.
    let by_config = |artifact: &str, blob: &[u8], note: &str| {
        tabbed(&json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": artifact, "digest": digest_of(blob), "size": blob.len()},
            "layers": [empty_desc], "subject": subject_of(subject), "annotations": {ANNOTATION: note},
        }))
    };
    let by_type = |artifact: &str, blob: &[u8], of: &Manifest, note: Option<&str>| {
        let mut m = json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": artifact, "config": empty_desc,
            "layers": [{"mediaType": artifact, "digest": digest_of(blob), "size": blob.len()}],
            "subject": subject_of(of),
        });
        if let Some(note) = note {
            m["annotations"] = json!({ANNOTATION: note});
        }
        tabbed(&m)
    };
    let put_referrer = |bytes: Vec<u8>, media_type: &'static str, of: &Manifest| {
        let of = of.digest.clone();
        async move {
            let headers = put_manifest(c, NAME, &digest_of(&bytes), media_type, &bytes).await;
            assert_eq!(header(&headers, "OCI-Subject"), of, "a PUT with a subject says so");
            (digest_of(&bytes), bytes)
        }
    };
    upload_in_session(c, NAME, &ref_a).await;
    let a_config = put_referrer(by_config(ARTIFACT_A, &ref_a, "test config a"), OCI_MANIFEST, subject).await;
    let a_layer =
        put_referrer(by_type(ARTIFACT_A, &ref_a, subject, Some("test layer a")), OCI_MANIFEST, subject).await;
    let index = tabbed(&json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX, "artifactType": ARTIFACT_INDEX,
        "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": a_config.0, "size": a_config.1.len()},
            {"mediaType": OCI_MANIFEST, "digest": a_layer.0, "size": a_layer.1.len()},
        ],
        "subject": subject_of(subject), "annotations": {ANNOTATION: "test index"},
    }));
    let index = put_referrer(index, OCI_INDEX, subject).await;
    upload_in_session(c, NAME, &f.configs[4]).await;
    upload_in_session(c, NAME, &f.layer).await;
    put_manifest(c, NAME, TAG, OCI_MANIFEST, &subject.bytes).await;
    upload_in_session(c, NAME, &ref_b).await;
    let b_config = put_referrer(by_config(ARTIFACT_B, &ref_b, "test config b"), OCI_MANIFEST, subject).await;
    let b_layer =
        put_referrer(by_type(ARTIFACT_B, &ref_b, subject, Some("test layer b")), OCI_MANIFEST, subject).await;
    let c_layer = put_referrer(by_type(ARTIFACT_B, &ref_b, missing, None), OCI_MANIFEST, missing).await;

    // Listing tags: all of them; `n` gives exactly n; `last` starts after that tag.
    let url = format!("{}/v2/{NAME}/tags/list", c.origin_url);
    let (status, _, body) = get(c, Method::GET, &url).await;
    assert_eq!(status, 200, "{body}");
    let tags = serde_json::from_str::<Value>(&body).expect("json")["tags"].clone();
    assert_eq!(tags, json!([TAG, "test0", "test1", "test2", "test3"]));
    for (query, page) in [("n=2", json!([TAG, "test0"])), ("n=2&last=test0", json!(["test1", "test2"]))] {
        let (status, _, body) = get(c, Method::GET, &format!("{url}?{query}")).await;
        assert_eq!(status, 200, "{query}: {body}");
        assert_eq!(serde_json::from_str::<Value>(&body).expect("json")["tags"], page, "{query}");
    }

    // Listing referrers, on the origin and through the agent.
    let notes = [
        (&a_config.0, "test config a"),
        (&a_layer.0, "test layer a"),
        (&index.0, "test index"),
        (&b_config.0, "test config b"),
        (&b_layer.0, "test layer b"),
    ];
    let annotated = |listed: &[Value]| {
        for m in listed {
            let (_, note) = notes.iter().find(|(d, _)| m["digest"] == ***d).expect("a referrer of the image");
            assert_eq!(m["annotations"], json!({ANNOTATION: note}), "{m}");
        }
    };
    for base in [c.origin_url.clone(), c.agents[0].registry_url.clone()] {
        // "GET request to nonexistent blob should result in empty 200 response".
        let (_, listed) = referrers(c, &base, NAME, DUMMY, None).await;
        assert!(listed.is_empty(), "{base}");
        // "GET request to existing blob should yield 200": all five, each once.
        let (_, listed) = referrers(c, &base, NAME, &subject.digest, None).await;
        let mut digests: Vec<&str> = listed.iter().filter_map(|m| m["digest"].as_str()).collect();
        digests.sort_unstable();
        digests.dedup();
        assert_eq!((listed.len(), digests.len()), (5, 5), "{base}: {listed:?}");
        annotated(&listed);
        let index_entry = listed.iter().find(|m| m["digest"] == *index.0).expect("the index");
        assert_eq!(index_entry["mediaType"], OCI_INDEX);
        assert_eq!(index_entry["artifactType"], ARTIFACT_INDEX);
        // "GET request to existing blob with filter should yield 200": the two of type A.
        let (headers, listed) = referrers(c, &base, NAME, &subject.digest, Some(ARTIFACT_A)).await;
        assert_eq!(header(&headers, "OCI-Filters-Applied"), "artifactType", "{base}");
        assert_eq!(listed.len(), 2, "{base}: {listed:?}");
        annotated(&listed);
        // "GET request to missing manifest should yield 200": the one referrer of it.
        let (_, listed) = referrers(c, &base, NAME, &missing.digest, None).await;
        assert_eq!(listed.len(), 1, "{base}: {listed:?}");
        assert_eq!(listed[0]["digest"], *c_layer.0);
    }

    // Teardown: manifests (the index first, the image before its referrers), blobs, then
    // the references teardown, whose manifests are gone already.
    let manifests = [
        &index.0,
        &f.manifests[2].digest,
        &subject.digest,
        &a_config.0,
        &a_layer.0,
        &b_config.0,
        &b_layer.0,
        &c_layer.0,
    ];
    for digest in manifests {
        delete(c, &format!("/v2/{NAME}/manifests/{digest}"), 202).await;
    }
    for blob in [&f.configs[2], &f.layer, &f.configs[4], &ref_a, &ref_b, &empty] {
        delete(c, &format!("/v2/{NAME}/blobs/{}", digest_of(blob)), 202).await;
    }
    for digest in &manifests[2..7] {
        delete(c, &format!("/v2/{NAME}/manifests/{digest}"), 404).await;
    }
}

/// Workflow 4, content management: a tag, then its manifest, then its blobs deleted, and
/// each deletion seen.
async fn management(c: &Cluster, f: &Fixtures) {
    upload_in_session(c, NAME, &f.configs[3]).await;
    upload_in_session(c, NAME, &f.layer).await;
    let m = &f.manifests[3];
    put_manifest(c, NAME, TAG, OCI_MANIFEST, &m.bytes).await;
    let url = format!("{}/v2/{NAME}/tags/list", c.origin_url);
    let (status, _, body) = get(c, Method::GET, &url).await;
    assert_eq!(status, 200, "{body}");
    let before = serde_json::from_str::<Value>(&body).expect("json")["tags"].as_array().map_or(0, Vec::len);
    assert_eq!(before, 1, "{body}");

    // "DELETE request to manifest tag should return 202".
    delete(c, &format!("/v2/{NAME}/manifests/{TAG}"), 202).await;
    // "DELETE request to manifest (digest) should yield 202 response unless already deleted".
    delete(c, &format!("/v2/{NAME}/manifests/{}", m.digest), 202).await;
    // "GET request to deleted manifest URL should yield 404 response".
    let (status, _, _) =
        get(c, Method::GET, &format!("{}/v2/{NAME}/manifests/{}", c.origin_url, m.digest)).await;
    assert_eq!(status, 404);
    // "GET request to tags list should reflect manifest deletion": none left, 404.
    let (status, _, body) = get(c, Method::GET, &url).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(code(&body).as_deref(), Some("NAME_UNKNOWN"));
    // "DELETE request to blob URL should yield 202 response", then "GET request to deleted
    // blob URL should yield 404 response".
    for blob in [&f.configs[3], &f.layer] {
        delete(c, &format!("/v2/{NAME}/blobs/{}", digest_of(blob)), 202).await;
    }
    let url = format!("{}/v2/{NAME}/blobs/{}", c.origin_url, digest_of(&f.configs[3]));
    let (status, _, body) = get(c, Method::GET, &url).await;
    assert_eq!(status, 404);
    assert_eq!(code(&body).as_deref(), Some("BLOB_UNKNOWN"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suite_workflows_in_order_on_one_repository() {
    let c = cluster().await;
    let f = Fixtures::new();
    pull(&c, &f).await;
    push(&c, &f).await;
    discovery(&c, &f).await;
    management(&c, &f).await;
}

/// The suite's client sends its username and password as Basic credentials with every
/// request, before any challenge: the origin takes the upload token as the password,
/// whatever the username, as it takes it as a bearer token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_credentials_carry_the_upload_token() {
    let c = cluster().await;
    let blob = b"pushed with Basic credentials".to_vec();
    let digest = digest_of(&blob);
    let post = |user: &str, password: Option<&str>| {
        c.client
            .post(format!("{}/v2/{NAME}/blobs/uploads/?digest={digest}", c.origin_url))
            .basic_auth(user, password)
            .body(blob.clone())
    };
    for (user, password) in
        [("conformance", Some("wrong")), (shoal_tests::conformance::TOKEN, None), ("", Some("conformance"))]
    {
        let (status, headers, body) = text(post(user, password).send().await.expect("post")).await;
        assert_eq!(status, 401, "{user}:{password:?}: {body}");
        assert_eq!(code(&body).as_deref(), Some("UNAUTHORIZED"));
        assert!(headers.contains_key("WWW-Authenticate"));
    }
    let (status, _, body) =
        text(post("conformance", Some(shoal_tests::conformance::TOKEN)).send().await.expect("post")).await;
    assert_eq!(status, 201, "{body}");
    let resp = c
        .client
        .delete(format!("{}/v2/{NAME}/blobs/{digest}", c.origin_url))
        .basic_auth("anyone", Some(shoal_tests::conformance::TOKEN))
        .send()
        .await
        .expect("delete");
    assert_eq!(resp.status(), 202);
}
