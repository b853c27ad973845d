#![no_main]
// What the target reaches and its contract: pipeline::fuzzing.
libfuzzer_sys::fuzz_target!(
    init: pipeline::fuzzing::crash_only_on_escaped_panics(),
    |data: &[u8]| pipeline::fuzzing::manifest(data)
);
