"""test_qformer.py - qfuse.qformer.QFormer (src/models/qformer.c, qformer_backward.c) against
transformers and the float64 PyTorch reference ref_qformer.py.

- Fixtures tests/fixtures/qformer_{0,1} (transformers Blip2QFormerModel, PyTorch 2.11): output
  (max|out-ref|/max|ref| < 1e-4) and every "grad.<param>" relative to the largest reference
  gradient of the case (< 1e-4); ref_qformer.py itself is checked against the same fixtures
  (so it can be trusted for the rest) and gives the input gradients.
- Fresh random models (written as config.json + model.safetensors by util's independent writer)
  against ref_qformer.py: InstructBLIP text tokens with padded text, KV prefix, both at once,
  an all-padding encoder item (uniform weights, autograd's gradient), no masks; forward, every
  parameter gradient, input and prefix gradients, cross-attention maps (per head, averaged).
- LAVIS names (fixture tensors renamed), whole BLIP-2 / InstructBLIP configs (qformer_config /
  qformer.), frozen models, gradient accumulation in C, finite differences on a tiny model.
- Errors: missing/misshapen tensors, unknown model_type, ids out of range, text too long, text on
  a model without text, backward without forward, NaN inputs, Python shape checks.
"""
import ctypes
import json
import os

import numpy as np
import pytest

import qfuse
import ref_qformer as R
import util
from qfuse import QfuseError
from qfuse import _native
from qfuse._native import lib
from qfuse.qformer import QFormer

TOL = 1e-4


def _rng():
    seed = int(os.environ.get("QFUSE_TEST_SEED", "0")) or int.from_bytes(os.urandom(4), "little")
    return np.random.default_rng(seed), seed


def _grad_err(got, ref, names):
    """max over names of max|g - ref| / (max over names of max|ref|), and the worst name."""
    scale = max(float(np.max(np.abs(ref[n]))) for n in names)
    worst = max((float(np.max(np.abs(np.asarray(got[n], np.float64) - ref[n]))) / scale, n) for n in names)
    return worst


def _lavis_name(name):
    """transformers Q-Former name -> LAVIS BertModel name (what a LAVIS checkpoint stores)."""
    name = name.replace("attention.attention.", "attention.self.")
    name = name.replace("embeddings.layernorm.", "embeddings.LayerNorm.")
    if name.startswith("layernorm."):
        name = "embeddings.LayerNorm." + name[len("layernorm."):]
    return "bert." + name


def _as_file_names(d, lavis):
    """Reference gradients keyed as the model reports them: the checkpoint's own names."""
    inputs = ("query_embeds", "encoder_hidden_states", "prefix_k", "prefix_v")
    return {(_lavis_name(k) if lavis and k not in inputs else k): v for k, v in d.items()}


def _write_model(folder, cfg, sd, model_type="blip_2_qformer", lavis=False, whole=None):
    """config.json + model.safetensors for a state dict with transformers names."""
    os.makedirs(folder, exist_ok=True)
    c = dict(cfg, model_type=model_type, position_embedding_type="absolute")
    tensors = {(_lavis_name(k) if lavis else k): np.asarray(v, np.float32) for k, v in sd.items()}
    if whole:
        c = {"model_type": whole, "qformer_config": c}
        tensors = {"qformer." + k: v for k, v in tensors.items()}
        tensors["language_projection.weight"] = np.zeros((3, 2), np.float32)  # ignored
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(c, f)
    util.write_safetensors(os.path.join(folder, "model.safetensors"), tensors)
    return folder


# ---- fixtures (transformers) ------------------------------------------------------------------

@pytest.mark.parametrize("name", util.fixture_names("qformer_"))
def test_fixture(name):
    case, io, folder = util.load_fixture(name)
    qf = QFormer.load(folder)
    args = (io["query_embeds"], io["encoder_hidden_states"], io["encoder_attention_mask"])
    out = qf.forward(*args)
    assert util.rel_err(out, io["last_hidden_state"]) < case["rtol_fp32"]
    g = qf.backward(io["grad_out"])
    refs = {k[5:]: v.astype(np.float64) for k, v in io.items() if k.startswith("grad.")}
    assert set(refs) == set(qf.params()), "parameter names differ from transformers'"
    err, worst = _grad_err(g, refs, list(refs))
    assert err < TOL, (name, worst, err)
    for k in refs:  # big tensors also per tensor
        if refs[k].size >= 1024:
            assert util.rel_err(g[k], refs[k]) < 1e-3, (name, k)
    # the reference agrees with transformers (so the random tests below can trust it) ...
    cfg = R.config_from_json(os.path.join(folder, "config.json"))
    sd = util.read_safetensors(os.path.join(folder, "model.safetensors"))
    rout, rg, _ = R.reference(sd, cfg, *args, grad_out=io["grad_out"])
    assert util.rel_err(rout, io["last_hidden_state"]) < 1e-6
    assert _grad_err(rg, refs, list(refs))[0] < 1e-6
    # ... and gives the input gradients
    for k in ("query_embeds", "encoder_hidden_states"):
        assert util.rel_err(g[k], rg[k]) < TOL, (name, k)


