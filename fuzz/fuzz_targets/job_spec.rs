//! `cargo +nightly fuzz run job_spec`: the properties are in `conch::fuzzing::job_spec`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| conch::fuzzing::job_spec(data));
