#!/bin/bash
# device_bench_qformer.sh - the whole-model benchmark (bench/bench_qformer.c: BLIP-2 Q-Former and
# AffectGPT pre-fusion vs PyTorch/transformers) on the device machine's CPU, at 2 and 16 threads.
#
#   QF_COMMIT=<hash> bash tools/device_bench_qformer.sh [rounds [diag]]   (repository root, .debs/ carried)
#   QF_THREADS="16 2" (thread counts, in order)  QF_QUICK=1 (bench_qformer --quick: fewer repetitions)
#
# Like tools/device_bench.sh: the machine has no package registry, so the Debian 12 packages in
# .debs/ (libcjson, OpenBLAS, libstb: `apt-get download libstb0 libstb-dev` beside the others) are
# unpacked with dpkg -x into $DEPS (never into /) and qfuse links them by absolute path with an
# RPATH. OPENBLAS_CORETYPE=SkylakeX: OpenBLAS 0.3.21 mistakes the VM's Xeon for Prescott
# (docs/blas.md). The peer is the machine's python3 (PyTorch + transformers from pip).
# Each table is followed by qfuse's time per op kind (bench_qformer --profile).
# Writes $OUT/h100-cpu-qformer-2t.txt, $OUT/h100-cpu-qformer-16t.txt, $OUT/h100-cpu-gemm-small.txt
# and $OUT/log.txt.
set -u
rounds=${1:-3}
OUT=${OUT:-/tmp/qfuse-out}
DEPS=/tmp/qfuse-deps
LIB=$DEPS/usr/lib/x86_64-linux-gnu
mkdir -p "$OUT" "$DEPS"
exec > >(tee -a "$OUT/log.txt") 2>&1

for f in .debs/*.deb; do dpkg -x "$f" "$DEPS"; done
RP="-Wl,--disable-new-dtags -Wl,-rpath,$LIB -Wl,-rpath-link,$LIB"
echo "== machine"
lscpu | grep -E '^(Model name|CPU\(s\))'
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' 2>&1 | tail -n 1
# OpenBLAS's OpenMP build by default, as the Makefile links it (one thread pool for qfuse's loops
# and the GEMMs); QF_OPENBLAS=pthread measures the pthread build. .debs carries the runtime package
# of each variant and the pthread -dev headers (the cblas.h API is the same), so the library is
# named by path.
variant=${QF_OPENBLAS:-openmp}
echo "== build (build-dev, OpenBLAS $variant)"
make -j16 BUILD=build-dev OPENBLAS_VARIANT=$variant \
    CFLAGS="-O2 -g -I$DEPS/usr/include -L$LIB $RP" \
    BLAS_CFLAGS="-I$DEPS/usr/include/x86_64-linux-gnu/openblas-pthread" \
    BLAS_LIBS="$LIB/openblas-$variant/libopenblas.so.0 -Wl,-rpath,$LIB/openblas-$variant" \
    build-dev/bench_qformer 2>&1 | grep -vE '^(cc|ar) ' | tail -n 30
[ -x build-dev/bench_qformer ] || { echo "build failed"; exit 1; }
export OPENBLAS_CORETYPE=SkylakeX
for t in ${QF_THREADS:-2 16}; do
    f="$OUT/h100-cpu-qformer-${t}t.txt"
    {
        echo "# device: nvidia-h100-x1 host CPU ($(lscpu | sed -n 's/^Model name: *//p')), $(nproc) CPUs; GPU unused"
        echo "# commit ${QF_COMMIT:-unknown}, run $(date -u '+%Y-%m-%d %H:%M UTC'), OpenBLAS $variant build, OPENBLAS_CORETYPE=$OPENBLAS_CORETYPE"
    } > "$f"
    echo "== $t threads"
    OMP_NUM_THREADS=$t build-dev/bench_qformer --threads $t --rounds "$rounds" ${QF_QUICK:+--quick} --python python3 --profile >> "$f"
    cat "$f"
done
# Few-rows GEMMs (bench_qformer --gemm-shapes): qfuse's own kernel (src/ops/gemm_small.c) against
# cblas_sgemm on the Q-Former's shapes at 16..256 rows, cold weights: the measurement behind the
# row cut (QF_GEMM_SMALL_MAX_M) of qf_linear_forward. Skipped with QF_NO_SHAPES=1.
if [ -z "${QF_NO_SHAPES:-}" ]; then
    f="$OUT/h100-cpu-gemm-small.txt"
    echo "# device: nvidia-h100-x1 host CPU, commit ${QF_COMMIT:-unknown}, $(date -u '+%Y-%m-%d %H:%M UTC'), OpenBLAS $variant build, OPENBLAS_CORETYPE=$OPENBLAS_CORETYPE" > "$f"
    for t in ${QF_THREADS:-2 16}; do
        echo "== gemm shapes, $t threads"
        OMP_NUM_THREADS=$t build-dev/bench_qformer --threads $t --gemm-shapes | tee -a "$f"
    done
fi
# Diagnostic (not a recorded table): qfuse alone with OpenMP's idle threads sleeping instead of
# spinning. The Q-Former alternates OpenMP ops with OpenBLAS (pthreads) GEMMs; spinning OpenMP
# workers compete with OpenBLAS's threads for the same cores (6x slower at 2 threads on a busy VM).
if [ "${2:-}" = diag ]; then
    for t in 2 16; do
        echo "== diagnostic: $t threads, OMP_WAIT_POLICY=passive, qfuse only, quick"
        OMP_WAIT_POLICY=passive OMP_NUM_THREADS=$t build-dev/bench_qformer --threads $t --rounds 1 --quick --no-peer \
            | tee "$OUT/diag-passive-${t}t.txt"
    done
fi