def test_fixture_lavis_names_and_whole_config(tmp_path):
    case, io, folder = util.load_fixture("qformer_0")
    cfg = R.config_from_json(os.path.join(folder, "config.json"))
    sd = util.read_safetensors(os.path.join(folder, "model.safetensors"))
    args = (io["query_embeds"], io["encoder_hidden_states"], io["encoder_attention_mask"])
    for kw in (dict(lavis=True), dict(whole="blip-2"), dict(lavis=True, whole="blip-2")):
        qf = QFormer.load(_write_model(str(tmp_path / str(len(os.listdir(tmp_path)))), cfg, sd, **kw))
        assert util.rel_err(qf.forward(*args), io["last_hidden_state"]) < case["rtol_fp32"], kw
        g = qf.backward(io["grad_out"])
        lavis = kw.get("lavis", False)
        # the checkpoint's own names
        assert ("bert.encoder.layer.0.attention.self.query.weight" if lavis else
                "encoder.layer.0.attention.attention.query.weight") in g
        refs = _as_file_names({k[5:]: v.astype(np.float64) for k, v in io.items() if k.startswith("grad.")}, lavis)
        assert _grad_err(g, refs, list(refs))[0] < TOL, kw
        p = _native.qf_param()   # find_param takes the transformers name too
        assert lib.qf_qformer_find_param(qf._h, b"encoder.layer.0.attention.attention.query.weight",
                                         ctypes.byref(p)) == 0


# ---- random models vs ref_qformer.py ----------------------------------------------------------

CASES = {
    # name: (has_text, Lt, P, freq, act, enc_mask kind)
    "text": (True, 5, 0, 2, "gelu", "pad"),
    "prefix": (False, 0, 3, 2, "gelu", "pad_allpad"),
    "text_prefix": (True, 4, 2, 1, "gelu_new", "pad"),
    "dead_item": (False, 0, 0, 1, "gelu", "pad_allpad"),
    "dead_item_text": (True, 3, 0, 2, "gelu_pytorch_tanh", "pad_allpad"),
    "no_masks": (True, 3, 0, 2, "gelu", None),
}


def _random_case(rng, has_text, Lt, P, freq, act, mask_kind, B=3, Lq=4, S=7):
    cfg = dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, intermediate_size=48,
               cross_attention_frequency=freq, encoder_hidden_size=24, layer_norm_eps=1e-12,
               hidden_act=act, vocab_size=50, max_position_embeddings=16, pad_token_id=0)
    sd = R.random_state_dict(cfg, rng, has_text=has_text, scale=0.15)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    inp = dict(query_embeds=f32(B, Lq, 32), encoder_hidden_states=f32(B, S, 24))
    if mask_kind:
        m = np.ones((B, S), np.int32)
        m[1, S - 3:] = 0
        if mask_kind == "pad_allpad":
            m[2, :] = 0
        inp["encoder_attention_mask"] = m
    if Lt:
        ids = rng.integers(0, 50, (B, Lt)).astype(np.int32)
        ids[0, -1] = 0  # the padding id: its embedding row gets no gradient
        inp["text_ids"] = ids
        if mask_kind:
            tm = np.ones((B, Lt), np.int32)
            tm[0, -1] = 0
            tm[2, -2:] = 0
            inp["text_attention_mask"] = tm
    if P:
        inp["prefix_k"] = f32(B, P, 32)
        inp["prefix_v"] = f32(B, P, 32)
    return cfg, sd, inp, f32(B, Lq + Lt, 32)


