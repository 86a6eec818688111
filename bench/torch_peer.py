"""torch_peer.py - the PyTorch side of the attention benchmark: the same cases as
bench/bench_attention.c (same names, shapes, thread count and timing rule), so bench/run.sh can
put both in one table.

    python3 bench/torch_peer.py [--threads N] [--quick] [--only sdpa|gemm]
    python3 bench/torch_peer.py [--threads N] [--quick | --scale F] [--min-reps N] --serve

What is timed (float32, CPU):
  - SDPA forward: torch.nn.functional.scaled_dot_product_attention under torch.no_grad() where
    torch has it (2.x; its CPU flash kernel is requested with sdpa_kernel(FLASH_ATTENTION) and the
    default dispatcher is used if that is refused); otherwise (torch 1.13) the math path
    softmax(q @ k^T * scale + mask) @ v, with the causal mask as a precomputed -inf bias.
  - SDPA backward: one forward with requires_grad, then out.backward(grad, retain_graph=True) is
    timed alone (gradients reset to None before each run, outside the timed region).
  - GEMMs: torch.nn.functional.linear(x, w) without bias, under torch.no_grad().
Timing: warm-up (at least one run, until 0.2 s), then 3..25 runs (about 1.5 s; --quick 0.3 s),
median; --scale F multiplies both times (--quick: 0.2), --min-reps N sets the least number of
timed runs. Every case sets up its own tensors, so a case can be timed alone, in any order.
Output: tab-separated lines, as bench_attention prints them:
  M <key> <value> | R <case> <median ms> <flop> | E <case> <message>
--serve speaks bench_attention's --serve protocol (bench/compare.py drives both): the M lines and
"D\t" (ready), then one request a line on stdin: a case name (its R or E line, any M line it
updates, then "D\t<name>"), "list" ("C\t<name>" for every case, then "D\tlist"), or "quit".
"""
import argparse
import math
import os
import sys
import time

try:
    import torch
    import torch.nn.functional as F
except Exception as e:  # run.sh reports the reason and prints qfuse's columns alone
    print("E\ttorch\tcannot import torch: %s" % e)
    sys.exit(3)

QUICK = 1.0
MIN_REPS = 3


def time_median(fn, before=None):
    """Median seconds of fn() after warm-up; before() runs untimed ahead of every call."""
    t0 = time.perf_counter()
    warm = 0
    while True:
        if before:
            before()
        a = time.perf_counter()
        fn()
        first = time.perf_counter() - a
        warm += 1
        if time.perf_counter() - t0 >= 0.2 * QUICK or warm >= 50:
            break
    reps = max(MIN_REPS, min(25, math.ceil(1.5 * QUICK / max(first, 1e-6))))
    ts = []
    for _ in range(reps):
        if before:
            before()
        a = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - a)
    ts.sort()
    n = len(ts)
    return ts[n // 2] if n % 2 else 0.5 * (ts[n // 2 - 1] + ts[n // 2])


def report(name, sec, flop):
    print("R\t%s\t%.6f\t%.6g" % (name, sec * 1e3, flop), flush=True)


def gemm_case(M, N, K):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(M, K, generator=g) * 2 - 1
    w = torch.rand(N, K, generator=g) * 2 - 1
    with torch.no_grad():
        return time_median(lambda: F.linear(x, w)), 2.0 * M * N * K


HAS_SDPA = hasattr(F, "scaled_dot_product_attention")


def flash_context():
    """A context that asks for the CPU flash kernel, or None when this torch cannot ask."""
    try:
        from torch.nn.attention import sdpa_kernel, SDPBackend
        return lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION])
    except Exception:
        return None


FLASH = flash_context() if HAS_SDPA else None
SDPA_PATH = "default"  # updated to "flash" when the flash kernel accepted the first call


