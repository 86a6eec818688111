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


def backward_section(ref, qm, folder):
    """Forward + backward at B=8, float32: qfuse's GPU Q-Former (qf_qformer_forward then
    qf_qformer_backward with every parameter gradient accumulated on the device, zeroed each
    step) against torch autograd of the same transformers model (parameters and inputs require
    grad, grads set to None each step). Input gradients are asked for on both sides."""
    B = 8
    g = torch.Generator(device="cuda").manual_seed(7)
    q = torch.randn(B, NQ, H, device="cuda", generator=g)
    enc = torch.randn(B, S, E, device="cuda", generator=g)
    gout = torch.randn(B, NQ, H, device="cuda", generator=g)
    for p in ref.parameters():
        p.requires_grad_(True)
    ref.train(False)
    qg, eg = q.clone().requires_grad_(True), enc.clone().requires_grad_(True)

    def peer():
        for p in ref.parameters():
            p.grad = None
        qg.grad = eg.grad = None
        out = ref(query_embeds=qg, encoder_hidden_states=eg).last_hidden_state
        out.backward(gout)
        torch.cuda.synchronize()
    t_peer = timeit(peer, 10, 2)
    out = torch.empty(B, NQ, H, device="cuda")
    dq, denc = torch.empty_like(q), torch.empty_like(enc)
    a = qf_qformer_args(B=B, num_queries=NQ, encoder_len=S)
    ck = qfuse._native.check
    P = ctypes.c_void_p

    def ours():
        lib.qf_qformer_zero_grad(qm._h)
        ck(lib.qf_qformer_forward(qm._h, ctypes.byref(a), P(q.data_ptr()), P(enc.data_ptr()), P(out.data_ptr())))
        ck(lib.qf_qformer_backward(qm._h, P(gout.data_ptr()), P(dq.data_ptr()), P(denc.data_ptr()), None, None))
    t_ours = timeit(ours, 10, 2)
    peer()
    err_q = float((dq - qg.grad).abs().max() / qg.grad.abs().max())
    err_e = float((denc - eg.grad).abs().max() / eg.grad.abs().max())
    out_lines = ["", "# forward + backward, B=8, float32 (every parameter gradient; input gradients compared)",
                 "%-6s %-5s %10s %10s %9s %12s" % ("dtype", "B", "torch ms", "qfuse ms", "x torch", "err dq/denc"),
                 "%-6s %-5d %10.3f %10.3f %9.2f %5.1e/%5.1e" % ("f32", B, t_peer, t_ours, t_peer / t_ours, err_q, err_e)]
    for p in ref.parameters():
        p.requires_grad_(False)
    print("\n".join(out_lines), flush=True)
    return out_lines


