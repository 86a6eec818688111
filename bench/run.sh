#!/bin/sh
# run.sh - the attention benchmark: qfuse (bench_attention) and PyTorch (torch_peer.py) on the
# same cases and thread count, one table per thread count.
#
#   sh bench/run.sh [THREADS...]        default: the number of cores
#
# By default bench/compare.py runs the two interleaved: both as servers pinned to the same cores,
# each case timed by one then the other, in ROUNDS rounds, ratios taken within a round.
# INTERLEAVE=0 runs them one after the other instead (each program's whole table, then merged),
# as before compare.py; so does a machine with no Python at all.
# Builds nothing: `make bench` builds first. Environment:
#   BUILD        build folder holding bench_attention (default: build)
#   PYTHON       interpreter with torch (default: the first of /usr/bin/python3, python3 that
#                imports torch)
#   ROUNDS       interleaved rounds (default 2; the device tables use 5); SCALE: timing per case,
#                side and round as a share of 1.5 s (default 0.35); MIN_REPS: least timed runs
#                per case and round (default 1)
#   QUICK=1      smoke run: 2 rounds at scale 0.1 (or 0.3 s a case with INTERLEAVE=0): not for tables
#   RESULTS_DIR  also write the table of T threads to RESULTS_DIR/table-Tt.txt and the raw numbers
#                to RESULTS_DIR/raw-Tt.tsv (INTERLEAVE=0: raw-{qfuse,torch}-Tt.tsv)
# Columns are explained in bench/README.md. Exit status: 1 if a qfuse case failed.
set -u
here=$(cd "$(dirname "$0")" && pwd)
BUILD=${BUILD:-build}
bench="$BUILD/bench_attention"
if [ ! -x "$bench" ]; then
    echo "run.sh: $bench not found; build it first (make bench, or make BUILD=$BUILD $bench)" >&2
    exit 2
