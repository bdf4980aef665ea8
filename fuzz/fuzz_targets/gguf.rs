//! libFuzzer target: see [`instinfer_fuzz::gguf`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| instinfer_fuzz::gguf(data));
