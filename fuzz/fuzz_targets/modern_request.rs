//! Fuzz target: `tether_core::fuzz::modern_request` (see that module).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tether_core::fuzz::modern_request(data));
