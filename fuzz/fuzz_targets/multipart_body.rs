//! cargo fuzz target `multipart_body`: see `blip2_fuzz::multipart_body` for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| blip2_fuzz::multipart_body(data));
