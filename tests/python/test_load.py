"""test_load.py - qfuse.load (python/qfuse/models.py): one API over the Q-Former family, checked
against the references, not against the per-family classes:
- qformer_0 (transformers Blip2QFormerModel): qformer() output and qformer_backward() gradients
  by the checkpoint's names, "query_embeds" and "encoder_hidden_states" present.
- blip2_opt_0 (transformers Blip2ForConditionalGeneration): vision(), qformer() with the model's
  own query tokens over the vision output, fuse() = language_projection; qformer_backward keys
  carry the "qformer." prefix and "query_tokens" = the batch sum of the query_embeds gradient.
- AffectGPT pre-fusion and KV-prefix folders with random weights: fuse() against ref_fusion's
  float64 PyTorch references; cross_attention_maps() shapes follow the keys (frames / prefix+S).
- Errors: unknown model_type, missing config, a part the model lacks (vision on a pre-fusion),
  inputs of another family (audio given to BLIP-2), KV-prefix qformer() without global_feature.
"""
import json
import os

import numpy as np
import pytest

import ref_fusion as RF
import util
import qfuse
from qfuse import QfuseError

TOL = 1e-4


def _rng():
    seed = int(os.environ.get("QFUSE_TEST_SEED", "0")) or int.from_bytes(os.urandom(4), "little")
    return np.random.default_rng(seed), seed


def _write(folder, cfg, sd):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    util.write_safetensors(os.path.join(folder, "model.safetensors"),
                           {k: np.asarray(v, np.float32) for k, v in sd.items()})
    return folder


def test_qformer_fixture():
    case, io, folder = util.load_fixture("qformer_0")
    m = qfuse.load(folder)
    assert m.kind == "qformer"
    inp = dict(query_embeds=io["query_embeds"], encoder_hidden_states=io["encoder_hidden_states"],
               encoder_attention_mask=io["encoder_attention_mask"])
    out = m.qformer(**inp)
    assert util.rel_err(out, io["last_hidden_state"]) < TOL
    g = m.qformer_backward(io["grad_out"], **inp)
    refs = {k[5:]: v for k, v in io.items() if k.startswith("grad.")}
    assert set(refs) <= set(g), sorted(set(refs) - set(g))
    scale = max(float(np.abs(v).max()) for v in refs.values())
    worst = max(float(np.abs(g[k] - v).max()) for k, v in refs.items()) / scale
    assert worst < TOL, worst
    assert g["query_embeds"].shape == io["query_embeds"].shape
    assert g["encoder_hidden_states"].shape == io["encoder_hidden_states"].shape
    with pytest.raises(QfuseError, match="has no vision"):
        m.vision(np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(QfuseError, match="no query tokens"):
        m.qformer(encoder_hidden_states=io["encoder_hidden_states"])


def test_blip2_with_language_model_loads_as_vision_lm():
    case, io, folder = util.load_fixture("blip2_opt_0")
    m = qfuse.load(folder)
    assert isinstance(m, qfuse.VisionLM)
    out = m.logits(input_ids=io["input_ids"], pixel_values=io["pixel_values"])
    assert util.rel_err(out, io["logits"]) < case["rtol_fp32"]


def test_blip2_fixture():
    case, io, folder = util.load_fixture("blip2_opt_0")
    m = qfuse.load(folder, part="fusion")
    assert m.kind == "blip2"
    v = m.vision(io["pixel_values"])
    assert util.rel_err(v, io["vision_last_hidden_state"]) < TOL
    h = m.qformer(encoder_hidden_states=v)
    assert util.rel_err(h, io["qformer_last_hidden_state"]) < TOL
    t = m.fuse(pixel_values=io["pixel_values"])
    assert util.rel_err(t, io["language_projection"]) < TOL
    maps = m.cross_attention_maps(average=True)
    assert len(maps) >= 1 and maps[0].shape == (2, case["num_query_tokens"], v.shape[1])
    assert np.allclose(maps[0].sum(-1), 1.0, atol=1e-5)
    rng = np.random.default_rng(0)
    go = rng.standard_normal(h.shape).astype(np.float32)
    g = m.qformer_backward(go, encoder_hidden_states=v)
    assert any(k.startswith("qformer.encoder.layer.0.") for k in g)
    assert np.allclose(g["query_tokens"], g["query_embeds"].sum(0, keepdims=True))
    with pytest.raises(QfuseError, match="does not take audio"):
        m.fuse(pixel_values=io["pixel_values"], audio=np.zeros((2, 3, 4), np.float32))


def test_prefusion_and_kvprefix_against_references(tmp_path):
    rng, seed = _rng()
    q = RF.qformer_config(hidden=32, heads=4, layers=2, inter=48, freq=1, eps=1e-12, act="gelu")
    cfg = RF.prefusion_config(12, 20, 5, 24, q, pos_size=40)
    sd = RF.random_prefusion(cfg, rng)
    m = qfuse.load(_write(str(tmp_path / "pf"), cfg, sd))
    assert m.kind == "prefusion"
    a = rng.standard_normal((2, 3, 12)).astype(np.float32)
    f = rng.standard_normal((2, 5, 20)).astype(np.float32)
    fm = np.ones((2, 5), np.uint8)
    fm[1, 3:] = 0
    ref = RF.prefusion_reference(sd, cfg, audio=a, face=f, face_mask=fm)
    out = m.fuse(audio=a, face=f, face_mask=fm)
    assert util.rel_err(out, ref[0]) < TOL, seed
    assert m.cross_attention_maps()[0].shape == (2, 4, 5, 8)
    # the averaged map of the last layer as a PNG: 5 queries x (5 face | 3 audio) keys, cell 4 px,
    # a white separator column after the 5 face keys
    from test_heatmap import decode_png
    png = str(tmp_path / "map.png")
    assert m.save_attention_png(png, cell_px=4) == [5]
    img = decode_png(png)
    assert img.shape == (5 * 4, 8 * 4 + 1, 3)
    assert (img[:, 5 * 4] == 255).all() and not (img[:, :5 * 4] == 255).all(axis=-1).any()
    with pytest.raises(QfuseError, match="has no vision"):
        m.vision(np.zeros((1, 3, 8, 8), np.float32))

    kcfg = RF.kvprefix_config(6, 3, 10, q, 24)
    ksd = RF.random_kvprefix(kcfg, rng)
    k = qfuse.load(_write(str(tmp_path / "kv"), kcfg, ksd))
    assert k.kind == "kv_prefix"
    enc = rng.standard_normal((2, 7, 24)).astype(np.float32)
    gfeat = rng.standard_normal((2, 10)).astype(np.float32)
    kref = RF.kvprefix_reference(ksd, kcfg, enc, gfeat)
    assert util.rel_err(k.fuse(encoder_hidden_states=enc, global_feature=gfeat), kref[0]) < TOL, seed
    assert util.rel_err(k.qformer(encoder_hidden_states=enc, global_feature=gfeat), kref[0]) < TOL, seed
    assert k.cross_attention_maps(average=True)[0].shape == (2, 6, 3 + 7)
    with pytest.raises(QfuseError, match="needs global_feature"):
        k.qformer(encoder_hidden_states=enc)


def test_load_errors(tmp_path):
    with pytest.raises(QfuseError, match="cannot read"):
        qfuse.load(str(tmp_path / "absent"))
    d = tmp_path / "bad"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "resnet"}))
    with pytest.raises(QfuseError, match="'resnet'.*not a model qfuse loads"):
        qfuse.load(str(d))
    (d / "config.json").write_text("{not json")
    with pytest.raises(QfuseError, match="not valid JSON"):
        qfuse.load(str(d))


