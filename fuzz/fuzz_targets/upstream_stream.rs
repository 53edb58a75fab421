//! Fuzz target: `tether_core::fuzz::upstream_stream` (see that module).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tether_core::fuzz::upstream_stream(data));
