//! The referrers API on the origin: which manifests of a repository name a subject, and the
//! `GET /v2/<name>/referrers/<digest>` answer.
//!
//! A manifest pushed with a `subject` leaves a link, one small file per referrer holding the
//! descriptor it is listed with (`referrers/<name>/<subject hex>/<referrer hex>.json`),
//! computed once at the push ([`shoal_shared::referrers::referrer_of`]). With a durable store
//! (`--store`) every link is also an object under the same relative key, written before the
//! local file and deleted before it, like tags (`tags.rs`); listings are the union of both.
//! So referrers survive the disk as tags do, and a listing reads only the links, never a
//! manifest. Links of a manifest deleted since are skipped when listing (content is global:
//! a manifest deleted through another repository leaves this repository's link behind).
//!
//! On a ring the links live where the manifest PUT went: the owners of the repository get
//! every PUT (`Cluster::replicate_manifest`), so a lookup on another member is forwarded to
//! them as a tag lookup is.

use std::io;
use std::path::PathBuf;

use actix_web::http::{header, StatusCode};
use actix_web::{HttpRequest, HttpResponse};
use shoal_shared::digest::Digest;
use shoal_shared::http::oci_error;
use shoal_shared::oci::{valid_name, ErrorCode, OCI_INDEX};
use shoal_shared::referrers::{
    valid_artifact_type, Descriptor, Referrer, ReferrersIndex, FILTERS_APPLIED, MAX_DESCRIPTOR_JSON,
    MAX_REFERRERS,
};
use shoal_shared::store::BlobStore;

use crate::api::AppState;

/// Why a link could not be written.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("{subject} already has {MAX_REFERRERS} referrers in this repository")]
    Full { subject: Digest },
    #[error("referrer link: {0}")]
    Io(#[from] io::Error),
}

/// The referrer links, on disk and in the durable store.
#[derive(Debug, Clone)]
pub struct Referrers {
    root: PathBuf,
    store: BlobStore,
}

impl Referrers {
    pub fn new(store: &BlobStore) -> Self {
        Self { root: store.root().join("referrers"), store: store.clone() }
    }

    /// `referrers/<name>/<subject hex>`; `None` for a name outside the grammar (callers
    /// validate; this keeps a bug from naming another key).
    fn dir_key(name: &str, subject: &Digest) -> Option<String> {
        valid_name(name).then(|| format!("referrers/{name}/{}", subject.hex()))
    }

    fn dir(&self, name: &str, subject: &Digest) -> PathBuf {
        self.root.join(name).join(subject.hex())
    }

