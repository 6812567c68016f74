//! An in-memory [`Registry`] for tests: serves the manifests and blobs it is given, counts
//! every call, and fails as told (a status, a stall, a body cut short, wrong bytes under a
//! digest), so the pull-through code is tested against a hostile upstream in process and in
//! milliseconds. Its failures are reported as the HTTP client reports them
//! ([`status_error`]), so what a test sees is what a real upstream would cause.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use shoal_shared::digest::Digest;

use super::registry::{status_error, BlobBody, Registry};
use super::UpstreamError;

/// Bytes per chunk of a blob body.
const CHUNK: usize = 1024;

/// The requests an upstream is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Call {
    Head,
    Manifest,
    Blob,
}

/// How one call fails.
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// Answered with this status (5xx, 429, 401, 403, 404).
    Status(u16),
    /// A request that never answers, reported as the HTTP client reports it once its stall
    /// bound passes; a blob body sends `after` bytes and then nothing, for ever.
    Stall { after: usize },
    /// A blob body that ends after `after` bytes (its whole length declared).
    CutShort { after: usize },
    /// Other bytes under the digest asked for: a blob with every byte flipped, a manifest
    /// with a space added.
    WrongBytes,
}

/// A registry in memory.
#[derive(Debug)]
pub struct MemoryRegistry {
    host: String,
    /// By repository and reference (tag or digest).
    manifests: Mutex<HashMap<(String, String), Vec<u8>>>,
    blobs: Mutex<HashMap<(String, Digest), Bytes>>,
    private: Mutex<HashSet<String>>,
    /// What the next calls of each kind meet, in order: a fault, or `None` (answered as
    /// usual).
    faults: Mutex<HashMap<Call, VecDeque<Option<Fault>>>>,
    calls: Mutex<HashMap<Call, usize>>,
    /// How long a blob request takes to answer.
    delay: Mutex<Duration>,
}

impl MemoryRegistry {
    pub fn new(host: &str) -> Self {
        Self {
            host: host.to_owned(),
            manifests: Mutex::default(),
            blobs: Mutex::default(),
            private: Mutex::default(),
            faults: Mutex::default(),
            calls: Mutex::default(),
            delay: Mutex::default(),
        }
    }

    /// Serves `body` as a manifest of `name`, by digest and by `tag`; returns its digest.
    pub fn put_manifest(&self, name: &str, tag: Option<&str>, body: &[u8]) -> Digest {
        let digest = Digest::of(body);
        let mut manifests = self.manifests.lock().expect("manifests");
        manifests.insert((name.to_owned(), digest.to_string()), body.to_vec());
        if let Some(tag) = tag {
            manifests.insert((name.to_owned(), tag.to_owned()), body.to_vec());
        }
        digest
    }

    /// Serves `bytes` as a blob of `name`; returns its digest.
    pub fn put_blob(&self, name: &str, bytes: &[u8]) -> Digest {
        let digest = Digest::of(bytes);
        self.blobs.lock().expect("blobs").insert((name.to_owned(), digest), Bytes::copy_from_slice(bytes));
        digest
    }

    /// Repository `name` is one that was served only with credentials.
    pub fn make_private(&self, name: &str) {
        self.private.lock().expect("private").insert(name.to_owned());
    }

    /// The next `times` calls of kind `call` meet `fault`.
    pub fn fail(&self, call: Call, fault: Fault, times: usize) {
        self.fail_after(call, 0, fault, times);
    }

    /// The next `clean` calls of kind `call` are answered as usual, the `times` after them
    /// meet `fault`.
    pub fn fail_after(&self, call: Call, clean: usize, fault: Fault, times: usize) {
        let mut faults = self.faults.lock().expect("faults");
        let queue = faults.entry(call).or_default();
        queue.extend(std::iter::repeat_n(None, clean));
        queue.extend(std::iter::repeat_n(Some(fault), times));
    }

    /// Blob requests take `delay` to answer.
    pub fn delay_blobs(&self, delay: Duration) {
        *self.delay.lock().expect("delay") = delay;
    }

