//! The push client: uploads an [`Image`] to an origin over the OCI distribution push API.
//!
//! Blobs are checked with `HEAD` and, when absent, uploaded with a monolithic
//! `POST .../blobs/uploads/` + `PUT <location>?digest=...` whose body is streamed from disk in
//! 1 MiB chunks and hashed on the way: if the bytes do not match the expected digest the push
//! fails. Child manifests are then `PUT` by digest and finally the root by tag.

use std::io::SeekFrom;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context as _};
use futures_util::{stream, StreamExt as _, TryStreamExt as _};
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::{header, Client, StatusCode, Url};
use shoal_shared::digest::{Digest, DigestHasher};
use shoal_shared::oci::{valid_name, valid_tag};
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};

use super::source::{self, BlobLocation, BlobRef, Image, ManifestDoc, Source};

/// How many blobs are uploaded at once.
const CONCURRENCY: usize = 4;
/// Read size for streaming blob bodies.
const CHUNK: usize = 1 << 20;
/// How much of an error response body ends up in the error message.
const MAX_ERROR_BODY: usize = 1024;

/// How to report progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// An indicatif progress bar over the total blob bytes (for terminals).
    Bar,
    /// One plain line per blob on stderr.
    Lines,
    /// Nothing.
    Quiet,
}

/// What a push did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushReport {
    /// Blobs sent to the origin.
    pub uploaded: usize,
    /// Blobs the origin already had.
    pub skipped: usize,
    /// Bytes of blob content sent.
    pub bytes: u64,
    /// Digest of the manifest or index the tag now points at.
    pub root: Digest,
}

/// Splits and validates `NAME:TAG`.
pub fn parse_target(target: &str) -> anyhow::Result<(String, String)> {
    let (name, tag) = target.rsplit_once(':').ok_or_else(|| anyhow!("target {target:?} must be NAME:TAG"))?;
    if !valid_name(name) {
        bail!(
            "invalid repository name {name:?}: must match \
             [a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)*)*"
        );
    }
    if !valid_tag(tag) {
        bail!("invalid tag {tag:?}: must match [a-zA-Z0-9_][a-zA-Z0-9._-]{{0,127}}");
    }
    Ok((name.to_owned(), tag.to_owned()))
}

/// Pushes `source` to `origin` (e.g. `http://127.0.0.1:5000`) as `target` (`NAME:TAG`).
pub async fn push(
    origin: &str,
    source: &Source,
    target: &str,
    progress: Progress,
) -> anyhow::Result<PushReport> {
    push_with_token(origin, None, source, target, progress).await
}

