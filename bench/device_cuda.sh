#!/bin/bash
# device_cuda.sh - the CUDA backend on the GPU machine: cross-backend test, compute-sanitizer
# (memcheck, racecheck) on small cases, and the attention benchmark against PyTorch.
#
#   bash bench/device_cuda.sh [test] [sanitize] [bench]        (repository root; default: all three)
#
# Expects build-cuda/run/ (carried; git-ignored), made on the build machine:
#   make CUDA=1 BUILD=build-cuda build-cuda/libqfuse.so; mkdir -p build-cuda/run
#   cp build-cuda/libqfuse.so build-cuda/run/; cp .debs/{libcjson1,libopenblas0-openmp,libgfortran5,
#   libquadmath0,libpcre2-8-0,libutf8proc2,libstb0}_*.deb /lib/x86_64-linux-gnu/libgomp.so.1 build-cuda/run/
# The machine has no package registry: the Debian packages are unpacked with dpkg -x into $DEPS
# (never into /) and found through LD_LIBRARY_PATH. Results go to $OUT.
set -u
OUT=${OUT:-/tmp/qfuse-out}
DEPS=/tmp/qfuse-deps
RUN=$PWD/build-cuda/run
mkdir -p "$OUT" "$DEPS"
for f in "$RUN"/*.deb; do dpkg -x "$f" "$DEPS"; done
L=$DEPS/usr/lib/x86_64-linux-gnu
export LD_LIBRARY_PATH=$RUN:$L:$L/openblas-openmp${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export QFUSE_LIBRARY=$RUN/libqfuse.so PYTHONPATH=$PWD/python PYTHONUNBUFFERED=1 OPENBLAS_CORETYPE=SkylakeX
steps=${*:-test sanitize bench}
nvidia-smi -L
for s in $steps; do
  case $s in
  test)
    echo "== test_cuda.py"
    python3 -m pytest -q -rs -p no:cacheprovider tests/python/test_cuda.py 2>&1 | tee "$OUT/test_cuda.txt" | tail -n 40 ;;
  sanitize)
    for tool in memcheck racecheck; do
      echo "== compute-sanitizer --tool $tool"
      timeout 240 compute-sanitizer --tool $tool --error-exitcode 9 python3 tests/python/test_cuda.py \
        > "$OUT/sanitizer-$tool.txt" 2>&1
      echo "exit $?"; tail -n 6 "$OUT/sanitizer-$tool.txt"
    done ;;
  profile)
    echo "== ncu: kernel times of one Q-Former-shape forward + backward (8x12x32x257x64)"
    ncu --metrics gpu__time_duration.sum --print-summary per-kernel python3 -c "
import numpy as np, qfuse, qfuse.cuda
r = np.random.default_rng(0); f = lambda *s: r.standard_normal(s).astype(np.float32)
q, k, v, g = f(8,12,32,64), f(8,12,257,64), f(8,12,257,64), f(8,12,32,64)
qfuse.sdpa_backward(q, k, v, g, device='cuda', check_finite=False)" 2>&1 | grep -E "sdpa|find_|gpu__time|Kernel|void" | head -n 40 ;;
  bench)
    echo "== bench_cuda_attention.py"
    python3 bench/bench_cuda_attention.py ${QF_QUICK:+--quick} --out "$OUT/h100-cuda-attention.txt" ;;
  esac
done
