pub mod cluster;
pub mod image;
