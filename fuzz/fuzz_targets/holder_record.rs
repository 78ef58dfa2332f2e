//! `cargo +nightly fuzz run holder_record`: the properties are in `conch::fuzzing::holder_record`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| conch::fuzzing::holder_record(data));
