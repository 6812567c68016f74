//! The origin's durable store (`--store URL`), through the `object_store` crate: the
//! [`Backing`] of its [`BlobStore`](shoal_shared::store::BlobStore), so blobs, their metainfo
//! and tags are kept for good outside the local `--data` directory, which becomes a cache.
//!
//! URLs: `file:///DIR` (a directory, e.g. a network mount; the data directory itself means
//! "no separate store", today's behaviour), `s3://BUCKET[/PREFIX]` (any S3-compatible service,
//! configured by the standard `AWS_*` environment: `AWS_ENDPOINT_URL`, `AWS_REGION`,
//! `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_ALLOW_HTTP`, ...), `gs://BUCKET[/PREFIX]`
//! (`GOOGLE_*`, `SERVICE_ACCOUNT`) and `az://CONTAINER[/PREFIX]` (`AZURE_*`). Every key is
//! under the prefix, laid out as the data directory is (see `shoal_shared::store::backing`).
//!
//! Two clients per store: writes and listings with a bound on each request (a part of a
//! multipart upload is at most [`PART`] bytes), and reads without one (a blob of any size
//! streams as long as it keeps moving; a body that stalls for [`STALL`] fails). Transient
//! failures are retried for at most [`RETRY_FOR`], so a store that is down fails a push with
//! 503 within that time instead of holding it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::StreamExt as _;
use object_store::path::Path as Key;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt as _, RetryConfig, WriteMultipart};
use shoal_shared::store::backing::{Backing, BackingError, Fetched};

/// Files up to this size are stored with one request; larger ones as a multipart upload of
/// parts this size (S3 wants at least 5 MiB per part but the last).
pub const PART: usize = 8 << 20;
/// Parts of one upload in flight at once (memory: a file upload holds at most this many
/// parts plus one).
const PARTS_IN_FLIGHT: usize = 4;
/// A read whose body makes no progress for this long fails.
pub const STALL: Duration = Duration::from_secs(30);
/// One write or listing request (a part at most) must complete within this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Transient failures of one request are retried for at most this long.
pub const RETRY_FOR: Duration = Duration::from_secs(20);
/// How long the startup check may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(15);

/// Why the durable store cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DurableError {
    #[error("--store {url}: {reason}")]
    Url { url: String, reason: String },
    #[error("--store {url}: {source}")]
    Client { url: String, source: object_store::Error },
    #[error("--store {url} is unreachable or refuses access: {cause}")]
    Unreachable { url: String, cause: String },
    #[error("--store {url} did not answer within {}s", .secs)]
    Timeout { url: String, secs: u64 },
}

/// A parsed `--store` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// `file:///DIR`.
    File(PathBuf),
    /// `s3://BUCKET/PREFIX`.
    S3 { bucket: String, prefix: String },
    /// `gs://BUCKET/PREFIX`.
    Gcs { bucket: String, prefix: String },
    /// `az://CONTAINER/PREFIX`.
    Azure { container: String, prefix: String },
}

impl StoreUrl {
    /// Parses `file:///DIR`, `s3://`, `gs://` or `az://` followed by `BUCKET[/PREFIX]`.
    /// The prefix is normalized (no leading, trailing or doubled `/`); `.` and `..`
    /// segments, credentials, queries and fragments are refused.
    pub fn parse(url: &str) -> Result<Self, DurableError> {
        let bad = |reason: &str| DurableError::Url { url: url.to_owned(), reason: reason.to_owned() };
        let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("expected SCHEME://..."))?;
        if rest.contains(['?', '#']) {
            return Err(bad("no query or fragment allowed"));
        }
        if scheme == "file" {
            let path = Path::new(rest);
            if !path.is_absolute() {
                return Err(bad("file:// needs an absolute path (file:///var/lib/shoal/store)"));
            }
            if path.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
                return Err(bad("no `..` in the path"));
            }
            return Ok(Self::File(path.to_path_buf()));
        }
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad("no bucket"));
        }
        if !bucket.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_')) {
            return Err(bad("the bucket name may hold letters, digits, '-', '.' and '_' only"));
        }
        let segments: Vec<&str> = prefix.split('/').filter(|s| !s.is_empty()).collect();
        if segments.iter().any(|s| matches!(*s, "." | "..")) {
            return Err(bad("no `.` or `..` in the prefix"));
        }
        let (bucket, prefix) = (bucket.to_owned(), segments.join("/"));
        match scheme {
            "s3" => Ok(Self::S3 { bucket, prefix }),
            "gs" => Ok(Self::Gcs { bucket, prefix }),
            "az" => Ok(Self::Azure { container: bucket, prefix }),
            _ => Err(bad("unknown scheme (file, s3, gs or az)")),
        }
    }

    fn prefix(&self) -> &str {
        match self {
            Self::File(_) => "",
            Self::S3 { prefix, .. } | Self::Gcs { prefix, .. } | Self::Azure { prefix, .. } => prefix,
        }
    }
}

