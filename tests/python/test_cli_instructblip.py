"""test_cli_instructblip.py - `qfuse run INSTRUCTBLIP_FOLDER --image ... --prompt ...` end to end.

The folder is built in a temp dir the way InstructBlipProcessor + the model's save_pretrained lay
it out: the instructblip_llama_0 fixture's config.json, generation_config.json and
model.safetensors (transformers 5.17 InstructBlipForConditionalGeneration, LLaMA decoder, Q-Former
vocab_size 120), tokenizer.json for the LLM and qformer_tokenizer/tokenizer.json for the Q-Former
(tests/fixtures/tokenizer_wordpiece: processor_llm_tokenizer.json and
processor_qformer_tokenizer.json, what InstructBlipProcessor.save_pretrained wrote on the GPU
machine; both WordPiece, 170 and 89 ids, so every id fits the fixture's vocabularies).

References (none computed by qfuse's tokenizer):
- the Q-Former ids the CLI used (--print-ids) equal tokenizers 0.23.2's encode of the prompt with
  special tokens ([CLS] ... [SEP]) under that file (expected.json, variant "qformer");
- the LLM input ids equal num_query_tokens image tokens + tokenizers' encode of the prompt under
  the LLM file (variant "llm"), the order InstructBlipProcessor uses;
- the generated ids equal those of the Python API (VisionLM.generate, itself checked against the
  fixture's transformers generate in test_vlm.py) on the same ids, the Q-Former ids with an
  all-ones mask, and the image as BlipImageProcessor prepares it (Pillow bicubic + CLIP
  mean/std, test_vlm.blip_pixels); the streamed text is their decode.
Errors: a folder without qformer_tokenizer/tokenizer.json names that path; an unreadable one
gives the tokenizer's own message.
"""
import json
import os
import shutil

import numpy as np
import pytest

from test_vlm import CLI, PHOTO, blip_pixels, needs_cli, run
from util import FIXTURES

FIX = os.path.join(FIXTURES, "instructblip_llama_0")
TOK = os.path.join(FIXTURES, "tokenizer_wordpiece")
PROMPTS = ["Question: what is in the picture? Answer:", "Describe this Café picture, please!", ""]


def _ref(variant, text):
    with open(os.path.join(TOK, "expected.json"), encoding="utf-8") as f:
        cases = json.load(f)["variants"][variant]["cases"]
    return next(c for c in cases if c["text"] == text)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    if not os.path.isfile(os.path.join(FIX, "model.safetensors")):
        pytest.skip("fixture instructblip_llama_0 absent")
    d = tmp_path_factory.mktemp("instructblip")
    for f in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(os.path.join(FIX, f), d / f)
    shutil.copy(os.path.join(TOK, "processor_llm_tokenizer.json"), d / "tokenizer.json")
    (d / "qformer_tokenizer").mkdir()
    shutil.copy(os.path.join(TOK, "processor_qformer_tokenizer.json"), d / "qformer_tokenizer" / "tokenizer.json")
    return d


def _ids(err, name):
    line = next(l for l in err.splitlines() if l.startswith(name + ":"))
    return [int(x) for x in line.split(":", 1)[1].split()]


@needs_cli
@pytest.mark.parametrize("prompt", PROMPTS)
def test_run_instructblip(folder, prompt):
    from qfuse.tokenizer import Tokenizer
    from qfuse.vlm import VisionLM
    rc, out, err = run(folder, "--image", PHOTO, "--prompt", prompt, "--max-new-tokens", 8, "--print-ids")
    assert rc == 0, err
    qref, lref = _ref("qformer", prompt), _ref("llm", prompt)
    assert qref["ids"][0] == 2 and qref["ids"][-1] == 3 and max(qref["ids"]) < 120   # [CLS] ... [SEP]
    assert _ids(err, "qformer_input_ids") == qref["ids"]
    m = VisionLM.load(folder)
    assert m.instruct and m.num_query_tokens == 6 and m.image_token_id == 160
    ids = [160] * 6 + lref["ids"]
    assert _ids(err, "input_ids") == ids
    got = _ids(err, "generated_ids")
    q = np.array([qref["ids"]], np.int32)
    gen = m.generate(np.array([ids], np.int32), blip_pixels(PHOTO, m.image_size), qformer_input_ids=q,
                     qformer_attention_mask=np.ones_like(q), max_new_tokens=8)
    want = [int(t) for t in gen[0, len(ids):]]
    assert 1 <= len(got) <= 8 and got == want[:len(got)]
    assert len(got) == 8 or got[-1] in m.eos_token_ids           # stopped early only at eos
    # the instruction matters: other Q-Former ids give other fused tokens
    if prompt:
        empty = _ref("qformer", "")["ids"]
        e = np.array([empty], np.int32)
        f1 = m.fused_tokens(blip_pixels(PHOTO, m.image_size), qformer_input_ids=q, qformer_attention_mask=np.ones_like(q))
        f0 = m.fused_tokens(blip_pixels(PHOTO, m.image_size), qformer_input_ids=e, qformer_attention_mask=np.ones_like(e))
        assert np.abs(f1 - f0).max() > 1e-4
    with Tokenizer(folder / "tokenizer.json") as tok:
        text = tok.decode([t for t in got if t not in m.eos_token_ids], skip_special_tokens=True)
    assert out == text + "\n"


@needs_cli
def test_run_instructblip_tokenizer_errors(folder, tmp_path):
    d = tmp_path / "ib"
    shutil.copytree(folder, d)
    shutil.rmtree(d / "qformer_tokenizer")
    rc, out, err = run(d, "--image", PHOTO, "--prompt", "what is this?")
    want = os.path.join(str(d), "qformer_tokenizer", "tokenizer.json")
    assert rc == 1 and out == "" and want + " is missing" in err and "InstructBLIP" in err
    (d / "qformer_tokenizer").mkdir()
    with open(os.path.join(TOK, "qformer.json"), encoding="utf-8") as f:
        j = json.load(f)
    j["normalizer"] = {"type": "Precompiled", "precompiled_charsmap": ""}
    (d / "qformer_tokenizer" / "tokenizer.json").write_text(json.dumps(j), encoding="utf-8")
    rc, out, err = run(d, "--image", PHOTO, "--prompt", "what is this?")
    assert rc == 1 and "loading the Q-Former's tokenizer" in err and 'normalizer "Precompiled" is not supported' in err
    assert want in err


@needs_cli
def test_run_instructblip_long_stream(folder):
    """~100 tokens streamed through the WordPiece decoder (## pieces joined to the word before,
    special tokens skipped, the cleanup rules): the streamed text equals the whole decode of the
    ids generated (decode itself is checked against tokenizers in test_wordpiece.py), with
    sampling so that many different tokens come out."""
    from qfuse.tokenizer import Tokenizer
    rc, out, err = run(folder, "--image", PHOTO, "--prompt", "what is this?", "--max-new-tokens", 100,
                       "--temperature", 1.5, "--seed", 3, "--print-ids")
    assert rc == 0, err
    got = _ids(err, "generated_ids")
    with open(os.path.join(folder, "generation_config.json")) as f:
        eos = json.load(f)["eos_token_id"]
    with Tokenizer(folder / "tokenizer.json") as tok:
        assert any(tok.id_to_token(t).startswith("##") for t in got)            # pieces were joined
        text = tok.decode([t for t in got if t != eos], skip_special_tokens=True)
    assert len(got) > 20 and out == text + "\n"
