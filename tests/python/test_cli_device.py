"""test_cli_device.py - `qfuse fuse --device cpu|cuda --dtype float32|bfloat16` and `qfuse run
--device cuda` (src/cli/main.c, src/cli/run.c), run as subprocesses.

Everywhere: --help teaches both options and says what stays on the CPU; --device tpu, --dtype
bfloat16 without cuda, an unknown --dtype, --attn-png with --device cuda and `qfuse run
--device cuda` on a text-only LLM are usage errors (exit 2, the message names the option).
Without a usable GPU (a CPU-only libqfuse, or no device): --device cuda exits 1 with the
library's own reason (qfuse.cuda.unavailable_reason()) before any model is loaded, no crash.
With a GPU: `qfuse fuse --device cuda` writes the same tokens as `--device cpu` (max|gpu-cpu| /
max|cpu| < 1e-4 in float32, < 3e-2 with bfloat16 weights) for a KV-prefix model with
--project, an AffectGPT pre-fusion, a bare Q-Former fixture and the BLIP-2 fixture (--pixels:
vision tower, Q-Former and projection all on the GPU); the CPU outputs are
themselves checked against the float64 references in test_cli_fuse.py / test_kvprefix.py /
test_prefusion.py, and here the KV-prefix and pre-fusion ones again against ref_fusion. `qfuse
run --device cuda` on the InstructBLIP fixture generates the CPU's ids (greedy).
The binary is $QFUSE_CLI, else qfuse next to $QFUSE_LIBRARY, else build/qfuse; absent -> skipped."""
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

import qfuse.cuda
import ref_fusion as RF
import util
from util import FIXTURES, REPO

REASON = qfuse.cuda.unavailable_reason()
TOL = 1e-4
BF16_TOL = 3e-2


def _cli():
    cands = [os.environ.get("QFUSE_CLI")]
    if os.environ.get("QFUSE_LIBRARY"):
        cands.append(os.path.join(os.path.dirname(os.environ["QFUSE_LIBRARY"]), "qfuse"))
    cands.append(os.path.join(REPO, "build", "qfuse"))
    for c in cands:
        if c and os.access(c, os.X_OK):
            return c
    return None


CLI = _cli()
pytestmark = pytest.mark.skipif(CLI is None, reason="qfuse CLI not built (set QFUSE_CLI)")
needs_gpu = pytest.mark.skipif(REASON is not None, reason="CUDA backend not usable: %s" % REASON)
PHOTO = os.path.join(REPO, "data", "chelsea.png")


def run(cmd, *args):
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # the sanitizer run preloads ASan
    env.setdefault("QFUSE_THREADS", "2")
    p = subprocess.run([CLI, cmd] + [str(a) for a in args], capture_output=True, env=env, timeout=120)
    return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")


def save(tmp_path, name, arr):
    p = str(tmp_path / (name + ".npy"))
    np.save(p, np.asarray(arr))
    return p


def test_help_teaches_device():
    rc, out, _ = run("fuse", "--help")
    assert rc == 0
    for word in ("--device cpu|cuda", "--dtype float32|bfloat16", "make CUDA=1", "vision tower",
                 "affectgpt_attention_fusion (its time means", "--attn-png"):
        assert word in out, word
    rc, out, _ = run("run", "--help")
    assert rc == 0
    for word in ("--device cpu|cuda", "--dtype", "language model", "CPU", "make CUDA=1"):
        assert word in out, word


@pytest.mark.parametrize("cmd,args,words", [
    ("fuse", ["m", "--device", "tpu"], ["--device", "tpu", "cpu or cuda"]),
    ("fuse", ["m", "--dtype", "bfloat16"], ["--dtype bfloat16 needs --device cuda"]),
    ("fuse", ["m", "--dtype", "int4", "--device", "cuda"], ["--dtype", "int4"]),
    ("fuse", ["m", "--device", "cuda", "--attn-png", "x.png"], ["--attn-png needs --device cpu"]),
    ("fuse", ["m", "--device"], ["--device needs a value"]),
    ("run", ["m", "--image", "x.png", "--device", "tpu"], ["--device", "tpu"]),
    ("run", ["m", "--image", "x.png", "--dtype", "bfloat16"], ["--dtype bfloat16 needs --device cuda"]),
    ("run", ["m", "--prompt", "hi", "--device", "cuda"], ["decoder LLM runs on the CPU only"]),
])
def test_usage_errors(cmd, args, words):
    rc, out, err = run(cmd, *args)
    assert rc == 2, (rc, err)
    for w in words:
        assert w in err, (w, err)


@pytest.mark.skipif(REASON is None, reason="a GPU is usable here")
@pytest.mark.parametrize("cmd,args", [("fuse", ["--features", "f.npy", "--global", "g.npy"]),
                                      ("fuse", ["--dtype", "bfloat16"]),
                                      ("run", ["--image", PHOTO])])
def test_cuda_unusable_fails_cleanly(tmp_path, cmd, args):
    """No GPU backend: exit 1 with the library's reason, before the (absent) model is read."""
    rc, out, err = run(cmd, str(tmp_path / "no-such-model"), "--device", "cuda", *args)
    assert rc == 1, (rc, err)
    assert "--device cuda" in err and REASON in err, err
    assert "no-such-model" not in err and "Traceback" not in err and out == ""


# ---- on a GPU: the same tokens as the CPU ----

