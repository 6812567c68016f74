//! Preload: pull an image into this agent's cache ahead of a rollout
//! (`POST /shoal/v1/preload`, or `shoal-agent preload IMAGE`).
//!
//! The image is resolved and downloaded exactly as a pull would (same single-flight
//! downloads, so a preload racing a real pull costs nothing extra); an index is narrowed to
//! the platforms asked for.

use std::sync::Arc;

use futures_util::{StreamExt as _, TryStreamExt as _};
use serde::{Deserialize, Serialize};
use shoal_shared::digest::Digest;
use shoal_shared::hint::Hint;
pub use shoal_shared::image::ImageRef;
use shoal_shared::manifest::{Manifest, Platform as IndexPlatform};
use shoal_shared::oci::{
    manifest_media_type, manifest_references, Reference, DOCKER_LIST, MAX_MANIFEST, OCI_INDEX,
};
use shoal_shared::tracker::LookupError;

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};

use crate::download::{DownloadError, Downloads};
use crate::registry::AppState;

/// Blobs of one image downloaded at once.
const PARALLEL_BLOBS: usize = 4;

/// The request body.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PreloadRequest {
    /// `[registry/]name:tag` or `[registry/]name@sha256:...`.
    pub image: String,
    /// `os/arch[/variant]`, or `all`; defaults to this host's platform.
    #[serde(default)]
    pub platform: Option<String>,
    /// Answer when the image is cached (default), or at once with 202.
    #[serde(default = "yes")]
    pub wait: bool,
}

fn yes() -> bool {
    true
}

/// The answer.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct PreloadResponse {
    pub image: String,
    /// `done` or `started`.
    pub status: String,
    /// The manifest (or index) digest the reference resolved to.
    pub digest: Option<String>,
    /// Blobs now in the cache (manifests included).
    pub blobs: usize,
    pub bytes: u64,
}

/// Why a preload failed; each maps to one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum PreloadError {
    #[error("invalid image reference {0:?}")]
    BadImage(String),
    #[error("invalid platform {0:?}: expected os/arch[/variant] or all")]
    BadPlatform(String),
    #[error("{0} is unknown to the cluster")]
    NotFound(String),
    #[error("{0}: not an image manifest or index")]
    NotManifest(Digest),
    #[error("the index {0} has no manifest for platform {1}")]
    NoPlatform(Digest, String),
    #[error("cluster unavailable: {0}")]
    Unavailable(String),
    #[error("the registry refused the cluster's credentials: {0}")]
    Denied(String),
}

/// A platform filter for indexes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Platform {
    All,
    One { os: String, arch: String, variant: Option<String> },
}

impl Platform {
    /// This host's platform, in OCI's names.
    pub fn host() -> Self {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            other => other,
        };
        Self::One { os: std::env::consts::OS.to_owned(), arch: arch.to_owned(), variant: None }
    }

    pub fn parse(s: &str) -> Result<Self, PreloadError> {
        if s == "all" {
            return Ok(Self::All);
        }
        let ok = |p: &str| {
            !p.is_empty() && p.len() <= 32 && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        };
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            [os, arch] if ok(os) && ok(arch) => {
                Ok(Self::One { os: (*os).to_owned(), arch: (*arch).to_owned(), variant: None })
            }
            [os, arch, v] if ok(os) && ok(arch) && ok(v) => Ok(Self::One {
                os: (*os).to_owned(),
                arch: (*arch).to_owned(),
                variant: Some((*v).to_owned()),
            }),
            _ => Err(PreloadError::BadPlatform(s.to_owned())),
        }
    }

    fn matches(&self, p: &IndexPlatform) -> bool {
        match self {
            Self::All => true,
            Self::One { os, arch, variant } => {
                &p.os == os
                    && &p.architecture == arch
                    && variant.as_ref().is_none_or(|v| p.variant.as_ref() == Some(v))
            }
        }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::All => f.write_str("all"),
            Self::One { os, arch, variant: None } => write!(f, "{os}/{arch}"),
            Self::One { os, arch, variant: Some(v) } => write!(f, "{os}/{arch}/{v}"),
        }
    }
}

