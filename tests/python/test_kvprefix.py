"""test_kvprefix.py - qfuse.fusion.KVPrefix (src/models/kvprefix.c, BLIP-2 Q-Former with KV-prefix
modulation) against the float64 PyTorch reference ref_fusion.kvprefix_reference (built on
ref_qformer.py), on fresh random weights and inputs drawn at test time.

- Forward (rel err < 1e-4) and every gradient (each parameter, encoder_hidden_states,
  global_feature, query_embeds; error relative to the case's largest reference gradient,
  < 1e-4): with and without an encoder mask (uneven real lengths per item), the model's own
  query tokens and caller query_embeds, cross-attention every layer and every other layer.
- The prefix really acts: zeroing k_proj/v_proj and prefix tokens differs from the plain
  Q-Former; cross-attention maps [B,heads,nq,P+S] (prefix first) match the reference's.
- language_projection through project(); LAVIS-named Q-Former tensors load too; an item with
  every encoder token padded attends to its prefix only.
- Errors: width mismatches, mask length, missing tensors, unknown model_type.
"""
import json
import os

import numpy as np
import pytest

import ref_fusion as RF
import util
from qfuse import QfuseError
from qfuse.fusion import KVPrefix

TOL = 1e-4


def _rng():
    seed = int(os.environ.get("QFUSE_TEST_SEED", "0")) or int.from_bytes(os.urandom(4), "little")
    return np.random.default_rng(seed), seed


def _cfg(layers=2, freq=1, nq=6, P=3, feat=10, enc=24):
    q = RF.qformer_config(hidden=32, heads=4, layers=layers, inter=40, freq=freq, eps=1e-12, act="gelu")
    return RF.kvprefix_config(nq, P, feat, q, enc)


def _write(folder, cfg, sd, lavis=False, drop=None):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    t = {(RF.to_lavis(k, RF.QPRE_KV) if lavis else k): np.asarray(v, np.float32)
         for k, v in sd.items() if k != drop}
    util.write_safetensors(os.path.join(folder, "model.safetensors"), t)
    return folder


def _inputs(rng, cfg, B, S, masked, own_queries):
    enc = rng.standard_normal((B, S, cfg["qformer_config"]["encoder_hidden_size"])).astype(np.float32)
    g = rng.standard_normal((B, cfg["prefix_feature_dim"])).astype(np.float32)
    q = None
    if not own_queries:
        q = rng.standard_normal((B, 4, cfg["qformer_config"]["hidden_size"])).astype(np.float32)
    mask = None
    if masked:
        mask = np.zeros((B, S), bool)
        for b in range(B):
            mask[b, :rng.integers(1, S + 1)] = True
    return enc, g, q, mask


def _check(m, sd, cfg, enc, g, q, mask, rng, seed):
    out = m.fuse(encoder_hidden_states=enc, global_feature=g, query_embeds=q, encoder_attention_mask=mask)
    go = rng.standard_normal(out.shape)
    ref, rg, probs = RF.kvprefix_reference(sd, cfg, enc, g, q, mask, grad_out=go)
    e = util.rel_err(out, ref)
    assert e < TOL, "forward rel err %.3g (seed %d)" % (e, seed)
    got = m.backward(go.astype(np.float32))
    # a LAVIS checkpoint reports LAVIS names (its own); the reference speaks transformers names
    got = {RF.from_lavis(k, RF.QPRE_KV): v for k, v in got.items()}
    if q is None:
        rg = dict(rg)
        # the model's own queries: "query_embeds" is the gradient w.r.t. the broadcast tokens
        assert util.rel_err(got["query_embeds"].sum(axis=0, keepdims=True), rg["query_tokens"]) < TOL
    scale = max(float(np.max(np.abs(v))) for v in rg.values())
    assert set(rg) - set(got) <= {"language_projection.weight", "language_projection.bias"}
    worst = 0.0
    for k, v in rg.items():
        if k.startswith("language_projection."):
            continue
        d = float(np.max(np.abs(np.asarray(got[k], np.float64) - v))) / scale
        worst = max(worst, d)
        assert d < TOL, "grad %s err %.3g of the largest gradient (seed %d)" % (k, d, seed)
        # each tensor on its own scale too, so a small gradient cannot hide behind a large one
        own = float(np.max(np.abs(v))) if v.size else 0.0
        if own > 1e-3 * scale:
            r = util.rel_err(got[k], v)
            assert r < 1e-3, "grad %s rel err %.3g on its own scale (seed %d)" % (k, r, seed)
    maps = m.cross_attention_maps()
    assert len(maps) == len(probs)
    for mp, p in zip(maps, probs):
        assert mp.shape == p.shape and util.rel_err(mp, p) < TOL
    return e, worst


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("own_queries", [True, False])
@pytest.mark.parametrize("freq", [1, 2])
def test_against_reference(tmp_path, masked, own_queries, freq):
    rng, seed = _rng()
    cfg = _cfg(layers=3 if freq == 2 else 2, freq=freq)
    sd = RF.random_kvprefix(cfg, rng)
    m = KVPrefix.load(_write(str(tmp_path / "m"), cfg, sd))
    enc, g, q, mask = _inputs(rng, cfg, 3, 7, masked, own_queries)
    _check(m, sd, cfg, enc, g, q, mask, rng, seed)
    enc, g, q, mask = _inputs(rng, cfg, 2, 11, masked, own_queries)    # other shapes
    _check(m, sd, cfg, enc, g, q, mask, rng, seed)


