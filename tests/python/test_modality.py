"""test_modality.py - qfuse.modality (src/models/modality_qformer.c): AffectGPT's video / audio
Q-Formers and its "attention" multi-fusion, against the float64 PyTorch references of
ref_modality.py, on fresh random weights and inputs drawn at test time (seed: QFUSE_TEST_SEED or
random, printed on failure).

- Video and audio Q-Former: forward (rel err < 1e-4) and every gradient (each parameter, the
  frames; error relative to the case's largest reference gradient < 1e-4, and each tensor on its
  own scale < 1e-3): 3-D frames with and without a frame mask, 4-D video frames (K tokens per
  frame), T = the full position table, LAVIS names (AffectGPT's) and transformers names,
  Video-LLaMA's video_llama_proj name; cross-attention maps against the reference's.
- Attention fusion: forward, modality weights, every gradient, with and without masks.
- Errors: frames beyond the position table, feature width mismatch, mask shape, missing
  tensor, model_type, encoder_hidden_size contradicting input_dim, an item without real frames.
"""
import json
import os

import numpy as np
import pytest

import ref_fusion as RF
import ref_modality as RM
import util
from qfuse import QfuseError
from qfuse.modality import AttentionFusion, ModalityQFormer

TOL = 1e-4


def _rng():
    seed = int(os.environ.get("QFUSE_TEST_SEED", "0")) or int.from_bytes(os.urandom(4), "little")
    return np.random.default_rng(seed), seed


def _qcfg():
    return RF.qformer_config(hidden=32, heads=4, layers=2, inter=48, freq=1, eps=1e-12, act="gelu")


def _write(folder, cfg, sd, qprefix=None, lavis=False, drop=None, rename=None):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    t = {}
    for k, v in sd.items():
        if k == drop:
            continue
        n = RF.to_lavis(k, qprefix) if lavis and qprefix else k
        t[(rename or {}).get(n, n)] = np.asarray(v, np.float32)
    util.write_safetensors(os.path.join(folder, "model.safetensors"), t)
    return folder


def _check_grads(got, rg, seed, qprefix=None):
    if qprefix:
        got = {RF.from_lavis(k, qprefix): v for k, v in got.items()}
    assert set(rg) == set(got), "grad names differ: %s" % (set(rg) ^ set(got))
    scale = max(float(np.max(np.abs(v))) for v in rg.values())
    worst = 0.0
    for k, v in rg.items():
        d = float(np.max(np.abs(np.asarray(got[k], np.float64) - v))) / scale if v.size else 0.0
        worst = max(worst, d)
        assert d < TOL, "grad %s err %.3g of the largest gradient (seed %d)" % (k, d, seed)
        own = float(np.max(np.abs(v))) if v.size else 0.0
        if own > 1e-3 * scale:
            r = util.rel_err(got[k], v)
            assert r < 1e-3, "grad %s rel err %.3g on its own scale (seed %d)" % (k, r, seed)
    return worst


def _check_modality(m, sd, cfg, x, fm, rng, seed, qprefix):
    out = m.fuse(x, frame_mask=fm)
    g = rng.standard_normal(out.shape)
    ref, rg, probs = RM.modality_reference(sd, cfg, x, fm, grad_out=g)
    e = util.rel_err(out, ref)
    assert e < TOL, "forward rel err %.3g (seed %d)" % (e, seed)
    got = m.backward(g.astype(np.float32))
    got["frames"] = got["frames"]
    worst = _check_grads(got, rg, seed, qprefix)
    maps = m.cross_attention_maps()
    assert len(maps) == len(probs) == 2
    for mp, p in zip(maps, probs):
        assert util.rel_err(mp, p) < TOL
    if fm is not None:   # padded frames get no gradient
        assert np.all(got["frames"][~np.asarray(fm, bool)] == 0)
    return e, worst


