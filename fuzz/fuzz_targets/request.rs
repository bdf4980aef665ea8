//! libFuzzer target: see [`instinfer_fuzz::request`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| instinfer_fuzz::request(data));
