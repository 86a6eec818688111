"""test_llm.py - qfuse.llm.CausalLM (src/models/llama.c) against the transformers 5.17 fixtures
tests/fixtures/llm_llama (LlamaForCausalLM: untied lm_head, MHA) and llm_qwen2
(Qwen2ForCausalLM: q/k/v biases, GQA 4/2, tied embeddings): logits, logits when embeddings are
spliced between token embeddings, greedy generation, and the load/input errors.

Bar: max|out - ref| / max|ref| <= case.json's rtol_fp32 (1e-3, the issue's whole-model bar).
"""
import json
import os
import shutil

import numpy as np
import pytest

import qfuse
from qfuse._native import QfuseError
from qfuse.llm import CausalLM

from util import load_fixture, read_safetensors, rel_err, write_safetensors

CASES = ["llm_llama", "llm_qwen2"]


@pytest.fixture(scope="module", params=CASES)
def case(request):
    meta, io, folder = load_fixture(request.param)
    return request.param, meta, io, CausalLM.load(folder)


def test_logits(case):
    name, meta, io, m = case
    out = m.logits(input_ids=io["input_ids"])
    err = rel_err(out, io["logits"])
    print("%s logits rel err %.3g" % (name, err))
    assert err <= meta["rtol_fp32"], "%s logits: rel err %.3g" % (name, err)


def test_logits_with_embeds(case):
    name, meta, io, m = case
    ids = io["input_ids"]
    emb = m.embed(ids)
    spliced = np.concatenate([emb[:, :2], io["inserted_embeds"], emb[:, 2:]], axis=1)
    out = m.logits(inputs_embeds=spliced)
    err = rel_err(out, io["logits_with_embeds"])
    print("%s logits_with_embeds rel err %.3g" % (name, err))
    assert err <= meta["rtol_fp32"], "%s logits_with_embeds: rel err %.3g" % (name, err)


def test_generate_greedy(case):
    name, meta, io, m = case
    ids, ref = io["input_ids"], io["generated_ids"]
    out = m.generate(ids, max_new_tokens=ref.shape[1] - ids.shape[1])
    assert out.shape == ref.shape
    np.testing.assert_array_equal(out, ref)


def test_embed_matches_table(case):
    name, meta, io, m = case
    table = read_safetensors(os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures",
                                          name, "model.safetensors"))["model.embed_tokens.weight"]
    np.testing.assert_array_equal(m.embed(io["input_ids"]), table[io["input_ids"]])


def test_token_id_out_of_range(case):
    name, meta, io, m = case
    ids = io["input_ids"].copy()
    ids[1, 4] = m.vocab_size
    with pytest.raises(QfuseError) as e:
        m.logits(input_ids=ids)
    assert e.value.status == "QF_ERR_ARG"
    assert "input_ids[1,4]" in e.value.message and str(m.vocab_size) in e.value.message
    ids[1, 4] = -1
    with pytest.raises(QfuseError, match=r"input_ids\[1,4\] = -1"):
        m.embed(ids)


def test_bad_embeds_shape(case):
    name, meta, io, m = case
    with pytest.raises(QfuseError, match="inputs_embeds has shape"):
        m.logits(inputs_embeds=np.zeros((1, 3, m.hidden_size + 1), np.float32))
    with pytest.raises(QfuseError, match="exactly one"):
        m.logits()


def _copy_case(tmp_path, name):
    dst = tmp_path / name
    shutil.copytree(os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", name), dst)
    for p in dst.iterdir():
        os.chmod(p, 0o644)
    return dst


def test_unknown_model_type(tmp_path):
    folder = _copy_case(tmp_path, "llm_llama")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "mistral_x"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QfuseError) as e:
        CausalLM.load(folder)
    assert e.value.status == "QF_ERR_UNSUPPORTED" and "mistral_x" in e.value.message


def test_unsupported_rope_type(tmp_path):
    folder = _copy_case(tmp_path, "llm_llama")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rope_parameters"]["rope_type"] = "llama3"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QfuseError) as e:
        CausalLM.load(folder)
    assert e.value.status == "QF_ERR_UNSUPPORTED" and "llama3" in e.value.message


@pytest.mark.parametrize("drop", ["model.layers.1.mlp.up_proj.weight", "lm_head.weight",
                                  "model.layers.0.self_attn.k_proj.bias"])
def test_missing_tensor(tmp_path, drop):
    name = "llm_qwen2" if drop.endswith(".bias") else "llm_llama"
    folder = _copy_case(tmp_path, name)
    tensors = read_safetensors(str(folder / "model.safetensors"))
    del tensors[drop]
    write_safetensors(str(folder / "model.safetensors"), tensors)
    with pytest.raises(QfuseError) as e:
        CausalLM.load(folder)
    assert e.value.status == "QF_ERR_NOT_FOUND" and drop in e.value.message


def test_wrong_shape(tmp_path):
    folder = _copy_case(tmp_path, "llm_qwen2")
    tensors = read_safetensors(str(folder / "model.safetensors"))
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((64, 64), np.float32)
    write_safetensors(str(folder / "model.safetensors"), tensors)
    with pytest.raises(QfuseError) as e:
        CausalLM.load(folder)
    assert e.value.status == "QF_ERR_SHAPE" and "k_proj.weight" in e.value.message


def test_tied_ignores_lm_head(tmp_path):
    # Qwen2 fixture is tied and stores no lm_head: logits must be embed_tokens-projected. A junk
    # lm_head.weight in the file must not be used while tie_word_embeddings is true.
    meta, io, _ = load_fixture("llm_qwen2")
    folder = _copy_case(tmp_path, "llm_qwen2")
    tensors = read_safetensors(str(folder / "model.safetensors"))
    tensors["lm_head.weight"] = np.zeros_like(tensors["model.embed_tokens.weight"])
    write_safetensors(str(folder / "model.safetensors"), tensors)
    out = CausalLM.load(folder).logits(input_ids=io["input_ids"])
    assert rel_err(out, io["logits"]) <= meta["rtol_fp32"]


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_logits_every_isa(case, isa):
    # The attention inside runs on qf_sdpa_forward, which has one kernel per ISA.
    name, meta, io, m = case
    try:
        qfuse.set_isa(isa)
    except QfuseError:
        pytest.skip("this CPU lacks %s" % isa)
    err = rel_err(m.logits(input_ids=io["input_ids"]), io["logits"])
    assert err <= meta["rtol_fp32"], "%s logits (%s): rel err %.3g" % (name, isa, err)
