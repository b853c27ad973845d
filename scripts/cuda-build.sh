#!/usr/bin/env bash
# Build the CUDA binary of `pipeline` with a CUDA toolkit made of NVIDIA's
# PyPI wheels (nvcc, headers, cuBLAS, cuRAND, NVRTC): no system CUDA needed.
#
#   scripts/cuda-build.sh [13]      # CUDA 13.0, compute 9.0 (H100/H200)
#
# Why 13 and not 12: NVIDIA's CUDA 12 wheels (nvidia-cuda-nvcc-cu12, every
# version 12.0.76 to 12.9.86) hold ptxas and libnvvm but no nvcc, cicc or
# cudafe++, and candle-kernels needs a full nvcc (PTX kernels plus a static
# library of MoE kernels). The CUDA 13 wheels (nvidia-cuda-nvcc,
# nvidia-cuda-crt, nvidia-nvvm) hold the whole compiler. The binary then
# needs an NVIDIA driver of the 580 series or newer (CUDA 13).
#
# Environment: CUDA_COMPUTE_CAP (default 90: H100/H200), CUDA_WHEELS (where
# the toolkit is unpacked, default .cuda/), CARGO_TARGET_DIR (default
# target-cuda<major>).
#
# Output: dist/pipeline-cuda<major>/ with
#   bin/pipeline   the binary; its RPATH is $ORIGIN/../lib
#   lib/           the CUDA libraries it loads (libcublas, libcublasLt,
#                  libcurand, libnvrtc): copy the whole folder to the GPU
#                  machine, which then needs only the NVIDIA driver
#                  (libcuda.so.1). Or leave lib/ out and put the same major
#                  version's libraries on LD_LIBRARY_PATH (e.g. a PyTorch
#                  environment's nvidia/*/lib).
set -euo pipefail
cd "$(dirname "$0")/.."
major=${1:-13}
cap=${CUDA_COMPUTE_CAP:-90}
wheels=${CUDA_WHEELS:-$PWD/.cuda}/cu$major
case $major in
  12) echo "CUDA 12: NVIDIA's cu12 wheels ship no nvcc (only ptxas and libnvvm), so this script" >&2
      echo "cannot build with them; use 13 here, or a system CUDA 12 toolkit with" >&2
      echo "  CUDA_COMPUTE_CAP=90 cargo build --release --features cuda -p pipeline" >&2
      exit 2 ;;
  # CUDA 13 splits nvcc's headers (crt) and its device compiler (nvvm) out.
  13) pkgs="nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
            nvidia-cuda-runtime==13.0.96 nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35
            nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88" ;;
  *) echo "usage: $0 [13]" >&2; exit 2 ;;
esac

# 1. The toolkit: wheels unpacked into one tree, merged into CUDA_ROOT.
if [ ! -x "$wheels/root/bin/nvcc" ]; then
  echo "installing the CUDA $major toolkit wheels into $wheels"
  # One install: pip --target does not merge into a folder it made before.
  rm -rf "$wheels/site"
  python3 -m pip install --quiet --no-deps --target "$wheels/site" $pkgs
  root=$wheels/root
  rm -rf "$root" && mkdir -p "$root/bin" "$root/include" "$root/lib64"
  # Every wheel ships an include/__init__.py: -f lets the duplicates overwrite.
  for d in "$wheels"/site/nvidia/*/ "$wheels"/site/nvidia/cu*/*/; do
    [ -d "$d" ] || continue
    [ -d "$d/bin" ] && cp -rsf "$d/bin/." "$root/bin/"
    [ -d "$d/include" ] && cp -rsf "$d/include/." "$root/include/"
    [ -d "$d/lib" ] && cp -rsf "$d/lib/." "$root/lib64/"
    [ -d "$d/nvvm" ] && ln -sfn "$d/nvvm" "$root/nvvm"
  done
  # Unversioned names for the linker.
  for f in "$root"/lib64/*.so.*; do
    base=${f%%.so.*}.so
    [ -e "$base" ] || ln -s "$(basename "$f")" "$base"
  done
  # libcuda.so.1 is the driver's and is not in the wheels: link against a
  # stub with the same soname that defines the driver API symbols cudarc
  # uses; the real driver library is found at run time.
  syms=$(grep -ho 'fn cu[A-Za-z0-9_]*(' ~/.cargo/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs \
         | sed 's/^fn //; s/($//' | sort -u)
  { for s in $syms; do echo "void $s(void) {}"; done; } > "$wheels/cuda_stub.c"
  mkdir -p "$root/lib64/stubs"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$root/lib64/stubs/libcuda.so" "$wheels/cuda_stub.c"
fi
root=$wheels/root
export CUDA_ROOT=$root CUDA_PATH=$root CUDA_HOME=$root
export PATH=$root/bin:$PATH
export LIBRARY_PATH=$root/lib64:$root/lib64/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}
export LD_LIBRARY_PATH=$root/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export CUDA_COMPUTE_CAP=$cap
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target-cuda$major}
nvcc --version | tail -2

# 2. The binary, looking for its libraries beside it first.
RUSTFLAGS="${RUSTFLAGS:-} -C link-arg=-Wl,-rpath,\$ORIGIN/../lib -C link-arg=-L$root/lib64/stubs" \
  cargo build --release --features cuda -p pipeline

# 3. The bundle: the binary and the CUDA libraries it needs.
out=dist/pipeline-cuda$major
rm -rf "$out" && mkdir -p "$out/bin" "$out/lib"
strip -o "$out/bin/pipeline" "$CARGO_TARGET_DIR/release/pipeline"
for lib in $(ldd "$out/bin/pipeline" | awk '/=>/ {print $3}' | grep "^$root/"); do
  cp -L "$lib" "$out/lib/"
done
# cuBLAS loads cuBLASLt itself; NVRTC (with its builtins) is opened at run
# time to compile the block softmax kernel.
cp -L "$root"/lib64/libcublasLt.so.* "$out/lib/" 2>/dev/null || true
cp -L "$root"/lib64/libnvrtc.so.* "$root"/lib64/libnvrtc-builtins.so.* "$out/lib/" 2>/dev/null || true
echo "bundle: $out"
ldd "$out/bin/pipeline" | grep -E "cuda|cublas|curand|nvrtc" || true
du -sh "$out/bin" "$out/lib"