def _cli_out(tmp_path, model, dev_args, *args):
    out = str(tmp_path / ("out_%d.npy" % len(os.listdir(tmp_path))))
    rc, so, err = run("fuse", model, *args, "--out", out, *dev_args)
    assert rc == 0, err
    if dev_args:
        assert "device:" in so and "on the GPU" in so, so
    return np.load(out)


@needs_gpu
def test_fuse_kvprefix_gpu_equals_cpu(tmp_path):
    import test_kvprefix as TK
    rng = np.random.default_rng(5)
    cfg = TK._cfg()
    sd = RF.random_kvprefix(cfg, rng, projection_dim=12)
    folder = TK._write(str(tmp_path / "kv"), cfg, sd)
    enc, g, _, mask = TK._inputs(rng, cfg, 3, 7, True, True)
    args = ["--features", save(tmp_path, "f", enc), "--global", save(tmp_path, "g", g),
            "--mask", save(tmp_path, "m", mask.astype(np.uint8)), "--project"]
    cpu = _cli_out(tmp_path, folder, [], *args)
    ref = RF.kvprefix_reference(sd, cfg, enc, g, None, mask)[0]
    ref = ref @ sd["language_projection.weight"].T + sd["language_projection.bias"]
    assert util.rel_err(cpu, ref) < TOL
    gpu = _cli_out(tmp_path, folder, ["--device", "cuda"], *args)
    assert gpu.shape == cpu.shape and util.rel_err(gpu, cpu) < TOL, util.rel_err(gpu, cpu)
    bf = _cli_out(tmp_path, folder, ["--device", "cuda", "--dtype", "bfloat16"], *args)
    assert util.rel_err(bf, cpu) < BF16_TOL


@needs_gpu
def test_fuse_prefusion_gpu_equals_cpu(tmp_path):
    import test_prefusion as TP
    rng = np.random.default_rng(6)
    cfg = TP._cfg()
    sd = RF.random_prefusion(cfg, rng)
    folder = TP._write(str(tmp_path / "pf"), cfg, sd)
    a, f, am, fm = TP._inputs(rng, cfg, 2, 4, 6, True)
    args = ["--audio", save(tmp_path, "a", a), "--face", save(tmp_path, "f", f),
            "--audio-mask", save(tmp_path, "am", np.asarray(am, np.uint8)),
            "--face-mask", save(tmp_path, "fm", np.asarray(fm, np.uint8))]
    cpu = _cli_out(tmp_path, folder, [], *args)
    assert util.rel_err(cpu, RF.prefusion_reference(sd, cfg, a, f, am, fm)[0]) < TOL
    gpu = _cli_out(tmp_path, folder, ["--device", "cuda"], *args)
    assert util.rel_err(gpu, cpu) < TOL


@needs_gpu
def test_fuse_qformer_and_blip2_fixtures_gpu_equals_cpu(tmp_path):
    case, io, folder = util.load_fixture("qformer_0")
    args = ["--features", save(tmp_path, "f", io["encoder_hidden_states"]),
            "--queries", save(tmp_path, "q", io["query_embeds"]),
            "--mask", save(tmp_path, "m", np.asarray(io["encoder_attention_mask"], np.uint8))]
    cpu = _cli_out(tmp_path, folder, [], *args)
    gpu = _cli_out(tmp_path, folder, ["--device", "cuda"], *args)
    assert util.rel_err(gpu, cpu) < TOL and util.rel_err(gpu, io["last_hidden_state"]) < TOL
    d = os.path.join(FIXTURES, "blip2_opt_0")
    if not os.path.isfile(os.path.join(d, "model.safetensors")):
        pytest.skip("fixture blip2_opt_0 absent")
    case, io, folder = util.load_fixture("blip2_opt_0")
    px = ["--pixels", save(tmp_path, "px", io["pixel_values"])]
    cpu = _cli_out(tmp_path, folder, [], *px)
    gpu = _cli_out(tmp_path, folder, ["--device", "cuda"], *px)
    assert gpu.shape == cpu.shape and util.rel_err(gpu, cpu) < TOL
    assert util.rel_err(gpu, io["language_projection"]) <= case["rtol_fp32"]


@needs_gpu
def test_run_instructblip_gpu_qformer(tmp_path):
    fix, tok = os.path.join(FIXTURES, "instructblip_llama_0"), os.path.join(FIXTURES, "tokenizer_wordpiece")
    if not os.path.isfile(os.path.join(fix, "model.safetensors")):
        pytest.skip("fixture instructblip_llama_0 absent")
    d = tmp_path / "ib"
    d.mkdir()
    for f in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(os.path.join(fix, f), d / f)
    shutil.copy(os.path.join(tok, "processor_llm_tokenizer.json"), d / "tokenizer.json")
    (d / "qformer_tokenizer").mkdir()
    shutil.copy(os.path.join(tok, "processor_qformer_tokenizer.json"), d / "qformer_tokenizer" / "tokenizer.json")
    base = [d, "--image", PHOTO, "--prompt", "what is in the picture?", "--max-new-tokens", 8, "--print-ids"]
    rc, out_cpu, err_cpu = run("run", *base)
    assert rc == 0, err_cpu
    rc, out_gpu, err_gpu = run("run", *base, "--device", "cuda")
    assert rc == 0, err_gpu
    assert "Q-Former and language_projection run on the GPU" in err_gpu

    def ids(err):
        return re.search(r"^generated_ids:(.*)$", err, re.M).group(1).split()
    assert ids(err_gpu) == ids(err_cpu) and out_gpu == out_cpu