def _qf_forward(qf, inp):
    return qf.forward(inp["query_embeds"], inp["encoder_hidden_states"], inp.get("encoder_attention_mask"),
                      qformer_input_ids=inp.get("text_ids"), qformer_attention_mask=inp.get("text_attention_mask"),
                      prefix_k=inp.get("prefix_k"), prefix_v=inp.get("prefix_v"))


@pytest.mark.parametrize("case", sorted(CASES))
def test_random_vs_reference(tmp_path, case):
    rng, seed = _rng()
    has_text, Lt, P, freq, act, mk = CASES[case]
    cfg, sd, inp, gout = _random_case(rng, has_text, Lt, P, freq, act, mk)
    mt = "instructblip_qformer" if has_text else "blip_2_qformer"
    qf = QFormer.load(_write_model(str(tmp_path / "m"), cfg, sd, model_type=mt))
    assert qf.has_text == has_text
    out = _qf_forward(qf, inp)
    rout, rg, rprobs = R.reference(sd, cfg, grad_out=gout, **inp)
    assert util.rel_err(out, rout) < TOL, (case, seed)
    # cross-attention maps, per head and averaged
    maps, avg = qf.cross_attention_maps(), qf.cross_attention_maps(average=True)
    assert len(maps) == len(rprobs) == len(range(0, 3, freq))
    for mp, av, rp in zip(maps, avg, rprobs):
        assert util.rel_err(mp, rp) < TOL, (case, seed)
        assert util.rel_err(av, rp.mean(axis=1)) < TOL, (case, seed)
    g = qf.backward(gout)
    names = list(sd)
    err, worst = _grad_err(g, rg, names)
    assert err < TOL, (case, seed, worst, err)
    if has_text:
        assert np.all(g["embeddings.word_embeddings.weight"][0] == 0)  # padding_idx row
        assert np.any(rg["embeddings.word_embeddings.weight"][1:] != 0)
    ins = ["query_embeds", "encoder_hidden_states"] + (["prefix_k", "prefix_v"] if P else [])
    for k in ins:
        assert util.rel_err(g[k], rg[k]) < TOL, (case, seed, k)
    if util.QUICK:
        return
    # the same through the scalar kernels
    qfuse.set_isa("scalar")
    out2 = _qf_forward(qf, inp)
    assert util.rel_err(out2, rout) < TOL, (case, seed, "scalar")
    g2 = qf.backward(gout)
    assert _grad_err(g2, rg, names)[0] < TOL, (case, seed, "scalar")


def test_lavis_text_and_instructblip_whole(tmp_path):
    rng, seed = _rng()
    cfg, sd, inp, gout = _random_case(rng, True, 4, 2, 2, "gelu", "pad")
    rout, rg, _ = R.reference(sd, cfg, grad_out=gout, **inp)
    for i, kw in enumerate((dict(lavis=True), dict(whole="instructblip"))):
        qf = QFormer.load(_write_model(str(tmp_path / str(i)), cfg, sd, **kw))
        assert util.rel_err(_qf_forward(qf, inp), rout) < TOL, (kw, seed)
        g = qf.backward(gout)
        lavis = kw.get("lavis", False)
        names = [_lavis_name(k) if lavis else k for k in sd]
        assert _grad_err(g, _as_file_names(rg, lavis), names)[0] < TOL, (kw, seed)


def test_lavis_affectgpt_style(tmp_path):
    """LAVIS checkpoint without word/position embeddings and text FFN (AffectGPT's multi_Qformer),
    under a tensor prefix: query path, cross-attention every layer."""
    rng, seed = _rng()
    cfg, sd, inp, gout = _random_case(rng, False, 0, 0, 1, "gelu", "pad")
    folder = _write_model(str(tmp_path / "m"), cfg, sd, lavis=True)
    qf = QFormer.load(folder)
    rout, rg, _ = R.reference(sd, cfg, grad_out=gout, **inp)
    assert util.rel_err(_qf_forward(qf, inp), rout) < TOL
    assert not qf.has_text
    assert sorted(qf.params()) == sorted(_lavis_name(k) for k in sd)


