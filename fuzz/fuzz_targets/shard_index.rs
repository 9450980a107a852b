//! cargo fuzz target `shard_index`: see `blip2_fuzz::shard_index` for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| blip2_fuzz::shard_index(data));
