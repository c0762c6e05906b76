//! The `POST /ingest` body parser: no panic, and what it accepts round-trips.
//! The check is `tidewatch_server::fuzz::rest_body` (docs/fuzzing.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tidewatch_server::fuzz::rest_body(data));
