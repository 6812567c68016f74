//! The origin's operational endpoints: `/readyz`, the HTML status page (`/` and `/status`),
//! `/shoal/v1/info` and `/metrics`. Read-only views of [`AppState`]; nothing here touches
//! content.

use actix_web::HttpResponse;

use super::State;

/// Ready when the store takes writes (a probe file in its temp directory).
pub(super) async fn readyz(state: State) -> HttpResponse {
    if state.store.writable().await {
        HttpResponse::Ok().body("ready\n")
    } else {
        HttpResponse::ServiceUnavailable().body("not ready: the store does not take writes\n")
    }
}

/// Upstreams, uploads in progress, and the blobs peers fetched recently.
pub(super) async fn status(state: State) -> HttpResponse {
    use shoal_shared::status::Page;
    let mut page = Page::new(&format!("shoal-origin {}", state.peer_addr));
    let up = std::time::Duration::from_secs(state.started.elapsed().as_secs());
    page.facts(&[
        ("version", env!("CARGO_PKG_VERSION").to_owned()),
        ("up", shoal_shared::config::Span(up).to_string()),
        ("uploads in progress", state.uploads.len().to_string()),
        ("writes", if state.upload_token.is_some() { "token required".into() } else { "open".into() }),
    ]);
    if let Some(cluster) = &state.cluster {
        let rows: Vec<Vec<String>> = cluster
            .members()
            .into_iter()
            .map(|(url, up)| {
                let role = if url == cluster.me() { "this origin" } else { "" };
                vec![url, if up { "up".into() } else { "down".into() }, role.into()]
            })
            .collect();
        page.table("Ring members", &["member", "health", ""], &rows, "No member.");
    }
    let rows: Vec<Vec<String>> = state.upstream_names.iter().map(|u| vec![u.clone()]).collect();
    page.table(
        "Upstream registries",
        &["registry=url"],
        &rows,
        "None: this origin holds only what is pushed to it.",
    );
    let mut hot = state.seeder.hot_set(crate::HOT_WINDOW);
    hot.sort();
    let rows: Vec<Vec<String>> = hot.iter().take(100).map(|d| vec![d.to_string()]).collect();
    page.table("Blobs peers fetched in the last 10 minutes", &["digest"], &rows, "None.");
    page.response()
}

pub(super) async fn info(state: State) -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({
        "peer": state.peer_addr,
        "piece_length": state.piece_length,
    }))
}

pub(super) async fn metrics(state: State) -> HttpResponse {
    shoal_shared::telemetry::metrics_response(&state.registry)
}