    /// Records that `referrer` names its subject in repository `name`.
    pub async fn add(&self, name: &str, referrer: &Referrer) -> Result<(), LinkError> {
        let subject = referrer.subject;
        let dir_key = Self::dir_key(name, &subject)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "invalid name"))?;
        let file = format!("{}.json", referrer.descriptor.digest.hex());
        let dir = self.dir(name, &subject);
        if !tokio::fs::try_exists(dir.join(&file)).await.unwrap_or(false)
            && count_files(&dir).await >= MAX_REFERRERS
        {
            return Err(LinkError::Full { subject });
        }
        let json = serde_json::to_vec(&referrer.descriptor).map_err(io::Error::other)?;
        if let Some(backing) = self.store.backing() {
            let key = format!("{dir_key}/{file}");
            backing.put_bytes(&key, json.clone().into()).await.map_err(io::Error::other)?;
        }
        tokio::fs::create_dir_all(&dir).await?;
        let tmp = self.store.temp_path("referrer");
        tokio::fs::write(&tmp, &json).await?;
        tokio::fs::rename(&tmp, dir.join(file)).await?;
        Ok(())
    }

    /// Forgets that `referrer` names `subject` in `name` (store first, then disk).
    pub async fn remove(&self, name: &str, subject: &Digest, referrer: &Digest) -> io::Result<()> {
        let file = format!("{}.json", referrer.hex());
        if let Some(backing) = self.store.backing() {
            let dir_key = Self::dir_key(name, subject)
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "invalid name"))?;
            backing.delete(&format!("{dir_key}/{file}")).await.map_err(io::Error::other)?;
        }
        match tokio::fs::remove_file(self.dir(name, subject).join(file)).await {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// The descriptors of the referrers of `subject` in `name`, from disk and the durable
    /// store (at most [`MAX_REFERRERS`] from each; unreadable links are logged and skipped).
    pub async fn list(&self, name: &str, subject: &Digest) -> Vec<Descriptor> {
        let mut out = Vec::new();
        let dir = self.dir(name, subject);
        let mut local = std::collections::HashSet::new();
        if let Ok(mut entries) = tokio::fs::read_dir(&dir).await {
            while let Ok(Some(entry)) = entries.next_entry().await {
                if local.len() >= MAX_REFERRERS {
                    break;
                }
                let Some(file) = entry.file_name().to_str().map(str::to_owned) else { continue };
                if let Some(d) = read_descriptor(&entry.path()).await {
                    local.insert(file);
                    out.push(d);
                }
            }
        }
        let Some((backing, dir_key)) = self.store.backing().zip(Self::dir_key(name, subject)) else {
            return out;
        };
        let names = match backing.list(&dir_key).await {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(dir = %dir_key, cause = %e, "cannot list referrers in the durable store");
                return out;
            }
        };
        for file in names.into_iter().filter(|f| !local.contains(f)).take(MAX_REFERRERS) {
            // Only names this module writes: `<64 hex>.json`.
            let Some(hex) = file.strip_suffix(".json") else { continue };
            if format!("sha256:{hex}").parse::<Digest>().is_err() {
                continue;
            }
            match fetch_small(backing.as_ref(), &format!("{dir_key}/{file}")).await {
                Ok(Some(bytes)) => match serde_json::from_slice::<Descriptor>(&bytes) {
                    Ok(d) => out.push(d),
                    Err(e) => {
                        tracing::warn!(%file, cause = %e, "unreadable referrer link in the durable store")
                    }
                },
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(%file, cause = %e, "cannot read a referrer link from the durable store")
                }
            }
        }
        out
    }
}

/// How many entries a directory has (0 when it does not exist).
async fn count_files(dir: &std::path::Path) -> usize {
    let mut n = 0;
    if let Ok(mut entries) = tokio::fs::read_dir(dir).await {
        while let Ok(Some(_)) = entries.next_entry().await {
            n += 1;
        }
    }
    n
}

/// A link file's descriptor; `None` (logged) when it is unreadable or too large.
async fn read_descriptor(path: &std::path::Path) -> Option<Descriptor> {
    let bytes = tokio::fs::read(path).await.ok()?;
    if bytes.len() > MAX_DESCRIPTOR_JSON {
        return None;
    }
    serde_json::from_slice(&bytes)
        .inspect_err(|e| tracing::warn!(path = %path.display(), cause = %e, "unreadable referrer link"))
        .ok()
}

/// A small object of the durable store, refused past [`MAX_DESCRIPTOR_JSON`].
async fn fetch_small(
    backing: &dyn shoal_shared::store::Backing,
    key: &str,
) -> Result<Option<Vec<u8>>, shoal_shared::store::backing::BackingError> {
    use futures_util::StreamExt as _;
    let Some(fetched) = backing.get(key).await? else { return Ok(None) };
    let mut body = fetched.body;
    let mut out = Vec::new();
    while let Some(chunk) = body.next().await {
        out.extend_from_slice(&chunk?);
        if out.len() > MAX_DESCRIPTOR_JSON {
            return Err(shoal_shared::store::backing::BackingError("referrer link too large".into()));
        }
    }
    Ok(Some(out))
}

/// `GET /v2/<name>/referrers/<digest>[?artifactType=]`: an OCI image index, 200 even when
/// empty. On a ring, a member that is not an owner of the repository asks the owners.
pub async fn get(
    req: &HttpRequest,
    name: &str,
    digest: &str,
    artifact_type: Option<&str>,
    hop: bool,
    state: &AppState,
) -> HttpResponse {
    let subject: Digest = match digest.parse() {
        Ok(d) => d,
        Err(e) => return oci_error(StatusCode::BAD_REQUEST, ErrorCode::DigestInvalid, e),
    };
    if artifact_type.is_some_and(|t| !valid_artifact_type(t)) {
        return oci_error(StatusCode::BAD_REQUEST, ErrorCode::Unsupported, "invalid artifactType");
    }
    if let (Some(cluster), false) = (&state.cluster, hop) {
        if !cluster.repo_owners(name).iter().any(|m| m == cluster.me()) {
            let path = req.uri().path_and_query().map_or(req.path(), |p| p.as_str());
            if let Some(resp) =
                cluster.forward(req.method(), path, name.as_bytes(), req.headers(), false).await
            {
                return crate::api::proxied(req, resp);
            }
        }
    }
    let mut held = Vec::new();
    for d in state.referrers.list(name, &subject).await {
        if state.store.size(&d.digest).await.is_some() {
            held.push(d);
        }
    }
    index_response(&ReferrersIndex::new(held, artifact_type), artifact_type.is_some())
}

