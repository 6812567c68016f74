//! The origin's internal listener (`--internal ADDR`): the same API as the public port,
//! served over HTTPS with mutual TLS to the cluster's trackers and origins only.
//!
//! The public port is also the registry (CI pushes, clients without certificates), so it
//! stays plain HTTP and is protected by the upload token. The calls the cluster makes to an
//! origin (a tracker's metainfo, tag and referrers lookups, a ring member's health probes,
//! `X-Shoal-Hop` forwards, replication and repair copies, deletions) go to this listener
//! instead, where the caller proves what it is with a certificate from the cluster CA: the
//! handshake refuses anything but a tracker or origin certificate that chains to the CA and
//! is not in `crl.pem` (`tls::http::HttpTls::server_config`), and each request is checked
//! again against the current revocation list (`tls::http::require_trusted_caller`), so a
//! keep-alive connection does not outlive a revocation.
//!
//! [`allowed`] is the one place that decides what a request may do, on either listener:
//! with a certificate its role decides (an origin may write and, when the member that
//! forwarded the read vouches that its client gave the token ([`MAY_FETCH_HEADER`]), make
//! this origin reach an upstream; a tracker may look up, which may reach an upstream, but
//! never write); without one (the public port) the upload token decides, as before.

use std::net::TcpListener;

use actix_web::{web, App, HttpRequest, HttpServer};
use shoal_shared::tls::http::{Caller, HttpTls};
use shoal_shared::tls::{Role, TlsError};

use crate::api::AppState;

/// Roles admitted on the internal listener.
pub const CALLERS: &[Role] = &[Role::Tracker, Role::Origin];

/// Sent by a ring member that forwards a read over the internal listener when its own
/// client gave the upload token: the owner may then reach an upstream for it. Honoured only
/// from a caller with an origin certificate (a member could write anything anyway).
pub const MAY_FETCH_HEADER: &str = "X-Shoal-May-Fetch";

/// What a request needs beyond a plain read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// It may make this origin fetch from an upstream (fills the disk): pull-through
    /// lookups, metainfo with a hint.
    Fetch,
    /// It changes what the origin holds: pushes, copies, deletions, prefetches.
    Write,
}

/// Whether `req` may do what `need` says: by the role of its caller's certificate on the
/// internal listener, by the upload `token` on the public port.
pub(crate) fn allowed(req: &HttpRequest, token: Option<&str>, need: Need) -> bool {
    let role = req.conn_data::<Caller>().map(|c| c.role);
    let vouched = req.headers().contains_key(MAY_FETCH_HEADER);
    permits(role, vouched, || crate::api::authorized(req, token), need)
}

/// [`allowed`]'s rule: `role` is the caller's certificate role (none on the public port),
/// `vouched` whether a forwarding member vouched for its client, `token_ok` the upload
/// token check.
fn permits(role: Option<Role>, vouched: bool, token_ok: impl FnOnce() -> bool, need: Need) -> bool {
    match role {
        Some(Role::Origin) => match need {
            Need::Write => true,
            Need::Fetch => vouched,
        },
        Some(Role::Tracker) => need == Need::Fetch,
        // An agent certificate never gets past the handshake; refuse it all the same.
        Some(Role::Agent) => false,
        None => token_ok(),
    }
}

/// Why the internal listener could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum InternalError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("internal listener: {0}")]
    Io(#[from] std::io::Error),
}

/// The internal listener's server on `listener`: the origin's routes behind mutual TLS with
/// `tls` (reloaded by its owner), each request's caller checked against the current CA and
/// revocation list. Run it with `shoal_shared::http::run_server`.
pub fn server(
    listener: TcpListener,
    tls: HttpTls,
    state: web::Data<AppState>,
    workers: usize,
    send_timeout: std::time::Duration,
    drain_timeout: u64,
) -> Result<actix_web::dev::Server, InternalError> {
    let config = tls.server_config(CALLERS)?;
    let live = web::Data::new(tls);
    let server = HttpServer::new(move || {
        App::new()
            .wrap(actix_web::middleware::from_fn(shoal_shared::tls::http::require_trusted_caller))
            .wrap(actix_web::middleware::from_fn(shoal_shared::http::request_span))
            .app_data(state.clone())
            .app_data(live.clone())
            .configure(crate::api::configure)
            .configure(crate::prefetch::configure)
    })
    .on_connect(move |conn, data| {
        type Tls = actix_tls::accept::rustls_0_23::TlsStream<actix_web::rt::net::TcpStream>;
        if let Some(tls) = conn.downcast_ref::<Tls>() {
            shoal_shared::http::set_send_timeout(tls.get_ref().0, send_timeout);
        }
        shoal_shared::tls::http::record_caller(conn, data);
    })
    .workers(workers.max(1))
    .disable_signals()
    .shutdown_timeout(drain_timeout.max(1))
    .listen_rustls_0_23(listener, config)?
    .run();
    Ok(server)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_decide_on_the_internal_listener_and_the_token_elsewhere() {
        let (yes, no) = (|| true, || false);
        let origin = Some(Role::Origin);
        assert!(permits(origin, false, no, Need::Write), "a member copies and deletes");
        assert!(!permits(origin, false, yes, Need::Fetch), "a member fetches only when vouched for");
        assert!(permits(origin, true, no, Need::Fetch));
        let tracker = Some(Role::Tracker);
        assert!(permits(tracker, false, no, Need::Fetch), "a tracker's lookups may reach upstreams");
        assert!(!permits(tracker, true, yes, Need::Write), "a tracker never writes");
        for need in [Need::Fetch, Need::Write] {
            assert!(!permits(Some(Role::Agent), true, yes, need));
            // The public port: the token decides, and vouching means nothing there.
            assert!(!permits(None, true, no, need));
            assert!(permits(None, false, yes, need));
        }
    }
}
