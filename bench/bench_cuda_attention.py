"""bench_cuda_attention.py - qfuse's CUDA SDPA against torch.nn.functional.scaled_dot_product_attention
in one process on one GPU: forward and forward+backward, float32 and bfloat16, TFLOP/s and the ratio.

    QFUSE_LIBRARY=build-cuda/libqfuse.so PYTHONPATH=python python3 bench/bench_cuda_attention.py \
        [--quick] [--dtype f32|bf16|both] [--out FILE]

Both sides get the same torch-allocated CUDA tensors: qfuse is called through its C entry points
(ctypes) on their device pointers (qf_sdpa_forward/backward for float32, qf_sdpa_forward_bf16 /
qf_sdpa_backward_bf16 for bfloat16), so the tensors' location selects the CUDA backend, with
check_finite off (torch checks nothing either). Each timing is the mean over `reps` back-to-back
calls after warm-up calls, timed on the host between two device-wide synchronisations
(torch.cuda.synchronize: qfuse queues on its own stream, torch on the default one, so events on
one stream would not see the other's work); host-side overhead (Python, ctypes, torch's
dispatcher and autograd) counts where it is not hidden behind the GPU.
bfloat16 rows: the error columns are max|x - ref| / max|ref| against torch's float32 SDPA on the
same bf16 inputs, for qfuse and for torch's own bf16 result ("qfuse/torch").

FLOPs: forward 2*B*H*(D+Dv)*P with P the attended (query, key) pairs (L*S, or sum_i min(i+1,S)
when causal); backward 2.5x forward (five matmuls to two); forward+backward 3.5x.
Correctness columns: max|qfuse - torch| / max|torch| for out (and dq, dk, dv in fwd+bwd rows).
"""
import argparse
import ctypes
import os
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))
import qfuse  # noqa: E402
import qfuse.cuda  # noqa: E402
import qfuse.ops  # noqa: E402,F401  (declares the bf16 entry points)

lib = qfuse._native.lib


def params(B, H, L, S, D, causal):
    p = lib.qf_sdpa_defaults(B, H, H, L, S, D)
    p.is_causal = 1 if causal else 0
    p.check_finite = 0
    return p


def ptr(t):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else None


def check(st):
    qfuse._native.check(st)


def timeit(fn, reps, warmup=2):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps  # seconds


def pick_reps(fn, budget_s):
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return max(3, min(200, int(budget_s / max(dt, 1e-6))))


def relerr(a, ref):
    a, ref = a.detach().double(), ref.detach().double()
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def bench_shape(B, H, L, S, D, causal, dtype, budget_s, lines):
    torch.manual_seed(0)
    dev = "cuda"
    q = torch.randn(B, H, L, D, device=dev, dtype=dtype)
    k = torch.randn(B, H, S, D, device=dev, dtype=dtype)
    v = torch.randn(B, H, S, D, device=dev, dtype=dtype)
    g = torch.randn(B, H, L, D, device=dev, dtype=dtype)
    out = torch.empty_like(q)
    lse = torch.empty(B, H, L, device=dev, dtype=torch.float32)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    p = params(B, H, L, S, D, causal)
    pp = ctypes.byref(p)

    pairs = sum(min(i + 1, S) for i in range(L)) if causal else L * S
    f_fwd = 2.0 * B * H * (D + D) * pairs
    f_all = 3.5 * f_fwd

    def q_fwd():
        check(lib.qf_sdpa_forward(pp, ptr(q), ptr(k), ptr(v), ptr(out), None, None))

    def q_all():
        check(lib.qf_sdpa_forward(pp, ptr(q), ptr(k), ptr(v), ptr(out), ptr(lse), None))
        check(lib.qf_sdpa_backward(pp, ptr(q), ptr(k), ptr(v), ptr(out), ptr(lse), ptr(g),
                                   ptr(dq), ptr(dk), ptr(dv)))

    def t_fwd():
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    qr, kr, vr = (x.detach().clone().requires_grad_(True) for x in (q, k, v))

    def t_all():
        o = F.scaled_dot_product_attention(qr, kr, vr, is_causal=causal)
        o.backward(g)
        qr.grad = kr.grad = vr.grad = None

    # correctness vs torch on these inputs (qfuse queues on its own stream: synchronise around it)
    torch.cuda.synchronize()
    q_all()
    torch.cuda.synchronize()
    ref = t_fwd()
    o = F.scaled_dot_product_attention(qr, kr, vr, is_causal=causal)
    o.backward(g)
    torch.cuda.synchronize()
    e_out = relerr(out, ref)
    e_grad = max(relerr(a, r) for a, r in ((dq, qr.grad), (dk, kr.grad), (dv, vr.grad)))
    qr.grad = kr.grad = vr.grad = None

    shape = "%dx%dx%dx%dx%d%s" % (B, H, L, S, D, " causal" if causal else "")
    dt = str(dtype).replace("torch.", "")
    for what, fq, ft, flops, err in (("fwd", q_fwd, t_fwd, f_fwd, "%.1e" % e_out),
                                     ("fwd+bwd", q_all, t_all, f_all, "%.1e/%.1e" % (e_out, e_grad))):
        reps = pick_reps(fq, budget_s)
        tq = timeit(fq, reps)
        tt = timeit(ft, pick_reps(ft, budget_s))
        line = "%-28s %-8s %-8s %10.3f %8.2f %10.3f %8.2f %7.2fx  %s" % (
            shape, dt, what, tq * 1e3, flops / tq / 1e12, tt * 1e3, flops / tt / 1e12, tt / tq, err)
        print(line, flush=True)
        lines.append(line)


