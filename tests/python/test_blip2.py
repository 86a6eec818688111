"""test_blip2.py - qfuse.blip2.Blip2 (src/models/vision.c, blip2.c; the Q-Former of qformer.c)
against transformers' outputs and a float64 PyTorch reference written here.

- Fixtures (transformers 5.17, PyTorch 2.11): blip2_opt_0 vision last_hidden_state, Q-Former
  last_hidden_state and language projection; instructblip_llama_0 vision last_hidden_state, and its
  Q-Former output / projection from tests/fixtures/instructblip_llama_0/extra.safetensors when that
  file exists (made later on the GPU machine; the test skips without it). Error measure:
  max|out - ref| / max|ref| < 1e-4.
- vision_ref below is Blip2VisionModel written from transformers' modeling_blip_2.py in torch
  1.13 float64 (conv2d patch embedding, fused qkv with its stored [3H] bias, erf GELU, pre-LN
  layers, post_layernorm). It is first checked against the fixture's vision output, then used
  for backward: every vision parameter gradient and grad pixel_values on the fixture weights with
  fresh random pixels and grad_out, each within 1e-4 of the case's largest gradient; plus a
  central finite-difference spot check of qfuse's own float32 forward.
- The whole fuse (vision -> Q-Former -> projection) and its backward against vision_ref composed
  with ref_qformer.forward (qcore's float64 Q-Former reference), when the library has
  qf_qformer_backward; frozen groups; InstructBLIP with instruction ids.
- Loading: a sharded checkpoint (model.safetensors.index.json) equals the single file; legacy
  q_bias/v_bias checkpoints load as (q_bias, 0, v_bias).
- Errors: wrong pixel size, wrong channel count, missing tensor, misshapen tensor, unknown
  model_type, instruction text on a BLIP-2 model, backward without forward.
"""
import json
import os
import shutil

import numpy as np
import pytest

import util
from qfuse import QfuseError, _native
from qfuse.blip2 import Blip2
from qfuse.qformer import QFormer

TOL = 1e-4
HAVE_QF_BWD = _native.has("qf_qformer_backward")


def _rng():
    seed = int(os.environ.get("QFUSE_TEST_SEED", "0")) or int.from_bytes(os.urandom(4), "little")
    return np.random.default_rng(seed), seed


def _folder(name):
    return os.path.join(util.FIXTURES, name)


def _config(folder):
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)


def _weights(folder):
    return util.read_safetensors(os.path.join(folder, "model.safetensors"))


# ---- the float64 PyTorch reference of the vision tower ----------------------------------------

