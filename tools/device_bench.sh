#!/bin/bash
# device_bench.sh - the official benchmark run on the device machine's CPU (see bench/README.md).
#
#   bash tools/device_bench.sh probe|blas|full|two     (in the repository root, .debs/ carried)
#   bash tools/device_bench.sh interleaved T[xRUNS]...  e.g. interleaved 16 2x2
#
# The device image has a compiler and PyTorch but no package registry and none of qfuse's
# libraries, so the Debian 12 packages in .debs/ (apt-get download, see bench/README.md) are
# unpacked with dpkg -x into $DEPS (never into /) and everything links to them by absolute path
# with an RPATH, so nothing else on the machine (PyTorch above all) sees them.
#   probe: machine facts, a quick sgemm comparison of every BLAS variant, a compile of qfuse,
#          a quick torch_peer.py run (checks the PyTorch side works)
#   blas:  the sgemm comparison (docs/blas.md) at 2 and 16 threads, full timing
#   full:  qfuse built with the default BLAS (Makefile) and bench/run.sh at 2 and 16 threads
#          (run.sh's default: bench/compare.py, interleaved, 3 rounds)
#   interleaved: the judged tables: bench/compare.py (via run.sh) at each thread count T, RUNS times
#          (default 1), ROUNDS (default 5) rounds of at least MIN_REPS (default 2) timed runs
#   sdpa T...: the attention cases only (compare.py --only sdpa; the GEMM ceiling still runs every
#          round), for a short device budget: ROUNDS (default 3), SCALE (default 0.12), MIN_REPS
#          (default 1), GAP (default 0.2 s); OPENBLAS_CORETYPE=SkylakeX as run.sh sets it where
#          OpenBLAS misdetects the CPU; writes table-Tt-sdpa.txt and raw-sdpa.tar.gz
# Writes into $OUT (at most 8 files come back): log.txt, blas.txt, table-2t.txt, table-16t.txt,
# raw.tar.gz; interleaved: table-Tt-interleaved-I.txt, raw-interleaved-T....tar.gz.
set -u
mode=${1:-probe}
OUT=${OUT:-/tmp/qfuse-out}
DEPS=/tmp/qfuse-deps
LIB=$DEPS/usr/lib/x86_64-linux-gnu
mkdir -p "$OUT" "$DEPS"
exec > >(tee -a "$OUT/log.txt") 2>&1

