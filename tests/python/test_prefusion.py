"""test_prefusion.py - qfuse.fusion.Prefusion (src/models/prefusion.c, AffectGPT pre-fusion) against
the float64 PyTorch reference ref_fusion.prefusion_reference (built on ref_qformer.py), on fresh
random weights and inputs drawn at test time (seed: QFUSE_TEST_SEED or random, printed on failure).

- Forward (rel err < 1e-4) and every gradient (each parameter, audio, face; error relative to
  the case's largest reference gradient, < 1e-4): uneven real frame counts per batch item with
  masks, no masks (AffectGPT's all-ones), one modality only, fusion_order ["audio","face"].
- The checkpoint in transformers names and in LAVIS names (AffectGPT's) give the same model.
- Cross-attention maps against the reference's probabilities (face keys first).
- tools/convert_affectgpt.py on a synthetic AffectGPT .pth ({"model": state dict}, LAVIS names,
  unrelated modules and buffers) and tools/make_fusion_model.py, loaded and checked.
- Errors: feature width differing from the checkpoint's, mask length mismatch, missing tensor,
  unknown model_type, too many frames, encoder_hidden_size contradicting max_hidden_size.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import ref_fusion as RF
import util
from qfuse import QfuseError
from qfuse.fusion import Prefusion

TOL = 1e-4
TOOLS = os.path.join(util.REPO, "tools")


def _rng():
    seed = int(os.environ.get("QFUSE_TEST_SEED", "0")) or int.from_bytes(os.urandom(4), "little")
    return np.random.default_rng(seed), seed


def _cfg(audio_dim=12, video_dim=20, nq=5, llm=24, pos=40, fusion_order=None, layers=2, freq=1):
    q = RF.qformer_config(hidden=32, heads=4, layers=layers, inter=48, freq=freq, eps=1e-12, act="gelu")
    return RF.prefusion_config(audio_dim, video_dim, nq, llm, q, pos_size=pos, fusion_order=fusion_order)


def _write(folder, cfg, sd, lavis=False, drop=None, extra=None):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    t = {}
    for k, v in sd.items():
        if k == drop:
            continue
        t[RF.to_lavis(k, RF.QPRE_AFFECT) if lavis else k] = np.asarray(v, np.float32)
    t.update(extra or {})
    util.write_safetensors(os.path.join(folder, "model.safetensors"), t)
    return folder


def _inputs(rng, cfg, B, ta, tf, masked):
    a = rng.standard_normal((B, ta, cfg["audio_dim"])).astype(np.float32) if ta else None
    f = rng.standard_normal((B, tf, cfg["video_dim"])).astype(np.float32) if tf else None
    am = fm = None
    if masked:
        # uneven real lengths: item b keeps a prefix of its frames (at least one frame overall)
        am = np.zeros((B, ta), bool) if ta else None
        fm = np.zeros((B, tf), bool) if tf else None
        for b in range(B):
            if ta:
                am[b, :rng.integers(1, ta + 1)] = True
            if tf:
                fm[b, :rng.integers(1, tf + 1)] = True
        if ta and tf and B > 1:
            am[1, :] = False         # item 1: face only
    return a, f, am, fm


def _check(m, sd, cfg, a, f, am, fm, rng, seed):
    out = m.fuse(audio=a, face=f, audio_mask=am, face_mask=fm)
    g = rng.standard_normal(out.shape)
    ref, rg, probs = RF.prefusion_reference(sd, cfg, a, f, am, fm, grad_out=g)
    e = util.rel_err(out, ref)
    assert e < TOL, "forward rel err %.3g (seed %d)" % (e, seed)
    got = m.backward(g.astype(np.float32))
    # a LAVIS checkpoint reports LAVIS names (its own); the reference speaks transformers names
    got = {RF.from_lavis(k, RF.QPRE_AFFECT): v for k, v in got.items()}
    scale = max(float(np.max(np.abs(v))) for v in rg.values())
    worst = 0.0
    assert set(rg) == set(got), "grad names differ: %s" % (set(rg) ^ set(got))
    for k, v in rg.items():
        d = float(np.max(np.abs(np.asarray(got[k], np.float64) - v))) / scale if v.size else 0.0
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
        assert util.rel_err(mp, p) < TOL
    avg = m.cross_attention_maps(average=True)
    assert util.rel_err(avg[0], probs[0].mean(axis=1)) < TOL
    return e, worst


@pytest.mark.parametrize("case", ["masked", "unmasked", "audio_first", "audio_only", "face_only", "freq2"])
def test_against_reference(tmp_path, case):
    rng, seed = _rng()
    cfg = _cfg(fusion_order=["audio", "face"] if case == "audio_first" else None,
               layers=3 if case == "freq2" else 2, freq=2 if case == "freq2" else 1)
    sd = RF.random_prefusion(cfg, rng)
    m = Prefusion.load(_write(str(tmp_path / "m"), cfg, sd))
    B, ta, tf = 3, 4, 6
    if case == "audio_only":
        tf = 0
    if case == "face_only":
        ta = 0
    a, f, am, fm = _inputs(rng, cfg, B, ta, tf, masked=case in ("masked", "audio_first", "audio_only",
                                                                 "freq2"))
    _check(m, sd, cfg, a, f, am, fm, rng, seed)
    # a second forward with other shapes reuses/grows the planned buffers correctly
    a, f, am, fm = _inputs(rng, cfg, 2, ta and 7, tf and 3, masked=True)
    _check(m, sd, cfg, a, f, am, fm, rng, seed)


def test_lavis_and_transformers_names(tmp_path):
    rng, seed = _rng()
    cfg = _cfg()
    sd = RF.random_prefusion(cfg, rng)
    m1 = Prefusion.load(_write(str(tmp_path / "hf"), cfg, sd))
    m2 = Prefusion.load(_write(str(tmp_path / "lavis"), cfg, sd, lavis=True))
    a, f, am, fm = _inputs(rng, cfg, 2, 3, 5, masked=True)
    o1 = m1.fuse(audio=a, face=f, audio_mask=am, face_mask=fm)
    o2 = m2.fuse(audio=a, face=f, audio_mask=am, face_mask=fm)
    assert np.array_equal(o1, o2)
    # parameters keep the checkpoint's own names
    assert "multi_Qformer.bert.encoder.layer.0.attention.self.query.weight" in m2.parameter_names()
    assert "multi_Qformer.encoder.layer.0.attention.attention.query.weight" in m1.parameter_names()
    _check(m2, sd, cfg, a, f, am, fm, rng, seed)
    # an item with no real frame at all: the Q-Former core's (transformers') uniform weights
    am[1, :] = False
    fm[1, :] = False
    _check(m2, sd, cfg, a, f, am, fm, rng, seed)
    # all-ones masks mean the same as no masks (AffectGPT passes all ones)
    a, f, _, _ = _inputs(rng, cfg, 2, 3, 5, masked=False)
    o3 = m1.fuse(audio=a, face=f)
    o4 = m1.fuse(audio=a, face=f, audio_mask=np.ones((2, 3), bool), face_mask=np.ones((2, 5), int))
    assert np.array_equal(o3, o4)


def test_converter_on_synthetic_pth(tmp_path):
    torch = util.torch()
    rng, seed = _rng()
    cfg = _cfg()
    sd = RF.random_prefusion(cfg, rng)
    ck = {RF.to_lavis(k, RF.QPRE_AFFECT): torch.tensor(np.asarray(v, np.float32)) for k, v in sd.items()}
    # what a real AffectGPT checkpoint also holds: other modules, buffers, leftovers
    ck["multi_Qformer.bert.embeddings.position_ids"] = torch.arange(512)[None]
    ck["audio_llama_proj.weight"] = torch.zeros(3, 3)
    ck["llama_model.base_model.model.lm_head.weight"] = torch.zeros(2, 2)
    ck["multi_Qformer.bert.encoder.layer.0.intermediate.dense.weight"] = torch.zeros(4, 4)
    pth = str(tmp_path / "affectgpt.pth")
    torch.save({"model": ck, "optimizer": {}, "epoch": 3}, pth)
    pth2 = str(tmp_path / "ddp.pth")      # saved from DataParallel: every key under "module."
    torch.save({"module." + k: v for k, v in ck.items()}, pth2)
    for names in ([], ["--transformers-names"]):
        if names:
            pth = pth2
        out = str(tmp_path / ("conv" + "".join(names)))
        r = subprocess.run([sys.executable, os.path.join(TOOLS, "convert_affectgpt.py"), pth, out,
                            "--heads", "4"] + names, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        with open(os.path.join(out, "config.json")) as f:
            c = json.load(f)
        assert c["model_type"] == "affectgpt_prefusion" and c["fusion_order"] == ["face", "audio"]
        assert c["max_hidden_size"] == 20 and c["num_multi_query_token"] == 5
        assert c["qformer_config"]["num_hidden_layers"] == 2
        st = util.read_safetensors(os.path.join(out, "model.safetensors"))
        assert "multi_Qformer.bert.embeddings.position_ids" not in st and "audio_llama_proj.weight" not in st
        assert ("multi_Qformer.bert.encoder.layer.0.attention.self.query.weight" in st) == (not names)
        m = Prefusion.load(out)
        a, f, am, fm = _inputs(rng, cfg, 2, 4, 3, masked=True)
        _check(m, sd, cfg, a, f, am, fm, rng, seed)
    # not an AffectGPT pre-fusion checkpoint: the converter says what is missing
    bad = str(tmp_path / "bad.pth")
    torch.save({"model": {"visual_encoder.weight": torch.zeros(2)}}, bad)
    r = subprocess.run([sys.executable, os.path.join(TOOLS, "convert_affectgpt.py"), bad,
                        str(tmp_path / "bad")], capture_output=True, text=True)
    assert r.returncode != 0 and "multi_audio_embs.weight" in r.stderr, r.stderr


def test_make_fusion_model(tmp_path):
    out = str(tmp_path / "rand")
    r = subprocess.run([sys.executable, os.path.join(TOOLS, "make_fusion_model.py"), "affectgpt", out,
                        "--audio-dim", "16", "--video-dim", "24", "--queries", "3", "--llm", "8",
                        "--hidden", "32", "--heads", "4", "--inter", "40", "--lavis", "--dtype", "BF16"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    m = Prefusion.load(out)
    y = m.fuse(audio=np.ones((1, 8, 16), np.float32), face=np.ones((1, 32, 24), np.float32))
    assert y.shape == (1, 3, 8) and np.all(np.isfinite(y))


# ---- errors ----------------------------------------------------------------------------------

def _err(fn, status, *words):
    with pytest.raises(QfuseError) as ei:
        fn()
    assert ei.value.status == status, (ei.value.status, ei.value.message)
    for w in words:
        assert w in ei.value.message, (w, ei.value.message)
    return ei.value.message


def test_errors(tmp_path):
    rng, _ = _rng()
    cfg = _cfg()
    sd = RF.random_prefusion(cfg, rng)
    m = Prefusion.load(_write(str(tmp_path / "ok"), cfg, sd))
    a, f, am, fm = _inputs(rng, cfg, 2, 3, 4, masked=True)
    _err(lambda: m.fuse(audio=a[..., :-1], face=f), "QF_ERR_SHAPE", "audio", "audio_dim = 12")
    _err(lambda: m.fuse(audio=a, face=np.zeros((2, 4, 21), np.float32)), "QF_ERR_SHAPE", "video_dim = 20")
    _err(lambda: m.fuse(audio=a, face=f, audio_mask=am[:, :2]), "QF_ERR_SHAPE", "audio_mask", "[2,3]")
    _err(lambda: m.fuse(audio=a, face=f, face_mask=fm[:1]), "QF_ERR_SHAPE", "face_mask")
    _err(lambda: m.fuse(audio=a, face=f[:1]), "QF_ERR_SHAPE", "batch")
    _err(lambda: m.fuse(audio=np.zeros((2, 30, 12)), face=np.zeros((2, 11, 20))), "QF_ERR_SHAPE",
         "position_embedding_size = 40")
    _err(lambda: m.fuse(), "QF_ERR_ARG")
    _err(lambda: m.backward(np.zeros((2, 5, 24))), "QF_ERR_ARG", "no fuse")
    m.fuse(audio=a, face=f)
    _err(lambda: m.backward(np.zeros((2, 5, 23))), "QF_ERR_SHAPE", "grad_out")
    m.qformer(encoder_hidden_states=np.zeros((2, 3, 20), np.float32))
    _err(lambda: m.backward(np.zeros((2, 5, 24))), "QF_ERR_ARG", "no fuse")

    # loading
    _err(lambda: Prefusion.load(_write(str(tmp_path / "miss"), cfg, sd, drop="multi_video_embs.bias")),
         "QF_ERR_NOT_FOUND", "multi_video_embs.bias")
    _err(lambda: Prefusion.load(_write(str(tmp_path / "missq"), cfg, sd,
                                       drop="multi_Qformer.encoder.layer.1.crossattention.attention.key.weight")),
         "QF_ERR_NOT_FOUND", "crossattention")
    bad = dict(sd)
    bad["multi_llama_proj.weight"] = np.zeros((24, 31))
    _err(lambda: Prefusion.load(_write(str(tmp_path / "shape"), cfg, bad)), "QF_ERR_SHAPE", "multi_llama_proj.weight")
    _err(lambda: Prefusion.load(_write(str(tmp_path / "mt"), dict(cfg, model_type="blip-2"), sd)),
         "QF_ERR_UNSUPPORTED", "model_type")
    _err(lambda: Prefusion.load(_write(str(tmp_path / "mt2"), dict(cfg, model_type="affectgpt"), sd)),
         "QF_ERR_UNSUPPORTED", "affectgpt_prefusion")
    c2 = json.loads(json.dumps(cfg))
    c2["qformer_config"]["encoder_hidden_size"] = 12
    _err(lambda: Prefusion.load(_write(str(tmp_path / "enc"), c2, sd)), "QF_ERR_FORMAT", "encoder_hidden_size")
    c3 = dict(cfg, fusion_order=["face", "text"])
    _err(lambda: Prefusion.load(_write(str(tmp_path / "fo"), c3, sd)), "QF_ERR_FORMAT", "fusion_order")
    c4 = dict(cfg, max_hidden_size=24)
    _err(lambda: Prefusion.load(_write(str(tmp_path / "mh"), c4, sd)), "QF_ERR_FORMAT", "max_hidden_size")
    c5 = dict(cfg)
    del c5["audio_dim"]
    _err(lambda: Prefusion.load(_write(str(tmp_path / "nokey"), c5, sd)), "QF_ERR_NOT_FOUND", "audio_dim")
