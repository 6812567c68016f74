//! Shoal's pure protocol, shared by every component and by the simulator.
//!
//! Nothing here does I/O, reads a clock or needs an async runtime: state machines take
//! events and `now` and return actions, codecs take bytes and return values. That is what
//! lets the same download scheduler run in an agent, in a unit test on a virtual clock and in
//! a simulator of 10,000 hosts. The I/O building blocks (store, QUIC transport, HTTP, TLS)
//! live in `shoal-shared`, which depends on this crate and never the other way round.
//!
//! Modules: [`digest`] (OCI content digests), [`metainfo`] (pieces and their hashes), [`blocks`] (checking a
//! piece block by block as it arrives),
//! [`bitfield`], [`codec`] (the one bincode module), [`wire`] (peer messages and framing),
//! [`scheduler`] (which peer is asked for which piece), [`session`] (the download's rules around
//! the scheduler: its progress timer and announce timer, the origin's first-copies-first
//! waves), [`oci`] (references, manifests, media types, error
//! codes), [`referrers`] (the referrers API's index), [`image`] (image references with Docker Hub's rules), [`hint`] (which registry a
//! pull is for), [`messages`] (tracker messages), [`ring`] (who owns a blob among origins or
//! trackers),
//! [`docker_config`] (Docker `config.json` and credential helpers' answers),
//! [`registry_auth`] (`WWW-Authenticate`, token responses), [`tenant`] (which private
//! upstream repository content belongs to).

pub mod bitfield;
pub mod blocks;
pub mod codec;
pub mod digest;
pub mod docker_config;
pub mod hint;
pub mod image;
pub mod manifest;
pub mod messages;
pub mod metainfo;
pub mod oci;
pub mod referrers;
pub mod registry_auth;
pub mod ring;
pub mod scheduler;
pub mod session;
pub mod tenant;
pub mod wire;