def bench_shape_bf16(B, H, L, S, D, causal, budget_s, lines):
    torch.manual_seed(0)
    dev, bf = "cuda", torch.bfloat16
    q = torch.randn(B, H, L, D, device=dev, dtype=bf)
    k = torch.randn(B, H, S, D, device=dev, dtype=bf)
    v = torch.randn(B, H, S, D, device=dev, dtype=bf)
    g = torch.randn(B, H, L, D, device=dev, dtype=bf)
    out = torch.empty_like(q)
    lse = torch.empty(B, H, L, device=dev, dtype=torch.float32)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    p = params(B, H, L, S, D, causal)
    pp = ctypes.byref(p)

    pairs = sum(min(i + 1, S) for i in range(L)) if causal else L * S
    f_fwd = 2.0 * B * H * (D + D) * pairs
    f_all = 3.5 * f_fwd

    def q_fwd():
        check(lib.qf_sdpa_forward_bf16(pp, ptr(q), ptr(k), ptr(v), ptr(out), None))

    def q_all():
        check(lib.qf_sdpa_forward_bf16(pp, ptr(q), ptr(k), ptr(v), ptr(out), ptr(lse)))
        check(lib.qf_sdpa_backward_bf16(pp, ptr(q), ptr(k), ptr(v), ptr(out), ptr(lse), ptr(g),
                                        ptr(dq), ptr(dk), ptr(dv)))

    def t_fwd():
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    qr, kr, vr = (x.detach().clone().requires_grad_(True) for x in (q, k, v))

    def t_all():
        o = F.scaled_dot_product_attention(qr, kr, vr, is_causal=causal)
        o.backward(g)
        qr.grad = kr.grad = vr.grad = None

    # accuracy: qfuse and torch bf16 against torch float32 on the same bf16 inputs
    torch.cuda.synchronize()
    q_all()
    torch.cuda.synchronize()
    q32, k32, v32 = (x.detach().float().requires_grad_(True) for x in (q, k, v))
    ref = F.scaled_dot_product_attention(q32, k32, v32, is_causal=causal)
    ref.backward(g.float())
    o = F.scaled_dot_product_attention(qr, kr, vr, is_causal=causal)
    o.backward(g)
    torch.cuda.synchronize()
    e_out = (relerr(out, ref), relerr(o, ref))
    refs = (q32.grad, k32.grad, v32.grad)
    e_grad = (max(relerr(a, r) for a, r in zip((dq, dk, dv), refs)),
              max(relerr(a, r) for a, r in zip((qr.grad, kr.grad, vr.grad), refs)))
    qr.grad = kr.grad = vr.grad = None
    del q32, k32, v32, ref, refs, o
    torch.cuda.empty_cache()

    shape = "%dx%dx%dx%dx%d%s" % (B, H, L, S, D, " causal" if causal else "")
    for what, fq, ft, flops, err in (("fwd", q_fwd, t_fwd, f_fwd, "%.1e/%.1e" % e_out),
                                     ("fwd+bwd", q_all, t_all, f_all,
                                      "%.1e/%.1e grads %.1e/%.1e" % (e_out + e_grad))):
        reps = pick_reps(fq, budget_s)
        tq = timeit(fq, reps)
        tt = timeit(ft, pick_reps(ft, budget_s))
        line = "%-28s %-8s %-8s %10.3f %8.2f %10.3f %8.2f %7.2fx  %s" % (
            shape, "bf16", what, tq * 1e3, flops / tq / 1e12, tt * 1e3, flops / tt / 1e12, tt / tq, err)
        print(line, flush=True)
        lines.append(line)