def test_frozen_and_accumulation(tmp_path):
    rng, seed = _rng()
    cfg, sd, inp, gout = _random_case(rng, True, 3, 2, 2, "gelu", "pad")
    qf = QFormer.load(_write_model(str(tmp_path / "m"), cfg, sd, model_type="instructblip_qformer"))
    _qf_forward(qf, inp)
    g = qf.backward(gout)
    qf.set_frozen(True)
    gf = qf.backward(gout)
    assert set(gf) == {"query_embeds", "encoder_hidden_states", "prefix_k", "prefix_v"}
    for k in gf:
        assert np.array_equal(gf[k], g[k]), k
    qf.set_frozen(False)
    # C accumulates parameter gradients across backward calls (qf_qformer_zero_grad resets)
    B, Lq = inp["query_embeds"].shape[:2]
    go = np.ascontiguousarray(gout)
    qf.zero_grad()
    for _ in range(2):
        assert lib.qf_qformer_backward(qf._h, go.ctypes.data, None, None, None, None) == 0
    p = qfuse._native.qf_param()
    name = "encoder.layer.0.crossattention.attention.value.weight"
    assert lib.qf_qformer_find_param(qf._h, name.encode(), ctypes.byref(p)) == 0
    acc = np.ctypeslib.as_array(p.grad, shape=(p.shape[0], p.shape[1]))
    np.testing.assert_allclose(acc, 2 * g[name], rtol=1e-5, atol=1e-6 * np.abs(g[name]).max())
    assert lib.qf_qformer_find_param(qf._h, b"nope.weight", ctypes.byref(p)) != 0
    assert "nope.weight" in qfuse._native.last_error()


def test_finite_differences(tmp_path):
    """Central differences in float32 on a tiny model: sampled parameter entries (perturbed in
    place through qf_qformer_find_param's data view) and input entries."""
    rng, seed = _rng()
    cfg = dict(num_hidden_layers=2, hidden_size=8, num_attention_heads=2, intermediate_size=12,
               cross_attention_frequency=1, encoder_hidden_size=6, layer_norm_eps=1e-5,
               hidden_act="gelu", vocab_size=10, max_position_embeddings=8, pad_token_id=0)
    sd = R.random_state_dict(cfg, rng, has_text=True, scale=0.4)
    qf = QFormer.load(_write_model(str(tmp_path / "m"), cfg, sd, model_type="instructblip_qformer"))
    B, Lq, S, Lt, P = 2, 3, 4, 2, 2
    inp = dict(query_embeds=rng.standard_normal((B, Lq, 8)), encoder_hidden_states=rng.standard_normal((B, S, 6)),
               encoder_attention_mask=np.array([[1, 1, 1, 0], [1, 1, 1, 1]]),
               text_ids=np.array([[3, 4], [5, 0]], np.int32), text_attention_mask=np.array([[1, 1], [1, 0]]),
               prefix_k=rng.standard_normal((B, P, 8)), prefix_v=rng.standard_normal((B, P, 8)))
    gout = rng.standard_normal((B, Lq + Lt, 8))
    loss = lambda: float(np.sum(_qf_forward(qf, inp).astype(np.float64) * gout))  # noqa: E731
    loss()
    g = qf.backward(gout)
    h = 1e-2
    checked = 0
    for name in ("encoder.layer.0.attention.attention.key.weight", "encoder.layer.1.crossattention.attention.query.weight",
                 "encoder.layer.0.intermediate.dense.weight", "embeddings.position_embeddings.weight",
                 "encoder.layer.1.output_query.LayerNorm.weight"):
        p = qfuse._native.qf_param()
        assert lib.qf_qformer_find_param(qf._h, name.encode(), ctypes.byref(p)) == 0
        n = int(np.prod([p.shape[i] for i in range(p.ndim)]))
        for idx in rng.choice(n, 3, replace=False):
            old = p.data[idx]
            p.data[idx] = old + h
            lp = loss()
            p.data[idx] = old - h
            lm = loss()
            p.data[idx] = old
            fd = (lp - lm) / (2 * h)
            an = g[name].reshape(-1)[idx]
            assert abs(fd - an) < 2e-2 * (1 + abs(an)), (name, idx, fd, an, seed)
            checked += 1
    for key in ("query_embeds", "encoder_hidden_states", "prefix_k", "prefix_v"):
        arr = inp[key]
        for idx in rng.choice(arr.size, 3, replace=False):
            old = arr.flat[idx]
            arr.flat[idx] = old + h
            lp = loss()
            arr.flat[idx] = old - h
            lm = loss()
            arr.flat[idx] = old
            fd = (lp - lm) / (2 * h)
            an = g[key].reshape(-1)[idx]
            assert abs(fd - an) < 2e-2 * (1 + abs(an)), (key, idx, fd, an, seed)
            checked += 1
    assert checked == 27


