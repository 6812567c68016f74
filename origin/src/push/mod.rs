//! Pushing a local image (OCI layout or `docker save` archive) to an origin.
//!
//! [`source`] reads the image from disk into manifests plus blob locations; [`upload`] speaks
//! the OCI distribution push API (`HEAD`/`POST`/`PUT` under `/v2/`) to send it, verifying every
//! blob's sha256 while streaming it.

pub mod source;
pub mod upload;

pub use source::{load, BlobLocation, BlobRef, Image, ManifestDoc, Source, SourceError};
pub use upload::{parse_target, push, push_with_token, Progress, PushReport};
