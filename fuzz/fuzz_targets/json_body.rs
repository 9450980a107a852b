//! cargo fuzz target `json_body`: see `blip2_fuzz::json_body` for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| blip2_fuzz::json_body(data));
