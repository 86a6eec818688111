"""llm_peer.py - the PyTorch/transformers side of bench/bench_llm.c: makes random-init Qwen2
checkpoints and times transformers' generate on them, printing bench_llm's table columns.
Runs where PyTorch 2.x and transformers 5.x are installed (the device machine); not a test.

  python3 bench/llm_peer.py --make FOLDER [--size full|small]
      Qwen2ForCausalLM with random weights (seed 0), saved with save_pretrained as float32
      safetensors (one file). full = Qwen2-0.5B's shape: hidden 896, 24 layers, 14 heads, 2 kv
      heads, intermediate 4864, vocab 151936, tied embeddings. small: hidden 512, 8 layers, 8 heads,
      2 kv heads, intermediate 1408, vocab 32000, tied.
  python3 bench/llm_peer.py FOLDER --threads N [--formats f32,bf16] [--prompt 128] [--prompt8 16]
                            [--steps 16] [--reps 1] [--bw-gbs GB/s] [--bw-mib 1024]

Timing, the same protocol as bench_llm (token ids from a seeded generator, so not the same ids):
  torch.set_num_threads(N). Each format loads the folder (torch_dtype float32 or bfloat16). A
  LogitsProcessor that records a timestamp is passed to generate(do_sample=False,
  min_new_tokens = max_new_tokens = steps + 2): its first call comes right after the prompt's
  forward, each later call after one decode step. prefill = first call - generate's start (B=1,
  `prompt` tokens; best of `reps` generate calls, after one 16-token warm-up generate); decode =
  (last call - second call) / steps (one warm-up step, as bench_llm), at B=1 after that prompt
  and at B=8 after a `prompt8`-token prompt per row (no padding).
  weights_MB: every nn.Linear's weight (and bias) as stored, lm_head excluded when tied (it is the
  embedding table); read/tok_MB: the same with lm_head included (what a decode step streams).
  peakRSS_MB: VmHWM after resetting it (/proc/self/clear_refs 5) before the load; '*' when the
  reset was refused. bw: (read/tok / bandwidth) / seconds per step; the bandwidth is --bw-gbs
  (bench_llm's measurement, so both sides divide by the same number) or else a torch measurement
  (best of 5 x.sum() over a --bw-mib float32 buffer).
"""
import argparse
import json
import os
import sys
import time

SIZES = {
    "full": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936),
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                  intermediate_size=1408, vocab_size=32000),
}


def make(folder, size):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    cfg = Qwen2Config(**SIZES[size], tie_word_embeddings=True, max_position_embeddings=32768,
                      rms_norm_eps=1e-6, use_sliding_window=False, bos_token_id=0, eos_token_id=1)
    t0 = time.perf_counter()
    model = Qwen2ForCausalLM(cfg).to(torch.float32).eval()
    model.save_pretrained(folder, max_shard_size="100GB")
    n = sum(p.numel() for p in model.parameters())
    print("made %s (%s, %.1fM parameters, float32) in %.1f s: %s" % (
        folder, size, n / 1e6, time.perf_counter() - t0, ", ".join(sorted(os.listdir(folder)))))


def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def vm_mib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return float(line.split()[1]) / 1024.0
    return -1.0


def torch_bandwidth(torch, mib):
    x = torch.ones(mib * (1 << 20) // 4, dtype=torch.float32)
    best = 1e30
    for _ in range(5):
        t0 = time.perf_counter()
        s = x.sum()
        best = min(best, time.perf_counter() - t0)
    assert float(s) > 0
    return x.numel() * 4 / best


def run(args):
    import torch
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList
    torch.set_num_threads(args.threads)
    bw = args.bw_gbs * 1e9 if args.bw_gbs else torch_bandwidth(torch, args.bw_mib)
    with open(os.path.join(args.folder, "config.json")) as f:
        cfg = json.load(f)

    class Stamp(LogitsProcessor):
        def __init__(self):
            self.t = []

        def __call__(self, input_ids, scores):
            self.t.append(time.perf_counter())
            return scores

    def generate(model, ids, new):
        st = Stamp()
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                           max_new_tokens=new, min_new_tokens=new, pad_token_id=0,
                           logits_processor=LogitsProcessorList([st]))
        return t0, st.t

    print("# torch %s bench (llm_peer.py) %s: %s, %d layers, hidden %d, vocab %d; %d threads" % (
        torch.__version__, args.folder, cfg.get("model_type"), cfg["num_hidden_layers"],
        cfg["hidden_size"], cfg["vocab_size"], args.threads))
    import transformers
    print("# transformers %s; bandwidth %.1f GB/s (%s)" % (
        transformers.__version__, bw / 1e9, "bench_llm's" if args.bw_gbs else "torch x.sum()"))
    print("%-6s %-7s %7s %12s %12s %12s %10s %10s %10s %9s %9s" % (
        "impl", "weights", "threads", "prefill_t/s", "dec_B1_t/s", "dec_B8_t/s", "weights_MB",
        "read/tok_MB", "peakRSS_MB", "bw_B1", "bw_B8"), flush=True)
    gen = torch.Generator().manual_seed(1234)
    V = cfg["vocab_size"]
    for fmt in args.formats.split(","):
        dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[fmt]
        exact = reset_peak()
        model = AutoModelForCausalLM.from_pretrained(args.folder, dtype=dtype).eval()
        tied = bool(cfg.get("tie_word_embeddings", False))
        wbytes = rbytes = 0
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear):
                b = sum(p.numel() * p.element_size() for p in mod.parameters())
                rbytes += b
                if not (tied and name.endswith("lm_head")):
                    wbytes += b
        S = args.steps
        ids1 = torch.randint(0, V, (1, args.prompt), generator=gen)
        generate(model, ids1[:, :16], 2)  # warm-up
        best = 1e30
        for _ in range(args.reps):
            t0, ts = generate(model, ids1, S + 2)
            best = min(best, ts[0] - t0)
        dec1 = (ts[-1] - ts[1]) / S
        ids8 = torch.randint(0, V, (8, args.prompt8), generator=gen)
        _, ts8 = generate(model, ids8, S + 2)
        dec8 = (ts8[-1] - ts8[1]) / S
        print("%-6s %-7s %7d %12.1f %12.2f %12.2f %10.1f %10.1f %9.0f%s %9.2f %9.2f" % (
            "torch", fmt, args.threads, args.prompt / best, 1 / dec1, 8 / dec8, wbytes / 2**20,
            rbytes / 2**20, vm_mib("VmHWM"), " " if exact else "*", rbytes / bw / dec1,
            rbytes / bw / dec8), flush=True)
        del model


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("--make", action="store_true", help="write a random-init checkpoint to FOLDER")
    ap.add_argument("--size", choices=sorted(SIZES), default="full")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--formats", default="f32,bf16")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--prompt8", type=int, default=16)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--bw-gbs", type=float, default=0.0)
    ap.add_argument("--bw-mib", type=int, default=1024)
    args = ap.parse_args()
    if args.make:
        make(args.folder, args.size)
    else:
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
