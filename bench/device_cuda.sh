#!/bin/bash
# device_cuda.sh - the CUDA backend on the GPU machine: cross-backend test, compute-sanitizer
# (memcheck, racecheck) on small cases, and the attention benchmark against PyTorch.
#
#   bash bench/device_cuda.sh [test] [sanitize] [bench]        (repository root; default: all three)
#   extra steps: optest / opsan (test_cuda_ops.py alone / its memcheck), gemm (gemm_nt timings vs torch), profile,
#   alltests (every GPU test file, the CLI's too), racecheck (racecheck + memcheck over every GPU test file, QUICK),
#   qprofile (per-kernel GPU time of the Q-Former forward: bench/profile_cuda_qformer.py)
#
# Expects build-cuda/run/ (carried; git-ignored; QF_RUN=<folder> for another), made on the build machine:
#   make CUDA=1 BUILD=build-cuda build-cuda/libqfuse.so; mkdir -p build-cuda/run
#   cp build-cuda/libqfuse.so build-cuda/run/; cp .debs/{libcjson1,libopenblas0-openmp,libgfortran5,
#   libquadmath0,libpcre2-8-0,libutf8proc2,libstb0}_*.deb /lib/x86_64-linux-gnu/libgomp.so.1 build-cuda/run/
# The machine has no package registry: the Debian packages are unpacked with dpkg -x into $DEPS
# (never into /) and found through LD_LIBRARY_PATH. Results go to $OUT.
set -u
OUT=${OUT:-/tmp/qfuse-out}
DEPS=/tmp/qfuse-deps
RUN=${QF_RUN:-$PWD/build-cuda/run}
mkdir -p "$OUT" "$DEPS"
for f in "$RUN"/*.deb; do dpkg -x "$f" "$DEPS"; done
L=$DEPS/usr/lib/x86_64-linux-gnu
export LD_LIBRARY_PATH=$RUN:$L:$L/openblas-openmp${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export QFUSE_LIBRARY=$RUN/libqfuse.so PYTHONPATH=$PWD/python PYTHONUNBUFFERED=1 OPENBLAS_CORETYPE=SkylakeX
steps=${*:-test sanitize bench}
nvidia-smi -L
if ldd "$RUN/libqfuse.so" | grep -q "libcublas.*not found"; then  # the toolkit's cuBLAS missing: torch's wheel has one
  CB=$(python3 -c "import nvidia.cublas, os; print(os.path.join(list(nvidia.cublas.__path__)[0], 'lib'))" 2>/dev/null)
  export LD_LIBRARY_PATH=$LD_LIBRARY_PATH:$CB
fi
ldd "$RUN/libqfuse.so" | grep -E "cublas|not found"
for s in $steps; do
  case $s in
  test)
    echo "== test_cuda.py"
    python3 -m pytest -q -rs -p no:cacheprovider tests/python/test_cuda.py 2>&1 | tee "$OUT/test_cuda.txt" | tail -n 40 ;&
  optest)
    echo "== test_cuda_ops.py"
    python3 -m pytest -q -rs -s -p no:cacheprovider tests/python/test_cuda_ops.py 2>&1 | tee "$OUT/test_cuda_ops.txt" \
      | grep -E "passed|failed|rror|assert|bf16 (lt|classic)|tf32 (lt|classic)|^E " | tail -n 40 ;;
  opsan)
    echo "== compute-sanitizer --tool memcheck test_cuda_ops.py (QUICK)"
    QFUSE_TEST_QUICK=1 timeout ${QF_SAN_TIMEOUT:-200} compute-sanitizer --tool memcheck --error-exitcode 9 python3 tests/python/test_cuda_ops.py \
      > "$OUT/sanitizer-ops-memcheck.txt" 2>&1
    echo "exit $?"; tail -n 6 "$OUT/sanitizer-ops-memcheck.txt" ;;
  sanitize)
    for tool in memcheck racecheck; do
      echo "== compute-sanitizer --tool $tool"
      timeout 240 compute-sanitizer --tool $tool --error-exitcode 9 python3 tests/python/test_cuda.py \
        > "$OUT/sanitizer-$tool.txt" 2>&1
      echo "exit $?"; tail -n 6 "$OUT/sanitizer-$tool.txt"
    done
    echo "== compute-sanitizer --tool memcheck test_cuda_ops.py (QUICK)"
    QFUSE_TEST_QUICK=1 timeout ${QF_SAN_TIMEOUT:-200} compute-sanitizer --tool memcheck --error-exitcode 9 python3 tests/python/test_cuda_ops.py \
      > "$OUT/sanitizer-ops-memcheck.txt" 2>&1
    echo "exit $?"; tail -n 6 "$OUT/sanitizer-ops-memcheck.txt" ;;
  gemm)
    echo "== gemm_nt with bias (graph of 20 calls, per call; cuBLASLt and classic paths) vs torch F.linear (CUDA graph of 20), fp32 no TF32 and bf16 weights"
    python3 - <<'PY' 2>&1 | tee "$OUT/gemm-timing.txt" ;;
import ctypes, time
from ctypes import POINTER, byref, c_int, c_void_p
import torch, torch.nn.functional as F
import qfuse, qfuse.cuda
from qfuse._native import check, lib
qfuse.cuda.init()
torch.backends.cuda.matmul.allow_tf32 = False
E = lambda op, res, args: qfuse.cuda.backend_entry("cuda", op, res, args)
gemm = E("gemm_nt", c_int, [POINTER(qfuse.cuda.GemmNtArgs)])
begin, end = E("capture_begin", c_int, []), E("capture_end", c_int, [POINTER(c_void_p)])
launch, gfree = E("graph_launch", c_int, [c_void_p, POINTER(c_int)]), E("graph_free", None, [c_void_p])
R, REPS = 20, 20
def qf_time(a):
    check(gemm(byref(a))); qfuse.cuda.synchronize()              # eager first (cuBLAS handle, scratch)
    t0 = time.perf_counter()
    for _ in range(REPS * R): check(gemm(byref(a)))
    qfuse.cuda.synchronize(); eager = (time.perf_counter() - t0) / (REPS * R)
    check(begin())
    for _ in range(R): check(gemm(byref(a)))
    g = c_void_p(); check(end(byref(g))); st = c_int()
    check(launch(g, byref(st))); qfuse.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(REPS): check(launch(g, byref(st)))
    qfuse.cuda.synchronize(); gfree(g)
    return (time.perf_counter() - t0) / (REPS * R), eager
def torch_time(fn):
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3): fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(R): fn()
    g.replay(); torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(REPS): g.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / (REPS * R)
for M, N, K in [(257, 9216, 1408), (32, 2304, 768)]:
    x, w, b = torch.randn(M, K, device="cuda"), torch.randn(N, K, device="cuda") * 0.05, torch.randn(N, device="cuda")
    wb, bb, out = w.bfloat16(), b.bfloat16(), torch.empty(M, N, device="cuda")
    torch.cuda.synchronize()
    a32 = qfuse.cuda.GemmNtArgs(x.data_ptr(), K, w.data_ptr(), b.data_ptr(), None, 0, out.data_ptr(), N, M, N, K, 0, None)
    a16 = qfuse.cuda.GemmNtArgs(x.data_ptr(), K, None, b.data_ptr(), None, 0, out.data_ptr(), N, M, N, K, 0, wb.data_ptr())
    fl = 2.0 * M * N * K
    for name, a, fn in (("fp32", a32, lambda: F.linear(x, w, b)), ("bf16", a16, lambda: F.linear(x.bfloat16(), wb, bb))):
        t = torch_time(fn)
        for path in (1, 0):
            lib.qf_cuda_test_gemm_lt(path)
            q, qe = qf_time(a)
            print("%4dx%5dx%5d %s %-7s: qfuse graph %7.1f us (%6.1f TFLOP/s), eager via ctypes %7.1f us; torch graph"
                  " %7.1f us (%6.1f TFLOP/s); torch/qfuse %.2fx" % (M, N, K, name, "lt" if path else "classic", q * 1e6,
                                                                   fl / q / 1e12, qe * 1e6, t * 1e6, fl / t / 1e12, t / q))
        lib.qf_cuda_test_gemm_lt(1)
PY
  profile)
    echo "== ncu: kernel times of one Q-Former-shape forward + backward (8x12x32x257x64)"
    ncu --metrics gpu__time_duration.sum --print-summary per-kernel python3 -c "
import numpy as np, qfuse, qfuse.cuda
r = np.random.default_rng(0); f = lambda *s: r.standard_normal(s).astype(np.float32)
q, k, v, g = f(8,12,32,64), f(8,12,257,64), f(8,12,257,64), f(8,12,32,64)
qfuse.sdpa_backward(q, k, v, g, device='cuda', check_finite=False)" 2>&1 | grep -E "sdpa|find_|gpu__time|Kernel|void" | head -n 40 ;;
  alltests)
    export QFUSE_CLI=$RUN/qfuse
    for f in tests/python/test_cuda*.py tests/python/test_sdpa_dtype.py tests/python/test_cli_device.py; do
      echo "== $f"
      python3 -m pytest -q -p no:cacheprovider "$f" 2>&1 | tee "$OUT/$(basename "$f" .py).txt" | grep -E "passed|failed|^E |Error" | tail -n 12
    done ;;
  racecheck)
    for tool in racecheck memcheck; do
      for f in tests/python/test_cuda*.py tests/python/test_sdpa_dtype.py; do
        echo "== compute-sanitizer --tool $tool $f (QUICK)"
        QFUSE_TEST_QUICK=1 timeout ${QF_SAN_TIMEOUT:-200} compute-sanitizer --tool $tool --error-exitcode 9 \
          python3 -m pytest -q -x -p no:cacheprovider "$f" > "$OUT/san-$tool-$(basename "$f" .py).txt" 2>&1
        echo "exit $?"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed" "$OUT/san-$tool-$(basename "$f" .py).txt" | tail -n 3
      done
    done ;;
  qprofile)
    echo "== profile_cuda_qformer.py (kernels launched eagerly: QFUSE_CUDA_GRAPHS=0)"
    QFUSE_CUDA_GRAPHS=0 python3 bench/profile_cuda_qformer.py ${QF_PROFILE_CONFIGS:+--configs $QF_PROFILE_CONFIGS} 2>&1 \
      | tee "$OUT/qprofile.txt" | grep -v Warning ;;
  bench)
    echo "== bench_cuda_attention.py"
    python3 bench/bench_cuda_attention.py ${QF_QUICK:+--quick} --out "$OUT/h100-cuda-attention.txt" ;;
  esac
done
