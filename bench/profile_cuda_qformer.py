"""profile_cuda_qformer.py - where the GPU time of one BLIP-2 Q-Former forward goes: per-kernel
GPU time (CUPTI through torch.profiler; qfuse's kernels are launched eagerly here, with
QFUSE_CUDA_GRAPHS=0, so each is recorded: a kernel's duration does not depend on whether a graph
launched it) and the graph-replay latency for comparison.

    QFUSE_CUDA_GRAPHS=0 QFUSE_LIBRARY=... PYTHONPATH=python python3 bench/profile_cuda_qformer.py \
        [--configs f32:1,bf16:1,bf16:64] [--reps 20]

Diagnostic only (not a benchmark table): the side-by-side numbers are bench_cuda_qformer.py's.
"""
import argparse
import ctypes
import os
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))
import qfuse  # noqa: E402
import qfuse.cuda  # noqa: E402
from qfuse.qformer import QFormer, qf_qformer_args  # noqa: E402

NQ, S, E, H, I, NL, NH, FREQ = 32, 257, 1408, 768, 3072, 12, 12, 2


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="f32:1,bf16:1,bf16:64")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    from transformers import Blip2QFormerConfig, Blip2QFormerModel
    torch.manual_seed(0)
    cfg = Blip2QFormerConfig(hidden_size=H, num_hidden_layers=NL, num_attention_heads=NH, intermediate_size=I,
                             cross_attention_frequency=FREQ, encoder_hidden_size=E)
    folder = tempfile.mkdtemp(prefix="qfuse-qformer-")
    Blip2QFormerModel(cfg).eval().save_pretrained(folder, safe_serialization=True)
    lib = qfuse._native.lib
    for c in args.configs.split(","):
        dt, B = c.split(":")
        B = int(B)
        m = QFormer.load(folder, device="cuda", dtype={"f32": "float32", "bf16": "bfloat16"}[dt])
        q = torch.randn(B, NQ, H, device="cuda")
        enc = torch.randn(B, S, E, device="cuda")
        out = torch.empty(B, NQ, H, device="cuda")
        a = qf_qformer_args(B=B, num_queries=NQ, encoder_len=S)
        call = lambda: qfuse._native.check(lib.qf_qformer_forward(  # noqa: E731
            m._h, ctypes.byref(a), ctypes.c_void_p(q.data_ptr()), ctypes.c_void_p(enc.data_ptr()),
            ctypes.c_void_p(out.data_ptr())))
        for _ in range(3):
            call()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(args.reps):
                call()
            torch.cuda.synchronize()
        ev = {}
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                d = ev.setdefault(e.name, [0, 0.0])
                d[0] += 1
                d[1] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        tot = sum(v[1] for v in ev.values()) / args.reps
        print("\n== %s B=%d: GPU busy %.1f us per forward, %d kernels per forward" %
              (dt, B, tot, sum(v[0] for v in ev.values()) // args.reps))
        for name, (n, t) in sorted(ev.items(), key=lambda kv: -kv[1][1])[:25]:
            print("%8.1f us %5.1f%% x%-4d %s" % (t / args.reps, 100 * t / args.reps / tot, n // args.reps, name[:150]))
        m.close()


if __name__ == "__main__":
    main()
