//! `cargo +nightly fuzz run names_and_keys`: the properties are in `conch::fuzzing::names_and_keys`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| conch::fuzzing::names_and_keys(data));
