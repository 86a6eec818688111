"""qformer_peer.py - the PyTorch side of bench/bench_qformer.c: the same cases on the same checkpoint
folders, the same thread count and the same timing rule, one case per request.

    python3 bench/qformer_peer.py --serve --model QFORMER_DIR [--prefusion-model DIR]
                                  [--threads N] [--quick]
    python3 bench/qformer_peer.py --model DIR [--prefusion-model DIR] [--threads N] [--quick]
                                  (runs every case once and prints a table)

Q-Former peer: transformers' Blip2QFormerModel.from_pretrained(QFORMER_DIR) in float32, eval mode,
when transformers imports (label "transformers-<version> Blip2QFormerModel"); otherwise a
PyTorch reimplementation, tests/python/ref_qformer.py's forward run in float32 (label
"torch-<version> reimpl (ref_qformer.py), NOT transformers"): a stand-in, not the peer of record.
Pre-fusion peer: AffectGPT's pre-fusion written with torch ops (the two modality nn.Linear-style
projections, position embedding, the Q-Former above on the fused sequence, the LLM projection),
following tests/python/ref_fusion.py, around the same Q-Former peer; transformers has no such
model, so its label says "reimpl".
Forward runs under torch.no_grad(). Forward+backward: inputs (query_embeds, encoder states) and
parameters require grad; parameter grads are set to None before each run (outside the timing);
one forward, then out.backward(grad_out), as qfuse's forward + qf_qformer_backward.

Protocol (--serve), lines on stdout: "M\tlabel\t<text>", then "D\t" (ready). Each stdin line is a
case name of bench_qformer.c: the answer is "R\t<case>\t<median ms>", "E\t<case>\t<error>" or
"S\t<case>\t<why skipped>", then "D\t<case>". "quit" or end of input exits.
"""
import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.join(HERE, "..", "tests", "python")

BLIP2_NQ, BLIP2_S = 32, 257
AFF_TA, AFF_TF = 8, 32


