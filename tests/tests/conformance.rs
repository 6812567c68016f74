//! The OCI distribution-spec (v1.1.1) conformance checks, written as this project's own
//! tests against an in-process cluster: the pull, push, content discovery and content
//! management workflows against the origin, and the pull side (manifests, blobs, tags list,
//! referrers) through an agent. Every check names the spec's expectation it stands for.

use reqwest::Method;
use serde_json::{json, Value};
use shoal_tests::conformance::{
    cluster, code, descriptor, digest_of, get, header, push_manifest, referrers, text, write, OCI_MANIFEST,
    TOKEN,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_references_are_unknown_manifests_and_refused_puts() {
    let c = cluster().await;
    let agent = c.agents[0].registry_url.clone();
    for base in [c.origin_url.clone(), agent] {
        for reference in ["-bad-tag", ".dot", "sha256:nothex", &"a".repeat(129)] {
            let url = format!("{base}/v2/app/manifests/{reference}");
            let (status, _, body) = get(&c, Method::GET, &url).await;
            assert_eq!(status, 404, "GET {url}: {body}");
            assert_eq!(code(&body).as_deref(), Some("MANIFEST_UNKNOWN"), "{url}: {body}");
            let (status, _, _) = get(&c, Method::HEAD, &url).await;
            assert_eq!(status, 404, "HEAD {url}");
        }
    }
    let resp = write(&c, Method::PUT, "/v2/app/manifests/-bad-tag")
        .header("Content-Type", OCI_MANIFEST)
        .body(r#"{"schemaVersion":2,"layers":[]}"#)
        .send()
        .await
        .expect("put");
    let (status, _, body) = text(resp).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(code(&body).as_deref(), Some("MANIFEST_INVALID"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_and_pull_workflows() {
    let c = cluster().await;
    let layer = vec![7u8; 100_000];
    let (image, _) = push_manifest(
        &c,
        "conf/app",
        Some("v1"),
        ("application/vnd.oci.image.config.v1+json", b"{}"),
        &layer,
        json!({}),
    )
    .await;
    let layer_digest = digest_of(&layer);

    // Chunked upload: POST, PATCH with Content-Range, an out-of-order chunk (416), PUT.
    let blob: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
    let resp = write(&c, Method::POST, "/v2/conf/app/blobs/uploads/").send().await.expect("post");
    let (status, headers, body) = text(resp).await;
    assert_eq!(status, 202, "{body}");
    let location = header(&headers, "Location").to_owned();
    assert!(location.starts_with("/v2/conf/app/blobs/uploads/"), "{location}");
    let resp = write(&c, Method::PATCH, &location)
        .header("Content-Type", "application/octet-stream")
        .header("Content-Range", "0-29999")
        .body(blob[..30_000].to_vec())
        .send()
        .await
        .expect("patch");
    let (status, headers, body) = text(resp).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(header(&headers, "Range"), "0-29999");
    let location = header(&headers, "Location").to_owned();
    let resp = write(&c, Method::PATCH, &location)
        .header("Content-Range", "40000-49999")
        .body(blob[40_000..].to_vec())
        .send()
        .await
        .expect("patch");
    assert_eq!(resp.status(), 416, "an out-of-order chunk");
    let (status, headers, _) = text(write(&c, Method::GET, &location).send().await.expect("status")).await;
    assert_eq!(status, 204);
    assert_eq!(header(&headers, "Range"), "0-29999");
    let digest = digest_of(&blob);
    let resp = write(&c, Method::PUT, &format!("{location}?digest={digest}"))
        .header("Content-Range", "30000-49999")
        .body(blob[30_000..].to_vec())
        .send()
        .await
        .expect("put");
    let (status, headers, body) = text(resp).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(header(&headers, "Location"), format!("/v2/conf/app/blobs/{digest}"));

    // Cross-repository mount: a held blob is mounted at once; an unknown one opens a session.
    let from = "?from=conf/app";
    let resp =
        write(&c, Method::POST, &format!("/v2/conf/other/blobs/uploads/?mount={digest}&{}", &from[1..]))
            .send()
            .await
            .expect("mount");
    let (status, headers, body) = text(resp).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(header(&headers, "Location"), format!("/v2/conf/other/blobs/{digest}"));
    let unknown = digest_of(b"nobody has this");
    let resp =
        write(&c, Method::POST, &format!("/v2/conf/other/blobs/uploads/?mount={unknown}&from=conf/app"))
            .send()
            .await
            .expect("mount");
    assert_eq!(resp.status(), 202);

    // Pull: blobs (HEAD with Content-Length and the digest), manifests by tag and digest.
    let agent = c.agents[0].registry_url.clone();
    for base in [c.origin_url.clone(), agent] {
        let url = format!("{base}/v2/conf/app/blobs/{layer_digest}");
        let (status, headers, _) = get(&c, Method::HEAD, &url).await;
        assert_eq!(status, 200, "{url}");
        assert_eq!(header(&headers, "Content-Length"), layer.len().to_string(), "{url}");
        assert_eq!(header(&headers, "Docker-Content-Digest"), layer_digest);
        let resp = c.client.get(&url).send().await.expect("get");
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.bytes().await.expect("body").as_ref(), &layer[..]);
        for reference in ["v1", image.digest.as_str()] {
            let url = format!("{base}/v2/conf/app/manifests/{reference}");
            for method in [Method::HEAD, Method::GET] {
                let resp = c.client.request(method.clone(), &url).header("Accept", OCI_MANIFEST).send().await;
                let resp = resp.expect("manifest");
                assert_eq!(resp.status(), 200, "{method} {url}");
                assert_eq!(header(resp.headers(), "Docker-Content-Digest"), image.digest);
                assert_eq!(header(resp.headers(), "Content-Type"), OCI_MANIFEST);
                assert_eq!(header(resp.headers(), "Content-Length"), image.bytes.len().to_string());
                if method == Method::GET {
                    assert_eq!(resp.bytes().await.expect("body").as_ref(), &image.bytes[..]);
                }
            }
        }
        let (status, _, body) = get(&c, Method::GET, &format!("{base}/v2/conf/app/blobs/{unknown}")).await;
        assert_eq!(status, 404);
        assert_eq!(code(&body).as_deref(), Some("BLOB_UNKNOWN"));
    }

    // Tags list with pagination (`n`, `last`), on the origin and through the agent.
    for tag in ["v2", "v3"] {
        let resp = write(&c, Method::PUT, &format!("/v2/conf/app/manifests/{tag}"))
            .header("Content-Type", OCI_MANIFEST)
            .body(image.bytes.clone())
            .send()
            .await
            .expect("tag");
        assert_eq!(resp.status(), 201);
    }
    for base in [c.origin_url.clone(), c.agents[0].registry_url.clone()] {
        let (status, _, body) = get(&c, Method::GET, &format!("{base}/v2/conf/app/tags/list")).await;
        assert_eq!(status, 200, "{body}");
        let tags: Value = serde_json::from_str(&body).expect("json");
        assert_eq!(tags, json!({"name": "conf/app", "tags": ["v1", "v2", "v3"]}));
        let (_, _, body) = get(&c, Method::GET, &format!("{base}/v2/conf/app/tags/list?n=1&last=v1")).await;
        assert_eq!(serde_json::from_str::<Value>(&body).expect("json")["tags"], json!(["v2"]));
        let (status, _, body) = get(&c, Method::GET, &format!("{base}/v2/conf/none/tags/list")).await;
        assert_eq!(status, 404, "{body}");
        assert_eq!(code(&body).as_deref(), Some("NAME_UNKNOWN"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn referrers_are_listed_filtered_and_forgotten_on_origin_and_agent() {
    let c = cluster().await;
    let config = ("application/vnd.oci.image.config.v1+json", &b"{\"os\":\"linux\"}"[..]);
    // The subject's digest is known before it is pushed: a referrer may come first (spec).
    let layer = vec![1u8; 4096];
    let subject_bytes = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(config.0, config.1),
        "layers": [descriptor("application/vnd.oci.image.layer.v1.tar", &layer)],
    }))
    .expect("json");
    let subject = digest_of(&subject_bytes);
    let subject_desc = json!({"mediaType": OCI_MANIFEST, "digest": subject, "size": subject_bytes.len()});
    let empty = ("application/vnd.oci.empty.v1+json", &b"{}"[..]);
    let (sig, headers) = push_manifest(
        &c,
        "ref/app",
        None,
        empty,
        b"signature",
        json!({"subject": subject_desc, "artifactType": "application/vnd.example.sig",
               "annotations": {"org.example.kind": "signature"}}),
    )
    .await;
    assert_eq!(header(&headers, "OCI-Subject"), subject, "a PUT with a subject says it was processed");
    // No artifactType: the config's media type stands for it.
    let (sbom, headers) = push_manifest(
        &c,
        "ref/app",
        None,
        ("application/vnd.example.sbom+json", b"{\"sbom\":1}"),
        b"sbom",
        json!({"subject": subject_desc, "annotations": {"org.example.kind": "sbom"}}),
    )
    .await;
    assert_eq!(header(&headers, "OCI-Subject"), subject);
    let (subject_m, headers) = push_manifest(&c, "ref/app", Some("v1"), config, &layer, json!({})).await;
    assert_eq!(subject_m.digest, subject);
    assert!(headers.get("OCI-Subject").is_none(), "no subject, no header");
    // A referrer in another repository is not this repository's.
    push_manifest(&c, "ref/other", None, empty, b"elsewhere", json!({"subject": subject_desc})).await;

    let agent = c.agents[0].registry_url.clone();
    for base in [c.origin_url.clone(), agent.clone()] {
        let (headers, listed) = referrers(&c, &base, "ref/app", &subject, None).await;
        assert!(headers.get("OCI-Filters-Applied").is_none());
        assert_eq!(listed.len(), 2, "{base}: {listed:?}");
        let by_digest = |d: &str| listed.iter().find(|m| m["digest"] == d).cloned().expect("listed");
        let s = by_digest(&sig.digest);
        assert_eq!(s["mediaType"], OCI_MANIFEST);
        assert_eq!(s["size"], sig.bytes.len());
        assert_eq!(s["artifactType"], "application/vnd.example.sig");
        assert_eq!(s["annotations"], json!({"org.example.kind": "signature"}));
        let b = by_digest(&sbom.digest);
        assert_eq!(b["artifactType"], "application/vnd.example.sbom+json");
        assert_eq!(b["annotations"], json!({"org.example.kind": "sbom"}));

        let (headers, listed) =
            referrers(&c, &base, "ref/app", &subject, Some("application/vnd.example.sbom+json")).await;
        assert_eq!(header(&headers, "OCI-Filters-Applied"), "artifactType", "{base}");
        assert_eq!(listed.len(), 1, "{base}: {listed:?}");
        assert_eq!(listed[0]["digest"], sbom.digest.as_str());
        let (_, listed) = referrers(&c, &base, "ref/app", &subject, Some("application/none")).await;
        assert!(listed.is_empty());
        // None at all: an empty index, never a 404.
        let (_, listed) = referrers(&c, &base, "ref/app", &sbom.digest, None).await;
        assert!(listed.is_empty());
        let (_, listed) = referrers(&c, &base, "ref/other", &subject, None).await;
        assert_eq!(listed.len(), 1);
    }

    // Deleting a referrer takes it out of the index, on the origin and through the agent.
    let resp = write(&c, Method::DELETE, &format!("/v2/ref/app/manifests/{}", sig.digest)).send().await;
    assert_eq!(resp.expect("delete").status(), 202);
    for base in [c.origin_url.clone(), agent] {
        let (_, listed) = referrers(&c, &base, "ref/app", &subject, None).await;
        let digests: Vec<&Value> = listed.iter().map(|m| &m["digest"]).collect();
        assert_eq!(digests, vec![&json!(sbom.digest)], "{base}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_management_deletes_tags_manifests_and_unused_blobs() {
    let c = cluster().await;
    let config = ("application/vnd.oci.image.config.v1+json", &b"{\"arch\":\"amd64\"}"[..]);
    let layer = vec![9u8; 70_000];
    let (image, _) = push_manifest(&c, "del/app", Some("v1"), config, &layer, json!({})).await;
    for tag in ["v2", "keep"] {
        let resp = write(&c, Method::PUT, &format!("/v2/del/app/manifests/{tag}"))
            .header("Content-Type", OCI_MANIFEST)
            .body(image.bytes.clone())
            .send()
            .await
            .expect("tag");
        assert_eq!(resp.status(), 201);
    }
    let (layer_digest, config_digest) = (digest_of(&layer), digest_of(config.1));
    let origin = c.origin_url.clone();
    let agent = c.agents[0].registry_url.clone();
    // The agent has pulled the image, so it holds the manifest and layer.
    for path in ["manifests/v2".to_owned(), format!("blobs/{layer_digest}")] {
        let (status, _, _) = get(&c, Method::GET, &format!("{agent}/v2/del/app/{path}")).await;
        assert_eq!(status, 200, "{path}");
    }

    // Without the token nothing is deleted.
    for path in
        ["manifests/v2".to_owned(), format!("manifests/{}", image.digest), format!("blobs/{layer_digest}")]
    {
        let (status, headers, body) = get(&c, Method::DELETE, &format!("{origin}/v2/del/app/{path}")).await;
        assert_eq!(status, 401, "{path}: {body}");
        assert_eq!(code(&body).as_deref(), Some("UNAUTHORIZED"));
        assert!(headers.contains_key("WWW-Authenticate"));
    }
    // The agent is read-only.
    for path in ["manifests/v2".to_owned(), format!("blobs/{layer_digest}")] {
        let resp = c.client.delete(format!("{agent}/v2/del/app/{path}")).bearer_auth(TOKEN).send().await;
        let (status, _, body) = text(resp.expect("delete")).await;
        assert_eq!(status, 405, "{body}");
        assert_eq!(code(&body).as_deref(), Some("UNSUPPORTED"));
    }

    // A tag: only the tag goes.
    let resp = write(&c, Method::DELETE, "/v2/del/app/manifests/v2").send().await.expect("delete");
    assert_eq!(resp.status(), 202);
    let resp = write(&c, Method::DELETE, "/v2/del/app/manifests/v2").send().await.expect("delete");
    let (status, _, body) = text(resp).await;
    assert_eq!(status, 404);
    assert_eq!(code(&body).as_deref(), Some("MANIFEST_UNKNOWN"));
    for base in [&origin, &agent] {
        let (status, _, body) = get(&c, Method::GET, &format!("{base}/v2/del/app/manifests/v2")).await;
        assert_eq!(status, 404, "{base}: the deleted tag is not served: {body}");
        let (_, _, body) = get(&c, Method::GET, &format!("{base}/v2/del/app/tags/list")).await;
        assert_eq!(
            serde_json::from_str::<Value>(&body).expect("json")["tags"],
            json!(["keep", "v1"]),
            "{base}"
        );
        let (status, _, _) =
            get(&c, Method::GET, &format!("{base}/v2/del/app/manifests/{}", image.digest)).await;
        assert_eq!(status, 200, "{base}: the manifest stays");
    }

    // A blob a held manifest uses is refused; so is a manifest tagged in another repository.
    for blob in [&layer_digest, &config_digest] {
        let resp =
            write(&c, Method::DELETE, &format!("/v2/del/app/blobs/{blob}")).send().await.expect("delete");
        let (status, _, body) = text(resp).await;
        assert_eq!(status, 405, "{body}");
        assert_eq!(code(&body).as_deref(), Some("UNSUPPORTED"));
    }
    let resp = write(&c, Method::PUT, "/v2/del/elsewhere/manifests/x")
        .header("Content-Type", OCI_MANIFEST)
        .body(image.bytes.clone())
        .send()
        .await
        .expect("tag");
    assert_eq!(resp.status(), 201);
    let resp = write(&c, Method::DELETE, &format!("/v2/del/app/manifests/{}", image.digest)).send().await;
    let (status, _, body) = text(resp.expect("delete")).await;
    assert_eq!(status, 405, "{body}");
    assert!(body.contains("del/elsewhere:x"), "{body}");
    assert_eq!(
        write(&c, Method::DELETE, "/v2/del/elsewhere/manifests/x").send().await.expect("d").status(),
        202
    );

    // The manifest by digest: it and every tag of the repository pointing at it go.
    let resp = write(&c, Method::DELETE, &format!("/v2/del/app/manifests/{}", image.digest)).send().await;
    assert_eq!(resp.expect("delete").status(), 202);
    let (status, _, body) =
        get(&c, Method::GET, &format!("{origin}/v2/del/app/manifests/{}", image.digest)).await;
    assert_eq!(status, 404);
    assert_eq!(code(&body).as_deref(), Some("MANIFEST_UNKNOWN"));
    for base in [&origin, &agent] {
        for tag in ["v1", "keep"] {
            let (status, _, _) = get(&c, Method::GET, &format!("{base}/v2/del/app/manifests/{tag}")).await;
            assert_eq!(status, 404, "{base} {tag}");
        }
        let (status, _, body) = get(&c, Method::GET, &format!("{base}/v2/del/app/tags/list")).await;
        assert_eq!(status, 404, "{base}: no tags left: {body}");
    }

    // Now nothing uses the blobs: they can go.
    for blob in [&layer_digest, &config_digest] {
        let resp =
            write(&c, Method::DELETE, &format!("/v2/del/app/blobs/{blob}")).send().await.expect("delete");
        assert_eq!(resp.status(), 202);
        let (status, _, _) = get(&c, Method::HEAD, &format!("{origin}/v2/del/app/blobs/{blob}")).await;
        assert_eq!(status, 404);
        let resp =
            write(&c, Method::DELETE, &format!("/v2/del/app/blobs/{blob}")).send().await.expect("delete");
        let (status, _, body) = text(resp).await;
        assert_eq!(status, 404);
        assert_eq!(code(&body).as_deref(), Some("BLOB_UNKNOWN"));
    }
    let resp = write(&c, Method::DELETE, &format!("/v2/del/app/manifests/{}", image.digest)).send().await;
    assert_eq!(resp.expect("delete").status(), 404);
    let resp = write(&c, Method::DELETE, "/v2/del/app/blobs/sha256:nothex").send().await.expect("delete");
    assert_eq!(resp.status(), 400);
}