/// Where the key `key` (relative, as the store names it) lives under `prefix`.
pub fn object_key(prefix: &str, key: &str) -> Key {
    if prefix.is_empty() {
        Key::from(key)
    } else {
        Key::from(format!("{prefix}/{key}"))
    }
}

/// The durable store: a [`Backing`] over an [`ObjectStore`].
#[derive(Debug)]
pub struct ObjectBacking {
    url: String,
    prefix: String,
    /// Writes and listings: each request bounded by [`REQUEST_TIMEOUT`].
    writes: Arc<dyn ObjectStore>,
    /// Reads: no bound on the whole body (see [`STALL`]).
    reads: Arc<dyn ObjectStore>,
}

/// The backing `--store URL` names for an origin whose data directory is `data`: `None` when
/// it is the data directory itself. Checks that the store answers (a listing under the
/// prefix, within [`PROBE_TIMEOUT`]): a store that is unreachable, refuses the credentials
/// or lacks the bucket is an error naming the URL.
pub async fn connect(url: &str, data: &Path) -> Result<Option<Arc<ObjectBacking>>, DurableError> {
    let parsed = StoreUrl::parse(url)?;
    let client = |source| DurableError::Client { url: url.to_owned(), source };
    let (writes, reads): (Arc<dyn ObjectStore>, Arc<dyn ObjectStore>) = match &parsed {
        StoreUrl::File(dir) => {
            std::fs::create_dir_all(dir).map_err(|e| DurableError::Unreachable {
                url: url.to_owned(),
                cause: format!("cannot create {}: {e}", dir.display()),
            })?;
            let same = |p: &Path| std::fs::canonicalize(p).ok();
            if same(dir).is_some() && same(dir) == same(data) {
                return Ok(None);
            }
            let local = Arc::new(object_store::local::LocalFileSystem::new_with_prefix(dir).map_err(client)?);
            (local.clone(), local)
        }
        _ => (
            build(&parsed, write_options()).map_err(client)?,
            build(&parsed, ClientOptions::new().with_timeout_disabled().with_connect_timeout(CONNECT))
                .map_err(client)?,
        ),
    };
    let backing = ObjectBacking { url: url.to_owned(), prefix: parsed.prefix().to_owned(), writes, reads };
    backing.probe().await?;
    Ok(Some(Arc::new(backing)))
}

const CONNECT: Duration = Duration::from_secs(5);

fn write_options() -> ClientOptions {
    ClientOptions::new().with_timeout(REQUEST_TIMEOUT).with_connect_timeout(CONNECT)
}

fn retry() -> RetryConfig {
    RetryConfig { max_retries: 10, retry_timeout: RETRY_FOR, backoff: Default::default() }
}

/// The environment variables starting with `prefix`, keys lowercased (how the builders'
/// `from_env` read them; done here so our client options come first and the environment can
/// still set any of them).
fn env_with(prefix: &str) -> Vec<(String, String)> {
    std::env::vars()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect()
}

fn build(url: &StoreUrl, options: ClientOptions) -> Result<Arc<dyn ObjectStore>, object_store::Error> {
    Ok(match url {
        StoreUrl::S3 { bucket, .. } => {
            let mut b =
                object_store::aws::AmazonS3Builder::new().with_client_options(options).with_retry(retry());
            for (k, v) in env_with("AWS_") {
                if let Ok(key) = k.parse() {
                    b = b.with_config(key, v);
                }
            }
            Arc::new(b.with_bucket_name(bucket).build()?)
        }
        StoreUrl::Gcs { bucket, .. } => {
            let mut b = object_store::gcp::GoogleCloudStorageBuilder::new()
                .with_client_options(options)
                .with_retry(retry());
            if let Ok(path) = std::env::var("SERVICE_ACCOUNT") {
                b = b.with_service_account_path(path);
            }
            for (k, v) in env_with("GOOGLE_") {
                if let Ok(key) = k.parse() {
                    b = b.with_config(key, v);
                }
            }
            Arc::new(b.with_bucket_name(bucket).build()?)
        }
        StoreUrl::Azure { container, .. } => {
            let mut b = object_store::azure::MicrosoftAzureBuilder::new()
                .with_client_options(options)
                .with_retry(retry());
            for (k, v) in env_with("AZURE_") {
                if let Ok(key) = k.parse() {
                    b = b.with_config(key, v);
                }
            }
            Arc::new(b.with_container_name(container).build()?)
        }
        StoreUrl::File(_) => unreachable!("file:// is built by `connect`"),
    })
}