@pytest.mark.parametrize("modality", ["video", "audio"])
@pytest.mark.parametrize("lavis", [True, False])
def test_modality_against_reference(tmp_path, modality, lavis):
    rng, seed = _rng()
    D = 20 if modality == "video" else 12
    cfg = RM.modality_config(modality, D, 5, 24, _qcfg())   # frame_position_size: the default
    sd = RM.random_modality(cfg, rng)
    qp = RM.NAMES[modality]["qformer"]
    m = ModalityQFormer.load(_write(str(tmp_path / "m"), cfg, sd, qp, lavis=lavis))
    assert m.modality == modality and m.frame_position_size == (32 if modality == "video" else 8)
    B, T = 3, 6
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    _check_modality(m, sd, cfg, x, None, rng, seed, qp)
    fm = np.zeros((B, T), bool)
    for b in range(B):
        fm[b, :rng.integers(1, T + 1)] = True
    _check_modality(m, sd, cfg, x, fm, rng, seed, qp)
    # the whole position table, another batch size (planned buffers grow)
    P = m.frame_position_size
    x = rng.standard_normal((2, P, D)).astype(np.float32)
    _check_modality(m, sd, cfg, x, None, rng, seed, qp)
    if modality == "video":   # Video-LLaMA-style [B,T,K,D]: K image-Q-Former tokens per frame
        x = rng.standard_normal((2, 4, 3, D)).astype(np.float32)
        fm = np.array([[1, 1, 0, 0], [1, 1, 1, 1]], bool)
        _check_modality(m, sd, cfg, x, fm, rng, seed, qp)
    if lavis:
        assert qp + "bert.encoder.layer.0.crossattention.self.key.weight" in m.parameter_names()


def test_video_llama_proj_name_and_pos_size(tmp_path):
    rng, seed = _rng()
    cfg = RM.modality_config("video", 16, 3, 8, _qcfg(), pos=10)
    sd = RM.random_modality(cfg, rng, proj="video_llama_proj")
    m = ModalityQFormer.load(_write(str(tmp_path / "m"), cfg, sd, "video_Qformer.", lavis=True))
    assert "video_llama_proj.weight" in m.parameter_names() and m.frame_position_size == 10
    x = rng.standard_normal((2, 10, 16)).astype(np.float32)
    _check_modality(m, sd, cfg, x, None, rng, seed, "video_Qformer.")


@pytest.mark.parametrize("masked", [False, True])
def test_attention_fusion_against_reference(tmp_path, masked):
    rng, seed = _rng()
    cfg = RM.attention_config(12, 20, 4, 16)
    sd = RM.random_attention(cfg, rng)
    m = AttentionFusion.load(_write(str(tmp_path / "a"), cfg, sd))
    for B, ta, tf in ((3, 5, 7), (2, 8, 1)):
        a = rng.standard_normal((B, ta, 12)).astype(np.float32)
        f = rng.standard_normal((B, tf, 20)).astype(np.float32)
        am = fm = None
        if masked:
            am = np.zeros((B, ta), bool)
            fm = np.zeros((B, tf), bool)
            for b in range(B):
                am[b, :rng.integers(1, ta + 1)] = True
                fm[b, :rng.integers(1, tf + 1)] = True
        out = m.fuse(a, f, am, fm)
        g = rng.standard_normal(out.shape)
        ref, rg, w = RM.attention_reference(sd, cfg, a, f, am, fm, grad_out=g)
        e = util.rel_err(out, ref)
        assert e < TOL, "forward rel err %.3g (seed %d)" % (e, seed)
        assert util.rel_err(m.modality_weights(), w) < TOL
        got = m.backward(g.astype(np.float32))
        _check_grads(got, rg, seed)
        if masked:
            assert np.all(got["audio"][~am] == 0) and np.all(got["face"][~fm] == 0)


# ---- errors ----------------------------------------------------------------------------------

def _err(fn, status, *words):
    with pytest.raises(QfuseError) as ei:
        fn()
    assert ei.value.status == status, (ei.value.status, ei.value.message)
    for w in words:
        assert w in ei.value.message, (w, ei.value.message)
    return ei.value.message


