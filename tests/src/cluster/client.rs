//! The client side of the harness: an independent registry client that pulls an image the
//! way containerd would and verifies every digest and size, blob fetches, Prometheus counter
//! scraping, and piece counts of generated images.

use anyhow::{anyhow, bail, ensure, Context as _};
use futures_util::StreamExt as _;
use sha2::{Digest as _, Sha256};

use crate::image::GeneratedImage;

/// Media types a pulling client accepts for manifests.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
     application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json, \
     application/vnd.docker.distribution.manifest.list.v2+json";

/// Scrapes a Prometheus text endpoint and returns the sum of the samples of `name` (0 when
/// absent).
pub async fn scrape_counter(client: &reqwest::Client, url: &str, name: &str) -> anyhow::Result<u64> {
    let resp = client.get(url).send().await.with_context(|| format!("GET {url}"))?;
    ensure!(resp.status().is_success(), "GET {url}: {}", resp.status());
    let text = resp.text().await?;
    Ok(parse_counter(&text, name))
}

/// Sums the samples of metric `name` in Prometheus text format.
pub fn parse_counter(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let value = if rest.starts_with('{') { rest.rsplit_once('}')?.1 } else { rest };
            if !value.starts_with(' ') {
                return None;
            }
            let value = value.split_whitespace().next()?;
            value.parse::<f64>().ok().map(|v| v as u64)
        })
        .sum()
}

/// What [`pull_image`] fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PulledImage {
    /// Digest of the manifest bytes (checked against `Docker-Content-Digest`).
    pub manifest_digest: String,
    /// The manifest's `Content-Type`.
    pub media_type: String,
    /// `(digest, size)` of the config, then of every layer.
    pub blobs: Vec<(String, u64)>,
    /// Manifest bytes plus every blob's bytes.
    pub total_bytes: u64,
}

fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// GETs a blob, streaming it through sha256, and checks digest and size.
pub async fn fetch_blob(
    client: &reqwest::Client,
    registry_url: &str,
    name: &str,
    digest: &str,
    size: Option<u64>,
) -> anyhow::Result<u64> {
    fetch_blob_in(client, registry_url, name, digest, size, "").await
}

/// [`fetch_blob`] with a query (`?ns=REGISTRY`, as containerd's mirror requests carry).
pub async fn fetch_blob_in(
    client: &reqwest::Client,
    registry_url: &str,
    name: &str,
    digest: &str,
    size: Option<u64>,
    query: &str,
) -> anyhow::Result<u64> {
    let url = format!("{registry_url}/v2/{name}/blobs/{digest}{query}");
    let resp = client.get(&url).send().await.with_context(|| format!("GET {url}"))?;
    let status = resp.status();
    if !status.is_success() {
        let body = resp.text().await.unwrap_or_default();
        bail!("GET {url}: {status}: {body}");
    }
    let length = resp.content_length();
    let mut hash = Sha256::new();
    let mut got = 0u64;
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.with_context(|| format!("reading {url}"))?;
        hash.update(&chunk);
        got += chunk.len() as u64;
    }
    let actual = format!("sha256:{}", hex::encode(hash.finalize()));
    ensure!(actual == digest, "{url}: content hashes to {actual}");
    if let Some(len) = length {
        ensure!(len == got, "{url}: Content-Length {len} but {got} bytes");
    }
    if let Some(size) = size {
        ensure!(size == got, "{url}: descriptor says {size} bytes, got {got}");
    }
    Ok(got)
}

/// A client that sends `user:password` (HTTP Basic) on every request, as containerd does to
/// a registry it holds credentials for.
pub fn basic_auth_client(user: &str, password: &str) -> reqwest::Client {
    use base64::Engine as _;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("Authorization", format!("Basic {basic}").parse().expect("header"));
    reqwest::Client::builder().default_headers(headers).build().expect("client")
}

/// Pulls `name:tag` from a registry like a container runtime would: the manifest, then the
/// config and every layer, verifying each digest (and size against its descriptor).
pub async fn pull_image(
    client: &reqwest::Client,
    registry_url: &str,
    name: &str,
    tag: &str,
) -> anyhow::Result<PulledImage> {
    pull_image_in(client, registry_url, name, tag, "").await
}

/// [`pull_image`] with a query on every request (`?ns=REGISTRY`, as containerd's mirror
/// requests carry).
pub async fn pull_image_in(
    client: &reqwest::Client,
    registry_url: &str,
    name: &str,
    tag: &str,
    query: &str,
) -> anyhow::Result<PulledImage> {
    let url = format!("{registry_url}/v2/{name}/manifests/{tag}{query}");
    let resp = client
        .get(&url)
        .header("Accept", MANIFEST_ACCEPT)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    let status = resp.status();
    if !status.is_success() {
        let body = resp.text().await.unwrap_or_default();
        bail!("GET {url}: {status}: {body}");
    }
    let header = |h: &str| resp.headers().get(h).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let media_type = header("content-type").unwrap_or_default();
    let claimed = header("docker-content-digest");
    let bytes = resp.bytes().await.with_context(|| format!("reading {url}"))?;
    let manifest_digest = sha256_digest(&bytes);
    ensure!(
        claimed.as_deref() == Some(manifest_digest.as_str()),
        "{url}: Docker-Content-Digest {claimed:?} but the manifest hashes to {manifest_digest}"
    );
    if let Ok(reference) = tag.parse::<shoal_shared::digest::Digest>() {
        ensure!(reference.to_string() == manifest_digest, "{url}: manifest does not match its digest");
    }
    let manifest: serde_json::Value = serde_json::from_slice(&bytes).context("manifest is not JSON")?;
    ensure!(manifest["schemaVersion"] == 2, "{url}: not a schema 2 manifest");
    let mut descriptors = Vec::new();
    descriptors.push(&manifest["config"]);
    if let Some(layers) = manifest["layers"].as_array() {
        descriptors.extend(layers);
    } else {
        bail!("{url}: manifest has no layers (an index is not supported here)");
    }
    let mut blobs = Vec::new();
    let mut total = bytes.len() as u64;
    for d in descriptors {
        let digest = d["digest"].as_str().ok_or_else(|| anyhow!("descriptor without digest"))?;
        let size = d["size"].as_u64();
        let got = fetch_blob_in(client, registry_url, name, digest, size, query).await?;
        blobs.push((digest.to_owned(), got));
        total += got;
    }
    Ok(PulledImage { manifest_digest, media_type, blobs, total_bytes: total })
}

/// Pieces of a blob of `size` bytes at `piece_length`.
pub fn pieces(size: u64, piece_length: u32) -> u64 {
    size.div_ceil(u64::from(piece_length))
}

/// Total pieces of every blob of `image` (manifest, config, layers) at `piece_length`;
/// sizes come from the manifest's descriptors.
pub fn image_pieces(image: &GeneratedImage, piece_length: u32) -> anyhow::Result<u64> {
    let manifest: serde_json::Value = serde_json::from_slice(&image.manifest_bytes)?;
    let config_len = manifest["config"]["size"].as_u64().ok_or_else(|| anyhow!("config without size"))?;
    let mut total =
        pieces(image.manifest_bytes.len() as u64, piece_length) + pieces(config_len, piece_length);
    total += image.layers.iter().map(|(_, size)| pieces(*size, piece_length)).sum::<u64>();
    Ok(total)
}
