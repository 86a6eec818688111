"""bench_cuda_qformer.py - the BLIP-2 Q-Former forward on one GPU: qfuse (CUDA backend, one graph
replay per forward) against transformers' Blip2QFormerModel on the same GPU, in one process,
float32 and bf16, eager and torch.compile.

    QFUSE_LIBRARY=build-cuda/libqfuse.so PYTHONPATH=python python3 bench/bench_cuda_qformer.py \
        [--batches 1,8,64] [--no-compile] [--out FILE]

The model: BLIP-2's Q-Former shape (12 layers, hidden 768, 12 heads, FFN 3072, cross-attention
every 2nd layer, 32 queries over 257 x 1408 encoder features), random init (transformers'
_init_weights), saved with save_pretrained and loaded by qfuse from that folder, so both sides
run the same weights. Peer: transformers' Blip2QFormerModel in eval mode under torch.no_grad():
float32 (TF32 off, torch's default for matmul), bf16 (model and inputs .to(bfloat16)), and
torch.compile of each (default mode) unless --no-compile. qfuse: QFormer.load(device="cuda",
dtype="float32"|"bfloat16") called through its C entry point on GPU-resident inputs and output
(torch tensors' device pointers), so no host copies are timed on either side.

Timing rule, both sides alike: latency per forward = mean over `reps` calls, each followed by a
device synchronisation (qfuse's forward ends with one; torch gets torch.cuda.synchronize()),
after warm-up calls (qfuse's first call captures its graph; torch.compile's compiles).
FLOPs per image: 2 x the multiply-adds of every GEMM and of attention's two products.
Correctness columns: max|qfuse - torch f32| / max|torch f32| on the same inputs.
"""
import argparse
import ctypes
import os
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))
import qfuse  # noqa: E402
import qfuse.cuda  # noqa: E402
from qfuse.qformer import QFormer, qf_qformer_args  # noqa: E402

lib = qfuse._native.lib
NQ, S, E, H, I, NL, NH, FREQ = 32, 257, 1408, 768, 3072, 12, 12, 2


def flops_per_image():
    ncross = (NL + FREQ - 1) // FREQ
    f = 2 * S * E * 2 * H * ncross                                   # encoder K|V of every cross layer
    f += NL * (2 * NQ * H * 3 * H + 2 * 2 * NQ * NQ * H + 2 * NQ * H * H + 2 * 2 * NQ * H * I)
    f += ncross * (2 * NQ * H * H + 2 * 2 * NQ * S * H + 2 * NQ * H * H)
    return f


def timeit(fn, reps, warmup):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    from transformers import Blip2QFormerConfig, Blip2QFormerModel
    import transformers
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    cfg = Blip2QFormerConfig(hidden_size=H, num_hidden_layers=NL, num_attention_heads=NH, intermediate_size=I,
                             cross_attention_frequency=FREQ, encoder_hidden_size=E)
    ref = Blip2QFormerModel(cfg).eval()
    folder = tempfile.mkdtemp(prefix="qfuse-qformer-")
    ref.save_pretrained(folder, safe_serialization=True)
    ref = ref.cuda()
    ref16 = Blip2QFormerModel(cfg).eval()
    ref16.load_state_dict(ref.state_dict())
    ref16 = ref16.cuda().to(torch.bfloat16)
    ours = {dt: QFormer.load(folder, device="cuda", dtype=dt) for dt in ("float32", "bfloat16")}
    gpu = torch.cuda.get_device_name(0)
    lines = ["# BLIP-2 Q-Former forward on %s: qfuse CUDA vs transformers %s Blip2QFormerModel, torch %s"
             % (gpu, transformers.__version__, torch.__version__),
             "# %d layers, hidden %d, %d queries over %dx%d, %.2f GFLOP/image; latency per forward (sync each call)"
             % (NL, H, NQ, S, E, flops_per_image() / 1e9),
             "%-6s %-5s %10s %10s %10s %9s %9s %9s %9s %10s" % ("dtype", "B", "torch ms", "compile ms", "qfuse ms",
                                                                "x eager", "x compile", "qf TF/s", "err", "graph")]
    print("\n".join(lines), flush=True)
    compiled = {}
    for B in [int(b) for b in args.batches.split(",")]:
        g = torch.Generator(device="cuda").manual_seed(B)
        q = torch.randn(B, NQ, H, device="cuda", generator=g)
        enc = torch.randn(B, S, E, device="cuda", generator=g)
        with torch.no_grad():
            want = ref(query_embeds=q, encoder_hidden_states=enc).last_hidden_state.float()
        for dt in ("float32", "bfloat16"):
            m = ref if dt == "float32" else ref16
            tq, tenc = (q, enc) if dt == "float32" else (q.bfloat16(), enc.bfloat16())

            def peer(mod=m):
                with torch.no_grad():
                    return mod(query_embeds=tq, encoder_hidden_states=tenc).last_hidden_state

            def peer_sync(mod=m):
                peer(mod)
                torch.cuda.synchronize()

            reps = 50 if B <= 8 else 20
            t_eager = timeit(peer_sync, reps, 3)
            t_comp = float("nan")
            if not args.no_compile:
                try:
                    if dt not in compiled:
                        compiled[dt] = torch.compile(m)
                    t_comp = timeit(lambda: peer_sync(compiled[dt]), reps, 3)
                except Exception as e:  # noqa: BLE001 - report, keep going
                    print("# torch.compile failed for %s: %s" % (dt, str(e).splitlines()[0][:120]), flush=True)
            out = torch.empty(B, NQ, H, device="cuda")
            a = qf_qformer_args(B=B, num_queries=NQ, encoder_len=S)
            qm = ours[dt]
            call = lambda: qfuse._native.check(lib.qf_qformer_forward(  # noqa: E731
                qm._h, ctypes.byref(a), ctypes.c_void_p(q.data_ptr()), ctypes.c_void_p(enc.data_ptr()),
                ctypes.c_void_p(out.data_ptr())))
            t_ours = timeit(call, reps, 3)
            err = float((out - want).abs().max() / want.abs().max())
            tf = flops_per_image() * B / (t_ours * 1e-3) / 1e12
            line = "%-6s %-5d %10.3f %10.3f %10.3f %9.2f %9.2f %9.1f %9.1e %10s" % (
                "f32" if dt == "float32" else "bf16", B, t_eager, t_comp, t_ours, t_eager / t_ours,
                t_comp / t_ours, tf, err, "off" if os.environ.get("QFUSE_CUDA_GRAPHS") == "0" else "on")
            lines.append(line)
            print(line, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
