#!/usr/bin/env bash
# GPU check of collect and decide (issue: CUDA build for current GPUs), run on
# a machine with an NVIDIA GPU from the repository root:
#
#   scripts/gpu-check.sh PIPELINE_BINARY OUT_DIR
#
# Builds a lake from the shipped sample (T = 2048), makes random-weight
# GPT-Neo models 2x768 and 12x1024 (biases random too, so the bias kernels
# are checked), and for each
#   - collects the validation split on the CPU (f32) and on the GPU (f32 and
#     bf16) and compares the statistics (max relative difference of the
#     class means and of M2, over classes with at least 4 samples);
#   - collects the train split (the sample 16 times: 1.8 M tokens) on the GPU
#     in bf16 and f32 for throughput, and runs decide there.
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
for m in 2x768 12x1024; do
  depth=${m%x*}; width=${m#*x}
  "$P" make-model --depth "$depth" --width "$width" --bias-std 0.05 --out "$W/m$m" 2>/dev/null
  for run in cpu-f32 cuda-f32 cuda-bf16; do
    dev=${run%-*}; dt=${run#*-}
    rm -rf "$W/l-$m-$run"; "$P" -q --lake "$L" copy "$W/l-$m-$run" >/dev/null
    batch=4; [ "$dev" = cpu ] && batch=2
    "$P" -q --lake "$W/l-$m-$run" run stage=collect model="$W/m$m" dataset=g split=validation \
      device=$dev dtype=$dt batch=$batch 2>&1 | tee "$OUT/collect-val-$m-$run.log"
  done
  python3 - "$W" "$m" <<'PY' | tee "$OUT/compare-$m.txt"
import sys, glob
import pyarrow.parquet as pq, numpy as np
w, m = sys.argv[1], sys.argv[2]
def load(run):
    f = glob.glob(f"{w}/l-{m}-{run}/class_stats/*/split=validation/*/part-0.parquet")[0]
    t = pq.read_table(f).to_pydict()
    return {c: (n, np.array(mu), m2) for c, n, mu, m2 in zip(t["class_id"], t["count"], t["mean"], t["m2"])}
ref = load("cpu-f32")
for run in ["cuda-f32", "cuda-bf16"]:
    got = load(run)
    dm = dv = 0.0
    for c, (n, mu, m2) in ref.items():
        if n < 4: continue
        g = got[c]
        dm = max(dm, np.max(np.abs(g[1] - mu)) / max(np.max(np.abs(mu)), 1e-12))
        dv = max(dv, abs(g[2] - m2) / max(abs(m2), 1e-12))
    print(f"{m} {run} vs cpu-f32: {len(ref)} classes, max rel diff of means {dm:.2e}, of M2 {dv:.2e}")
PY
  for dt in bf16 f32; do
    rm -rf "$W/t-$m-$dt"; "$P" -q --lake "$L" copy "$W/t-$m-$dt" >/dev/null
    "$P" -q --lake "$W/t-$m-$dt" run stage=collect model="$W/m$m" dataset=g device=cuda dtype=$dt batch=8 2>&1 | tee "$OUT/collect-train-$m-$dt.log"
  done
  "$P" -q --lake "$W/t-$m-bf16" run stage=decide model="$W/m$m" dataset=g device=cuda batch=8 precision=f32 2>&1 | tee "$OUT/decide-$m.log"
done