# ---- errors -----------------------------------------------------------------------------------

def _small(tmp_path, has_text=True, **over):
    rng = np.random.default_rng(1)
    cfg = dict(num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=24,
               cross_attention_frequency=2, encoder_hidden_size=12, layer_norm_eps=1e-12,
               hidden_act="gelu", vocab_size=20, max_position_embeddings=6, pad_token_id=0)
    cfg.update(over)
    return cfg, R.random_state_dict(cfg, rng, has_text=has_text)


def _load_err(folder):
    with pytest.raises(QfuseError) as e:
        QFormer.load(folder)
    return e.value


def test_load_errors(tmp_path):
    cfg, sd = _small(tmp_path, has_text=False)
    d = dict(sd)
    del d["encoder.layer.1.output_query.dense.bias"]
    e = _load_err(_write_model(str(tmp_path / "a"), cfg, d))
    assert e.status == "QF_ERR_NOT_FOUND" and "encoder.layer.1.output_query.dense.bias" in e.message
    d = dict(sd)
    d["encoder.layer.0.crossattention.attention.key.weight"] = np.zeros((16, 13))
    e = _load_err(_write_model(str(tmp_path / "b"), cfg, d))
    assert e.status == "QF_ERR_SHAPE" and "encoder.layer.0.crossattention.attention.key.weight" in e.message
    e = _load_err(_write_model(str(tmp_path / "c"), cfg, sd, model_type="bert"))
    assert e.status == "QF_ERR_UNSUPPORTED" and '"bert"' in e.message and "model_type" in e.message
    e = _load_err(_write_model(str(tmp_path / "d"), dict(cfg, hidden_act="relu"), sd))
    assert e.status == "QF_ERR_UNSUPPORTED" and "hidden_act" in e.message
    cfgt, sdt = _small(tmp_path)
    d = dict(sdt)
    del d["embeddings.position_embeddings.weight"]
    e = _load_err(_write_model(str(tmp_path / "e"), cfgt, d))
    assert e.status == "QF_ERR_NOT_FOUND" and "position_embeddings" in e.message
    e = _load_err(_write_model(str(tmp_path / "f"), dict(cfgt, vocab_size=21), sdt))
    assert e.status == "QF_ERR_SHAPE" and "vocab_size" in e.message
    d = dict(sdt)
    del d["encoder.layer.1.intermediate.dense.weight"]
    e = _load_err(_write_model(str(tmp_path / "g"), cfgt, d))
    assert e.status == "QF_ERR_NOT_FOUND" and "encoder.layer.1.intermediate.dense.weight" in e.message


def _args_struct(B, Lq, S, Lt=0, ids=None):
    from qfuse.qformer import qf_qformer_args
    a = qf_qformer_args(B=B, num_queries=Lq, encoder_len=S, text_len=Lt)
    if ids is not None:
        a.text_ids = ids.ctypes.data
    return a