    /// How many calls of kind `call` were made.
    pub fn calls(&self, call: Call) -> usize {
        self.calls.lock().expect("calls").get(&call).copied().unwrap_or(0)
    }

    /// Counts a call and takes the fault it meets, if any.
    fn start(&self, call: Call) -> Option<Fault> {
        *self.calls.lock().expect("calls").entry(call).or_default() += 1;
        self.faults.lock().expect("faults").get_mut(&call).and_then(VecDeque::pop_front).flatten()
    }

    /// The error a fault is before any body is sent, if it is one then.
    fn refusal(&self, fault: Option<Fault>) -> Result<(), UpstreamError> {
        match fault {
            Some(Fault::Status(status)) => Err(status_error(&self.host, status)),
            Some(Fault::Stall { .. }) => Err(UpstreamError::Stalled { host: self.host.clone(), secs: 0 }),
            _ => Ok(()),
        }
    }

    fn manifest(&self, name: &str, reference: &str) -> Result<Vec<u8>, UpstreamError> {
        let key = (name.to_owned(), reference.to_owned());
        self.manifests.lock().expect("manifests").get(&key).cloned().ok_or(UpstreamError::NotFound)
    }
}

/// A body of `bytes` in chunks, declared whole, that ends after `end` bytes, then either
/// ends or sends nothing more for ever.
fn body(bytes: Bytes, end: usize, stall: bool) -> BlobBody {
    let length = Some(bytes.len() as u64);
    let sent = bytes.slice(..end.min(bytes.len()));
    let chunks: Vec<Result<Bytes, UpstreamError>> =
        sent.chunks(CHUNK).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
    let chunks = futures_util::stream::iter(chunks);
    let chunks = if stall { chunks.chain(futures_util::stream::pending()).boxed() } else { chunks.boxed() };
    BlobBody { length, chunks }
}

impl Registry for MemoryRegistry {
    fn host(&self) -> &str {
        &self.host
    }

    fn learned_private(&self, name: &str) -> bool {
        self.private.lock().expect("private").contains(name)
    }

    fn head_manifest<'a>(
        &'a self,
        name: &'a str,
        reference: &'a str,
    ) -> BoxFuture<'a, Result<Option<Digest>, UpstreamError>> {
        Box::pin(async move {
            self.refusal(self.start(Call::Head))?;
            Ok(Some(Digest::of(&self.manifest(name, reference)?)))
        })
    }

    fn get_manifest<'a>(
        &'a self,
        name: &'a str,
        reference: &'a str,
    ) -> BoxFuture<'a, Result<Vec<u8>, UpstreamError>> {
        Box::pin(async move {
            let fault = self.start(Call::Manifest);
            self.refusal(fault)?;
            let mut body = self.manifest(name, reference)?;
            if let Some(Fault::WrongBytes) = fault {
                body.push(b' ');
            }
            Ok(body)
        })
    }

    fn get_blob<'a>(
        &'a self,
        name: &'a str,
        digest: &'a Digest,
    ) -> BoxFuture<'a, Result<BlobBody, UpstreamError>> {
        Box::pin(async move {
            let fault = self.start(Call::Blob);
            let delay = *self.delay.lock().expect("delay");
            tokio::time::sleep(delay).await;
            self.refusal(fault.filter(|f| !matches!(f, Fault::Stall { .. })))?;
            let blob = self.blobs.lock().expect("blobs").get(&(name.to_owned(), *digest)).cloned();
            let bytes = match blob {
                Some(b) => b,
                // As the registry API allows: a manifest asked for by digest at the blobs
                // endpoint.
                None => Bytes::from(self.manifest(name, &digest.to_string())?),
            };
            Ok(match fault {
                Some(Fault::Stall { after }) => body(bytes, after, true),
                Some(Fault::CutShort { after }) => body(bytes, after, false),
                Some(Fault::WrongBytes) => {
                    let len = bytes.len();
                    body(bytes.iter().map(|b| !b).collect(), len, false)
                }
                _ => {
                    let len = bytes.len();
                    body(bytes, len, false)
                }
            })
        })
    }
}