/// [`push`] to an origin that requires a bearer token for uploads.
pub async fn push_with_token(
    origin: &str,
    token: Option<&str>,
    source: &Source,
    target: &str,
    progress: Progress,
) -> anyhow::Result<PushReport> {
    let (name, tag) = parse_target(target)?;
    let base =
        Url::parse(origin.trim_end_matches('/')).with_context(|| format!("invalid origin URL {origin:?}"))?;
    let loaded = {
        let source = source.clone();
        tokio::task::spawn_blocking(move || source::load(&source))
            .await
            .context("image loader task failed")?
    };
    let image = loaded.with_context(|| format!("reading {source}"))?;
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(token) = token {
        let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
            .context("the upload token must be printable ASCII")?;
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    let client = Client::builder().default_headers(headers).build().context("HTTP client")?;
    push_image(&client, &base, &name, &tag, &image, progress).await
}

/// Reporting shared by the concurrent blob uploads.
#[derive(Debug, Clone)]
struct Reporter {
    mode: Progress,
    bar: Option<ProgressBar>,
}

impl Reporter {
    fn new(mode: Progress, total: u64) -> Self {
        let bar = (mode == Progress::Bar).then(|| {
            let bar = ProgressBar::new(total);
            if let Ok(style) = ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta}) {msg}",
            ) {
                bar.set_style(style);
            }
            bar
        });
        Self { mode, bar }
    }

    fn advance(&self, bytes: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(bytes);
        }
    }

    fn line(&self, text: &str) {
        match (&self.bar, self.mode) {
            (Some(bar), _) => bar.set_message(text.to_owned()),
            (None, Progress::Lines) => eprintln!("{text}"),
            _ => {}
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

enum BlobOutcome {
    Uploaded(u64),
    Skipped,
}

async fn push_image(
    client: &Client,
    base: &Url,
    name: &str,
    tag: &str,
    image: &Image,
    progress: Progress,
) -> anyhow::Result<PushReport> {
    let total: u64 = image.blobs.iter().map(|b| b.size).sum();
    let reporter = Reporter::new(progress, total);
    let outcomes: Vec<BlobOutcome> = stream::iter(image.blobs.iter())
        .map(|blob| push_blob(client, base, name, blob, &reporter))
        .buffer_unordered(CONCURRENCY)
        .try_collect()
        .await
        .inspect_err(|_| reporter.finish())?;
    reporter.finish();

    let mut report = PushReport { uploaded: 0, skipped: 0, bytes: 0, root: image.root.digest };
    for outcome in outcomes {
        match outcome {
            BlobOutcome::Uploaded(bytes) => {
                report.uploaded += 1;
                report.bytes += bytes;
            }
            BlobOutcome::Skipped => report.skipped += 1,
        }
    }

    for doc in image.manifests.iter().filter(|m| m.digest != image.root.digest) {
        put_manifest(client, base, name, &doc.digest.to_string(), doc).await?;
        reporter.line(&format!("pushed manifest {}", doc.digest));
    }
    put_manifest(client, base, name, tag, &image.root).await?;
    if progress == Progress::Lines {
        eprintln!("pushed {name}:{tag} -> {}", image.root.digest);
    }
    Ok(report)
}

fn join(base: &Url, path: &str) -> anyhow::Result<Url> {
    base.join(path).with_context(|| format!("cannot build URL for {path:?} on {base}"))
}

/// Turns a non-success response into an error with the status and (truncated) body.
async fn check(response: reqwest::Response, what: &str) -> anyhow::Result<reqwest::Response> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    Err(status_error(response, what).await)
}

async fn status_error(response: reqwest::Response, what: &str) -> anyhow::Error {
    let status = response.status();
    let body = response.bytes().await.unwrap_or_default();
    let shown = &body[..body.len().min(MAX_ERROR_BODY)];
    let text = String::from_utf8_lossy(shown);
    let ellipsis = if body.len() > MAX_ERROR_BODY { "…" } else { "" };
    anyhow!("{what}: origin answered {status}: {}{ellipsis}", text.trim())
}

async fn push_blob(
    client: &Client,
    base: &Url,
    name: &str,
    blob: &BlobRef,
    reporter: &Reporter,
) -> anyhow::Result<BlobOutcome> {
    let digest = blob.digest;
    let blob_url = join(base, &format!("/v2/{name}/blobs/{digest}"))?;
    let head = client.head(blob_url).send().await.with_context(|| format!("HEAD blob {digest}"))?;
    match head.status() {
        StatusCode::OK => {
            reporter.advance(blob.size);
            reporter.line(&format!("exists   {digest} ({} bytes)", blob.size));
            return Ok(BlobOutcome::Skipped);
        }
        StatusCode::NOT_FOUND => {}
        _ => return Err(status_error(head, &format!("HEAD blob {digest}")).await),
    }

    let start = client
        .post(join(base, &format!("/v2/{name}/blobs/uploads/"))?)
        .send()
        .await
        .with_context(|| format!("starting upload of blob {digest}"))?;
    let start = check(start, &format!("starting upload of blob {digest}")).await?;
    let location = start
        .headers()
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| anyhow!("starting upload of blob {digest}: no Location header"))?;
    let mut url = join(base, location)?;
    let query = match url.query() {
        Some(q) if !q.is_empty() => format!("{q}&digest={digest}"),
        _ => format!("digest={digest}"),
    };
    url.set_query(Some(&query));

    let verdict = Arc::new(Mutex::new(None::<String>));
    let body = blob_body(blob, reporter.clone(), Arc::clone(&verdict)).await?;
    let sent = client
        .put(url)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, blob.size)
        .body(body)
        .send()
        .await;
    let failure = verdict.lock().ok().and_then(|v| v.clone());
    if let Some(failure) = failure {
        bail!("{failure}");
    }
    let response = sent.with_context(|| format!("uploading blob {digest}"))?;
    check(response, &format!("uploading blob {digest}")).await?;
    reporter.line(&format!("uploaded {digest} ({} bytes)", blob.size));
    Ok(BlobOutcome::Uploaded(blob.size))
}

