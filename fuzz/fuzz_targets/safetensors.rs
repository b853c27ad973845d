#![no_main]
// What the target reaches and its contract: pipeline::fuzzing.
libfuzzer_sys::fuzz_target!(|data: &[u8]| pipeline::fuzzing::safetensors(data));