fi
if [ $# -eq 0 ]; then set -- "$(nproc)"; fi
quick=""
[ "${QUICK:-0}" = 1 ] && quick="--quick"

if [ -z "${PYTHON:-}" ]; then
    for p in /usr/bin/python3 python3; do
        if "$p" -c 'import torch' >/dev/null 2>&1; then PYTHON=$p; break; fi
    done
fi
PYTHON=${PYTHON:-python3}

# OpenBLAS 0.3.21 (Debian 12) picks its kernels from the CPU model number and falls back to old
# ones on CPUs it does not know: Prescott (SSE3) on the device machine's virtualised Xeon,
# Haswell (AVX2) on Zen 5, each several times slower than its AVX-512 kernels (docs/blas.md).
# Where the CPU has AVX-512 and the detected core lacks it, ask for the SkylakeX kernels (BLIS:
# arch skx, id 0), unless the caller chose a core; the table's header says so.
blas_note=""
[ -n "${OPENBLAS_CORETYPE:-}" ] && blas_note="OPENBLAS_CORETYPE=$OPENBLAS_CORETYPE (from the environment)"
[ -n "${BLIS_ARCH_TYPE:-}" ] && blas_note="BLIS_ARCH_TYPE=$BLIS_ARCH_TYPE (from the environment)"
avx512=$(grep -m1 -o -w 'avx512f\|avx512bw\|avx512dq\|avx512vl' /proc/cpuinfo 2>/dev/null | wc -l)
if [ "$avx512" -ge 4 ] 2>/dev/null; then
    info=$("$bench" --blas-info 2>/dev/null)
    case "$info" in
    OpenBLAS*SkylakeX*|OpenBLAS*Cooperlake*|OpenBLAS*SapphireRapids*|BLIS*skx*) ;;
    OpenBLAS*)
        if [ -z "${OPENBLAS_CORETYPE:-}" ]; then
            export OPENBLAS_CORETYPE=SkylakeX
            blas_note="OPENBLAS_CORETYPE=SkylakeX set by run.sh (detected: $(echo "${info##*core }" | tr -d "()"))"
        fi ;;
    BLIS*)
        if [ -z "${BLIS_ARCH_TYPE:-}" ]; then
            export BLIS_ARCH_TYPE=0
            blas_note="BLIS_ARCH_TYPE=0 (skx) set by run.sh (detected: $(echo "${info##*arch }" | tr -d "()"))"
        fi ;;
    esac
fi

if [ "${INTERLEAVE:-1}" != 0 ] && command -v "$PYTHON" >/dev/null 2>&1; then
    rounds=${ROUNDS:-2} scale=${SCALE:-0.35} reps=${MIN_REPS:-1}
    [ "${QUICK:-0}" = 1 ] && { rounds=${ROUNDS:-2}; scale=0.1; }
    status=0
    [ -n "${RESULTS_DIR:-}" ] && mkdir -p "$RESULTS_DIR"
    for t in "$@"; do
        out=$(mktemp)
        "$PYTHON" "$here/compare.py" --bench "$bench" --python "$PYTHON" --threads "$t" --rounds "$rounds" \
            --scale "$scale" --min-reps "$reps" --note "$blas_note" \
            ${RESULTS_DIR:+--raw "$RESULTS_DIR/raw-${t}t.tsv"} >"$out" || status=1
        cat "$out"
        echo
        if [ -n "${RESULTS_DIR:-}" ]; then cp "$out" "$RESULTS_DIR/table-${t}t.txt"; fi
        rm -f "$out"
    done
    exit $status
fi

cpu=$(lscpu 2>/dev/null | sed -n 's/^Model name:[[:space:]]*//p' | head -n 1)
cores=$(nproc)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
status=0

for t in "$@"; do
    OMP_NUM_THREADS=$t OPENBLAS_NUM_THREADS=$t BLIS_NUM_THREADS=$t QFUSE_THREADS=$t \
        "$bench" --threads "$t" $quick >"$tmp/q" 2>"$tmp/qerr" || status=1
    OMP_NUM_THREADS=$t OPENBLAS_NUM_THREADS=$t MKL_NUM_THREADS=$t \
        "$PYTHON" "$here/torch_peer.py" --threads "$t" $quick >"$tmp/t" 2>"$tmp/terr"
    trc=$?
    if [ $trc -ne 0 ]; then
        why=$(grep '^E' "$tmp/t" | head -n 1 | cut -f3)
        [ -n "$why" ] || why="torch_peer.py exited $trc: $(tail -n 1 "$tmp/terr")"
        printf 'N\twhy\t%s\n' "$why" >>"$tmp/t"
    fi
    awk -F '\t' -v note="$blas_note" -v cpu="$cpu" -v cores="$cores" -v threads="$t" '
        { file = (FILENAME == ARGV[1]) ? 1 : 2 }
        file == 1 && $1 == "M" { qm[$2] = $3 }
        file == 1 && $1 == "R" { n++; name[n] = $2; qms[$2] = $3; flop[$2] = $4 }
        file == 1 && $1 == "E" { n++; name[n] = $2; qerr[$2] = $3 }
        file == 2 && $1 == "M" { tm[$2] = $3 }
        file == 2 && $1 == "R" { tms[$2] = $3 }
        file == 2 && $1 == "N" { why = $3 }
        END {
            have_t = ("torch" in tm)
            label = have_t ? tm["torch_label"] : "torch"
            printf "# CPU: %s | cores: %s | threads: %s | BLAS: %s | qfuse %s, ISA %s | %s\n", \
                cpu, cores, threads, qm["blas"], qm["qfuse"], qm["isa"], \
                have_t ? sprintf("torch %s (%s, path: %s)", tm["torch"], label, tm["sdpa_path"]) : "torch: not run"
            if (!have_t) printf "# torch columns empty: %s\n", why
            if (note != "") printf "# BLAS kernels: %s\n", note
            printf "# GEMM ceiling: %s GFLOP/s (sgemm %s, same BLAS and threads). FLOPs: SDPA fwd 4*B*H*L*S*D,\n", \
                qm["ceiling_gflops"], qm["ceiling_shape"]
            printf "#   causal (L==S) counts computed pairs L*(L+1)/2 instead of L*S; bwd = 2.5x fwd; GEMM 2*M*N*K.\n"
            printf "#   Shapes B x H x L x S x D; times are medians in ms; speedup = torch ms / qfuse ms.\n"
            tw = length(label " ms"); if (tw < 9) tw = 9
            dash = "--------------------------------------------"
            printf "| %-42s | %9s | %*s | %7s | %8s | %7s |\n", "case", "qfuse ms", tw, label " ms", "speedup", "GFLOP/s", "% ceil"
            printf "|%s|%s|%s|%s|%s|%s|\n", dash, substr(dash, 1, 11), substr(dash, 1, tw + 2), \
                substr(dash, 1, 9), substr(dash, 1, 10), substr(dash, 1, 9)
            for (i = 1; i <= n; i++) {
                k = name[i]
                if (k in qerr) { printf "| %-42s | FAILED: %s\n", k, qerr[k]; continue }
                g = flop[k] / qms[k] / 1e6
                ts = (k in tms) ? sprintf("%*.3f", tw, tms[k]) : sprintf("%*s", tw, "-")
                sp = (k in tms) ? sprintf("%6.2fx", tms[k] / qms[k]) : sprintf("%7s", "-")
                ce = qm["ceiling_gflops"] > 0 ? sprintf("%6.1f%%", 100 * g / qm["ceiling_gflops"]) : "-"
                printf "| %-42s | %9.3f | %s | %s | %8.1f | %7s |\n", k, qms[k], ts, sp, g, ce
            }
            for (key in qm) if (key ~ /^causal_ratio /) {
                s = substr(key, 14)
                tk = "causal_ratio " s
                printf "# causal/unmasked forward time, %s: qfuse %.2f%s\n", s, qm[key], \
                    (tk in tm) ? sprintf(", %s %.2f", label, tm[tk]) : ""
            }
        }' "$tmp/q" "$tmp/t" >"$tmp/table"
    cat "$tmp/table"
    [ -s "$tmp/qerr" ] && sed 's/^/# bench_attention: /' "$tmp/qerr"
    echo
    if [ -n "${RESULTS_DIR:-}" ]; then
        mkdir -p "$RESULTS_DIR"
        cp "$tmp/table" "$RESULTS_DIR/table-${t}t.txt"
        cp "$tmp/q" "$RESULTS_DIR/raw-qfuse-${t}t.tsv"
        cp "$tmp/t" "$RESULTS_DIR/raw-torch-${t}t.tsv"
    fi
done
exit $status