def make_attention(L, S, causal):
    """Returns attend(q, k, v) for this torch: fused SDPA if present, else the math path."""
    if HAS_SDPA:
        def plain(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        if FLASH is not None:
            def flash(q, k, v):
                with FLASH():
                    return plain(q, k, v)
            return flash, plain
        return plain, plain
    bias = None
    if causal:
        bias = torch.full((L, S), float("-inf")).triu(1)

    def math_path(q, k, v):
        s = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
        if bias is not None:
            s = s + bias
        return torch.matmul(torch.softmax(s, dim=-1), v)
    return math_path, math_path


def sdpa_case(B, H, L, S, D, causal, backward):
    """Times the forward, or the backward of one forward with requires_grad, of one shape."""
    global SDPA_PATH
    g = torch.Generator().manual_seed(11)
    q = torch.rand(B, H, L, D, generator=g) * 2 - 1
    k = torch.rand(B, H, S, D, generator=g) * 2 - 1
    v = torch.rand(B, H, S, D, generator=g) * 2 - 1
    dout = torch.rand(B, H, L, D, generator=g) * 2 - 1
    pairs = L * (L + 1) / 2 if (causal and L == S) else L * S
    fwd_flop = 4.0 * B * H * pairs * D
    attend, fallback = make_attention(L, S, causal)
    try:
        with torch.no_grad():
            attend(q, k, v)
        if attend is not fallback:
            SDPA_PATH = "flash"
    except RuntimeError:
        attend = fallback  # the flash kernel refused these inputs: the dispatcher picks
    if not backward:
        with torch.no_grad():
            return time_median(lambda: attend(q, k, v)), fwd_flop

    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = attend(qg, kg, vg)

    def reset():
        qg.grad = kg.grad = vg.grad = None

    return time_median(lambda: out.backward(dout, retain_graph=True), before=reset), 2.5 * fwd_flop


def make_cases():
    """(name, kind, run) in bench_attention's table order; run() returns (seconds, flop)."""
    cases = []
    for name, M, N, K in (("linear q/k/v/out 256x768 . 768x768^T", 256, 768, 768),
                          ("linear cross k/v 2056x1408 . 768x1408^T", 2056, 768, 1408),
                          ("linear ffn up 256x768 . 3072x768^T", 256, 3072, 768),
                          ("linear ffn down 256x3072 . 768x3072^T", 256, 768, 3072)):
        cases.append((name, "gemm", lambda M=M, N=N, K=K: gemm_case(M, N, K)))
    for shape, causal in (((8, 12, 32, 257, 64), False), ((8, 12, 512, 512, 64), False),
                          ((8, 12, 512, 512, 64), True), ((1, 16, 2048, 2048, 128), False),
                          ((1, 16, 2048, 2048, 128), True)):
        B, H, L, S, D = shape
        tag = "%s%s %s" % ("self" if L == S else "cross", " causal" if causal else "",
                           "x".join(map(str, shape)))
        for bwd in (False, True):
            cases.append(("sdpa %s %s" % ("bwd" if bwd else "fwd", tag), "sdpa",
                          lambda shape=shape, causal=causal, bwd=bwd: sdpa_case(*shape, causal, bwd)))
    return cases


def run_case(name, run):
    """Runs one case and prints its R line, or an E line when torch raised."""
    try:
        sec, flop = run()
    except Exception as e:  # noqa: BLE001 - a benchmark reports and goes on
        print("E\t%s\t%s: %s" % (name, type(e).__name__, str(e).splitlines()[0] if str(e) else ""), flush=True)
        return None
    report(name, sec, flop)
    return sec


def serve(cases):
    by_name = {name: run for name, _, run in cases}
    print("D\t", flush=True)
    for line in sys.stdin:
        req = line.rstrip("\r\n")
        if req == "quit":
            break
        if req == "list":
            for name, _, _ in cases:
                print("C\t%s" % name)
        elif req in by_name:
            run_case(req, by_name[req])
            if req.startswith("sdpa"):
                print("M\tsdpa_path\t%s" % (SDPA_PATH if HAS_SDPA else "math"))
        elif req:
            print("E\t%s\tno such case (send 'list' for the names)" % req)
        print("D\t%s" % req, flush=True)


def main():
    global QUICK, MIN_REPS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("QFUSE_THREADS") or 0) or os.cpu_count())
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--scale", type=float, help="timing factor (--quick is 0.2)")
    ap.add_argument("--min-reps", type=int, default=3, choices=range(1, 26), metavar="N",
                    help="least number of timed runs (default 3)")
    ap.add_argument("--only", choices=["sdpa", "gemm"])
    ap.add_argument("--serve", action="store_true", help="one case per request on stdin (bench/compare.py)")
    a = ap.parse_args()
    if a.quick:
        QUICK = 0.2
    if a.scale:
        QUICK = a.scale
    MIN_REPS = a.min_reps
    torch.set_num_threads(a.threads)
    ver = torch.__version__.split("+")[0]
    label = ("torch-%s sdpa" % ver) if HAS_SDPA else ("torch-%s math" % ".".join(ver.split(".")[:2]))
    print("M\tthreads\t%d" % torch.get_num_threads())
    print("M\ttorch\t%s" % torch.__version__)
    print("M\ttorch_label\t%s" % label, flush=True)
    cases = make_cases()
    if a.serve:
        serve(cases)
        return
    fwd_sec = {}
    for name, kind, run in cases:
        if a.only and kind != a.only:
            continue
        sec = run_case(name, run)
        if name.startswith("sdpa fwd self"):
            shape = name.rsplit(" ", 1)[1]
            if " causal " not in name:
                fwd_sec[shape] = sec
            elif sec and fwd_sec.get(shape):
                print("M\tcausal_ratio %s\t%.3f" % (shape, sec / fwd_sec[shape]), flush=True)
    if a.only != "gemm":
        print("M\tsdpa_path\t%s" % (SDPA_PATH if HAS_SDPA else "math"), flush=True)


if __name__ == "__main__":
    main()
