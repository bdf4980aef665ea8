//! libFuzzer target: see [`instinfer_fuzz::tokenizer`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| instinfer_fuzz::tokenizer(data));