def test_forward_errors(tmp_path):
    cfg, sd = _small(tmp_path)
    qf = QFormer.load(_write_model(str(tmp_path / "t"), cfg, sd, model_type="instructblip_qformer"))
    q = np.zeros((2, 3, 16), np.float32)
    enc = np.ones((2, 5, 12), np.float32)
    # backward without forward
    with pytest.raises(QfuseError, match="no successful forward"):
        qf.backward(np.zeros((2, 3, 16)))
    g = np.zeros((2, 3, 16), np.float32)
    assert lib.qf_qformer_backward(qf._h, g.ctypes.data, None, None, None, None) == 1
    assert "no successful qf_qformer_forward" in qfuse._native.last_error()
    # ids out of range: Python and C both name the index
    ids = np.array([[1, 2], [3, 20]], np.int32)
    with pytest.raises(QfuseError, match=r"qformer_input_ids\[1\]\[1\] = 20 is out of range \[0, 20\)"):
        qf.forward(q, enc, qformer_input_ids=ids)
    out = np.empty((2, 5, 16), np.float32)
    a = _args_struct(2, 3, 5, 2, ids)
    assert lib.qf_qformer_forward(qf._h, ctypes.byref(a), q.ctypes.data, enc.ctypes.data, out.ctypes.data) == 1
    assert "text_ids[1][1] = 20 is out of range [0, 20)" in qfuse._native.last_error()
    ids[1, 1] = -1
    assert lib.qf_qformer_forward(qf._h, ctypes.byref(a), q.ctypes.data, enc.ctypes.data, out.ctypes.data) == 1
    assert "text_ids[1][1] = -1" in qfuse._native.last_error()
    # text longer than max_position_embeddings (6)
    ids7 = np.ones((2, 7), np.int32)
    a = _args_struct(2, 3, 5, 7, ids7)
    out7 = np.empty((2, 10, 16), np.float32)
    assert lib.qf_qformer_forward(qf._h, ctypes.byref(a), q.ctypes.data, enc.ctypes.data, out7.ctypes.data) == 1
    assert "text_len = 7 exceeds max_position_embeddings = 6" in qfuse._native.last_error()
    # NaN inputs
    qn = q.copy()
    qn[1, 2, 3] = np.nan
    with pytest.raises(QfuseError, match=r"query_embeds\[") as e:
        qf.forward(qn, enc)
    assert e.value.status == "QF_ERR_NONFINITE"
    en = enc.copy()
    en[0, 0, 0] = np.inf
    with pytest.raises(QfuseError, match="encoder_hidden_states"):
        qf.forward(q, en)
    # a failed forward leaves no forward to differentiate
    with pytest.raises(QfuseError, match="no successful forward"):
        qf.backward(np.zeros((2, 3, 16)))
    # Python shape checks
    with pytest.raises(QfuseError, match=r"encoder_hidden_states has shape \[2,5,11\]; expected \[2, S, 12\]"):
        qf.forward(q, np.zeros((2, 5, 11)))
    with pytest.raises(QfuseError, match=r"query_embeds has shape \[2,3,15\]"):
        qf.forward(np.zeros((2, 3, 15)), enc)
    with pytest.raises(QfuseError, match=r"encoder_attention_mask has shape \[2,4\]; expected \[2,5\]"):
        qf.forward(q, enc, np.ones((2, 4)))
    with pytest.raises(QfuseError, match="encoder_attention_mask has dtype <U1"):
        qf.forward(q, enc, np.full((2, 5), "a"))
    with pytest.raises(QfuseError, match=r"qformer_attention_mask has shape \[2,3\]; expected \[2,2\]"):
        qf.forward(q, enc, qformer_input_ids=np.ones((2, 2), np.int64), qformer_attention_mask=np.ones((2, 3)))
    with pytest.raises(QfuseError, match=r"prefix_k has shape \[2,2,8\]"):
        qf.forward(q, enc, prefix_k=np.zeros((2, 2, 8)), prefix_v=np.zeros((2, 2, 8)))
    with pytest.raises(QfuseError, match="prefix_v has shape"):
        qf.forward(q, enc, prefix_k=np.zeros((2, 2, 16)), prefix_v=np.zeros((2, 3, 16)))
    with pytest.raises(QfuseError, match="together"):
        qf.forward(q, enc, prefix_k=np.zeros((2, 2, 16)))
    qf.forward(q, enc)
    with pytest.raises(QfuseError, match=r"grad_out has shape \[2,4,16\]; the output is \[2,3,16\]"):
        qf.backward(np.zeros((2, 4, 16)))
    with pytest.raises(QfuseError, match="out of range"):
        lib_w = np.empty((2, 3, 5), np.float32)
        qfuse._native.check(lib.qf_qformer_cross_attention(qf._h, 1, 1, lib_w.ctypes.data))
    # text on a model without text
    cfg2, sd2 = _small(tmp_path, has_text=False)
    qf2 = QFormer.load(_write_model(str(tmp_path / "n"), cfg2, sd2))
    with pytest.raises(QfuseError, match="no word/position embeddings"):
        qf2.forward(q, enc, qformer_input_ids=np.ones((2, 2), np.int32))
    a = _args_struct(2, 3, 5, 2, np.ones((2, 2), np.int32))
    ids_keep = np.ones((2, 2), np.int32)
    a.text_ids = ids_keep.ctypes.data
    assert lib.qf_qformer_forward(qf2._h, ctypes.byref(a), q.ctypes.data, enc.ctypes.data, out.ctypes.data) == 1
    assert "text_len = 2 but this Q-Former has no word/position embeddings" in qfuse._native.last_error()
    qf.close()
    with pytest.raises(QfuseError, match="closed"):
        qf.forward(q, enc)