struct BodyState {
    file: tokio::io::Take<tokio::fs::File>,
    hasher: Option<DigestHasher>,
    sent: u64,
    blob: BlobRef,
    reporter: Reporter,
    verdict: Arc<Mutex<Option<String>>>,
}

impl BodyState {
    fn fail(&self, message: String) -> std::io::Error {
        if let Ok(mut verdict) = self.verdict.lock() {
            *verdict = Some(message.clone());
        }
        std::io::Error::new(std::io::ErrorKind::InvalidData, message)
    }

    /// Finishes the hash (ending the stream) and checks size and digest.
    fn verify(&mut self) -> Option<std::io::Error> {
        let hasher = self.hasher.take()?;
        let digest = self.blob.digest;
        if self.sent != self.blob.size {
            let message =
                format!("blob {digest}: source is truncated ({} of {} bytes)", self.sent, self.blob.size);
            return Some(self.fail(message));
        }
        let actual = hasher.finish();
        if actual != digest {
            let message = format!(
                "blob {digest}: content does not match its digest (it hashes to {actual}); \
                 the image source is corrupt"
            );
            return Some(self.fail(message));
        }
        None
    }
}

/// A streaming request body over the blob's bytes that checks size and digest as it goes.
async fn blob_body(
    blob: &BlobRef,
    reporter: Reporter,
    verdict: Arc<Mutex<Option<String>>>,
) -> anyhow::Result<reqwest::Body> {
    let (path, offset) = match &blob.location {
        BlobLocation::File(path) => (path.clone(), 0),
        BlobLocation::TarEntry { archive, offset } => (archive.clone(), *offset),
    };
    let mut file =
        tokio::fs::File::open(&path).await.with_context(|| format!("opening {}", path.display()))?;
    file.seek(SeekFrom::Start(offset)).await.with_context(|| format!("seeking in {}", path.display()))?;
    let state = BodyState {
        file: file.take(blob.size),
        hasher: Some(DigestHasher::new()),
        sent: 0,
        blob: blob.clone(),
        reporter,
        verdict,
    };
    let body = stream::unfold(state, |mut state| async move {
        state.hasher.as_ref()?;
        let mut buf = vec![0u8; CHUNK];
        match state.file.read(&mut buf).await {
            Ok(0) => {
                // Only reached early (truncated source) or for an empty blob.
                state.verify().map(|err| (Err(err), state))
            }
            Ok(n) => {
                buf.truncate(n);
                if let Some(hasher) = state.hasher.as_mut() {
                    hasher.update(&buf);
                }
                state.sent += n as u64;
                state.reporter.advance(n as u64);
                // Verify before yielding the last chunk, so a corrupt blob never reaches the
                // origin complete.
                if state.sent >= state.blob.size {
                    if let Some(err) = state.verify() {
                        return Some((Err(err), state));
                    }
                }
                Some((Ok(bytes::Bytes::from(buf)), state))
            }
            Err(e) => {
                let message = format!("blob {}: read error: {e}", state.blob.digest);
                let err = state.fail(message);
                state.hasher = None;
                Some((Err(err), state))
            }
        }
    });
    Ok(reqwest::Body::wrap_stream(body))
}