def test_modality_errors(tmp_path):
    rng, _ = _rng()
    cfg = RM.modality_config("audio", 12, 5, 24, _qcfg())
    sd = RM.random_modality(cfg, rng)
    m = ModalityQFormer.load(_write(str(tmp_path / "ok"), cfg, sd))
    x = rng.standard_normal((2, 8, 12)).astype(np.float32)
    _err(lambda: m.fuse(np.zeros((2, 9, 12), np.float32)), "QF_ERR_SHAPE", "frame_position_size = 8")
    _err(lambda: m.fuse(x[..., :-1]), "QF_ERR_SHAPE", "frames", "input_dim = 12")
    _err(lambda: m.fuse(x, frame_mask=np.ones((2, 7), bool)), "QF_ERR_SHAPE", "frame_mask", "[2,8]")
    _err(lambda: m.backward(np.zeros((2, 5, 24))), "QF_ERR_ARG", "no fuse")
    m.fuse(x)
    _err(lambda: m.backward(np.zeros((2, 5, 23))), "QF_ERR_SHAPE", "grad_out")
    # the C layer's own checks (what the Python wrapper would otherwise catch first)
    from qfuse.modality import qf_modality_qformer_args
    from qfuse._native import lib, check
    import ctypes
    a = qf_modality_qformer_args()
    a.B, a.frames, a.tokens_per_frame = 2, 9, 1
    out = np.empty((2, 5, 24), np.float32)
    big = np.zeros((2, 9, 12), np.float32)
    _err(lambda: check(lib.qf_modality_qformer_forward(m._h, ctypes.byref(a), big.ctypes.data, out.ctypes.data)),
         "QF_ERR_SHAPE", "audio_position_embedding", "frame_position_size = 8")
    # loading
    _err(lambda: ModalityQFormer.load(_write(str(tmp_path / "miss"), cfg, sd, drop="audio_llama_proj.bias")),
         "QF_ERR_NOT_FOUND", "audio_llama_proj.bias")
    _err(lambda: ModalityQFormer.load(_write(str(tmp_path / "missq"), cfg, sd,
                                             drop="audio_Qformer.encoder.layer.1.crossattention.attention.key.weight")),
         "QF_ERR_NOT_FOUND", "crossattention")
    bad = dict(sd)
    bad["audio_position_embedding.weight"] = np.zeros((8, 13))
    _err(lambda: ModalityQFormer.load(_write(str(tmp_path / "shape"), cfg, bad)), "QF_ERR_SHAPE",
         "audio_position_embedding.weight")
    _err(lambda: ModalityQFormer.load(_write(str(tmp_path / "mt"), dict(cfg, model_type="affectgpt"), sd)),
         "QF_ERR_UNSUPPORTED", "affectgpt_video_qformer")
    c2 = json.loads(json.dumps(cfg))
    c2["qformer_config"]["encoder_hidden_size"] = 20
    _err(lambda: ModalityQFormer.load(_write(str(tmp_path / "enc"), c2, sd)), "QF_ERR_FORMAT",
         "encoder_hidden_size")
    c3 = dict(cfg)
    del c3["input_dim"]
    _err(lambda: ModalityQFormer.load(_write(str(tmp_path / "nokey"), c3, sd)), "QF_ERR_NOT_FOUND", "input_dim")
    # a video checkpoint saved with audio names is not a video model
    cv = dict(cfg, model_type="affectgpt_video_qformer")
    _err(lambda: ModalityQFormer.load(_write(str(tmp_path / "wrongmod"), cv, sd)), "QF_ERR_NOT_FOUND",
         "video_Qformer")


def test_attention_fusion_errors(tmp_path):
    rng, _ = _rng()
    cfg = RM.attention_config(12, 20, 4, 16)
    sd = RM.random_attention(cfg, rng)
    m = AttentionFusion.load(_write(str(tmp_path / "ok"), cfg, sd))
    a = np.zeros((2, 3, 12), np.float32)
    f = np.zeros((2, 4, 20), np.float32)
    _err(lambda: m.fuse(a, None), "QF_ERR_ARG", "both")
    _err(lambda: m.fuse(a[..., :-1], f), "QF_ERR_SHAPE", "audio_dim = 12")
    _err(lambda: m.fuse(a, f[:1]), "QF_ERR_SHAPE", "batch")
    am = np.ones((2, 3), bool)
    am[1] = False
    _err(lambda: m.fuse(a, f, audio_mask=am), "QF_ERR_ARG", "audio_mask", "item 1")
    _err(lambda: m.backward(np.zeros((2, 4, 16))), "QF_ERR_ARG", "no fuse")
    _err(lambda: AttentionFusion.load(_write(str(tmp_path / "miss"), cfg, sd, drop="fc_att.weight")),
         "QF_ERR_NOT_FOUND", "fc_att.weight")
    _err(lambda: AttentionFusion.load(_write(str(tmp_path / "mh"), dict(cfg, max_hidden_size=24), sd)),
         "QF_ERR_FORMAT", "max_hidden_size")


# ---- tools/convert_affectgpt.py --kind video|audio|attention on a synthetic AffectGPT .pth -------