def vision_ref(tsd, vc, px):
    """Blip2VisionModel.last_hidden_state on torch float64 tensors: tsd maps checkpoint names
    (with "vision_model.") to tensors, vc is config.json's vision_config, px [B,C,S,S]."""
    t = util.torch()
    F = t.nn.functional
    H, nh = vc["hidden_size"], vc["num_attention_heads"]
    hd = H // nh
    eps = vc.get("layer_norm_eps", 1e-6)
    act = vc.get("hidden_act", "gelu")
    p = "vision_model."
    B = px.shape[0]
    x = F.conv2d(px, tsd[p + "embeddings.patch_embedding.weight"], tsd[p + "embeddings.patch_embedding.bias"],
                 stride=vc["patch_size"])
    x = x.flatten(2).transpose(1, 2)
    cls = tsd[p + "embeddings.class_embedding"].expand(B, 1, H)
    x = t.cat([cls, x], dim=1)
    N = x.shape[1]
    x = x + tsd[p + "embeddings.position_embedding"][:, :N, :]
    for i in range(vc["num_hidden_layers"]):
        lp = p + "encoder.layers.%d." % i

        def ln(name, v):
            return F.layer_norm(v, (H,), tsd[lp + name + ".weight"], tsd[lp + name + ".bias"], eps)
        h = ln("layer_norm1", x)
        qkv = F.linear(h, tsd[lp + "self_attn.qkv.weight"], tsd.get(lp + "self_attn.qkv.bias"))
        qkv = qkv.reshape(B, N, 3, nh, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        probs = t.softmax((q @ k.transpose(-1, -2)) * hd ** -0.5, dim=-1)
        ctx = (probs @ v).permute(0, 2, 1, 3).reshape(B, N, H)
        x = x + F.linear(ctx, tsd[lp + "self_attn.projection.weight"], tsd[lp + "self_attn.projection.bias"])
        h = ln("layer_norm2", x)
        h = F.linear(h, tsd[lp + "mlp.fc1.weight"], tsd[lp + "mlp.fc1.bias"])
        h = F.gelu(h) if act == "gelu" else F.gelu(h, approximate="tanh")
        x = x + F.linear(h, tsd[lp + "mlp.fc2.weight"], tsd[lp + "mlp.fc2.bias"])
    return F.layer_norm(x, (H,), tsd[p + "post_layernorm.weight"], tsd[p + "post_layernorm.bias"], eps)


def _tensors(sd, prefixes, grad=True):
    t = util.torch()
    return {k: t.tensor(np.asarray(v, np.float64), requires_grad=grad)
            for k, v in sd.items() if k.startswith(prefixes)}


def _grad_err(got, ref):
    """max over tensors of max|got - ref| / (largest |ref| over all tensors)."""
    scale = max(float(np.max(np.abs(r))) for r in ref.values())
    worst, where = 0.0, None
    for k, r in ref.items():
        assert k in got, "qfuse returned no gradient for %s" % k
        e = float(np.max(np.abs(np.asarray(got[k], np.float64) - r))) / scale
        if e > worst:
            worst, where = e, k
    return worst, where


# ---- forward against the fixtures -------------------------------------------------------------

def test_fixture_blip2_opt():
    case, io, folder = util.load_fixture("blip2_opt_0")
    m = Blip2.load(folder)
    assert m.num_query_tokens == case["num_query_tokens"]
    vis = m.vision(io["pixel_values"])
    assert util.rel_err(vis, io["vision_last_hidden_state"]) < TOL
    q = m.qformer(encoder_hidden_states=io["vision_last_hidden_state"])
    assert util.rel_err(q, io["qformer_last_hidden_state"]) < TOL
    # an all-ones encoder mask (what the fixture passed) is the same as none
    q1 = m.qformer(encoder_hidden_states=io["vision_last_hidden_state"],
                   encoder_attention_mask=np.ones(io["vision_last_hidden_state"].shape[:2], np.int64))
    assert util.rel_err(q1, io["qformer_last_hidden_state"]) < TOL
    tok = m.fuse(io["pixel_values"])
    assert util.rel_err(tok, io["language_projection"]) < TOL
    # the same shapes again (planned buffers reused) give the same numbers
    tok2 = m.fuse(io["pixel_values"])
    assert np.array_equal(tok, tok2)
    # one image alone equals its row of the batch
    tok1 = m.fuse(io["pixel_values"][1:2])
    assert util.rel_err(tok1[0], io["language_projection"][1]) < TOL


def test_fixture_instructblip_vision():
    _, io, folder = util.load_fixture("instructblip_llama_0")
    m = Blip2.load(folder)
    vis = m.vision(io["pixel_values"])
    assert util.rel_err(vis, io["vision_last_hidden_state"]) < TOL


def test_fixture_instructblip_qformer():
    _, io, folder = util.load_fixture("instructblip_llama_0")
    extra = os.path.join(folder, "extra.safetensors")
    if not os.path.exists(extra):
        pytest.skip("tests/fixtures/instructblip_llama_0/extra.safetensors not made yet")
    ref = util.read_safetensors(extra)
    m = Blip2.load(folder)
    ids, mask = io["qformer_input_ids"], io["qformer_attention_mask"]
    q = m.qformer(encoder_hidden_states=io["vision_last_hidden_state"], qformer_input_ids=ids,
                  qformer_attention_mask=mask)
    assert util.rel_err(q, ref["qformer_last_hidden_state"]) < TOL
    tok = m.fuse(io["pixel_values"], qformer_input_ids=ids, qformer_attention_mask=mask)
    assert util.rel_err(tok, ref["language_projection"]) < TOL


@pytest.mark.parametrize("name", ["blip2_opt_0", "instructblip_llama_0"])
def test_vision_reference_matches_fixture(name):
    """The reference used for backward reproduces transformers' vision output."""
    t = util.torch()
    _, io, folder = util.load_fixture(name)
    tsd = _tensors(_weights(folder), ("vision_model.",), grad=False)
    out = vision_ref(tsd, _config(folder)["vision_config"], t.tensor(io["pixel_values"], dtype=t.float64))
    assert util.rel_err(out.numpy(), io["vision_last_hidden_state"]) < 1e-5


# ---- vision backward ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["blip2_opt_0", "instructblip_llama_0"])
def test_vision_backward(name):
    t = util.torch()
    rng, seed = _rng()
    folder = _folder(name)
    vc = _config(folder)["vision_config"]
    m = Blip2.load(folder)
    B = 3
    px = rng.standard_normal((B, 3, vc["image_size"], vc["image_size"])).astype(np.float32)
    out = m.vision(px)
    g = rng.standard_normal(out.shape).astype(np.float32)
    got = m.vision_backward(g)

    tsd = _tensors(_weights(folder), ("vision_model.",))
    tpx = t.tensor(px, dtype=t.float64, requires_grad=True)
    ref_out = vision_ref(tsd, vc, tpx)
    assert util.rel_err(out, ref_out.detach().numpy()) < TOL, "seed %d" % seed
    ref_out.backward(t.tensor(g, dtype=t.float64))
    ref = {k: v.grad.numpy() for k, v in tsd.items()}
    ref["pixel_values"] = tpx.grad.numpy()
    assert set(got) == set(ref), set(got) ^ set(ref)
    err, where = _grad_err(got, ref)
    assert err < TOL, "%s: worst gradient %s rel err %.3g (seed %d)" % (name, where, err, seed)
    # pixel gradients alone also within 1e-4 of their own scale
    assert util.rel_err(got["pixel_values"], ref["pixel_values"]) < TOL

    # a second backward of the same forward gives the same (zeroed, then accumulated) gradients
    again = m.vision_backward(g)
    for k in ref:
        assert np.array_equal(again[k], got[k]), k

    # frozen vision: no parameter gradients, the pixel gradient unchanged
    m.set_frozen("vision", True)
    m.vision(px)
    frozen = m.vision_backward(g)
    assert set(frozen) == {"pixel_values"}
    assert np.allclose(frozen["pixel_values"], got["pixel_values"], rtol=0, atol=1e-6 * np.abs(got["pixel_values"]).max())


def test_vision_backward_each_isa():
    import qfuse
    t = util.torch()
    rng, seed = _rng()
    folder = _folder("blip2_opt_0")
    vc = _config(folder)["vision_config"]
    m = Blip2.load(folder)
    px = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    g = rng.standard_normal((2, m.num_image_tokens, m.vision_hidden_size)).astype(np.float32)
    tsd = _tensors(_weights(folder), ("vision_model.",))
    tpx = t.tensor(px, dtype=t.float64, requires_grad=True)
    ref_out = vision_ref(tsd, vc, tpx)
    ref_out.backward(t.tensor(g, dtype=t.float64))
    ref = {k: v.grad.numpy() for k, v in tsd.items()}
    ref["pixel_values"] = tpx.grad.numpy()
    for isa in ("scalar", "avx2", "avx512"):
        try:
            qfuse.set_isa(isa)
        except QfuseError:
            continue
        out = m.vision(px)
        assert util.rel_err(out, ref_out.detach().numpy()) < TOL, isa
        err, where = _grad_err(m.vision_backward(g), ref)
        assert err < TOL, "%s: %s %.3g (seed %d)" % (isa, where, err, seed)


def test_vision_finite_differences():
    """Central differences of qfuse's own float32 loss sum(vision(px) * g) at sampled pixels and
    weights agree with the analytic gradients."""
    rng, seed = _rng()
    m = Blip2.load(_folder("blip2_opt_0"))
    px = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
    g = rng.standard_normal((1, m.num_image_tokens, m.vision_hidden_size)).astype(np.float32)
    m.vision(px)
    grads = m.vision_backward(g)
    h = 1e-2

    def loss(p):
        return float(np.sum(m.vision(p).astype(np.float64) * g))
    scale = np.abs(grads["pixel_values"]).max()
    for _ in range(4 if util.QUICK else 8):
        idx = tuple(int(rng.integers(0, s)) for s in px.shape)
        a, b = px.copy(), px.copy()
        a[idx] += h
        b[idx] -= h
        fd = (loss(a) - loss(b)) / (2 * h)
        assert abs(fd - grads["pixel_values"][idx]) < 2e-2 * scale, (idx, fd, grads["pixel_values"][idx], seed)


# ---- the whole fuse and its backward -----------------------------------------------------------

def _fuse_ref(folder, px, ids=None, mask=None, grad_out=None, maps=False):
    """vision_ref -> ref_qformer.forward -> query rows -> language_projection, float64 torch.
    Returns (out numpy, {checkpoint name or "pixel_values": grad} or None), or with maps=True
    (out, [cross-attention probabilities [B,heads,nq,S] per cross layer])."""
    import ref_qformer as R
    t = util.torch()
    cfg = _config(folder)
    sd = _weights(folder)
    want = "maps" if maps else grad_out is not None
    tsd = _tensors(sd, ("vision_model.", "qformer.", "query_tokens", "language_projection."), grad=want is True)
    tpx = t.tensor(px, dtype=t.float64, requires_grad=want is True)
    vis = vision_ref(tsd, cfg["vision_config"], tpx)
    qcfg = R.config_from_json(cfg["qformer_config"])
    qsd = {k[len("qformer."):]: v for k, v in tsd.items() if k.startswith("qformer.")}
    B = px.shape[0]
    nq = cfg["num_query_tokens"]
    qe = tsd["query_tokens"].expand(B, -1, -1)
    kw = {}
    if ids is not None:
        kw = dict(text_ids=t.tensor(np.asarray(ids, np.int64)),
                  text_attention_mask=None if mask is None else t.tensor(np.asarray(mask, np.int64)))
    q, probs = R.forward(qsd, qcfg, qe, vis, **kw)
    out = t.nn.functional.linear(q[:, :nq], tsd["language_projection.weight"], tsd["language_projection.bias"])
    if want == "maps":
        return out.detach().numpy(), [p.detach().numpy() for p in probs]
    if not want:
        return out.detach().numpy(), None
    out.backward(t.tensor(grad_out, dtype=t.float64))
    grads = {k: v.grad.numpy() for k, v in tsd.items() if v.grad is not None}
    grads["pixel_values"] = tpx.grad.numpy()
    return out.detach().numpy(), grads


def test_fuse_matches_composed_reference():
    _, io, folder = util.load_fixture("blip2_opt_0")
    ref, _ = _fuse_ref(folder, io["pixel_values"])
    assert util.rel_err(ref, io["language_projection"]) < 1e-5   # the reference itself
    assert util.rel_err(Blip2.load(folder).fuse(io["pixel_values"]), ref) < TOL


def test_instructblip_fuse_vs_reference():
    _, io, folder = util.load_fixture("instructblip_llama_0")
    m = Blip2.load(folder)
    ids, mask = io["qformer_input_ids"], io["qformer_attention_mask"]
    try:
        tok = m.fuse(io["pixel_values"], qformer_input_ids=ids, qformer_attention_mask=mask)
    except QfuseError as e:
        if e.status == "QF_ERR_UNSUPPORTED":
            pytest.skip("Q-Former text path not built: %s" % e)
        raise
    ref, _ = _fuse_ref(folder, io["pixel_values"], ids, mask)
    assert util.rel_err(tok, ref) < TOL


@pytest.mark.parametrize("name", ["blip2_opt_0", "instructblip_llama_0"])
def test_cross_attention_maps(name):
    _, io, folder = util.load_fixture(name)
    m = Blip2.load(folder)
    ids = io.get("qformer_input_ids")
    mask = io.get("qformer_attention_mask")
    m.fuse(io["pixel_values"], ids, mask)
    maps = m.cross_attention_maps()
    avg = m.cross_attention_maps(average=True)
    _, ref = _fuse_ref(folder, io["pixel_values"], ids, mask, maps=True)
    assert len(maps) == len(ref) == len(avg) >= 1
    for got, a, r in zip(maps, avg, ref):
        assert got.shape == r.shape
        assert util.rel_err(got, r) < TOL
        assert util.rel_err(a, r.mean(axis=1)) < TOL
    # qformer() with explicit query embeddings (the model's own) gives the same maps
    qt = m.parameter("query_tokens")
    m.qformer(query_embeds=np.repeat(qt, 2, axis=0), encoder_hidden_states=io["vision_last_hidden_state"],
              qformer_input_ids=ids, qformer_attention_mask=mask)
    for got, r in zip(m.cross_attention_maps(), ref):
        assert util.rel_err(got, r) < TOL


@pytest.mark.skipif(not HAVE_QF_BWD, reason="library lacks qf_qformer_backward")
@pytest.mark.parametrize("name", ["blip2_opt_0", "instructblip_llama_0"])
def test_fuse_backward(name):
    rng, seed = _rng()
    _, io, folder = util.load_fixture(name)
    m = Blip2.load(folder)
    B = 2
    px = rng.standard_normal((B, 3, 32, 32)).astype(np.float32)
    ids = mask = None
    if "qformer_input_ids" in io:
        ids, mask = io["qformer_input_ids"], io["qformer_attention_mask"]
    out = m.fuse(px, ids, mask)
    g = rng.standard_normal(out.shape).astype(np.float32)
    got = m.fuse_backward(g)
    ref_out, ref = _fuse_ref(folder, px, ids, mask, grad_out=g)
    assert util.rel_err(out, ref_out) < TOL
    # parameters the loss does not reach (text-row FFN, word embeddings of unused ids) have zero
    # reference gradient; every reference gradient must be matched
    err, where = _grad_err(got, ref)
    assert err < TOL, "%s: worst gradient %s rel err %.3g (seed %d)" % (name, where, err, seed)
    assert util.rel_err(got["pixel_values"], ref["pixel_values"]) < TOL

    # frozen groups: no gradients for them; the others and the pixels unchanged
    m.set_frozen(["vision", "qformer"], True)
    m.fuse(px, ids, mask)
    part = m.fuse_backward(g)
    assert not any(k.startswith(("vision_model.", "qformer.")) for k in part)
    for k in ("query_tokens", "language_projection.weight", "language_projection.bias", "pixel_values"):
        assert util.rel_err(part[k], got[k]) < 1e-6, k
    m.set_frozen("all", True)
    m.fuse(px, ids, mask)
    assert set(m.fuse_backward(g)) == {"pixel_values"}
    m.set_frozen("all", False)
    m.fuse(px, ids, mask)
    assert util.rel_err(m.fuse_backward(g)["vision_model.embeddings.patch_embedding.weight"],
                        got["vision_model.embeddings.patch_embedding.weight"]) < 1e-6


def test_projection_backward_only():
    """With every group but the projection frozen and no pixel gradient, backward stops at the
    projection (needs no Q-Former backward): d W = sum_rows g^T q, d b = sum_rows g."""
    _, io, folder = util.load_fixture("blip2_opt_0")
    m = Blip2.load(folder)
    m.set_frozen(["vision", "qformer", "query_tokens"], True)
    out = m.fuse(io["pixel_values"])
    rng, _ = _rng()
    g = rng.standard_normal(out.shape).astype(np.float32)
    got = m.fuse_backward(g, pixel_grad=False)
    assert set(got) == {"language_projection.weight", "language_projection.bias"}
    q = io["qformer_last_hidden_state"].reshape(-1, m.qformer_hidden_size).astype(np.float64)
    gg = g.reshape(-1, m.projection_dim).astype(np.float64)
    assert util.rel_err(got["language_projection.weight"], gg.T @ q) < TOL
    assert util.rel_err(got["language_projection.bias"], gg.sum(0)) < TOL


# ---- loading variants ------------------------------------------------------------------------

def _copy_case(tmp_path, name, tensors=None, config=None):
    """A copy of a fixture folder with its tensors / config replaced."""
    src = _folder(name)
    dst = tmp_path / name
    dst.mkdir()
    cfg = _config(src) if config is None else config
    (dst / "config.json").write_text(json.dumps(cfg))
    if tensors is None:
        shutil.copy(os.path.join(src, "model.safetensors"), dst / "model.safetensors")
    else:
        util.write_safetensors(str(dst / "model.safetensors"), tensors)
    return str(dst)


def test_sharded_checkpoint(tmp_path):
    _, io, folder = util.load_fixture("blip2_opt_0")
    sd = _weights(folder)
    names = sorted(sd)
    dst = tmp_path / "sharded"
    dst.mkdir()
    shutil.copy(os.path.join(folder, "config.json"), dst / "config.json")
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    wm = {}
    for fname, keys in shards.items():
        util.write_safetensors(str(dst / fname), {k: sd[k] for k in keys})
        wm.update({k: fname for k in keys})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    m = Blip2.load(str(dst))
    assert util.rel_err(m.fuse(io["pixel_values"]), io["language_projection"]) < TOL
    # the bare Q-Former of the same sharded folder (only its tensors are gathered)
    qf, ref_qf = QFormer.load(str(dst)), QFormer.load(folder)
    rng = np.random.default_rng(3)
    H, Henc = qf.config["hidden_size"], qf.config["encoder_hidden_size"]
    qe, enc = rng.standard_normal((1, 4, H)).astype(np.float32), rng.standard_normal((1, 5, Henc)).astype(np.float32)
    np.testing.assert_array_equal(qf.forward(qe, enc), ref_qf.forward(qe, enc))
    # a shard that is missing is an I/O error naming it
    os.remove(dst / "model-00002-of-00002.safetensors")
    with pytest.raises(QfuseError) as e:
        Blip2.load(str(dst))
    assert "model-00002-of-00002.safetensors" in e.value.message


def test_legacy_q_v_bias(tmp_path):
    """Checkpoints of older transformers store self_attn.q_bias / v_bias instead of qkv.bias."""
    t = util.torch()
    _, io, folder = util.load_fixture("blip2_opt_0")
    sd = _weights(folder)
    H = _config(folder)["vision_config"]["hidden_size"]
    legacy = {}
    for k, v in sd.items():
        if k.endswith("self_attn.qkv.bias"):
            base = k[:-len("qkv.bias")]
            legacy[base + "q_bias"] = v[:H]
            legacy[base + "v_bias"] = v[2 * H:]
        else:
            legacy[k] = v
    m = Blip2.load(_copy_case(tmp_path, "blip2_opt_0", tensors=legacy))
    ref_sd = dict(sd)
    for k in sd:
        if k.endswith("self_attn.qkv.bias"):
            ref_sd[k] = np.concatenate([sd[k][:H], np.zeros(H, np.float32), sd[k][2 * H:]])
    ref = vision_ref(_tensors(ref_sd, ("vision_model.",), grad=False), _config(folder)["vision_config"],
                     t.tensor(io["pixel_values"], dtype=t.float64))
    assert util.rel_err(m.vision(io["pixel_values"]), ref.numpy()) < TOL


# ---- errors ----------------------------------------------------------------------------------

def test_error_pixel_size_and_channels():
    _, io, folder = util.load_fixture("blip2_opt_0")
    m = Blip2.load(folder)
    with pytest.raises(QfuseError) as e:
        m.fuse(np.zeros((2, 3, 48, 48), np.float32))
    assert e.value.status == "QF_ERR_SHAPE"
    assert "pixel_values has shape [2,3,48,48]" in e.value.message and "32x32" in e.value.message
    with pytest.raises(QfuseError) as e:
        m.vision(np.zeros((2, 1, 32, 32), np.float32))
    assert e.value.status == "QF_ERR_SHAPE" and "3 channels" in e.value.message
    with pytest.raises(QfuseError) as e:
        m.vision(np.zeros((3, 32, 32), np.float32))
    assert e.value.status == "QF_ERR_SHAPE" and "rank 3" in e.value.message
    with pytest.raises(QfuseError) as e:
        m.fuse(io["pixel_values"], qformer_input_ids=np.ones((2, 3), np.int32))
    assert e.value.status == "QF_ERR_ARG" and "BLIP-2" in e.value.message
    with pytest.raises(QfuseError) as e:
        m.qformer(encoder_hidden_states=np.zeros((2, 17, 40), np.float32))
    assert e.value.status == "QF_ERR_SHAPE" and "[2,17,40]" in e.value.message


def test_error_backward_without_forward():
    _, io, folder = util.load_fixture("blip2_opt_0")
    m = Blip2.load(folder)
    with pytest.raises(QfuseError) as e:
        m.fuse_backward(np.zeros((2, 8, 64), np.float32))
    assert "no fuse()" in e.value.message
    m.fuse(io["pixel_values"])
    m.vision(io["pixel_values"])      # replaces the vision state the fuse kept
    with pytest.raises(QfuseError):
        m.fuse_backward(np.zeros((2, 8, 64), np.float32))
    with pytest.raises(QfuseError) as e:
        m.vision_backward(np.zeros((2, 17, 40), np.float32))
    assert e.value.status == "QF_ERR_SHAPE"


def test_error_missing_and_misshapen_tensor(tmp_path):
    sd = _weights(_folder("blip2_opt_0"))
    gone = "vision_model.encoder.layers.1.mlp.fc1.weight"
    with pytest.raises(QfuseError) as e:
        Blip2.load(_copy_case(tmp_path, "blip2_opt_0", tensors={k: v for k, v in sd.items() if k != gone}))
    assert e.value.status == "QF_ERR_NOT_FOUND" and gone in e.value.message
    bad = dict(sd)
    bad["vision_model.embeddings.position_embedding"] = np.zeros((1, 16, 48), np.float32)
    (tmp_path / "b").mkdir()
    with pytest.raises(QfuseError) as e:
        Blip2.load(_copy_case(tmp_path / "b", "blip2_opt_0", tensors=bad))
    assert e.value.status == "QF_ERR_SHAPE" and "position_embedding" in e.value.message
    bad = {k: v for k, v in sd.items() if k != "query_tokens"}
    (tmp_path / "c").mkdir()
    with pytest.raises(QfuseError) as e:
        Blip2.load(_copy_case(tmp_path / "c", "blip2_opt_0", tensors=bad))
    assert e.value.status == "QF_ERR_NOT_FOUND" and "query_tokens" in e.value.message


def test_error_unknown_model_type(tmp_path):
    cfg = _config(_folder("blip2_opt_0"))
    cfg["model_type"] = "llava"
    with pytest.raises(QfuseError) as e:
        Blip2.load(_copy_case(tmp_path, "blip2_opt_0", config=cfg))
    assert e.value.status == "QF_ERR_UNSUPPORTED" and "\"llava\"" in e.value.message
    cfg = _config(_folder("blip2_opt_0"))
    cfg["vision_config"]["hidden_act"] = "relu"
    (tmp_path / "b").mkdir()
    with pytest.raises(QfuseError) as e:
        Blip2.load(_copy_case(tmp_path / "b", "blip2_opt_0", config=cfg))
    assert e.value.status == "QF_ERR_UNSUPPORTED" and "vision_config.hidden_act" in e.value.message
    with pytest.raises(QfuseError) as e:
        Blip2.load(str(tmp_path / "nowhere"))
    assert e.value.status == "QF_ERR_IO"
