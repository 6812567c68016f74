//! Requests to what the origin depends on, by outcome: its upstream registries and its
//! durable store (`shoal_origin_upstream_requests_total{upstream,kind,outcome}`,
//! `shoal_origin_upstream_bytes_total{upstream}`, `shoal_origin_store_requests_total{op,outcome}`).

use std::path::Path;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use shoal_shared::store::backing::{Backing, BackingError, Fetched};

/// Labels of an upstream request.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct UpstreamLabel {
    pub upstream: String,
    /// `blob` or `manifest`.
    pub kind: &'static str,
    /// `ok` or `error`.
    pub outcome: &'static str,
}

/// Labels of the bytes fetched from one upstream.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct HostLabel {
    pub upstream: String,
}

/// Upstream requests and bytes.
#[derive(Debug, Default, Clone)]
pub struct UpstreamMetrics {
    pub requests: Family<UpstreamLabel, Counter>,
    pub bytes: Family<HostLabel, Counter>,
}

impl UpstreamMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("shoal_origin_upstream");
        r.register(
            "requests",
            "Blob fetches and manifest pulls from upstream registries, by outcome",
            self.requests.clone(),
        );
        r.register("bytes", "Blob bytes pulled through from each upstream", self.bytes.clone());
    }

    /// Counts one request to `upstream`.
    pub fn request(&self, upstream: &str, kind: &'static str, ok: bool) {
        let outcome = if ok { "ok" } else { "error" };
        self.requests.get_or_create(&UpstreamLabel { upstream: upstream.to_owned(), kind, outcome }).inc();
    }
}

/// Labels of a durable-store request.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct StoreLabel {
    /// `put`, `get`, `list`, `exists` or `delete`.
    pub op: &'static str,
    pub outcome: &'static str,
}

/// A backing that counts its requests by outcome.
#[derive(Debug)]
pub struct CountedBacking {
    inner: Arc<dyn Backing>,
    pub requests: Family<StoreLabel, Counter>,
}

impl CountedBacking {
    pub fn new(inner: Arc<dyn Backing>) -> Self {
        Self { inner, requests: Family::default() }
    }

    fn count<T>(&self, op: &'static str, result: Result<T, BackingError>) -> Result<T, BackingError> {
        let outcome = if result.is_ok() { "ok" } else { "error" };
        self.requests.get_or_create(&StoreLabel { op, outcome }).inc();
        result
    }
}

impl Backing for CountedBacking {
    fn put_file<'a>(&'a self, key: &'a str, path: &'a Path) -> BoxFuture<'a, Result<(), BackingError>> {
        Box::pin(async move { self.count("put", self.inner.put_file(key, path).await) })
    }

    fn put_bytes<'a>(&'a self, key: &'a str, bytes: bytes::Bytes) -> BoxFuture<'a, Result<(), BackingError>> {
        Box::pin(async move { self.count("put", self.inner.put_bytes(key, bytes).await) })
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Fetched>, BackingError>> {
        Box::pin(async move { self.count("get", self.inner.get(key).await) })
    }

    fn list<'a>(&'a self, dir: &'a str) -> BoxFuture<'a, Result<Vec<String>, BackingError>> {
        Box::pin(async move { self.count("list", self.inner.list(dir).await) })
    }

    fn exists<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, BackingError>> {
        Box::pin(async move { self.count("exists", self.inner.exists(key).await) })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), BackingError>> {
        Box::pin(async move { self.count("delete", self.inner.delete(key).await) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_shared::store::backing::testing::MemoryBacking;

    #[tokio::test]
    async fn store_requests_are_counted_by_outcome() {
        let memory = Arc::new(MemoryBacking::default());
        let counted = CountedBacking::new(memory.clone());
        counted.put_bytes("a", bytes::Bytes::from_static(b"x")).await.expect("put");
        assert!(counted.exists("a").await.expect("exists"));
        memory.fail.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(counted.get("a").await.is_err());
        let get = |op, outcome| counted.requests.get_or_create(&StoreLabel { op, outcome }).get();
        assert_eq!((get("put", "ok"), get("exists", "ok"), get("get", "error")), (1, 1, 1));
        assert_eq!(get("get", "ok"), 0);
    }
}
