//! The agent's status page: downloads in progress with what each peer sent, the cache's
//! usage and largest entries, and what it seeds.

use actix_web::{web, HttpResponse};
use shoal_shared::status::{human_bytes, Page};

use crate::registry::AppState;

/// Largest cache entries listed.
const LARGEST: usize = 20;

/// `GET /status` (and `/`).
pub async fn page(state: web::Data<AppState>) -> HttpResponse {
    let downloads = &state.downloads;
    let cache = &downloads.cache;
    let mut page = Page::new(&format!("shoal-agent {}", state.me));
    let limit = cache.limit();
    let used = cache.used();
    page.facts(&[
        ("version", env!("CARGO_PKG_VERSION").to_owned()),
        ("up", humantime_secs(state.started.elapsed().as_secs())),
        (
            "cache",
            format!(
                "{} of {}",
                human_bytes(used),
                if limit == 0 { "unbounded".into() } else { human_bytes(limit) }
            ),
        ),
        ("blobs cached", cache.len().to_string()),
        ("downloads", downloads.active.len().to_string()),
    ]);

    let mut rows = Vec::new();
    let mut peers = std::collections::BTreeMap::new();
    for entry in downloads.active.iter() {
        let active = entry.value();
        let (length, verified) = (active.length(), active.verified_bytes());
        let by_peer = active.by_peer.lock().map(|m| m.clone()).unwrap_or_default();
        let mut senders: Vec<_> = by_peer.into_iter().collect();
        senders.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        for (addr, pieces) in &senders {
            *peers.entry(*addr).or_insert(0u64) += u64::from(*pieces);
        }
        let senders: Vec<String> = senders.iter().map(|(a, n)| format!("{a}: {n}")).collect();
        rows.push(vec![
            entry.key().to_string(),
            human_bytes(length),
            Page::bar(if length == 0 { 1.0 } else { verified as f64 / length as f64 }),
            humantime_secs(active.started.elapsed().as_secs()),
            if senders.is_empty() { "-".into() } else { senders.join(", ") },
        ]);
    }
    page.table(
        "Downloads in progress",
        &["digest", "size", "verified", "running", "pieces per peer"],
        &rows,
        "No download in progress.",
    );

    let rows: Vec<Vec<String>> =
        peers.iter().map(|(addr, pieces)| vec![addr.to_string(), pieces.to_string()]).collect();
    page.table("Peers sending to this agent", &["peer", "pieces"], &rows, "None right now.");

    let rows: Vec<Vec<String>> = cache
        .largest(LARGEST)
        .into_iter()
        .map(|e| {
            vec![
                e.digest.to_string(),
                human_bytes(e.bytes),
                humantime_secs(e.idle_secs),
                match (e.pins, e.swarm_active) {
                    (0, false) => "-".into(),
                    (0, true) => "seeding to an active swarm".into(),
                    (n, _) => format!("in use ({n})"),
                },
            ]
        })
        .collect();
    page.table(
        "Largest cached blobs",
        &["digest", "disk", "unused for", "state"],
        &rows,
        "The cache is empty.",
    );

    let mut seeding = downloads.seeding();
    seeding.sort_by_key(|s| std::cmp::Reverse(s.1));
    let rows: Vec<Vec<String>> = seeding
        .iter()
        .take(LARGEST)
        .map(|(d, left)| vec![d.to_string(), humantime_secs(left.as_secs())])
        .collect();
    page.table("Seeding", &["digest", "announced for"], &rows, "Nothing announced as seeded.");
    page.response()
}

fn humantime_secs(secs: u64) -> String {
    shoal_shared::config::Span(std::time::Duration::from_secs(secs)).to_string()
}
