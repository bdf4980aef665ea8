//! libFuzzer target: see [`instinfer_fuzz::store`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| instinfer_fuzz::store(data));
