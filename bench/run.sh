#!/bin/sh
# run.sh - the attention benchmark: qfuse (bench_attention) and PyTorch (torch_peer.py) on the
# same cases and thread count, merged into one table per thread count.
#
#   sh bench/run.sh [THREADS...]        default: the number of cores
#
# Builds nothing: `make bench` builds first. Environment:
#   BUILD        build folder holding bench_attention (default: build)
#   PYTHON       interpreter with torch (default: the first of /usr/bin/python3, python3 that
#                imports torch)
#   QUICK=1      shorter timing (0.3 s a case instead of 1.5 s): for smoke runs, not for tables
#   RESULTS_DIR  also write the table of T threads to RESULTS_DIR/table-Tt.txt and the raw lines
#                to RESULTS_DIR/raw-{qfuse,torch}-Tt.tsv
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
    awk -F '\t' -v cpu="$cpu" -v cores="$cores" -v threads="$t" '
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
            printf "# GEMM ceiling: %s GFLOP/s (sgemm %s, same BLAS and threads). FLOPs: SDPA fwd 4*B*H*L*S*D,\n", \
                qm["ceiling_gflops"], qm["ceiling_shape"]
            printf "#   causal (L==S) counts computed pairs L*(L+1)/2 instead of L*S; bwd = 2.5x fwd; GEMM 2*M*N*K.\n"
            printf "#   Shapes B x H x L x S x D; times are medians in ms; speedup = torch ms / qfuse ms.\n"
            printf "| %-42s | %9s | %9s | %7s | %8s | %7s |\n", "case", "qfuse ms", label " ms", "speedup", "GFLOP/s", "% ceil"
            printf "|%s|%s|%s|%s|%s|%s|\n", "--------------------------------------------", \
                "-----------", "-----------", "---------", "----------", "---------"
            for (i = 1; i <= n; i++) {
                k = name[i]
                if (k in qerr) { printf "| %-42s | FAILED: %s\n", k, qerr[k]; continue }
                g = flop[k] / qms[k] / 1e6
                ts = (k in tms) ? sprintf("%9.3f", tms[k]) : sprintf("%9s", "-")
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