def test_converter_kinds_on_synthetic_pth(tmp_path):
    import subprocess
    import sys
    import qfuse
    torch = util.torch()
    tool = os.path.join(util.REPO, "tools", "convert_affectgpt.py")
    rng, seed = _rng()
    vcfg = RM.modality_config("video", 20, 5, 24, _qcfg())
    acfg = RM.modality_config("audio", 12, 3, 24, _qcfg())
    tcfg = RM.attention_config(12, 20, 4, 24)
    vsd, asd, tsd = RM.random_modality(vcfg, rng), RM.random_modality(acfg, rng), RM.random_attention(tcfg, rng)
    ck = {}
    for sd, qp in ((vsd, "video_Qformer."), (asd, "audio_Qformer."), (tsd, None)):
        for k, v in sd.items():   # AffectGPT saves LAVIS names
            ck[RF.to_lavis(k, qp) if qp else k] = torch.tensor(np.asarray(v, np.float32))
    # what a real checkpoint also holds: buffers, leftovers of the text branch, other modules
    for qp in ("video_Qformer.", "audio_Qformer."):
        ck[qp + "bert.embeddings.position_ids"] = torch.arange(512)[None]
        ck[qp + "bert.encoder.layer.0.output.dense.weight"] = torch.zeros(4, 4)
        ck[qp + "cls.predictions.bias"] = torch.zeros(3)
    ck["llama_model.base_model.model.lm_head.weight"] = torch.zeros(2, 2)
    ck["visual_encoder.weight"] = torch.zeros(2)
    pth = str(tmp_path / "affectgpt.pth")
    torch.save({"model": ck, "epoch": 1}, pth)

    def conv(kind, *extra):
        out = str(tmp_path / ("conv_" + kind + "".join(extra)))
        r = subprocess.run([sys.executable, tool, pth, out, "--kind", kind, "--heads", "4"] + list(extra),
                           capture_output=True, text=True)
        return r, out

    for kind, cfg, sd, qp in (("video", vcfg, vsd, "video_Qformer."), ("audio", acfg, asd, "audio_Qformer.")):
        quick = os.environ.get("QFUSE_TEST_QUICK") == "1"   # each run imports torch (~1.5 s)
        for names in ([], ["--transformers-names"])[:1 if quick and kind == "audio" else 2]:
            r, out = conv(kind, *names)
            assert r.returncode == 0, r.stderr
            with open(os.path.join(out, "config.json")) as f:
                c = json.load(f)
            assert c["model_type"] == cfg["model_type"] and c["input_dim"] == cfg["input_dim"]
            assert c["frame_position_size"] == (32 if kind == "video" else 8)
            assert c["num_query_token"] == cfg["num_query_token"] and c["llm_hidden_size"] == 24
            assert c["qformer_config"]["num_hidden_layers"] == 2 and c["qformer_config"]["intermediate_size"] == 48
            st = util.read_safetensors(os.path.join(out, "model.safetensors"))
            other = "audio_" if kind == "video" else "video_"
            assert not [k for k in st if k.startswith(other) or k.startswith("multi_") or "llama_model" in k]
            assert not [k for k in st if "position_ids" in k or "layer.0.output.dense" in k or "cls." in k]
            assert (qp + "bert.encoder.layer.0.attention.self.query.weight" in st) == (not names)
            fm_ = qfuse.load(out)
            assert fm_.kind == kind + "_qformer"
            m = fm_.impl
            assert isinstance(m, ModalityQFormer) and m.modality == kind
            x = rng.standard_normal((2, 5, cfg["input_dim"])).astype(np.float32)
            fm = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
            _check_modality(m, sd, cfg, x, fm, rng, seed, qp)

    r, out = conv("attention", "--num-multi-query-token", "4")
    assert r.returncode == 0, r.stderr
    with open(os.path.join(out, "config.json")) as f:
        c = json.load(f)
    assert c == tcfg, c
    assert set(util.read_safetensors(os.path.join(out, "model.safetensors"))) == set(tsd)
    m = qfuse.load(out)
    assert m.kind == "attention_fusion"
    m = m.impl
    assert isinstance(m, AttentionFusion)
    a = rng.standard_normal((3, 4, 12)).astype(np.float32)
    f = rng.standard_normal((3, 6, 20)).astype(np.float32)
    ref, _, w = RM.attention_reference(tsd, tcfg, a, f)
    e = util.rel_err(m.fuse(a, f), ref)
    assert e < TOL, "converted attention fusion: rel err %.3g (seed %d)" % (e, seed)
    assert util.rel_err(m.modality_weights(), w) < TOL

    # what the converter cannot know, or a part the checkpoint lacks: a message, no folder
    r, out = conv("attention")
    assert r.returncode != 0 and "--num-multi-query-token" in r.stderr, r.stderr
    del ck["audio_query_tokens"]
    torch.save({"model": ck}, pth)
    import shutil
    shutil.rmtree(str(tmp_path / "conv_audio"))
    r, out = conv("audio")
    assert r.returncode != 0 and "audio_query_tokens" in r.stderr and not os.path.exists(out), r.stderr
