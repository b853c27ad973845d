//! Builds the CPU emulator of the project's CUDA kernels (`cuda/`), which
//! the unit tests run against brute-force references on machines without a
//! GPU. Only test code calls into it, so the linker leaves it out of the
//! binary. Without a C++17 compiler the crate still builds (cfg
//! `cuda_emulator` unset) and the emulator tests fail, saying why.

fn main() {
    for f in [
        "emulator.hpp",
        "prelude.cuh",
        "flash_attention.cu",
        "flash_attention_emulated.cpp",
        "class_stats_merge.cu",
        "class_stats_merge_emulated.cpp",
        "bias_epilogues.cu",
        "bias_epilogues_emulated.cpp",
    ] {
        println!("cargo:rerun-if-changed=cuda/{f}");
    }
    println!("cargo::rustc-check-cfg=cfg(cuda_emulator)");
    let built = cc::Build::new()
        .cpp(true)
        .std("c++17")
        .file("cuda/flash_attention_emulated.cpp")
        .file("cuda/class_stats_merge_emulated.cpp")
        .file("cuda/bias_epilogues_emulated.cpp")
        .include("cuda")
        .warnings(true)
        // The kernels' f64 arithmetic is checked bit for bit against Rust,
        // which never fuses a multiply and an add.
        .flag_if_supported("-ffp-contract=off")
        .try_compile("lc_kernels_cuda_emulator");
    match built {
        Ok(()) => println!("cargo:rustc-cfg=cuda_emulator"),
        Err(e) => println!("cargo:warning=the CUDA kernel emulator was not built (its tests will fail): {e}"),
    }
}
