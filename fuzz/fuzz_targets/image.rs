//! cargo fuzz target `image`: see `blip2_fuzz::image` for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| blip2_fuzz::image(data));
