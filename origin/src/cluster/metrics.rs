//! The cluster's counters (`shoal_origin_cluster_*`): copies made on write and by repair,
//! failures, forwarded reads, members up, and the handoff of copies no longer owned.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Counters of the cluster (`shoal_origin_cluster_*`).
#[derive(Debug, Default, Clone)]
pub struct ClusterMetrics {
    pub replicated: Counter,
    pub replication_failures: Counter,
    pub forwarded: Counter,
    pub repaired: Counter,
    pub repair_backlog: Gauge,
    pub members_up: Gauge,
    pub handed_off: Counter,
    pub unowned: Gauge,
}

impl ClusterMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("shoal_origin_cluster");
        r.register(
            "replicated",
            "Blobs, manifests and tags copied to another owner on write",
            self.replicated.clone(),
        );
        r.register(
            "replication_failures",
            "Copies to another owner that failed (repaired later)",
            self.replication_failures.clone(),
        );
        r.register("forwarded", "Reads forwarded to an owner", self.forwarded.clone());
        r.register("repaired", "Copies made by the repair pass", self.repaired.clone());
        r.register(
            "repair_backlog",
            "Copies the last repair pass found missing and has not made yet",
            self.repair_backlog.clone(),
        );
        r.register("members_up", "Members (this one included) currently healthy", self.members_up.clone());
        r.register(
            "handed_off",
            "Local copies of blobs this origin no longer owns, dropped after the handoff grace",
            self.handed_off.clone(),
        );
        r.register("unowned", "Blobs held here that this origin does not own", self.unowned.clone());
    }
}
