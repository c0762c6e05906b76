//! The snapshot decoder: no panic, and what decodes re-encodes equal.
//! The check is `tidewatch_server::fuzz::snapshot` (docs/fuzzing.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tidewatch_server::fuzz::snapshot(data));
