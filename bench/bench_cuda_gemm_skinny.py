"""bench_cuda_gemm_skinny.py - few-row products on the GPU: qfuse's skinny kernel
(src/backend/cuda/gemm_skinny.cu, forced on for every shape it can run) vs qfuse's cuBLAS path
(skinny off) vs torch F.linear, through the CUDA backend table's gemm_nt (as bench/device_cuda.sh's
`gemm` step), each timed per call inside a CUDA graph of R calls replayed REPS times.

    QFUSE_LIBRARY=... PYTHONPATH=python python3 bench/bench_cuda_gemm_skinny.py [--out FILE] [--quick]

Columns: hot = the same weight in all 20 calls (it stays in the 50 MB L2); cold = every call of
the graph reads its own copy of the weight, at least 200 MB per graph (at most 200 calls), so the
weight streams from HBM as in a model forward. TFLOP/s, weight GB/s and the fraction of the H100's
HBM3 bandwidth (3.35 TB/s) are of the skinny kernel, cold. `rule` = 1 where the default rule
(skinny_wins) takes the shape. `err` = max|skinny - ref| / max|ref|, ref = float64 product of the
same (for bf16: bf16-rounded) operands. All products with a float32 bias.
dtypes: f32 = float32 x, w, out (no TF32); bf16 = float32 x, bf16 w, float32 out (qfuse rounds x;
torch gets x already in bf16 and writes bf16); bf16io = bf16 x, w and out (x_bf16 / out_bf16).
"""
import argparse
import ctypes
import math
import time
from ctypes import POINTER, byref, c_int, c_int64, c_void_p

import torch
import torch.nn.functional as F

import qfuse
import qfuse.cuda
from qfuse._native import check, lib

HBM = 3.35e12
REPS = 10