impl ObjectBacking {
    pub fn url(&self) -> &str {
        &self.url
    }

    fn key(&self, key: &str) -> Key {
        object_key(&self.prefix, key)
    }

    fn error(&self, what: &str, key: &str, e: impl std::fmt::Display) -> BackingError {
        BackingError(format!("{} {what} {key}: {e}", self.url))
    }

    async fn probe(&self) -> Result<(), DurableError> {
        let prefix = (!self.prefix.is_empty()).then(|| Key::from(self.prefix.as_str()));
        match tokio::time::timeout(PROBE_TIMEOUT, self.writes.list_with_delimiter(prefix.as_ref())).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(DurableError::Unreachable { url: self.url.clone(), cause: e.to_string() }),
            Err(_) => Err(DurableError::Timeout { url: self.url.clone(), secs: PROBE_TIMEOUT.as_secs() }),
        }
    }

    async fn upload(&self, key: &Key, path: &Path) -> Result<(), String> {
        let len = tokio::fs::metadata(path).await.map_err(|e| e.to_string())?.len();
        if len <= PART as u64 {
            let bytes = tokio::fs::read(path).await.map_err(|e| e.to_string())?;
            self.writes.put(key, Bytes::from(bytes).into()).await.map_err(|e| e.to_string())?;
            return Ok(());
        }
        let upload = self.writes.put_multipart(key).await.map_err(|e| e.to_string())?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART);
        let result = async {
            use tokio::io::AsyncReadExt as _;
            let mut file = tokio::fs::File::open(path).await.map_err(|e| e.to_string())?;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = file.read(&mut buf).await.map_err(|e| e.to_string())?;
                if n == 0 {
                    return Ok(());
                }
                writer.wait_for_capacity(PARTS_IN_FLIGHT).await.map_err(|e| e.to_string())?;
                writer.write(&buf[..n]);
            }
        }
        .await;
        match result {
            Ok(()) => writer.finish().await.map(drop).map_err(|e| e.to_string()),
            Err(e) => {
                // Parts already sent are dropped by the store; the object never appeared.
                if let Err(abort) = writer.abort().await {
                    tracing::warn!(key = %key, cause = %abort, "cannot abort multipart upload");
                }
                Err(e)
            }
        }
    }
}

