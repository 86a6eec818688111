"""test_vlm.py - BLIP-2 / InstructBLIP end to end (qfuse.vlm.VisionLM over src/models/blip2_lm.c,
and `qfuse run`) against the reference fixtures:
- blip2_opt_0 (transformers 5.17 Blip2ForConditionalGeneration, OPT decoder) and
  instructblip_llama_0 (InstructBlipForConditionalGeneration, LLaMA decoder, Q-Former
  instruction with a padding mask): logits vs the reference forward's logits, greedy generate vs
  the reference's generated_ids (prompt + 8 new tokens), fused tokens vs language_projection,
  the spliced embeddings vs embed_tokens from the checkpoint with the reference projection
  written over the image positions;
- attention_mask: a left-padded row gives the reference's logits at its real positions and the
  reference's generated tokens;
- a sharded copy of the checkpoint (model.safetensors.index.json) gives the same logits;
- the general splice vs numpy concatenation;
- bad inputs, each refused with a message naming the rule: image-token miscount (per row), an id
  outside the vocabulary, a prompt longer than the context, generation past the context,
  Q-Former ids for a BLIP-2 model, wrong pixel shape;
- `qfuse run` on models/default and data/chelsea.png: the streamed text is the decode of the ids
  VisionLM generates from the same pixels (Pillow + numpy BlipImageProcessor recipe) and the
  Blip2Processor order (image tokens, BOS, prompt); --help; usage errors; a corrupt image file.
"""
import json
import os
import shutil
import subprocess

import numpy as np
import pytest

import util
from util import FIXTURES, REPO

from qfuse._native import QfuseError
from qfuse.vlm import VisionLM

CASES = ["blip2_opt_0", "instructblip_llama_0"]
DEFAULT_MODEL = os.path.join(REPO, "models", "default")
PHOTO = os.path.join(REPO, "data", "chelsea.png")


def fixture(name):
    d = os.path.join(FIXTURES, name)
    if not os.path.isfile(os.path.join(d, "model.safetensors")):
        pytest.skip("fixture %s absent" % name)
    case, io, folder = util.load_fixture(name)
    extra = os.path.join(folder, "extra.safetensors")
    if os.path.exists(extra):
        io = dict(io, **util.read_safetensors(extra))
    return case, io, folder


def qformer_kwargs(io):
    if "qformer_input_ids" not in io:
        return {}
    return dict(qformer_input_ids=io["qformer_input_ids"], qformer_attention_mask=io["qformer_attention_mask"])


_models = {}


def model(name):
    if name not in _models:
        _models[name] = VisionLM.load(os.path.join(FIXTURES, name))
    return _models[name]


# ---- against the reference ---------------------------------------------------------------------

@pytest.mark.parametrize("name", CASES)
def test_config(name):
    case, io, folder = fixture(name)
    m = model(name)
    assert m.image_token_id == case["image_token_id"]
    assert m.num_query_tokens == case["num_query_tokens"]
    assert m.instruct == name.startswith("instructblip")
    with open(os.path.join(folder, "generation_config.json")) as f:
        g = json.load(f)
    assert m.eos_token_ids == [g["eos_token_id"]] and m.pad_token_id == g["pad_token_id"]


@pytest.mark.parametrize("name", CASES)
def test_logits(name):
    case, io, _ = fixture(name)
    m = model(name)
    got = m.logits(io["input_ids"], io["pixel_values"], **qformer_kwargs(io))
    err = util.rel_err(got, io["logits"])
    assert err < case["rtol_fp32"], "logits rel err %.3g" % err
    assert err < 1e-5  # measured ~3e-7 / 4e-7: a regression shows long before the case tolerance


@pytest.mark.parametrize("name", CASES)
def test_generate_greedy(name):
    case, io, _ = fixture(name)
    m = model(name)
    ref = io["generated_ids"]
    new = ref.shape[1] - io["input_ids"].shape[1]
    got = m.generate(io["input_ids"], io["pixel_values"], max_new_tokens=new, **qformer_kwargs(io))
    # the reference returns the prompt followed by the new tokens (compare with the tail)
    np.testing.assert_array_equal(got[:, -new:], ref[:, -new:])
    np.testing.assert_array_equal(got[:, :io["input_ids"].shape[1]], io["input_ids"])


