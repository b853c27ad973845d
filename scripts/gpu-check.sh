#!/usr/bin/env bash
# GPU check of collect and decide (issue: CUDA build for current GPUs), run on
# a machine with an NVIDIA GPU from the repository root:
#
#   scripts/gpu-check.sh PIPELINE_BINARY OUT_DIR
#
# Times the two attention paths of bf16 inference (`bench attention`: block
# attention from primitives and the fused kernel, causal and with GPT-Neo's
# 256-key window, and their largest difference) and the fused bias epilogues
# against the unfused passes (`bench epilogues`, bf16 and f32). Builds a lake from the
# shipped sample (T = 2048), makes random-weight GPT-Neo models 2x768 and
# 12x1024 (biases random too, so the bias kernels are checked), and for each
#   - collects the validation split on the CPU (f32) and on the GPU (f32,
#     bf16, bf16 with the running statistics merged on the host
#     (accumulate=host) instead of in tables on the GPU, and bf16 with
#     attention=fused) and compares the statistics (max relative difference
#     of the class means and of M2, over classes with at least 4 samples),
#     and the GPU's tables with the host's merges of the same forward;
#   - collects the train split (the sample 16 times: 1.8 M tokens) on the GPU
#     in bf16 (both attention paths, both places of accumulation) and f32 for
#     throughput, and runs decide there.
# Prints a table; every log goes to OUT_DIR.
set -euo pipefail
P=${1:?pipeline binary}
if [[ "$P" == *.xz ]]; then python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open('/tmp/pipeline','wb'))" "$P"; chmod +x /tmp/pipeline; P=/tmp/pipeline; fi
OUT=${2:?output dir}
mkdir -p "$OUT"
W=$(mktemp -d)
for i in $(seq 16); do cat data/tinystories_train_sample.txt; done > "$W/train.txt"
L=$W/lake
"$P" --lake "$L" -q run stage=ingest dataset=g train="$W/train.txt" validation=data/tinystories_val_sample.txt
"$P" --lake "$L" -q run stage=tokenize dataset=g
"$P" --lake "$L" -q run stage=pack dataset=g T=2048 mode=concat
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
# The GPU runs may fail without ending the check (the fused kernel and the
# statistics tables are new there): the rest of the table is still measured.
for window in 0 256; do
  "$P" bench attention window=$window 2>&1 | tee -a "$OUT/bench-attention.log" || echo "bench attention window=$window FAILED"
done
for dt in bf16 f32; do
  "$P" bench epilogues dtype=$dt 2>&1 | tee -a "$OUT/bench-epilogues.log" || echo "bench epilogues dtype=$dt FAILED"
done
for m in 2x768 12x1024; do
  depth=${m%x*}; width=${m#*x}
  "$P" make-model --depth "$depth" --width "$width" --bias-std 0.05 --out "$W/m$m" 2>/dev/null
  for run in cpu-f32 cuda-f32 cuda-bf16 cuda-bf16-host cuda-bf16-fused; do
    dev=${run%%-*}; rest=${run#*-}; dt=${rest%%-*}
    att=blocks; [[ $run == *-fused ]] && att=fused
    acc=auto; [[ $run == *-host ]] && acc=host
    rm -rf "$W/l-$m-$run"; "$P" -q --lake "$L" copy "$W/l-$m-$run" >/dev/null
    batch=4; [ "$dev" = cpu ] && batch=2
    "$P" -q --lake "$W/l-$m-$run" run stage=collect model="$W/m$m" dataset=g split=validation \
      device=$dev dtype=$dt attention=$att accumulate=$acc batch=$batch 2>&1 | tee "$OUT/collect-val-$m-$run.log" \
      || { [ $dev = cuda ] && echo "collect $m $run FAILED"; }
  done
  python3 - "$W" "$m" <<'PY' | tee "$OUT/compare-$m.txt"
import sys, glob
import pyarrow.parquet as pq, numpy as np
w, m = sys.argv[1], sys.argv[2]
def load(run):
    f = glob.glob(f"{w}/l-{m}-{run}/class_stats/*/split=validation/*/part-0.parquet")[0]
    t = pq.read_table(f).to_pydict()
    return {c: (n, np.array(mu), m2) for c, n, mu, m2 in zip(t["class_id"], t["count"], t["mean"], t["m2"])}
def compare(run, base):
    try:
        ref, got = load(base), load(run)
    except IndexError:
        print(f"{m} {run} vs {base}: no statistics (a run failed)")
        return
    dm = dv = 0.0
    for c, (n, mu, m2) in ref.items():
        if n < 4: continue
        g = got[c]
        dm = max(dm, np.max(np.abs(g[1] - mu)) / max(np.max(np.abs(mu)), 1e-12))
        dv = max(dv, abs(g[2] - m2) / max(abs(m2), 1e-12))
    print(f"{m} {run} vs {base}: {len(ref)} classes, max rel diff of means {dm:.2e}, of M2 {dv:.2e}")
for run in ["cuda-f32", "cuda-bf16", "cuda-bf16-host", "cuda-bf16-fused"]:
    compare(run, "cpu-f32")
# The same forward, merged in tables on the GPU or on the host: equal up to
# f64 summation order (about 1e-13), unless the forward itself varies.
compare("cuda-bf16", "cuda-bf16-host")
PY
  for run in bf16 bf16-host bf16-fused f32; do
    dt=${run%%-*}; att=blocks; [[ $run == *-fused ]] && att=fused
    acc=auto; [[ $run == *-host ]] && acc=host
    rm -rf "$W/t-$m-$run"; "$P" -q --lake "$L" copy "$W/t-$m-$run" >/dev/null
    "$P" -q --lake "$W/t-$m-$run" run stage=collect model="$W/m$m" dataset=g device=cuda dtype=$dt \
      attention=$att accumulate=$acc batch=8 2>&1 | tee "$OUT/collect-train-$m-$run.log" \
      || echo "collect $m $run FAILED"
  done
  "$P" -q --lake "$W/t-$m-bf16-host" run stage=decide model="$W/m$m" dataset=g device=cuda batch=8 precision=f32 2>&1 | tee "$OUT/decide-$m.log" \
    || echo "decide $m FAILED"
done