impl Backing for ObjectBacking {
    fn put_file<'a>(&'a self, key: &'a str, path: &'a Path) -> BoxFuture<'a, Result<(), BackingError>> {
        Box::pin(
            async move { self.upload(&self.key(key), path).await.map_err(|e| self.error("put", key, e)) },
        )
    }

    fn put_bytes<'a>(&'a self, key: &'a str, bytes: Bytes) -> BoxFuture<'a, Result<(), BackingError>> {
        Box::pin(async move {
            self.writes
                .put(&self.key(key), bytes.into())
                .await
                .map(drop)
                .map_err(|e| self.error("put", key, e))
        })
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Fetched>, BackingError>> {
        Box::pin(async move {
            let result = match self.reads.get(&self.key(key)).await {
                Ok(r) => r,
                Err(object_store::Error::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(self.error("get", key, e)),
            };
            let modified: SystemTime = result.meta.last_modified.into();
            let (url, key) = (self.url.clone(), key.to_owned());
            let body = futures_util::stream::unfold(Some(result.into_stream()), move |stream| {
                let (url, key) = (url.clone(), key.clone());
                async move {
                    let mut stream = stream?;
                    match tokio::time::timeout(STALL, stream.next()).await {
                        Ok(None) => None,
                        Ok(Some(Ok(bytes))) => Some((Ok(bytes), Some(stream))),
                        Ok(Some(Err(e))) => Some((Err(BackingError(format!("{url} get {key}: {e}"))), None)),
                        Err(_) => Some((
                            Err(BackingError(format!(
                                "{url} get {key}: no progress for {}s",
                                STALL.as_secs()
                            ))),
                            None,
                        )),
                    }
                }
            });
            Ok(Some(Fetched { body: Box::pin(body), modified: Some(modified) }))
        })
    }

    fn list<'a>(&'a self, dir: &'a str) -> BoxFuture<'a, Result<Vec<String>, BackingError>> {
        Box::pin(async move {
            match self.writes.list_with_delimiter(Some(&self.key(dir))).await {
                Ok(listing) => Ok(listing
                    .objects
                    .iter()
                    .filter_map(|o| o.location.filename().map(str::to_owned))
                    .collect()),
                Err(object_store::Error::NotFound { .. }) => Ok(Vec::new()),
                Err(e) => Err(self.error("list", dir, e)),
            }
        })
    }

    fn exists<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, BackingError>> {
        Box::pin(async move {
            match self.writes.head(&self.key(key)).await {
                Ok(_) => Ok(true),
                Err(object_store::Error::NotFound { .. }) => Ok(false),
                Err(e) => Err(self.error("head", key, e)),
            }
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), BackingError>> {
        Box::pin(async move {
            match self.writes.delete(&self.key(key)).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(self.error("delete", key, e)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_into_bucket_and_normalized_prefix() {
        let s3 = |b: &str, p: &str| StoreUrl::S3 { bucket: b.into(), prefix: p.into() };
        assert_eq!(StoreUrl::parse("s3://bucket").unwrap(), s3("bucket", ""));
        assert_eq!(StoreUrl::parse("s3://bucket/").unwrap(), s3("bucket", ""));
        assert_eq!(StoreUrl::parse("s3://b-1.x/shoal//prod/").unwrap(), s3("b-1.x", "shoal/prod"));
        assert_eq!(
            StoreUrl::parse("gs://g/p").unwrap(),
            StoreUrl::Gcs { bucket: "g".into(), prefix: "p".into() }
        );
        assert_eq!(
            StoreUrl::parse("az://c/p/q").unwrap(),
            StoreUrl::Azure { container: "c".into(), prefix: "p/q".into() }
        );
        assert_eq!(StoreUrl::parse("file:///var/lib/x").unwrap(), StoreUrl::File("/var/lib/x".into()));
        for bad in [
            "bucket",
            "s3://",
            "s3:///prefix",
            "s3://user:pw@bucket/p",
            "s3://bucket/../x",
            "s3://bucket/a/./b",
            "s3://bucket/p?x=1",
            "http://bucket/p",
            "file://relative/dir",
            "file:///a/../b",
        ] {
            let err = StoreUrl::parse(bad).expect_err(bad);
            assert!(err.to_string().contains(bad), "{err} names {bad}");
        }
    }

    #[test]
    fn keys_live_under_the_prefix() {
        assert_eq!(object_key("", "meta/ab").as_ref(), "meta/ab");
        assert_eq!(object_key("shoal/prod", "blobs/sha256/ab").as_ref(), "shoal/prod/blobs/sha256/ab");
        assert_eq!(object_key("p", "tags/team/app/v1.tag").as_ref(), "p/tags/team/app/v1.tag");
    }

    #[tokio::test]
    async fn the_data_directory_itself_is_no_separate_store() {
        let dir = tempfile::tempdir().expect("tmp");
        let url = format!("file://{}", dir.path().display());
        assert!(connect(&url, dir.path()).await.expect("connect").is_none());
        let other = tempfile::tempdir().expect("tmp");
        assert!(connect(&url, other.path()).await.expect("connect").is_some());
    }

    /// The whole backing contract on a directory store: big files go up in parts and come
    /// back whole, absent keys are `None`, listings show one level.
    #[tokio::test]
    async fn a_directory_store_keeps_files_bytes_and_listings() {
        let store_dir = tempfile::tempdir().expect("tmp");
        let data = tempfile::tempdir().expect("tmp");
        let url = format!("file://{}", store_dir.path().display());
        let backing = connect(&url, data.path()).await.expect("connect").expect("backing");
        let big: Vec<u8> = (0..PART as u32 * 2 + 12345).map(|i| (i % 251) as u8).collect();
        let file = data.path().join("big");
        std::fs::write(&file, &big).expect("write");
        backing.put_file("blobs/sha256/big", &file).await.expect("put");
        backing.put_bytes("tags/a/v1.tag", Bytes::from_static(b"x")).await.expect("put");
        backing.put_bytes("tags/a/b/v2.tag", Bytes::from_static(b"y")).await.expect("put");
        let fetched = backing.get("blobs/sha256/big").await.expect("get").expect("present");
        let chunks: Vec<Bytes> = fetched.body.map(|c| c.expect("chunk")).collect().await;
        assert_eq!(chunks.concat(), big);
        assert!(backing.get("blobs/sha256/none").await.expect("get").is_none());
        assert_eq!(backing.list("tags/a").await.expect("list"), vec!["v1.tag".to_string()]);
        assert!(backing.list("tags/none").await.expect("list").is_empty());
    }
}