@pytest.mark.parametrize("name", CASES)
def test_fused_and_embed(name):
    case, io, folder = fixture(name)
    m = model(name)
    kw = qformer_kwargs(io)
    fused = m.fused_tokens(io["pixel_values"], **kw)
    assert util.rel_err(fused, io["language_projection"]) < 1e-5
    # inputs_embeds = embed_tokens(input_ids), image positions <- the reference projection
    st = util.read_safetensors(os.path.join(folder, "model.safetensors"))
    table = st.get("language_model.model.decoder.embed_tokens.weight",
                   st.get("language_model.model.embed_tokens.weight"))
    ids = io["input_ids"]
    ref = table[ids].astype(np.float32)
    img = ids == case["image_token_id"]
    ref[img] = io["language_projection"].reshape(-1, ref.shape[-1])
    got = m.embed(ids, io["pixel_values"], **kw)
    assert util.rel_err(got, ref) < 1e-5
    # splicing the reference projection itself is exact
    np.testing.assert_array_equal(m.splice_image_tokens(ids, io["language_projection"]), ref)


@pytest.mark.parametrize("name", CASES)
def test_left_padding(name):
    """Row 1 left-padded by 3 pad tokens (mask 0): its real positions give the reference logits
    of the unpadded row, and generation gives the reference's new tokens."""
    case, io, _ = fixture(name)
    m = model(name)
    ids = io["input_ids"]
    pad = 3
    B, T = ids.shape
    padded = np.full((B, T + pad), m.pad_token_id, np.int32)
    mask = np.zeros((B, T + pad), np.int32)
    padded[0, :T], mask[0, :T] = ids[0], 1          # row 0 right-padded
    padded[1, pad:], mask[1, pad:] = ids[1], 1      # row 1 left-padded
    kw = qformer_kwargs(io)
    got = m.logits(padded, io["pixel_values"], attention_mask=mask, **kw)
    assert util.rel_err(got[0, :T], io["logits"][0]) < 1e-5
    assert util.rel_err(got[1, pad:], io["logits"][1]) < 1e-5
    # generation (left padding, as generate needs): both rows behind 3 pad tokens in one batch
    lp = np.concatenate([np.full((B, pad), m.pad_token_id, np.int32), ids], axis=1)
    lm = np.concatenate([np.zeros((B, pad), np.int32), np.ones((B, T), np.int32)], axis=1)
    new = io["generated_ids"].shape[1] - T
    got = m.generate(lp, io["pixel_values"], attention_mask=lm, max_new_tokens=new, **kw)
    np.testing.assert_array_equal(got[:, -new:], io["generated_ids"][:, -new:])


def test_sharded_checkpoint(tmp_path):
    case, io, folder = fixture("blip2_opt_0")
    st = util.read_safetensors(os.path.join(folder, "model.safetensors"))
    names = sorted(st)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    wm = {}
    for fname, part in shards.items():
        util.write_safetensors(str(tmp_path / fname), {n: st[n] for n in part})
        wm.update({n: fname for n in part})
    with open(tmp_path / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {}, "weight_map": wm}, f)
    for extra in ("config.json", "generation_config.json"):
        shutil.copy(os.path.join(folder, extra), tmp_path / extra)
    m = VisionLM.load(tmp_path)
    got = m.logits(io["input_ids"], io["pixel_values"])
    assert util.rel_err(got, io["logits"]) < 1e-5


def test_general_splice():
    rng = np.random.default_rng(0)
    B, T, n, D = 2, 5, 3, 4
    p = rng.standard_normal((B, T, D)).astype(np.float32)
    f = rng.standard_normal((B, n, D)).astype(np.float32)
    pm = np.array([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], np.uint8)
    for pos in (0, 2, T):
        out, mask = VisionLM.splice(p, f, pos, prompt_mask=pm)
        np.testing.assert_array_equal(out, np.concatenate([p[:, :pos], f, p[:, pos:]], axis=1))
        np.testing.assert_array_equal(mask, np.concatenate([pm[:, :pos], np.ones((B, n), np.uint8), pm[:, pos:]], 1))
    with pytest.raises(QfuseError, match="pos = 6 is outside the prompt"):
        VisionLM.splice(p, f, T + 1)


# ---- bad inputs ----------------------------------------------------------------------------------

def test_image_token_count():
    case, io, _ = fixture("blip2_opt_0")
    m = model("blip2_opt_0")
    ids = io["input_ids"].copy()
    ids[1, 0] = 5  # row 1: one image token fewer
    with pytest.raises(QfuseError, match=r"row 1 holds 7 image tokens \(id 150\).*num_query_tokens = 8") as e:
        m.logits(ids, io["pixel_values"])
    assert e.value.status == "QF_ERR_ARG"
    ids = io["input_ids"].copy()
    ids[0, 10] = 150  # row 0: one more
    with pytest.raises(QfuseError, match=r"row 0 holds 9 image tokens"):
        m.generate(ids, io["pixel_values"], max_new_tokens=2)
    with pytest.raises(QfuseError, match=r"row 0 holds 0 image tokens"):
        m.embed(io["input_ids"][:, 8:], io["pixel_values"])


