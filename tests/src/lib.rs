pub mod cluster;
pub mod image;
pub mod load;
pub mod netns;
pub mod quic_ceiling;
pub mod registry;
pub mod sim;
pub mod upstream_bench;
