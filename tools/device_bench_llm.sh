#!/bin/bash
# device_bench_llm.sh - the decoder-LLM benchmark (bench/bench_llm.c, per weight format f32 /
# bf16 / int8 / q4) against transformers' generate (bench/llm_peer.py) on the device machine's
# CPU, at 16 and 2 threads, on a random-init Qwen2 with Qwen2-0.5B's shape and on a small one.
#
#   QF_COMMIT=<hash> bash tools/device_bench_llm.sh      (repository root, .debs/ carried)
#   QF_THREADS="16 2"  QF_MODELS="full small"  QF_STEPS=16  QF_PEER=0 (qfuse only)
#   QF_LLM_FULL=<folder> / QF_LLM_SMALL=<folder>: use existing checkpoints instead of making them
#
# Like tools/device_bench_qformer.sh: the machine has no package registry, so the Debian 12
# packages in .debs/ are unpacked with dpkg -x into $DEPS (never into /) and qfuse links them by
# absolute path with an RPATH; OpenBLAS's OpenMP build (as the Makefile links it) with
# OPENBLAS_CORETYPE=SkylakeX (OpenBLAS 0.3.21 mistakes the VM's Xeon for Prescott, docs/blas.md).
# The peer is the machine's python3 (PyTorch + transformers from pip). Each step has a time
# limit so that a slow one still leaves the others' tables.
# Writes $OUT/h100-cpu-llm-<model>-<t>t.txt (qfuse rows, then the peer's) and $OUT/log.txt.
set -u
OUT=${OUT:-/tmp/qfuse-out}
DEPS=/tmp/qfuse-deps
LIB=$DEPS/usr/lib/x86_64-linux-gnu
STEPS=${QF_STEPS:-16}
mkdir -p "$OUT" "$DEPS"
exec > >(tee -a "$OUT/log.txt") 2>&1
t_start=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - t_start )) s] $*"; }

for f in .debs/*.deb; do dpkg -x "$f" "$DEPS"; done
RP="-Wl,--disable-new-dtags -Wl,-rpath,$LIB -Wl,-rpath-link,$LIB"
stamp machine
lscpu | grep -E '^(Model name|CPU\(s\)|L3 cache)'
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' 2>&1 | tail -n 1
stamp "build (build-dev, OpenBLAS openmp)"
make -j16 BUILD=build-dev OPENBLAS_VARIANT=openmp \
    CFLAGS="-O2 -g -I$DEPS/usr/include -L$LIB $RP" \
    BLAS_CFLAGS="-I$DEPS/usr/include/x86_64-linux-gnu/openblas-pthread" \
    BLAS_LIBS="$LIB/openblas-openmp/libopenblas.so.0 -Wl,-rpath,$LIB/openblas-openmp" \
    build-dev/bench_llm 2>&1 | grep -vE '^(cc|ar) ' | tail -n 30
[ -x build-dev/bench_llm ] || { echo "build failed"; exit 1; }
export OPENBLAS_CORETYPE=SkylakeX

declare -A FOLDER=([full]=${QF_LLM_FULL:-/tmp/qwen2-full} [small]=${QF_LLM_SMALL:-/tmp/qwen2-small})
for m in ${QF_MODELS:-full small}; do
    if [ ! -f "${FOLDER[$m]}/config.json" ]; then
        stamp "make $m checkpoint"
        timeout 120 python3 bench/llm_peer.py --make "${FOLDER[$m]}" --size "$m"
    fi
done

for t in ${QF_THREADS:-16 2}; do
    for m in ${QF_MODELS:-full small}; do
        f="$OUT/h100-cpu-llm-$m-${t}t.txt"
        {
            echo "# device: nvidia-h100-x1 host CPU ($(lscpu | sed -n 's/^Model name: *//p')), $(nproc) CPUs; GPU unused"
            echo "# commit ${QF_COMMIT:-unknown}, run $(date -u '+%Y-%m-%d %H:%M UTC'), OpenBLAS openmp build, OPENBLAS_CORETYPE=$OPENBLAS_CORETYPE"
        } > "$f"
        kern=""
        [ "$m" = full ] && [ "$t" = "$(echo ${QF_THREADS:-16 2} | cut -d' ' -f1)" ] && kern=--kernels
        stamp "qfuse $m $t threads"
        OMP_NUM_THREADS=$t timeout 150 build-dev/bench_llm "${FOLDER[$m]}" --threads "$t" --steps "$STEPS" $kern >> "$f"
        bw=$(sed -n 's/.*memory read bandwidth \([0-9.]*\) GB\/s.*/\1/p' "$f" | head -n 1)
        if [ "${QF_PEER:-1}" = 1 ]; then
            stamp "peer $m $t threads"
            echo >> "$f"
            OMP_NUM_THREADS=$t PYTHONUNBUFFERED=1 timeout 150 python3 bench/llm_peer.py "${FOLDER[$m]}" --threads "$t" \
                --steps "$STEPS" ${bw:+--bw-gbs $bw} >> "$f" 2>> "$OUT/peer.err"
            tail -n 5 "$OUT/peer.err"
        fi
        cat "$f"
    done
done
stamp done