fn lookup_error(e: LookupError, what: &str) -> PreloadError {
    match e {
        LookupError::NotFound => PreloadError::NotFound(what.to_owned()),
        LookupError::Denied(m) => PreloadError::Denied(m),
        other => PreloadError::Unavailable(other.to_string()),
    }
}

fn download_error(e: DownloadError, what: &str) -> PreloadError {
    match e {
        DownloadError::NotFound => PreloadError::NotFound(what.to_owned()),
        DownloadError::Denied(m) => PreloadError::Denied(m),
        other => PreloadError::Unavailable(other.to_string()),
    }
}

/// Resolves `image` to its manifest digest, at the registry it names (the `ns` its blobs
/// are then fetched with, as for a containerd mirror request).
pub async fn resolve(downloads: &Downloads, image: &ImageRef) -> Result<Digest, PreloadError> {
    match &image.reference {
        Reference::Digest(d) => Ok(*d),
        Reference::Tag(tag) => downloads
            .tracker()
            .tag_in(&image.name, tag, image.hint().ns.as_deref())
            .await
            .map_err(|e| lookup_error(e, &format!("{}:{tag}", image.name))),
    }
}

/// Downloads a manifest into the cache and returns its bytes and media type.
async fn manifest(
    downloads: &Arc<Downloads>,
    digest: Digest,
    hint: &Hint,
) -> Result<(Vec<u8>, String), PreloadError> {
    downloads.ensure(digest, Some(hint)).await.map_err(|e| download_error(e, &digest.to_string()))?;
    let size = match downloads.store.size(&digest).await {
        Some(s) if s <= MAX_MANIFEST as u64 => s as usize,
        _ => return Err(PreloadError::NotManifest(digest)),
    };
    let bytes = downloads
        .store
        .read_range(&digest, 0, size)
        .await
        .ok()
        .flatten()
        .ok_or_else(|| PreloadError::Unavailable(format!("{digest} evicted")))?;
    let media_type = manifest_media_type(&bytes).ok_or(PreloadError::NotManifest(digest))?;
    Ok((bytes.to_vec(), media_type))
}

/// Pulls the image `digest` names (narrowing an index to `platform`) into the cache.
pub async fn preload(
    downloads: &Arc<Downloads>,
    digest: Digest,
    hint: &Hint,
    platform: &Platform,
) -> Result<(usize, u64), PreloadError> {
    let (bytes, media_type) = manifest(downloads, digest, hint).await?;
    let mut manifests = Vec::new();
    let mut count = 1;
    if media_type == OCI_INDEX || media_type == DOCKER_LIST {
        let index = Manifest::parse(&bytes).map_err(|_| PreloadError::NotManifest(digest))?;
        let chosen: Vec<Digest> = index
            .manifests
            .iter()
            .filter(|m| m.platform.as_ref().is_some_and(|p| platform.matches(p)))
            .map(|m| m.digest)
            .collect();
        if chosen.is_empty() {
            return Err(PreloadError::NoPlatform(digest, platform.to_string()));
        }
        for child in chosen {
            let (bytes, media_type) = manifest(downloads, child, hint).await?;
            // Nested indexes are not followed: one level is what registries produce.
            if media_type == OCI_INDEX || media_type == DOCKER_LIST {
                return Err(PreloadError::NotManifest(child));
            }
            count += 1;
            manifests.push(bytes);
        }
    } else {
        manifests.push(bytes);
    }
    let mut blobs = Vec::new();
    for m in &manifests {
        blobs.extend(manifest_references(m).map_err(|_| PreloadError::NotManifest(digest))?);
    }
    blobs.sort_unstable();
    blobs.dedup();
    let sizes: Vec<u64> = futures_util::stream::iter(blobs)
        .map(|blob| async move {
            downloads.ensure(blob, Some(hint)).await.map_err(|e| download_error(e, &blob.to_string()))?;
            Ok::<_, PreloadError>(downloads.store.size(&blob).await.unwrap_or(0))
        })
        .buffer_unordered(PARALLEL_BLOBS)
        .try_collect()
        .await?;
    Ok((count + sizes.len(), sizes.iter().sum()))
}

/// Largest request body accepted.
const MAX_BODY: usize = 4096;

/// Background preloads running at once; more are refused with 429.
pub const MAX_BACKGROUND: usize = 16;