def test_token_out_of_range():
    case, io, _ = fixture("blip2_opt_0")
    m = model("blip2_opt_0")
    ids = io["input_ids"].copy()
    ids[1, 12] = m.vocab_size
    with pytest.raises(QfuseError, match=r"input_ids\[1,12\] = 160 is outside the vocabulary \[0, 160\)"):
        m.logits(ids, io["pixel_values"])
    ids[1, 12] = -1
    with pytest.raises(QfuseError, match=r"input_ids\[1,12\] = -1"):
        m.generate(ids, io["pixel_values"], max_new_tokens=1)


def test_context_length():
    case, io, _ = fixture("blip2_opt_0")
    m = model("blip2_opt_0")
    assert m.max_positions == 128
    long = np.concatenate([io["input_ids"][:1], np.full((1, 129 - 15), 7, np.int32)], axis=1)
    with pytest.raises(QfuseError, match=r"prompt has 129 tokens but the language model's context is 128"):
        m.logits(long, io["pixel_values"][:1])
    with pytest.raises(QfuseError, match=r"15 tokens \+ max_new_tokens 114 exceed the language model's context of 128"):
        m.generate(io["input_ids"][:1], io["pixel_values"][:1], max_new_tokens=114)
    m.generate(io["input_ids"][:1], io["pixel_values"][:1], max_new_tokens=113)  # exactly fills it


def test_other_misuse():
    case, io, _ = fixture("blip2_opt_0")
    m = model("blip2_opt_0")
    with pytest.raises(QfuseError, match="reads no instruction"):
        m.logits(io["input_ids"], io["pixel_values"], qformer_input_ids=[[1, 2], [3, 4]])
    with pytest.raises(QfuseError, match=r"pixel_values has shape \[2,3,16,16\]; expected \[B,3,32,32\]"):
        m.logits(io["input_ids"], io["pixel_values"][:, :, :16, :16])
    with pytest.raises(QfuseError, match="input_ids has 2 rows but pixel_values 1 images"):
        m.logits(io["input_ids"], io["pixel_values"][:1])
    with pytest.raises(QfuseError, match="model_type"):
        VisionLM.load(os.path.join(FIXTURES, "qformer_0"))


# ---- qfuse run -----------------------------------------------------------------------------------

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
needs_cli = pytest.mark.skipif(CLI is None, reason="qfuse CLI not built (set QFUSE_CLI)")


def run(*args):
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # the sanitizer run preloads ASan
    env.setdefault("QFUSE_THREADS", "2")
    p = subprocess.run([CLI, "run"] + [str(a) for a in args], capture_output=True, env=env, timeout=120)
    return p.returncode, p.stdout.decode("utf-8"), p.stderr.decode("utf-8", "replace")


def blip_pixels(path, size):
    """BlipImageProcessor's recipe with Pillow + numpy: RGB, bicubic resize, /255, CLIP mean/std."""
    Image = pytest.importorskip("PIL.Image")
    img = Image.open(path).convert("RGB").resize((size, size), resample=Image.BICUBIC)
    x = np.asarray(img, np.float32) / 255.0
    mean = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
    std = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
    return ((x - mean) / std).transpose(2, 0, 1)[None].astype(np.float32)


@needs_cli
def test_run_streams_the_generated_text():
    if not os.path.isfile(os.path.join(DEFAULT_MODEL, "model.safetensors")):
        pytest.skip("models/default absent")
    from qfuse.tokenizer import Tokenizer
    prompt = "Question: what is in the picture? Answer:"
    rc, out, err = run(DEFAULT_MODEL, "--image", PHOTO, "--prompt", prompt, "--max-new-tokens", 12,
                       "--repetition-penalty", 1.3)
    assert rc == 0, err
    assert "prefill" in err and "tok/s" in err and "decode" in err
    tok = Tokenizer(os.path.join(DEFAULT_MODEL, "tokenizer.json"))
    m = VisionLM.load(DEFAULT_MODEL)
    text_ids = tok.encode(prompt)           # the processor's add_special_tokens=True: BOS first
    assert text_ids[0] == m.bos_token_id
    ids = np.array([[m.image_token_id] * m.num_query_tokens + list(text_ids)], np.int32)
    gen = m.generate(ids, blip_pixels(PHOTO, m.image_size), max_new_tokens=12, repetition_penalty=1.3)
    new = [int(t) for t in gen[0, ids.shape[1]:] if t not in m.eos_token_ids]
    assert out == tok.decode(new, skip_special_tokens=True) + "\n"


