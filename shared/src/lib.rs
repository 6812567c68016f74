//! Shoal's protocol core and common building blocks.
//!
//! Pure modules (no I/O, no clock): [`digest`], [`metainfo`], [`bitfield`], [`codec`],
//! [`wire`], [`scheduler`], [`oci`]. I/O modules built on them: [`store`], [`tls`],
//! [`peer`], [`http`], [`config`], [`telemetry`], [`ratelimit`].

pub mod bitfield;
pub mod codec;
pub mod digest;
pub mod metainfo;
pub mod scheduler;
pub mod wire;

pub mod client;
pub mod config;
pub mod hint;
pub mod http;
pub mod oci;
pub mod peer;
pub mod ratelimit;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod tracker;
