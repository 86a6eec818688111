"""test_cli_run_text.py - `qfuse run LLM --prompt ...` (no --image): a decoder LLM folder continues
a prompt, streamed to stdout. The model is a random LLaMA whose vocabulary matches the
tokenizer_bpe fixture; the reference for the streamed text is tokenizers-exact encoding
(test_tokenizer.py) and the fixture-checked CausalLM.generate (test_llm.py), decoded whole by
qfuse.Tokenizer: this checks the CLI's wiring (prompt -> ids -> generate -> stream), with and
without a LoRA adapter, and its errors.
"""
import json
import os
import shutil
import subprocess

import numpy as np
import pytest

import ref_llm
from qfuse.llm import CausalLM
from qfuse.tokenizer import Tokenizer
from test_vlm import CLI, needs_cli
from util import FIXTURES, write_safetensors

TOK = os.path.join(FIXTURES, "tokenizer_bpe", "tokenizer.json")


def run(*args):
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env.setdefault("QFUSE_THREADS", "2")
    p = subprocess.run([CLI, "run"] + [str(a) for a in args], capture_output=True, env=env, timeout=120)
    return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("llm")
    with open(TOK) as f:
        t = json.load(f)
    V = 1 + max(list(t["model"]["vocab"].values()) + [a["id"] for a in t.get("added_tokens", [])])
    cfg = dict(model_type="llama", vocab_size=V, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=48, num_hidden_layers=2, max_position_embeddings=64, eos_token_id=V - 1)
    rng = np.random.default_rng(5)
    W = ref_llm.random_llama(cfg, rng)
    W = {k: (v * 4 if k == "lm_head.weight" else v) for k, v in W.items()}   # peaky logits: stable greedy
    write_safetensors(str(d / "model.safetensors"), W)
    (d / "config.json").write_text(json.dumps(cfg))
    shutil.copy(TOK, d / "tokenizer.json")
    # a LoRA adapter on every q_proj / down_proj
    ad = d / "lora"
    ad.mkdir()
    A = {}
    for l in range(2):
        for mod, o, i in [("self_attn.q_proj", 32, 32), ("mlp.down_proj", 32, 48)]:
            p = "base_model.model.model.layers.%d.%s" % (l, mod)
            A[p + ".lora_A.weight"] = rng.standard_normal((4, i)).astype(np.float32) * 0.3
            A[p + ".lora_B.weight"] = rng.standard_normal((o, 4)).astype(np.float32) * 0.3
    write_safetensors(str(ad / "adapter_model.safetensors"), A)
    (ad / "adapter_config.json").write_text(json.dumps(dict(peft_type="LORA", r=4, lora_alpha=8,
                                                            target_modules=["q_proj", "down_proj"])))
    return d


def _expected(folder, prompt, n, adapter=None, **kw):
    tok = Tokenizer(str(folder / "tokenizer.json"))
    ids = np.array([tok.encode(prompt)], np.int32)
    m = CausalLM.load(folder)
    if adapter:
        m.load_adapter(adapter)
    out = m.generate(ids, max_new_tokens=n, **kw)[0, ids.shape[1]:]
    eos = m.eos_token_ids
    cut = [i for i, t in enumerate(out) if t in eos]
    out = out[:cut[0] + 1] if cut else out
    return prompt + tok.decode(out.tolist(), skip_special_tokens=True)


@needs_cli
def test_text_mode_greedy(folder):
    rc, out, err = run(folder, "--prompt", "hello world", "--max-new-tokens", 10)
    assert rc == 0, err
    assert out.rstrip("\n") == _expected(folder, "hello world", 10)
    assert "prefill" in err and "tok/s" in err and "image" not in err


@needs_cli
def test_text_mode_sampling_and_adapter(folder):
    args = ["--prompt", "the cat", "--max-new-tokens", 8, "--temperature", 0.9, "--top-k", 20, "--seed", 4]
    rc, out, err = run(folder, *args, "--adapter", folder / "lora")
    assert rc == 0, err
    exp = _expected(folder, "the cat", 8, adapter=str(folder / "lora"), do_sample=True, temperature=0.9,
                    top_k=20, seed=4)
    assert out.rstrip("\n") == exp
    rc2, out2, _ = run(folder, *args)
    assert rc2 == 0 and out2 != out          # the adapter changes the text


@needs_cli
def test_text_mode_errors(folder, tmp_path):
    rc, _, err = run(folder, "--prompt", "x " * 200)
    assert rc == 1 and "context" in err
    rc, _, err = run(folder)
    assert rc == 2 and "--prompt" in err
    rc, _, err = run(folder, "--prompt", "hi", "--adapter", tmp_path)
    assert rc == 1 and "adapter_config.json" in err