def time_median(fn, quick, before=None):
    """bench_attention's rule: warm-up until 0.2 s (>= 1 run), then 3..25 runs of ~1.5 s; ms."""
    scale = 0.2 if quick else 1.0
    t0, warm, first = time.perf_counter(), 0, 0.0
    while True:
        if before:
            before()
        a = time.perf_counter()
        fn()
        first = time.perf_counter() - a
        warm += 1
        if time.perf_counter() - t0 >= 0.2 * scale or warm >= 50:
            break
    reps = max(3, min(25, int(-(-1.5 * scale // max(first, 1e-6)))))
    ts = []
    for _ in range(reps):
        if before:
            before()
        a = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - a)
    return statistics.median(ts) * 1e3


def read_safetensors(path):
    sys.path.insert(0, TESTS)
    import util
    return util.read_safetensors(path)


class QFormerPeer:
    """callable(query_embeds, encoder_hidden_states) -> last_hidden_state, plus .params()."""

    def __init__(self, torch, folder):
        self.torch = torch
        try:
            import transformers
            from transformers import Blip2QFormerModel
        except Exception as e:  # noqa: BLE001 - any import failure means: no transformers here
            self.model = None
            why = "%s: %s" % (type(e).__name__, e)
        else:
            try:
                m = Blip2QFormerModel.from_pretrained(folder, dtype=torch.float32)
            except TypeError:  # transformers 4.x names it torch_dtype
                m = Blip2QFormerModel.from_pretrained(folder, torch_dtype=torch.float32)
            self.model = m.float().eval()
            self.label = "transformers-%s Blip2QFormerModel" % transformers.__version__
            return
        sys.path.insert(0, TESTS)
        import ref_qformer as R
        self.R = R
        self.cfg = R.config_from_json(os.path.join(folder, "config.json"))
        sd = read_safetensors(os.path.join(folder, "model.safetensors"))
        self.sd = {k: torch.tensor(v, dtype=torch.float32) for k, v in sd.items()}
        self.label = "torch-%s reimpl (tests/python/ref_qformer.py in float32), NOT transformers (%s)" % (
            torch.__version__, why)

    def params(self):
        return list(self.model.parameters()) if self.model is not None else list(self.sd.values())

    def __call__(self, q, enc):
        if self.model is not None:
            return self.model(query_embeds=q, encoder_hidden_states=enc).last_hidden_state
        return self.R.forward(self.sd, self.cfg, q, enc)[0]


class PrefusionPeer:
    def __init__(self, torch, folder):
        self.torch = torch
        with open(os.path.join(folder, "config.json")) as f:
            self.cfg = json.load(f)
        sd = read_safetensors(os.path.join(folder, "model.safetensors"))
        self.sd = {k: torch.tensor(v, dtype=torch.float32) for k, v in sd.items()}
        sys.path.insert(0, TESTS)
        import ref_qformer as R
        self.R = R
        q = dict(self.cfg["qformer_config"])
        q["encoder_hidden_size"] = self.cfg["max_hidden_size"]
        self.qcfg = R.config_from_json(q)
        pre = "multi_Qformer."
        self.qsd = {k[len(pre):]: v for k, v in self.sd.items() if k.startswith(pre)}
        self.face_first = self.cfg.get("fusion_order", ["face", "audio"])[0] == "face"
        self.label = "torch-%s reimpl (AffectGPT pre-fusion per tests/python/ref_fusion.py)" % torch.__version__

    def __call__(self, audio, face):
        F, sd = self.torch.nn.functional, self.sd
        a = F.linear(audio, sd["multi_audio_embs.weight"], sd["multi_audio_embs.bias"])
        v = F.linear(face, sd["multi_video_embs.weight"], sd["multi_video_embs.bias"])
        x = self.torch.cat([v, a] if self.face_first else [a, v], dim=1)
        x = x + sd["multi_position_embedding.weight"][: x.shape[1]][None]
        q = sd["multi_query_tokens"].expand(x.shape[0], -1, -1)
        h = self.R.forward(self.qsd, self.qcfg, q, x)[0]
        return F.linear(h, sd["multi_llama_proj.weight"], sd["multi_llama_proj.bias"])


def make_cases(torch, a):
    qf = QFormerPeer(torch, a.model)
    pf = PrefusionPeer(torch, a.prefusion_model) if a.prefusion_model else None
    g = torch.Generator().manual_seed(0)
    with open(os.path.join(a.model, "config.json")) as f:
        c = json.load(f)
    H, E = c["hidden_size"], c["encoder_hidden_size"]
    q8 = torch.rand(8, BLIP2_NQ, H, generator=g) - 0.5
    f8 = torch.rand(8, BLIP2_S, E, generator=g) * 2 - 1
    go = torch.rand(8, BLIP2_NQ, H, generator=g) * 2 - 1

    def fwd(B):
        def run():
            with torch.no_grad():
                qf(q8[:B], f8[:B])
        return run

    qg, fg = q8.clone().requires_grad_(True), f8.clone().requires_grad_(True)
    params = qf.params()
    for p in params:
        p.requires_grad_(True)

    def reset():
        for t in params + [qg, fg]:
            t.grad = None

    def fwdbwd():
        out = qf(qg, fg)
        out.backward(go)

    cases = {"qformer fwd B=1 (32q x 257x1408)": (fwd(1), None), "qformer fwd B=8": (fwd(8), None),
             "qformer fwd+bwd B=8": (fwdbwd, reset)}
    if pf is not None:
        ad, vd = pf.cfg["audio_dim"], pf.cfg["video_dim"]
        au = torch.rand(32, AFF_TA, ad, generator=g) * 2 - 1
        fa = torch.rand(32, AFF_TF, vd, generator=g) * 2 - 1

        def pfwd(B):
            def run():
                with torch.no_grad():
                    pf(au[:B], fa[:B])
            return run
        cases["prefusion fwd B=1 (8a+32f x 1024)"] = (pfwd(1), None)
        cases["prefusion fwd B=32"] = (pfwd(32), None)
    label = qf.label + ("; pre-fusion: " + pf.label if pf else "")
    return cases, label


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--prefusion-model")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--serve", action="store_true")
    a = ap.parse_args()
    try:
        import torch
        if a.threads > 0:
            torch.set_num_threads(a.threads)
        cases, label = make_cases(torch, a)
    except Exception as e:  # noqa: BLE001 - reported to bench_qformer as the reason for no peer
        print("X\tPyTorch peer unavailable: %s: %s" % (type(e).__name__, e), flush=True)
        return 1
    label += "; %d threads" % torch.get_num_threads()
    if not a.serve:
        print("# peer: " + label)
        for name, (fn, before) in cases.items():
            print("%-36s %10.3f ms" % (name, time_median(fn, a.quick, before)), flush=True)
        return 0
    print("M\tlabel\t%s" % label)
    print("D\t", flush=True)
    for line in sys.stdin:
        name = line.strip()
        if name == "quit":
            break
        if not name:
            continue
        if name not in cases:
            print("S\t%s\tno such case in the peer (pre-fusion model not given?)" % name)
        else:
            fn, before = cases[name]
            try:
                print("R\t%s\t%.6f" % (name, time_median(fn, a.quick, before)))
            except Exception as e:  # noqa: BLE001
                print("E\t%s\t%s: %s" % (name, type(e).__name__, e))
        print("D\t%s" % name, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
