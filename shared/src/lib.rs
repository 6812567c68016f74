//! Shoal's I/O building blocks, on top of the pure protocol crate `shoal-proto`.
//!
//! The pure modules are re-exported from `shoal-proto` under their old paths ([`digest`],
//! [`metainfo`], [`bitfield`], [`codec`], [`wire`], [`scheduler`], [`session`], [`oci`], [`hint`]). Built
//! on them here: [`store`], [`tls`], [`peer`], [`http`], [`client`], [`tracker`], [`config`],
//! [`telemetry`], [`ratelimit`], [`members`], [`tasks`], [`seams`], [`registry_client`].

pub use shoal_proto::{
    bitfield, blocks, codec, digest, docker_config, hint, image, manifest, messages, metainfo, oci,
    referrers, registry_auth, ring, scheduler, session, tenant, wire,
};

pub mod client;
pub mod config;
pub mod http;
pub mod members;
pub mod peer;
pub mod ratelimit;
pub mod registry_client;
pub mod seams;
pub mod status;
pub mod store;
pub mod tasks;
pub mod telemetry;
pub mod tls;
pub mod tracker;
