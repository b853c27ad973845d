//! Test glue for the CPU emulator of the project's CUDA kernels
//! (`cuda/emulator.hpp`, built by build.rs when a C++17 compiler is there):
//! how an emulated launch reports back.

use std::ffi::{c_char, c_int};

/// Room for the emulator's message about a failed launch.
pub type Message = [c_char; 256];

/// Ok for rc 0, else the NUL-terminated message the emulator wrote.
pub fn outcome(rc: c_int, message: &Message) -> Result<(), String> {
    if rc == 0 {
        return Ok(());
    }
    // SAFETY: on failure the emulator writes a NUL-terminated message that
    // fits the buffer (it truncates with snprintf).
    Err(unsafe { std::ffi::CStr::from_ptr(message.as_ptr()) }
        .to_string_lossy()
        .into_owned())
}

/// What an emulator test reports where build.rs could not compile it.
#[cfg_attr(cuda_emulator, allow(dead_code))]
pub const NOT_BUILT: &str =
    "build.rs could not compile the CUDA emulator: these tests need a C++17 compiler (g++)";