def prefusion_section(args):
    """AffectGPT pre-fusion (8 audio + 32 face frames of 1024, 16 queries, 2 layers of 768, 4096
    out) at B=1 and 32: qfuse's whole pre-fusion on the GPU (qf_prefusion_to_device) against the
    same computation in PyTorch (two nn.functional.linear, the position rows, transformers'
    Blip2QFormerModel with cross-attention in every layer, the LLM projection) on the same
    weights (tools/make_fusion_model.py affectgpt --bench, transformers names)."""
    import json
    import subprocess
    from safetensors.torch import load_file
    from transformers import Blip2QFormerConfig, Blip2QFormerModel
    folder = tempfile.mkdtemp(prefix="qfuse-prefusion-")
    subprocess.run([sys.executable, os.path.join(HERE, "..", "tools", "make_fusion_model.py"), "affectgpt", folder,
                    "--bench"], check=True, stdout=subprocess.DEVNULL)
    cfg = json.load(open(os.path.join(folder, "config.json")))
    sd = {k: v.cuda() for k, v in load_file(os.path.join(folder, "model.safetensors")).items()}
    q = dict(cfg["qformer_config"])
    qc = Blip2QFormerConfig(hidden_size=q["hidden_size"], num_hidden_layers=q["num_hidden_layers"],
                            num_attention_heads=q["num_attention_heads"], intermediate_size=q["intermediate_size"],
                            cross_attention_frequency=q.get("cross_attention_frequency", 1),
                            encoder_hidden_size=cfg["max_hidden_size"], layer_norm_eps=q.get("layer_norm_eps", 1e-12))
    qf = Blip2QFormerModel(qc).eval().cuda()
    missing = qf.load_state_dict({k[len("multi_Qformer."):]: v for k, v in sd.items()
                                  if k.startswith("multi_Qformer.")}, strict=False)
    ta, tf, A, V = 8, 32, cfg["audio_dim"], cfg["video_dim"]
    out = ["", "# AffectGPT pre-fusion (%d audio + %d face frames of %d, %d queries, %d layers, %d out); "
           "peer: torch ops + transformers Blip2QFormerModel (unloaded keys: %d)"
           % (ta, tf, A, cfg["num_multi_query_token"], q["num_hidden_layers"], cfg["llm_hidden_size"],
              len(missing.missing_keys)),
           "%-6s %-5s %10s %10s %10s %9s %9s %9s" % ("dtype", "B", "torch ms", "compile ms", "qfuse ms", "x eager",
                                                    "x compile", "err")]
    print("\n".join(out), flush=True)
    ours = {dt: qfuse.Prefusion.load(folder).to("cuda", dt) for dt in ("float32", "bfloat16")}
    from qfuse.fusion import qf_prefusion_args

    def peer_fn(dt):
        cast = (lambda t: t) if dt == "float32" else (lambda t: t.bfloat16())
        w = {k: cast(v) for k, v in sd.items()}
        mod = qf if dt == "float32" else Blip2QFormerModel(qc).eval().cuda().to(torch.bfloat16)
        if dt != "float32":
            mod.load_state_dict({k: cast(v) for k, v in qf.state_dict().items()})

        def run(audio, face):
            with torch.no_grad():
                a = torch.nn.functional.linear(cast(audio), w["multi_audio_embs.weight"], w["multi_audio_embs.bias"])
                f = torch.nn.functional.linear(cast(face), w["multi_video_embs.weight"], w["multi_video_embs.bias"])
                x = torch.cat([f, a], 1) + w["multi_position_embedding.weight"][: ta + tf]
                qt = w["multi_query_tokens"].expand(audio.shape[0], -1, -1)
                h = mod(query_embeds=qt, encoder_hidden_states=x).last_hidden_state
                return torch.nn.functional.linear(h, w["multi_llama_proj.weight"], w["multi_llama_proj.bias"])
        return run

    peers = {dt: peer_fn(dt) for dt in ("float32", "bfloat16")}
    for B in (1, 32):
        g = torch.Generator(device="cuda").manual_seed(100 + B)
        audio = torch.randn(B, ta, A, device="cuda", generator=g)
        face = torch.randn(B, tf, V, device="cuda", generator=g)
        want = peers["float32"](audio, face).float()
        for dt in ("float32", "bfloat16"):
            run = peers[dt]

            def sync_run(fn=run):
                fn(audio, face)
                torch.cuda.synchronize()
            t_eager = timeit(sync_run, 50, 3)
            t_comp = float("nan")
            if not args.no_compile:
                try:
                    comp = torch.compile(run)
                    t_comp = timeit(lambda: sync_run(comp), 50, 3)
                except Exception as e:  # noqa: BLE001
                    print("# torch.compile failed: %s" % str(e).splitlines()[0][:120], flush=True)
            res = torch.empty(B, cfg["num_multi_query_token"], cfg["llm_hidden_size"], device="cuda")
            pa = qf_prefusion_args(B=B, audio_len=ta, face_len=tf)
            m = ours[dt]
            call = lambda: qfuse._native.check(lib.qf_prefusion_forward(  # noqa: E731
                m._h, ctypes.byref(pa), ctypes.c_void_p(audio.data_ptr()), ctypes.c_void_p(face.data_ptr()),
                ctypes.c_void_p(res.data_ptr())))
            t_ours = timeit(call, 50, 3)
            err = float((res - want).abs().max() / want.abs().max())
            line = "%-6s %-5d %10.3f %10.3f %10.3f %9.2f %9.2f %9.1e" % (
                "f32" if dt == "float32" else "bf16", B, t_eager, t_comp, t_ours, t_eager / t_ours, t_comp / t_ours, err)
            out.append(line)
            print(line, flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--qformer-only", action="store_true", help="skip the backward and pre-fusion sections")
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
    if not args.qformer_only:
        lines += backward_section(ref, ours["float32"], folder)
        lines += prefusion_section(args)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
