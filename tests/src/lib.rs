pub mod cluster;
pub mod image;
pub mod quic_ceiling;
pub mod registry;
pub mod upstream_bench;
