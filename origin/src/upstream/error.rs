//! Why something could not be pulled from an upstream registry ([`UpstreamError`]), whether
//! it is worth retrying (and serving a cached tag meanwhile), and the registry error each
//! becomes for a client.

use actix_web::http::StatusCode;
use shoal_shared::oci::ErrorCode;
use shoal_shared::store::StoreError;

use super::credentials;

/// Why something could not be pulled from an upstream registry.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("registry {0} is not an upstream of this origin")]
    UnknownRegistry(String),
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    #[error("denied by {0}")]
    Denied(String),
    #[error("not found upstream")]
    NotFound,
    #[error("{0}: schema 1 manifests are not supported (re-push the image with a current client)")]
    Schema1(String),
    #[error("invalid upstream content: {0}")]
    Invalid(String),
    #[error("upstream {host} answered {status}")]
    Status { host: String, status: u16 },
    #[error("upstream unreachable: {0}")]
    Unreachable(String),
    #[error("upstream {host} made no progress for {secs}s")]
    Stalled { host: String, secs: u64 },
    #[error("upstream {host} ended a body after {received} of the {declared} bytes it declared")]
    Truncated { host: String, received: u64, declared: u64 },
    #[error("upstream response larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("storage: {0}")]
    Store(StoreError),
    #[error("too many upstream fetches in progress, retry later")]
    Busy,
    #[error(transparent)]
    Helper(#[from] credentials::HelperError),
}

impl UpstreamError {
    /// Worth retrying, and a reason to serve a cached tag: the upstream is down or busy.
    pub fn transient(&self) -> bool {
        match self {
            Self::Unreachable(_) | Self::Stalled { .. } | Self::Truncated { .. } => true,
            Self::Status { status, .. } => *status >= 500 || *status == 429,
            Self::Helper(e) => e.transient(),
            _ => false,
        }
    }

    /// The registry error this becomes for a client: `unknown` is the code of what was asked
    /// for (`BLOB_UNKNOWN`, `MANIFEST_UNKNOWN`), also carried by the 502/503 answers, since the
    /// spec has no code of its own for a server-side failure (see [`ErrorCode`]).
    pub fn http(&self, unknown: ErrorCode) -> (StatusCode, ErrorCode) {
        match self {
            Self::UnknownRegistry(_) => (StatusCode::NOT_FOUND, ErrorCode::NameUnknown),
            Self::NotFound => (StatusCode::NOT_FOUND, unknown),
            Self::Unauthorized(_) => (StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized),
            Self::Denied(_) => (StatusCode::FORBIDDEN, ErrorCode::Denied),
            Self::Schema1(_) => (StatusCode::BAD_REQUEST, ErrorCode::ManifestInvalid),
            Self::Invalid(_) | Self::TooLarge { .. } => (StatusCode::BAD_GATEWAY, unknown),
            Self::Status { .. }
            | Self::Unreachable(_)
            | Self::Stalled { .. }
            | Self::Truncated { .. }
            | Self::Store(_)
            | Self::Busy
            | Self::Helper(_) => (StatusCode::SERVICE_UNAVAILABLE, unknown),
        }
    }
}
