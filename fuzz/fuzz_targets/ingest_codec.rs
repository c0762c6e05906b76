//! The `Ingest` fast path's decoder against prost: the same request or the same error.
//! The check is `tidewatch_server::fuzz::ingest_codec` (docs/fuzzing.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tidewatch_server::fuzz::ingest_codec(data));
