//! Manifests and indexes from clients and upstream registries: media-type detection and
//! reference extraction never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_proto::oci::{manifest_media_type, manifest_references};

fuzz_target!(|data: &[u8]| {
    let _ = manifest_media_type(data);
    let _ = manifest_references(data);
});