def test_prefix_acts_and_projection(tmp_path):
    rng, seed = _rng()
    cfg = _cfg()
    sd = RF.random_kvprefix(cfg, rng, projection_dim=9)
    m = KVPrefix.load(_write(str(tmp_path / "m"), cfg, sd, lavis=True))
    enc, g, _, mask = _inputs(rng, cfg, 2, 5, True, True)
    _check(m, sd, cfg, enc, g, None, mask, rng, seed)
    out = m.fuse(encoder_hidden_states=enc, global_feature=g, encoder_attention_mask=mask)
    plain = m.qformer(encoder_hidden_states=enc, encoder_attention_mask=mask)
    assert util.rel_err(out, plain) > 1e-3            # the prefix changes the output
    proj = m.project(out)
    ref = out.astype(np.float64) @ sd["language_projection.weight"].T + sd["language_projection.bias"]
    assert proj.shape == (2, cfg["num_query_tokens"], 9) and util.rel_err(proj, ref) < TOL
    # its backward vs torch autograd (float64)
    t = util.torch()
    go = rng.standard_normal(proj.shape)
    xt = t.tensor(out.astype(np.float64), requires_grad=True)
    wt = t.tensor(sd["language_projection.weight"].astype(np.float64), requires_grad=True)
    bt = t.tensor(sd["language_projection.bias"].astype(np.float64), requires_grad=True)
    (t.nn.functional.linear(xt, wt, bt) * t.tensor(go)).sum().backward()
    gx, gp = m.project_backward(out, go.astype(np.float32))
    assert util.rel_err(gx, xt.grad.numpy()) < TOL
    assert util.rel_err(gp["language_projection.weight"], wt.grad.numpy()) < TOL
    assert util.rel_err(gp["language_projection.bias"], bt.grad.numpy()) < TOL
    # a prefix whose keys and values are all zero rows still takes attention mass: the output
    # differs from the plain Q-Former, and matches the reference
    sd0 = dict(sd)
    for k in ("kv_prefix.k_proj.weight", "kv_prefix.k_proj.bias"):
        sd0[k] = np.zeros_like(sd[k])
    m0 = KVPrefix.load(_write(str(tmp_path / "z"), cfg, sd0))
    _check(m0, sd0, cfg, enc, g, None, mask, rng, seed)
    # an item whose encoder tokens are all padding still attends to its prefix
    mask[1, :] = False
    _check(m, sd, cfg, enc, g, None, mask, rng, seed)


def _err(fn, status, *words):
    with pytest.raises(QfuseError) as ei:
        fn()
    assert ei.value.status == status, (ei.value.status, ei.value.message)
    for w in words:
        assert w in ei.value.message, (w, ei.value.message)


def test_errors(tmp_path):
    rng, _ = _rng()
    cfg = _cfg()
    sd = RF.random_kvprefix(cfg, rng)
    m = KVPrefix.load(_write(str(tmp_path / "ok"), cfg, sd))
    enc, g, _, mask = _inputs(rng, cfg, 2, 5, True, True)
    _err(lambda: m.fuse(encoder_hidden_states=enc[..., :-1], global_feature=g), "QF_ERR_SHAPE",
         "encoder_hidden_size = 24")
    _err(lambda: m.fuse(encoder_hidden_states=enc, global_feature=g[:, :-1]), "QF_ERR_SHAPE",
         "prefix_feature_dim")
    _err(lambda: m.fuse(encoder_hidden_states=enc, global_feature=g, encoder_attention_mask=mask[:, :4]),
         "QF_ERR_SHAPE", "encoder_attention_mask")
    _err(lambda: m.fuse(encoder_hidden_states=enc, global_feature=g,
                        query_embeds=np.zeros((2, 3, 31), np.float32)), "QF_ERR_SHAPE", "query_embeds")
    _err(lambda: m.fuse(encoder_hidden_states=enc), "QF_ERR_ARG", "global_feature")
    _err(lambda: m.backward(np.zeros((2, 6, 32))), "QF_ERR_ARG", "no fuse")
    _err(lambda: m.project(np.zeros((2, 32))), "QF_ERR_NOT_FOUND", "language_projection")
    for drop in ("kv_prefix.k_proj.bias", "kv_prefix.prefix_tokens", "query_tokens",
                 "qformer.encoder.layer.0.crossattention.attention.value.weight"):
        _err(lambda: KVPrefix.load(_write(str(tmp_path / drop), cfg, sd, drop=drop)), "QF_ERR_NOT_FOUND", drop)
    bad = dict(sd)
    bad["kv_prefix.feature_proj.0.weight"] = np.zeros((10, 11))
    _err(lambda: KVPrefix.load(_write(str(tmp_path / "shape"), cfg, bad)), "QF_ERR_SHAPE", "feature_proj.0.weight")
    _err(lambda: KVPrefix.load(_write(str(tmp_path / "mt"), dict(cfg, model_type="blip-2"), sd)),
         "QF_ERR_UNSUPPORTED", "blip2_kv_prefix")
    c = dict(cfg)
    del c["num_prefix_tokens"]
    _err(lambda: KVPrefix.load(_write(str(tmp_path / "nokey"), c, sd)), "QF_ERR_NOT_FOUND", "num_prefix_tokens")
