//! cargo fuzz target `safetensors`: see `blip2_fuzz::safetensors` for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| blip2_fuzz::safetensors(data));
