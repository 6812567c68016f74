//! Registry paths, references, names and `ns` hints from clients: parsing never panics, and
//! what parses as a reference prints back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_proto::hint::Hint;
use shoal_proto::oci::{parse_v2_path, valid_name, valid_tag, Reference};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = parse_v2_path(text);
    let _ = valid_name(text);
    let _ = valid_tag(text);
    if let Ok(reference) = text.parse::<Reference>() {
        assert_eq!(reference.to_string(), text);
    }
    let (name, ns) = text.split_once('?').unwrap_or((text, ""));
    let _ = Hint::new(name, (!ns.is_empty()).then_some(ns));
});