for f in .debs/*.deb; do dpkg -x "$f" "$DEPS"; done
RP="-Wl,--disable-new-dtags -Wl,-rpath,$LIB -Wl,-rpath-link,$LIB"
W="-std=c11 -D_GNU_SOURCE -O2 -march=native -fopenmp -Wall -Wextra -Wshadow"

facts() {
    echo "== machine"
    gcc --version | head -n 1
    lscpu | grep -E '^(Model name|CPU\(s\)|Thread|Core|Socket|L2|L3|Flags)' | cut -c1-400
    nproc; free -g | head -n 2
    python3 -c 'import torch; print("torch", torch.__version__, "mkldnn", torch.backends.mkldnn.is_available()); print(torch.__config__.parallel_info())' 2>&1 | head -n 12
}

# gemm-only builds of bench_attention against each BLAS variant
build_gemm_benches() {
    mkdir -p /tmp/gb
    cc $W -DQF_BENCH_GEMM_ONLY -I$DEPS/usr/include/x86_64-linux-gnu/openblas-pthread bench/bench_attention.c \
        -o /tmp/gb/openblas-pthread $LIB/openblas-pthread/libopenblasp-r0.3.21.so $RP -Wl,-rpath,$LIB/openblas-pthread -lm
    cc $W -DQF_BENCH_GEMM_ONLY -I$DEPS/usr/include/x86_64-linux-gnu/openblas-pthread bench/bench_attention.c \
        -o /tmp/gb/openblas-openmp $LIB/openblas-openmp/libopenblasp-r0.3.21.so $RP -Wl,-rpath,$LIB/openblas-openmp -lm
    for v in openmp pthread; do
        cc $W -Wno-unused-function -DQF_BENCH_GEMM_ONLY -I$DEPS/usr/include/x86_64-linux-gnu/blis-openmp bench/bench_attention.c \
            -o /tmp/gb/blis-$v $LIB/blis-$v/libblis.so.4 $RP -Wl,-rpath,$LIB/blis-$v -lm
    done
    ls /tmp/gb
}

# blas_compare QUICKFLAG THREADS...: every variant, detected core and forced AVX-512 cores
blas_compare() {
    local quick=$1; shift
    for t in "$@"; do
        for b in openblas-pthread openblas-openmp blis-openmp blis-pthread; do
            echo "== $b, $t threads (detected core)"
            OMP_NUM_THREADS=$t OPENBLAS_VERBOSE=2 /tmp/gb/$b --threads $t --only gemm $quick
        done
        if grep -q avx512f /proc/cpuinfo; then
            for c in SkylakeX Cooperlake; do
                echo "== openblas-pthread, $t threads, OPENBLAS_CORETYPE=$c"
                OPENBLAS_CORETYPE=$c /tmp/gb/openblas-pthread --threads $t --only gemm $quick
            done
            echo "== blis-openmp, $t threads, BLIS_ARCH_TYPE=0 (skx)"
            OMP_NUM_THREADS=$t BLIS_ARCH_TYPE=0 /tmp/gb/blis-openmp --threads $t --only gemm $quick
        fi
    done
}

# qfuse against OpenBLAS's OpenMP build, as the Makefile links by default (QF_OPENBLAS=pthread:
# the pthread build, which the tables before 2026-11-23 12:00 used). .debs carries each variant's
# runtime package and the pthread -dev headers (the cblas.h API is the same), so the library is
# named by path. bench_attention is relinked every time: make does not see a variant change.
build_qfuse() {
    local variant=${QF_OPENBLAS:-openmp}
    echo "== build qfuse (build-dev, OpenBLAS $variant)"
    rm -f build-dev/bench_attention
    make -j16 BUILD=build-dev OPENBLAS_VARIANT=$variant CFLAGS="-O2 -g -I$DEPS/usr/include -L$LIB $RP" \
        BLAS_CFLAGS="-I$DEPS/usr/include/x86_64-linux-gnu/openblas-pthread" \
        BLAS_LIBS="$LIB/openblas-$variant/libopenblas.so.0 -Wl,-rpath,$LIB/openblas-$variant" \
        build-dev/libqfuse.a build-dev/bench_attention 2>&1 | grep -vE '^(cc|ar) ' | tail -n 30
    ls -la build-dev/bench_attention 2>/dev/null
}

facts
case "$mode" in
probe)
    build_gemm_benches
    blas_compare --quick 2 16 | grep -vE '^M.threads'
    build_qfuse
    echo "== torch_peer quick, 16 threads"
    PYTHONUNBUFFERED=1 python3 bench/torch_peer.py --threads 16 --quick
    if [ -x build-dev/bench_attention ]; then
        BUILD=build-dev QUICK=1 sh bench/run.sh 16
    fi
    ;;
blas)
    build_gemm_benches
    blas_compare "" 2 16 | tee "$OUT/blas.txt"
    ;;
full)
    build_qfuse
    BUILD=build-dev RESULTS_DIR=/tmp/res sh bench/run.sh 2 16
    cp /tmp/res/table-2t.txt /tmp/res/table-16t.txt "$OUT/" 2>/dev/null
    tar -C /tmp/res -czf "$OUT/raw.tar.gz" .
    ;;
two)
    # 2-thread tables only, twice (run.sh: interleaved, pinned by affinity mask). It once set
    # OMP_PROC_BIND=close OMP_PLACES=cores: that put every OpenBLAS thread on one core (the
    # results/h100-cpu-2t-pinned-* ceilings of 134/154 GFLOP/s are one core's sgemm rate).
    build_qfuse
    for r in 1 2; do
        BUILD=build-dev RESULTS_DIR=/tmp/res$r sh bench/run.sh 2
        cp /tmp/res$r/table-2t.txt "$OUT/table-2t-pinned-$r.txt" 2>/dev/null
    done
    ;;
interleaved)
    shift
    build_qfuse
    rm -rf /tmp/iraw; mkdir -p /tmp/iraw
    for spec in "$@"; do
        t=${spec%%x*}; runs=1
        case "$spec" in *x*) runs=${spec#*x} ;; esac
        for i in $(seq 1 "$runs"); do
            echo "== interleaved, $t threads, run $i of $runs, $(date -u '+%F %H:%M UTC')"
            ROUNDS=${ROUNDS:-5} MIN_REPS=${MIN_REPS:-2} BUILD=build-dev RESULTS_DIR=/tmp/ires sh bench/run.sh "$t"
            cp /tmp/ires/table-${t}t.txt "$OUT/table-${t}t-interleaved-$i.txt" 2>/dev/null
            cp /tmp/ires/raw-${t}t.tsv "/tmp/iraw/raw-${t}t-$i.tsv" 2>/dev/null
            tar -C /tmp/iraw -czf "$OUT/raw-interleaved-$(echo "$*" | tr ' ' '_').tar.gz" .
        done
    done
    ;;
sdpa)
    shift
    build_qfuse
    if grep -q avx512f /proc/cpuinfo && [ -z "${OPENBLAS_CORETYPE:-}" ]; then
        case "$(build-dev/bench_attention --blas-info 2>/dev/null)" in
        OpenBLAS*SkylakeX*|OpenBLAS*Cooperlake*|OpenBLAS*SapphireRapids*) note="" ;;
        *) export OPENBLAS_CORETYPE=SkylakeX; note="OPENBLAS_CORETYPE=SkylakeX set by device_bench.sh sdpa" ;;
        esac
    fi
    rm -rf /tmp/sraw; mkdir -p /tmp/sraw
    for t in "$@"; do
        echo "== sdpa only, $t threads, $(date -u '+%F %H:%M UTC')"
        python3 bench/compare.py --bench build-dev/bench_attention --python python3 --threads "$t" --only sdpa \
            --rounds "${ROUNDS:-3}" --scale "${SCALE:-0.12}" --min-reps "${MIN_REPS:-1}" --gap "${GAP:-0.2}" \
            --note "${note:-}" --raw "/tmp/sraw/raw-${t}t.tsv" | tee "$OUT/table-${t}t-sdpa.txt"
        tar -C /tmp/sraw -czf "$OUT/raw-sdpa.tar.gz" .
    done
    ;;
build) build_gemm_benches; build_qfuse ;;
*) echo "device_bench.sh: mode '$mode' is not probe, blas, full, two, interleaved, sdpa or build"; exit 2 ;;
esac
