//! The `pipeline` command: the CLI of [`pipeline::cli`], which the Python
//! wheel's `pipeline` console script runs too.

// Training and collection allocate the same score- and vocabulary-sized
// tensors every step. With the system allocator each of them is fresh memory
// the kernel must zero-fill (a third of a training step under perf);
// mimalloc with purging off keeps freed memory for the next step.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    pipeline::cli::park_idle_candle_workers();
    pipeline::cli::keep_freed_memory();
    std::process::exit(pipeline::cli::main(std::env::args_os()));
}