class Args(ctypes.Structure):
    """qf_gemm_nt_args of src/ops/gemm_small.h, field for field."""
    _fields_ = [("x", c_void_p), ("ldx", c_int64), ("w", c_void_p), ("bias", c_void_p),
                ("res", c_void_p), ("ldr", c_int64), ("out", c_void_p), ("ldo", c_int64),
                ("M", c_int64), ("N", c_int64), ("K", c_int64), ("accumulate", c_int),
                ("w_bf16", c_void_p), ("x_bf16", c_void_p), ("out_bf16", c_void_p)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true")
    opt = ap.parse_args()
    qfuse.cuda.init()
    torch.backends.cuda.matmul.allow_tf32 = False
    E = lambda op, res, args: qfuse.cuda.backend_entry("cuda", op, res, args)  # noqa: E731
    gemm = E("gemm_nt", c_int, [POINTER(Args)])
    sync = E("synchronize", c_int, [])
    begin, end = E("capture_begin", c_int, []), E("capture_end", c_int, [POINTER(c_void_p)])
    launch, gfree = E("graph_launch", c_int, [c_void_p, POINTER(c_int)]), E("graph_free", None, [c_void_p])
    lib.qf_cuda_test_gemm_skinny.argtypes = [c_int]
    lib.qf_cuda_test_gemm_skinny_force.argtypes = [c_int]
    lib.qf_cuda_test_gemm_skinny_wins.argtypes = [c_int64, c_int64, c_int64, c_int]

    def qf_time(calls):
        """per-call seconds of the gemm_nt calls `calls` captured as one graph"""
        for a in calls[:2]:
            check(gemm(byref(a)))
        check(sync())
        check(begin())
        try:
            for a in calls:
                check(gemm(byref(a)))
        finally:
            g = c_void_p()
            check(end(byref(g)))
        st = c_int()
        check(launch(g, byref(st)))
        check(sync())
        t0 = time.perf_counter()
        for _ in range(REPS):
            check(launch(g, byref(st)))
        check(sync())
        t = (time.perf_counter() - t0) / (REPS * len(calls))
        gfree(g)
        return t

    def torch_time(fns):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for f in fns[:3]:
                f()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for f in fns:
                f()
        g.replay()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(REPS):
            g.replay()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / (REPS * len(fns))

    qshapes = [(2304, 768), (768, 768), (3072, 768), (768, 3072)]  # the Q-Former's linears
    Ms = (1, 32) if opt.quick else (1, 4, 8, 16, 32, 64)
    shapes = [(M, N, K) for M in Ms for N, K in qshapes]
    if not opt.quick:
        shapes += [(32, 1536, 1408), (32, 256, 768), (32, 768, 256), (32, 128, 128), (48, 1536, 1408),
                   (64, 9216, 1408), (128, 768, 768), (257, 1536, 1408)]
    lines = []

    def emit(s):
        print(s, flush=True)
        lines.append(s)

    emit("# %s, torch %s; per call in a CUDA graph (us); hot: one weight (L2-resident), cold: a weight copy per"
         " call (>= 200 MB per graph, from HBM)" % (torch.cuda.get_device_name(), torch.__version__))
    emit("%-15s %-6s %4s | %7s %7s %7s | %7s %7s %7s | %6s %6s %5s | %6s %6s | %8s" % (
        "MxNxK", "dtype", "rule", "skinny", "cublas", "torch", "skinny", "cublas", "torch", "TFLOP/s", "GB/s", "HBM%",
        "x_cubl", "x_trch", "err"))
    emit("%-15s %-6s %4s | %23s | %23s | %20s | %13s |" % ("", "", "", "hot (us)", "cold (us)", "skinny cold",
                                                            "cold speedup"))
    for M, N, K in shapes:
        for dt in ("f32", "bf16", "bf16io"):
            if dt == "bf16io" and M not in (1, 32):
                continue
            b16 = dt != "f32"
            wbytes = N * K * (2 if b16 else 4)
            R = min(200, max(20, math.ceil(200e6 / wbytes)))
            x = torch.randn(M, K, device="cuda")
            xb = x.bfloat16()
            bias = torch.randn(N, device="cuda")
            biasb = bias.bfloat16()
            ws = torch.randn(R, N, K, device="cuda", dtype=torch.bfloat16 if b16 else torch.float32) * 0.05
            out = torch.zeros(M, N, device="cuda", dtype=torch.bfloat16 if dt == "bf16io" else torch.float32)

            def args(r):
                w = ws[r].data_ptr()
                return Args(None if dt == "bf16io" else x.data_ptr(), K, None if b16 else w, bias.data_ptr(),
                            None, 0, None if dt == "bf16io" else out.data_ptr(), N, M, N, K, 0, w if b16 else None,
                            xb.data_ptr() if dt == "bf16io" else None, out.data_ptr() if dt == "bf16io" else None)

            hot, cold = [args(0)] * 20, [args(r) for r in range(R)]
            tx = xb if b16 else x
            tb = biasb if b16 else bias
            t_hot = torch_time([lambda: F.linear(tx, ws[0], tb)] * 20)
            t_cold = torch_time([(lambda r: lambda: F.linear(tx, ws[r], tb))(r) for r in range(R)])
            res = {}
            can = M <= 64
            for path in ("skinny", "cublas"):
                if path == "skinny" and not can:
                    res[path] = (float("nan"), float("nan"))
                    continue
                lib.qf_cuda_test_gemm_skinny(1 if path == "skinny" else 0)
                lib.qf_cuda_test_gemm_skinny_force(1 if path == "skinny" else 0)
                res[path] = (qf_time(hot), qf_time(cold))
                if path == "skinny":  # the error of this path's result (out holds the last cold call's)
                    check(sync())
                    got = out.double()
                    xr = xb.double() if b16 else x.double()
                    ref = xr @ ws[R - 1].double().t() + bias.double()
                    err = float((got - ref).abs().max() / ref.abs().max())
            lib.qf_cuda_test_gemm_skinny(1)
            lib.qf_cuda_test_gemm_skinny_force(0)
            sk, cb = res["skinny"], res["cublas"]
            fl = 2.0 * M * N * K
            rule = lib.qf_cuda_test_gemm_skinny_wins(M, N, K, {"f32": 0, "bf16": 1, "bf16io": 2}[dt])
            us = lambda t: "%7.2f" % (t * 1e6) if t == t else "%7s" % "-"  # noqa: E731
            if can:
                tail = "%6.1f %6.0f %5.1f | %6.2f %6.2f | %8.2g" % (fl / sk[1] / 1e12, wbytes / sk[1] / 1e9,
                                                                    100 * wbytes / sk[1] / HBM, cb[1] / sk[1],
                                                                    t_cold / sk[1], err)
            else:
                tail = "%6s %6s %5s | %6s %6s | %8s" % ("-", "-", "-", "-", "-", "-")
            emit("%-15s %-6s %4d | %s %s %s | %s %s %s | %s" % (
                "%dx%dx%d" % (M, N, K), dt, rule, us(sk[0]), us(cb[0]), us(t_hot), us(sk[1]), us(cb[1]), us(t_cold),
                tail))
            ws = None  # free the copies before the next shape
            torch.cuda.empty_cache()
    if opt.out:
        with open(opt.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
