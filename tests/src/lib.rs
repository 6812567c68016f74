pub mod cluster;
pub mod image;
pub mod quic_ceiling;
pub mod sim;
