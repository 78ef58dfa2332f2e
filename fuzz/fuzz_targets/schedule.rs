//! `cargo +nightly fuzz run schedule`: the properties are in `conch::fuzzing::schedule`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| conch::fuzzing::schedule(data));
