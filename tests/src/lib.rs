pub mod cluster;
pub mod image;
pub mod netns;
pub mod quic_ceiling;