fn error_response(status: StatusCode, message: impl std::fmt::Display) -> HttpResponse {
    HttpResponse::build(status).json(serde_json::json!({ "status": "failure", "error": message.to_string() }))
}

impl PreloadError {
    fn status(&self) -> StatusCode {
        match self {
            Self::BadImage(_) | Self::BadPlatform(_) => StatusCode::BAD_REQUEST,
            Self::NotFound(_) | Self::NoPlatform(..) => StatusCode::NOT_FOUND,
            Self::NotManifest(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Denied(_) => StatusCode::UNAUTHORIZED,
        }
    }
}

/// `POST /shoal/v1/preload`.
pub async fn handle(body: web::Bytes, state: web::Data<AppState>) -> HttpResponse {
    if body.len() > MAX_BODY {
        return error_response(StatusCode::PAYLOAD_TOO_LARGE, format!("body over {MAX_BODY} bytes"));
    }
    let req: PreloadRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error_response(StatusCode::BAD_REQUEST, format!("bad body: {e}")),
    };
    let parsed = ImageRef::parse(&req.image).map_err(|e| PreloadError::BadImage(e.0)).and_then(|image| {
        let platform = req.platform.as_deref().map_or(Ok(Platform::host()), Platform::parse)?;
        Ok((image, platform))
    });
    let (image, platform) = match parsed {
        Ok(p) => p,
        Err(e) => return error_response(e.status(), e),
    };
    let downloads = state.downloads.clone();
    let digest = match resolve(&downloads, &image).await {
        Ok(d) => d,
        Err(e) => return error_response(e.status(), e),
    };
    if !req.wait {
        let Ok(permit) = state.preloads.clone().try_acquire_owned() else {
            return error_response(StatusCode::TOO_MANY_REQUESTS, "too many background preloads");
        };
        let name = req.image.clone();
        let hint = image.hint();
        let tasks = downloads.clone();
        tasks.spawn(async move {
            match preload(&downloads, digest, &hint, &platform).await {
                Ok((blobs, bytes)) => tracing::info!(image = %name, blobs, bytes, "preloaded"),
                Err(e) => tracing::warn!(image = %name, cause = %e, "preload failed"),
            }
            drop(permit);
        });
        let started = PreloadResponse {
            image: req.image,
            status: "started".into(),
            digest: Some(digest.to_string()),
            blobs: 0,
            bytes: 0,
        };
        return HttpResponse::Accepted().json(started);
    }
    match preload(&downloads, digest, &image.hint(), &platform).await {
        Ok((blobs, bytes)) => HttpResponse::Ok().json(PreloadResponse {
            image: req.image,
            status: "done".into(),
            digest: Some(digest.to_string()),
            blobs,
            bytes,
        }),
        Err(e) => error_response(e.status(), e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_credentials_are_a_401() {
        let e = download_error(DownloadError::Denied("refused".into()), "x");
        assert!(matches!(e, PreloadError::Denied(ref m) if m == "refused"), "{e:?}");
        assert_eq!(e.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(lookup_error(LookupError::Denied("no".into()), "x").status(), StatusCode::UNAUTHORIZED);
        assert_eq!(download_error(DownloadError::NotFound, "x").status(), StatusCode::NOT_FOUND);
        let down = download_error(DownloadError::Unavailable("down".into()), "x");
        assert_eq!(down.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn platforms() {
        assert_eq!(Platform::parse("all").unwrap(), Platform::All);
        let p = Platform::parse("linux/arm64/v8").unwrap();
        assert_eq!(p.to_string(), "linux/arm64/v8");
        for bad in ["", "linux", "linux/", "linux/amd64/v8/x", "li nux/amd64"] {
            assert!(Platform::parse(bad).is_err(), "{bad}");
        }
        let arm =
            IndexPlatform { os: "linux".into(), architecture: "arm64".into(), variant: Some("v8".into()) };
        assert!(Platform::parse("linux/arm64").unwrap().matches(&arm));
        assert!(p.matches(&arm));
        assert!(!Platform::parse("linux/arm64/v7").unwrap().matches(&arm));
        assert!(!Platform::parse("linux/amd64").unwrap().matches(&arm));
    }
}
