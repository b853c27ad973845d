//! Builds the CPU emulator of the project's CUDA kernels (`cuda/`), which
//! the unit tests run against brute-force references on machines without a
//! GPU. Only test code calls into it, so the linker leaves it out of the
//! binary.

fn main() {
    for f in [
        "emulator.hpp",
        "prelude.cuh",
        "flash_attention.cu",
        "flash_attention_emulated.cpp",
    ] {
        println!("cargo:rerun-if-changed=cuda/{f}");
    }
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .file("cuda/flash_attention_emulated.cpp")
        .include("cuda")
        .warnings(true)
        .compile("pipeline_cuda_emulator");
}
