//! Fuzz target: `tether_core::fuzz::config` (see that module).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tether_core::fuzz::config(data));
