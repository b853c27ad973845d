#!/usr/bin/env bash
# Coverage-guided fuzzing of every parser of outside input (libFuzzer through
# cargo-fuzz, on nightly Rust with AddressSanitizer). The targets are
# fuzz/fuzz_targets/*.rs, their bodies pipeline::fuzzing; `cargo test` replays
# the committed corpus on stable (tests/fuzz_corpus.rs).
#
#   scripts/fuzz.sh build                 build every target
#   scripts/fuzz.sh run TARGET [SECONDS]  fuzz one target (default 60 s)
#   scripts/fuzz.sh all [SECONDS]         every target in turn, then a table
#   scripts/fuzz.sh replay TARGET FILE    run one input (a crash to debug)
#   scripts/fuzz.sh list                  the targets
#
# Bounds per input (libFuzzer reports a crash past them): 10 s
# (-timeout), 2 GiB resident (-rss_limit_mb), 1 GiB in one allocation or
# live at once (-malloc_limit_mb, checked by ASan's allocator), inputs up
# to 256 KiB (-max_len). New inputs go to a scratch corpus under the fuzz
# target directory, not into fuzz/corpus: merge the useful ones by hand
# (cargo fuzz cmin). Crashes land in $FUZZ_OUT/artifacts/TARGET/; each one
# fixed gets its input in fuzz/regressions/TARGET/, which `cargo test` replays.
#
#   LC_FUZZ_TARGET  build directory (default ~/.cache/lc-fuzz-target)
#   LC_FUZZ_OUT     scratch corpora, crashes, logs (default $LC_FUZZ_TARGET/runs)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

export CARGO_TARGET_DIR="${LC_FUZZ_TARGET:-$HOME/.cache/lc-fuzz-target}"
out="${LC_FUZZ_OUT:-$CARGO_TARGET_DIR/runs}"
flags=(-timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=1024 -max_len=262144 -print_final_stats=1)

setup() {
    if ! rustup run nightly rustc --version >/dev/null 2>&1; then
        echo "installing the nightly toolchain (cargo-fuzz needs it for the sanitizer flags)"
        rustup toolchain install nightly --profile minimal
    fi
    if ! command -v cargo-fuzz >/dev/null 2>&1; then
        echo "installing cargo-fuzz"
        cargo install cargo-fuzz --locked
    fi
}

targets() {
    ls fuzz/fuzz_targets | sed 's/\.rs$//'
}

build() {
    setup
    # fuzz/Cargo.toml's dev profile: opt-level 1, debug assertions and
    # overflow checks on everywhere.
    cargo +nightly fuzz build -D --fuzz-dir fuzz
}

run() {
    local target="$1" seconds="${2:-60}"
    local scratch="$out/corpus/$target" crashes="$out/artifacts/$target"
    mkdir -p "$scratch" "$crashes" "$out/logs"
    cargo +nightly fuzz run -D --fuzz-dir fuzz "$target" "$scratch" "fuzz/corpus/$target" -- \
        "${flags[@]}" -max_total_time="$seconds" -artifact_prefix="$crashes/" \
        2>&1 | tee "$out/logs/$target.log" | grep -E "^(#[0-9]+ +(INITED|DONE)|==|SUMMARY|stat::|Done)" || true
    # libFuzzer exits non-zero on a crash; the log and the artifact say which.
}

summary() {
    printf '%-16s %12s %10s %8s %8s\n' target inputs exec/s corpus crashes
    for t in $(targets); do
        local log="$out/logs/$t.log"
        [ -f "$log" ] || continue
        local runs speed corpus crashes
        # The final stats; a run stopped by a crash has only its last status line.
        runs="$(grep -oP 'stat::number_of_executed_units:\s+\K[0-9]+' "$log" | tail -1 || true)"
        [ -n "$runs" ] || runs="$(grep -oP '^#\K[0-9]+' "$log" | tail -1 || true)"
        speed="$(grep -oP 'stat::average_exec_per_sec:\s+\K[0-9]+' "$log" | tail -1 || true)"
        corpus="$(ls "$out/corpus/$t" 2>/dev/null | wc -l || true)"
        crashes="$(ls "$out/artifacts/$t" 2>/dev/null | wc -l || true)"
        printf '%-16s %12s %10s %8s %8s\n' "$t" "${runs:-?}" "${speed:-?}" "$corpus" "$crashes"
    done
}

case "${1:-}" in
    build) build ;;
    run) build && run "$2" "${3:-60}" ;;
    all)
        build
        for t in $(targets); do
            echo "== $t"
            run "$t" "${2:-60}"
        done
        summary
        ;;
    summary) summary ;;
    replay)
        setup
        cargo +nightly fuzz run -D --fuzz-dir fuzz "$2" "$3" -- "${flags[@]}"
        ;;
    list) targets ;;
    *)
        sed -n '2,20p' "$0"
        exit 2
        ;;
esac