@needs_cli
def test_run_sampling_and_stop():
    if not os.path.isfile(os.path.join(DEFAULT_MODEL, "model.safetensors")):
        pytest.skip("models/default absent")
    args = [DEFAULT_MODEL, "--image", PHOTO, "--prompt", "A photo of", "--max-new-tokens", 16,
            "--temperature", 0.8, "--top-k", 50, "--top-p", 0.95, "--seed", 7, "--quiet"]
    rc1, out1, err1 = run(*args)
    rc2, out2, _ = run(*args)
    assert rc1 == 0 and err1 == "" and out1 == out2   # seeded: reproducible; --quiet: no timings
    rc3, out3, _ = run(*(args[:-3] + ["--seed", 8, "--quiet"]))
    assert rc3 == 0
    text = out1.rstrip("\n")
    if len(text) >= 4:
        stop = text[2:4]
        rc, out, _ = run(*(args + ["--stop", stop]))
        assert rc == 0 and out == text[:text.index(stop)] + "\n"


@needs_cli
def test_run_help_and_usage(tmp_path):
    rc, out, _ = run("--help")
    assert rc == 0 and "usage: qfuse run MODEL --image IMAGE" in out and "--max-new-tokens" in out
    rc, _, err = run(DEFAULT_MODEL)
    assert rc == 2 and "give --image FILE" in err
    rc, _, err = run(DEFAULT_MODEL, "--image", PHOTO, "--top-p", "1.5")
    assert rc == 2 and "--top-p expects a number in" in err
    rc, _, err = run(DEFAULT_MODEL, "--image", PHOTO, "--bogus")
    assert rc == 2 and "unknown option --bogus" in err
    rc, _, err = run(DEFAULT_MODEL, "--image", PHOTO, "--weights", "fp8")
    assert rc == 2 and "--weights" in err


@needs_cli
def test_run_corrupt_image(tmp_path):
    if not os.path.isfile(os.path.join(DEFAULT_MODEL, "model.safetensors")):
        pytest.skip("models/default absent")
    bad = tmp_path / "broken.png"
    with open(PHOTO, "rb") as f:
        bad.write_bytes(f.read()[:300])  # a PNG cut inside its first chunk
    rc, out, err = run(DEFAULT_MODEL, "--image", bad)
    assert rc == 1 and out == ""
    assert "--image" in err and "cannot decode" in err and str(bad) in err
    rc, out, err = run(DEFAULT_MODEL, "--image", tmp_path / "missing.jpg")
    assert rc == 1 and "missing.jpg" in err


@needs_cli
def test_run_prompt_too_long(tmp_path):
    if not os.path.isfile(os.path.join(DEFAULT_MODEL, "model.safetensors")):
        pytest.skip("models/default absent")
    rc, out, err = run(DEFAULT_MODEL, "--image", PHOTO, "--prompt", "word " * 600)
    assert rc == 1 and "more than the language model's context of 512" in err


@pytest.mark.parametrize("weights,tol", [("bf16", 1e-2), ("int8", 3e-2)])
def test_reduced_weights(weights, tol):
    """The language model's linears stored as bf16 / int8 (the image side stays float32): logits
    stay near the reference (measured 2.3e-3 bf16, 7.0e-3 int8; q4 9e-2 is not tested here)."""
    case, io, folder = fixture("blip2_opt_0")
    m = VisionLM.load(folder, weights=weights)
    err = util.rel_err(m.logits(io["input_ids"], io["pixel_values"]), io["logits"])
    assert 1e-7 < err < tol, "%s logits rel err %.3g" % (weights, err)


def test_encoder_decoder_refused(tmp_path):
    case, io, folder = fixture("blip2_opt_0")
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    cfg["use_decoder_only_language_model"] = False
    with open(tmp_path / "config.json", "w") as f:
        json.dump(cfg, f)
    os.symlink(os.path.join(folder, "model.safetensors"), tmp_path / "model.safetensors")
    with pytest.raises(QfuseError, match="use_decoder_only_language_model = false") as e:
        VisionLM.load(tmp_path)
    assert e.value.status == "QF_ERR_UNSUPPORTED"


@needs_cli
def test_run_without_tokenizer():
    case, io, folder = fixture("blip2_opt_0")
    rc, out, err = run(folder, "--image", PHOTO)
    assert rc == 1 and "tokenizer.json is missing" in err


def test_nonfinite_pixels_named():
    meta, io, folder = util.load_fixture("blip2_opt_0")
    m = VisionLM.load(folder)
    px = io["pixel_values"].copy()
    px[1, 2, 3, 4] = np.nan
    with pytest.raises(QfuseError) as e:
        m.logits(io["input_ids"], px)
    assert e.value.status == "QF_ERR_NONFINITE" and "pixel_values[1,2,3,4] = nan" in e.value.message