def host_overhead(n=2000):
    """Per-call cost of a near-empty forward [1,1,1,1,8] (host work + launch), both sides: what
    small shapes such as the Q-Former's pay besides the kernel."""
    x = torch.randn(1, 1, 1, 8, device="cuda")
    o = torch.empty_like(x)
    p = params(1, 1, 1, 1, 8, False)
    pp = ctypes.byref(p)
    px, po = ptr(x), ptr(o)
    res = []
    for fn in (lambda: check(lib.qf_sdpa_forward(pp, px, px, px, po, None, None)),
               lambda: F.scaled_dot_product_attention(x, x, x)):
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        res.append((time.perf_counter() - t0) / n * 1e6)
    return "# per-call overhead, forward [1,1,1,1,8]: qfuse %.1f us, torch %.1f us" % tuple(res)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="shorter timing budget")
    ap.add_argument("--out", help="also write the table here")
    ap.add_argument("--dtype", choices=("f32", "bf16", "both"), default="both", help="which rows")
    args = ap.parse_args()
    qfuse.cuda.init()
    props = torch.cuda.get_device_properties(0)
    head = ["# qfuse CUDA SDPA vs torch %s F.scaled_dot_product_attention on %s (%d SMs), one process"
            % (torch.__version__, props.name, props.multi_processor_count),
            "# %s; TF32 matmul allowed in torch: %s; times are means of back-to-back calls"
            % (time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), torch.backends.cuda.matmul.allow_tf32),
            "%-28s %-8s %-8s %10s %8s %10s %8s %8s  %s" % ("shape BxHxLxSxD", "dtype", "pass", "qfuse ms",
                                                          "TFLOP/s", "torch ms", "TFLOP/s", "speedup",
                                                          "rel err out[/grads]")]
    for h in head:
        print(h, flush=True)
    lines = list(head)
    budget = 0.15 if args.quick else 0.5
    lines.append(host_overhead())
    print(lines[-1], flush=True)
    sdp = torch.backends.cuda
    lines.append("# torch SDPA backends enabled: flash %s, mem_efficient %s, cudnn %s, math %s"
                 % (sdp.flash_sdp_enabled(), sdp.mem_efficient_sdp_enabled(),
                    getattr(sdp, "cudnn_sdp_enabled", lambda: "n/a")(), sdp.math_sdp_enabled()))
    print(lines[-1], flush=True)
    shapes = ((8, 16, 4096, 4096, 128, True), (8, 16, 4096, 4096, 64, False), (8, 12, 32, 257, 64, False))
    if args.dtype in ("bf16", "both"):
        lines.append("# bf16 error columns: qfuse/torch-bf16 vs torch float32 on the same bf16 inputs")
        print(lines[-1], flush=True)
        for shp in shapes:
            bench_shape_bf16(*shp, budget, lines)
    if args.dtype in ("f32", "both"):
        for shp in shapes:
            bench_shape(*shp, torch.float32, budget, lines)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
