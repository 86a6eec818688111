"""torch_peer.py - the PyTorch side of the attention benchmark: the same cases as
bench/bench_attention.c (same names, shapes, thread count and timing rule), so bench/run.sh can
put both in one table.

    python3 bench/torch_peer.py [--threads N] [--quick] [--only sdpa|gemm]

What is timed (float32, CPU):
  - SDPA forward: torch.nn.functional.scaled_dot_product_attention under torch.no_grad() where
    torch has it (2.x; its CPU flash kernel is requested with sdpa_kernel(FLASH_ATTENTION) and the
    default dispatcher is used if that is refused); otherwise (torch 1.13) the math path
    softmax(q @ k^T * scale + mask) @ v, with the causal mask as a precomputed -inf bias.
  - SDPA backward: one forward with requires_grad, then out.backward(grad, retain_graph=True) is
    timed alone (gradients reset to None before each run, outside the timed region).
  - GEMMs: torch.nn.functional.linear(x, w) without bias, under torch.no_grad().
Timing: warm-up (at least one run, until 0.2 s), then 3..25 runs (about 1.5 s; --quick 0.3 s),
median. Output: tab-separated lines, as bench_attention prints them:
  M <key> <value> | R <case> <median ms> <flop> | E <case> <message>
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
    reps = max(3, min(25, math.ceil(1.5 * QUICK / max(first, 1e-6))))
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


def gemm_case(name, M, N, K):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(M, K, generator=g) * 2 - 1
    w = torch.rand(N, K, generator=g) * 2 - 1
    with torch.no_grad():
        sec = time_median(lambda: F.linear(x, w))
    report(name, sec, 2.0 * M * N * K)


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


def sdpa_case(B, H, L, S, D, causal):
    global SDPA_PATH
    kind = "self" if L == S else "cross"
    shape = "%dx%dx%dx%dx%d" % (B, H, L, S, D)
    tag = "%s%s %s" % (kind, " causal" if causal else "", shape)
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
    with torch.no_grad():
        fsec = time_median(lambda: attend(q, k, v))
    report("sdpa fwd " + tag, fsec, fwd_flop)

    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = attend(qg, kg, vg)

    def reset():
        qg.grad = kg.grad = vg.grad = None

    bsec = time_median(lambda: out.backward(dout, retain_graph=True), before=reset)
    report("sdpa bwd " + tag, bsec, 2.5 * fwd_flop)
    return fsec


def main():
    global QUICK
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("QFUSE_THREADS") or 0) or os.cpu_count())
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=["sdpa", "gemm"])
    a = ap.parse_args()
    if a.quick:
        QUICK = 0.2
    torch.set_num_threads(a.threads)
    ver = torch.__version__.split("+")[0]
    label = ("torch-%s sdpa" % ver) if HAS_SDPA else ("torch-%s math" % ".".join(ver.split(".")[:2]))
    print("M\tthreads\t%d" % torch.get_num_threads())
    print("M\ttorch\t%s" % torch.__version__)
    print("M\ttorch_label\t%s" % label, flush=True)
    if a.only != "sdpa":
        gemm_case("linear q/k/v/out 256x768 . 768x768^T", 256, 768, 768)
        gemm_case("linear cross k/v 2056x1408 . 768x1408^T", 2056, 768, 1408)
        gemm_case("linear ffn up 256x768 . 3072x768^T", 256, 3072, 768)
        gemm_case("linear ffn down 256x3072 . 768x3072^T", 256, 768, 3072)
    if a.only != "gemm":
        sdpa_case(8, 12, 32, 257, 64, False)
        for shape in ((8, 12, 512, 512, 64), (1, 16, 2048, 2048, 128)):
            full = sdpa_case(*shape, False)
            causal = sdpa_case(*shape, True)
            print("M\tcausal_ratio %s\t%.3f" % ("x".join(map(str, shape)), causal / full))
        print("M\tsdpa_path\t%s" % (SDPA_PATH if HAS_SDPA else "math"), flush=True)


if __name__ == "__main__":
    main()
