//! cargo fuzz target `detok`: see `blip2_fuzz::detok` for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| blip2_fuzz::detok(data));