/// The answer carrying `index` (with `OCI-Filters-Applied` when a filter was applied).
pub fn index_response(index: &ReferrersIndex, filtered: bool) -> HttpResponse {
    let mut resp = HttpResponse::Ok();
    resp.insert_header((header::CONTENT_TYPE, OCI_INDEX));
    if filtered {
        resp.insert_header((FILTERS_APPLIED, "artifactType"));
    }
    resp.body(serde_json::to_vec(index).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    use shoal_shared::store::backing::testing::MemoryBacking;
    use shoal_shared::store::Backing;

    use super::*;

    fn referrer(subject: &Digest, n: &[u8]) -> Referrer {
        Referrer {
            subject: *subject,
            descriptor: Descriptor {
                media_type: shoal_shared::oci::OCI_MANIFEST.into(),
                digest: Digest::of(n),
                size: n.len() as u64,
                artifact_type: Some("application/vnd.example.sig".into()),
                annotations: Default::default(),
            },
        }
    }

    #[tokio::test]
    async fn links_survive_an_empty_disk_and_deletions_reach_the_store() {
        let backing = Arc::new(MemoryBacking::default());
        let subject = Digest::of(b"subject");
        let first = tempfile::tempdir().expect("tmp");
        let store = BlobStore::open_backed(first.path(), backing.clone() as Arc<dyn Backing>).expect("open");
        let links = Referrers::new(&store);
        links.add("team/app", &referrer(&subject, b"sig")).await.expect("add");
        links.add("team/app", &referrer(&subject, b"sbom")).await.expect("add");
        links.add("other", &referrer(&subject, b"x")).await.expect("add");
        assert_eq!(links.list("team/app", &subject).await.len(), 2);
        assert!(links.list("team/app", &Digest::of(b"nothing")).await.is_empty());

        let second = tempfile::tempdir().expect("tmp");
        let store = BlobStore::open_backed(second.path(), backing.clone() as Arc<dyn Backing>).expect("open");
        let links = Referrers::new(&store);
        let mut listed: Vec<Digest> =
            links.list("team/app", &subject).await.into_iter().map(|d| d.digest).collect();
        listed.sort();
        let mut want = vec![Digest::of(b"sig"), Digest::of(b"sbom")];
        want.sort();
        assert_eq!(listed, want);

        links.remove("team/app", &subject, &Digest::of(b"sig")).await.expect("remove");
        let listed: Vec<Digest> =
            links.list("team/app", &subject).await.into_iter().map(|d| d.digest).collect();
        assert_eq!(listed, vec![Digest::of(b"sbom")]);
        // A store that cannot take the link refuses it.
        backing.fail.store(true, Ordering::Relaxed);
        assert!(links.add("team/app", &referrer(&subject, b"late")).await.is_err());
    }

    #[tokio::test]
    async fn a_subject_takes_a_bounded_number_of_referrers() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = BlobStore::open(dir.path()).expect("open");
        let links = Referrers::new(&store);
        let subject = Digest::of(b"s");
        for i in 0..MAX_REFERRERS {
            links.add("app", &referrer(&subject, &i.to_le_bytes())).await.expect("add");
        }
        let err = links.add("app", &referrer(&subject, b"one too many")).await;
        assert!(matches!(err, Err(LinkError::Full { .. })), "{err:?}");
        // Writing an existing link again is not a new one.
        links.add("app", &referrer(&subject, &0usize.to_le_bytes())).await.expect("rewrite");
        assert_eq!(links.list("app", &subject).await.len(), MAX_REFERRERS);
    }
}