def test_affectgpt_siblings_against_references(tmp_path):
    """qfuse.load routes the per-modality Q-Formers (face -> video branch, audio -> audio
    branch) and the attention fusion; outputs vs ref_modality's float64 references."""
    import ref_modality as RM
    rng, seed = _rng()
    q = RF.qformer_config(hidden=32, heads=4, layers=2, inter=48, freq=1, eps=1e-12, act="gelu")
    for modality, dim in (("video", 20), ("audio", 12)):
        cfg = RM.modality_config(modality, dim, 5, 24, q)
        sd = RM.random_modality(cfg, rng)
        m = qfuse.load(_write(str(tmp_path / modality), cfg, sd))
        assert m.kind == modality + "_qformer"
        x = rng.standard_normal((2, 4, dim)).astype(np.float32)
        out = m.fuse(face=x) if modality == "video" else m.fuse(audio=x)
        assert util.rel_err(out, RM.modality_reference(sd, cfg, x)[0]) < TOL, seed
        assert m.cross_attention_maps()[0].shape == (2, 4, 5, 4)
    cfg = RM.attention_config(12, 20, 5, 24)
    sd = RM.random_attention(cfg, rng)
    m = qfuse.load(_write(str(tmp_path / "att"), cfg, sd))
    a = rng.standard_normal((2, 3, 12)).astype(np.float32)
    f = rng.standard_normal((2, 5, 20)).astype(np.float32)
    assert util.rel_err(m.fuse(audio=a, face=f), RM.attention_reference(sd, cfg, a, f)[0]) < TOL, seed
    with pytest.raises(QfuseError, match="has no cross-attention"):
        m.cross_attention_maps()


def test_llm_folder_loads_as_causal_lm():
    case, io, folder = util.load_fixture("llm_qwen2")
    m = qfuse.load(folder)
    assert isinstance(m, qfuse.CausalLM)
    assert util.rel_err(m.logits(input_ids=io["input_ids"]), io["logits"]) < case["rtol_fp32"]


def test_opt_folder_loads_as_causal_lm_in_every_format():
    case, io, folder = util.load_fixture("llm_opt")
    m = qfuse.load(folder)
    assert isinstance(m, qfuse.CausalLM) and m.config["model_type"] == "opt"
    assert util.rel_err(m.logits(input_ids=io["input_ids"]), io["logits"]) < case["rtol_fp32"]
    q = qfuse.load(folder, weights="int8")
    assert q.weight_bytes < m.weight_bytes
    with pytest.raises(qfuse.QfuseError, match="weights"):
        qfuse.load(folder, weights="int3")