async fn put_manifest(
    client: &Client,
    base: &Url,
    name: &str,
    reference: &str,
    doc: &ManifestDoc,
) -> anyhow::Result<()> {
    let what = format!("putting manifest {name}:{reference}");
    let response = client
        .put(join(base, &format!("/v2/{name}/manifests/{reference}"))?)
        .header(header::CONTENT_TYPE, doc.media_type.as_str())
        .body(doc.bytes.clone())
        .send()
        .await
        .with_context(|| what.clone())?;
    check(response, &what).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_targets() {
        for good in ["foo:latest", "library/ubuntu:22.04", "a.b_c__d---e/f:_x", "x0/y1/z2:V-1.2_3"] {
            assert!(parse_target(good).is_ok(), "{good} should be valid");
        }
        let long_tag = format!("foo:{}", "a".repeat(129));
        for bad in [
            "foo",
            "Foo:latest",
            "foo:",
            ":tag",
            "foo/:tag",
            "/foo:tag",
            "foo..bar:tag",
            "foo___bar:tag",
            "foo-:tag",
            "foo:-tag",
            "foo:.tag",
            "foo:ta/g",
            "foo:tag with space",
            long_tag.as_str(),
        ] {
            assert!(parse_target(bad).is_err(), "{bad} should be invalid");
        }
        assert!(parse_target(&format!("foo:{}", "a".repeat(128))).is_ok());
    }

    /// A minimal in-memory registry implementing the push endpoints.
    mod fake {
        use std::collections::HashMap;
        use std::net::SocketAddr;
        use std::sync::{Arc, Mutex};

        use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
        use shoal_shared::digest::Digest;

        #[derive(Default, Debug)]
        pub struct State {
            pub blobs: HashMap<String, Vec<u8>>,
            pub manifests: HashMap<String, (String, Vec<u8>)>,
            pub puts: usize,
        }

        pub type Shared = Arc<Mutex<State>>;

        async fn head(state: web::Data<Shared>, path: web::Path<(String, String)>) -> HttpResponse {
            let (_, digest) = path.into_inner();
            let present = state.lock().expect("lock").blobs.contains_key(&digest);
            if present {
                HttpResponse::Ok().finish()
            } else {
                HttpResponse::NotFound().finish()
            }
        }

        async fn start(path: web::Path<String>) -> HttpResponse {
            HttpResponse::Accepted()
                .insert_header(("Location", format!("/v2/{}/blobs/uploads/u1?state=abc", path.into_inner())))
                .finish()
        }

        async fn put_blob(state: web::Data<Shared>, req: HttpRequest, body: web::Bytes) -> HttpResponse {
            let query = web::Query::<HashMap<String, String>>::from_query(req.query_string());
            let Ok(query) = query else {
                return HttpResponse::BadRequest().body("bad query");
            };
            if query.get("state").map(String::as_str) != Some("abc") {
                return HttpResponse::BadRequest().body("lost upload state");
            }
            let Some(digest) = query.get("digest") else {
                return HttpResponse::BadRequest().body("no digest");
            };
            if Digest::of(&body).to_string() != *digest {
                return HttpResponse::BadRequest().body("DIGEST_INVALID");
            }
            let mut state = state.lock().expect("lock");
            state.puts += 1;
            state.blobs.insert(digest.clone(), body.to_vec());
            HttpResponse::Created().finish()
        }

        async fn put_manifest(
            state: web::Data<Shared>,
            req: HttpRequest,
            path: web::Path<(String, String)>,
            body: web::Bytes,
        ) -> HttpResponse {
            let (_, reference) = path.into_inner();
            if reference == "forbidden" {
                return HttpResponse::Forbidden().body("x".repeat(5000));
            }
            let content_type = req
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            state.lock().expect("lock").manifests.insert(reference, (content_type, body.to_vec()));
            HttpResponse::Created().finish()
        }

        pub fn spawn() -> (SocketAddr, Shared) {
            let state: Shared = Arc::default();
            let data = web::Data::new(Arc::clone(&state));
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                actix_web::rt::System::new().block_on(async move {
                    let server = HttpServer::new(move || {
                        App::new()
                            .app_data(data.clone())
                            .app_data(web::PayloadConfig::new(64 << 20))
                            .route("/v2/{name:.+}/blobs/uploads/", web::post().to(start))
                            .route("/v2/{name:.+}/blobs/uploads/{id}", web::put().to(put_blob))
                            .route("/v2/{name:.+}/blobs/{digest}", web::head().to(head))
                            .route("/v2/{name:.+}/manifests/{reference}", web::put().to(put_manifest))
                    })
                    .workers(1)
                    .disable_signals()
                    .bind(("127.0.0.1", 0))
                    .expect("bind");
                    tx.send(server.addrs()[0]).expect("send addr");
                    server.run().await
                })
            });
            (rx.recv().expect("server address"), state)
        }
    }

    fn write_layout(dir: &std::path::Path, layers: &[&[u8]], corrupt: bool) -> Digest {
        let blobs = dir.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).expect("mkdir");
        let put = |media_type: &str, bytes: &[u8]| {
            let digest = Digest::of(bytes);
            std::fs::write(blobs.join(digest.hex()), bytes).expect("write");
            serde_json::json!({"mediaType": media_type, "digest": digest.to_string(), "size": bytes.len()})
        };
        let config = put("application/vnd.oci.image.config.v1+json", b"{}");
        let layer_descs: Vec<_> =
            layers.iter().map(|l| put("application/vnd.oci.image.layer.v1.tar", l)).collect();
        if corrupt {
            let victim = Digest::of(layers[0]);
            let mut bytes = layers[0].to_vec();
            bytes[0] ^= 1;
            std::fs::write(blobs.join(victim.hex()), bytes).expect("corrupt");
        }
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config,
            "layers": layer_descs,
        });
        let bytes = serde_json::to_vec(&manifest).expect("json");
        let mut desc = put("application/vnd.oci.image.manifest.v1+json", &bytes);
        desc["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": "v1"});
        let index = serde_json::json!({"schemaVersion": 2, "manifests": [desc]});
        std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).expect("json")).expect("write");
        Digest::of(&bytes)
    }

    #[tokio::test]
    async fn pushes_then_skips_existing_blobs() {
        let (addr, state) = fake::spawn();
        let origin = format!("http://{addr}/");
        let tmp = tempfile::tempdir().expect("tempdir");
        let big = vec![9u8; (3 << 20) + 5];
        let root = write_layout(tmp.path(), &[b"small layer", &big], false);
        let source = Source::Oci { dir: tmp.path().to_owned(), reference: Some("v1".into()) };

        let report = push(&origin, &source, "team/app:v1", Progress::Quiet).await.expect("push");
        assert_eq!(report, PushReport { uploaded: 3, skipped: 0, bytes: 2 + 11 + big.len() as u64, root });
        {
            let state = state.lock().expect("lock");
            assert_eq!(state.blobs.get(&Digest::of(&big).to_string()), Some(&big));
            let (content_type, bytes) = state.manifests.get("v1").expect("tagged");
            assert_eq!(content_type, "application/vnd.oci.image.manifest.v1+json");
            assert_eq!(Digest::of(bytes), root);
        }

        let again = push(&origin, &source, "team/app:v1", Progress::Lines).await.expect("push again");
        assert_eq!((again.uploaded, again.skipped, again.bytes), (0, 3, 0));
        assert_eq!(state.lock().expect("lock").puts, 3);

        let err = push(&origin, &source, "team/app:forbidden", Progress::Quiet).await.expect_err("403");
        let text = format!("{err:#}");
        assert!(text.contains("403"), "{text}");
        assert!(text.len() < 1500, "body must be truncated: {}", text.len());

        assert!(push(&origin, &source, "Bad/Name:v1", Progress::Quiet).await.is_err());
    }

    #[tokio::test]
    async fn corrupt_blob_fails_the_push() {
        let (addr, state) = fake::spawn();
        let tmp = tempfile::tempdir().expect("tempdir");
        write_layout(tmp.path(), &[&vec![1u8; 2 << 20]], true);
        let source = Source::Oci { dir: tmp.path().to_owned(), reference: None };
        let err = push(&format!("http://{addr}"), &source, "app:v1", Progress::Quiet)
            .await
            .expect_err("corrupt blob");
        let text = format!("{err:#}");
        assert!(text.contains("does not match its digest"), "{text}");
        let state = state.lock().expect("lock");
        assert!(state.manifests.is_empty());
        assert!(!state.blobs.contains_key(&Digest::of(&vec![1u8; 2 << 20]).to_string()));
    }
}
