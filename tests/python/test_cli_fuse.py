"""test_cli_fuse.py - `qfuse fuse` end to end, run as a subprocess on the reference fixtures:
- Q-Former (qformer_0/1: transformers Blip2QFormerModel): written tokens vs last_hidden_state, and
  the attention PNG's cells vs the float64 reference's head-averaged cross-attention (ref_qformer)
  mapped through matplotlib's viridis stops (decoded with the independent PNG reader of
  test_heatmap);
- BLIP-2 (blip2_opt_0: Blip2ForConditionalGeneration): --pixels vs language_projection, --features
  vs qformer_last_hidden_state, --image vs --pixels of the same image preprocessed with Pillow +
  numpy (BlipImageProcessor's recipe);
- usage errors: exit status 2 with a message naming the option and the rule.
The binary is $QFUSE_CLI, else qfuse next to $QFUSE_LIBRARY, else build/qfuse; absent -> skipped.
"""
import json
import os
import subprocess

import numpy as np
import pytest

import util
from util import FIXTURES, REPO

PIL = pytest.importorskip("PIL.Image")


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
pytestmark = pytest.mark.skipif(CLI is None, reason="qfuse CLI not built (set QFUSE_CLI)")


def run(*args):
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # the sanitizer run preloads ASan
    env.setdefault("QFUSE_THREADS", "2")
    p = subprocess.run([CLI, "fuse"] + [str(a) for a in args], capture_output=True, text=True, env=env,
                       timeout=120)
    return p.returncode, p.stdout, p.stderr


def fixture(name):
    d = os.path.join(FIXTURES, name)
    if not os.path.isdir(d):
        pytest.skip("fixture %s absent" % name)
    with open(os.path.join(d, "case.json")) as f:
        case = json.load(f)
    return d, case, util.read_safetensors(os.path.join(d, "io.safetensors"))


def save(tmp_path, name, arr):
    p = str(tmp_path / (name + ".npy"))
    np.save(p, arr)
    return p


def test_fuse_help_teaches():
    rc, out, _ = run("--help")
    assert rc == 0
    for word in ("blip_2_qformer", "blip-2", "instructblip", "affectgpt_prefusion", "blip2_kv_prefix",
                 "--features", "--queries", "--audio", "--face", "--global", "--image", "--out",
                 "--attn-png", "--layer", "--threads", "examples"):
        assert word in out, word
    rc, _, err = run()
    assert rc == 2 and "usage" in err


@pytest.mark.parametrize("name,layer", [("qformer_0", None), ("qformer_1", 0)])
def test_fuse_qformer_fixture(tmp_path, name, layer):
    import ref_qformer as R
    from test_heatmap import decode_png, viridis
    d, case, io = fixture(name)
    f = save(tmp_path, "f", io["encoder_hidden_states"])
    q = save(tmp_path, "q", io["query_embeds"])
    m = save(tmp_path, "m", io["encoder_attention_mask"].astype(np.uint8))
    out, png, cell = str(tmp_path / "o.npy"), str(tmp_path / "map.png"), 3
    extra = [] if layer is None else ["--layer", layer]
    rc, so, se = run(d, "--features", f, "--queries", q, "--mask", m, "--out", out, "--attn-png", png,
                     "--cell", cell, "--threads", 2, *extra)
    assert rc == 0, se
    assert "[3,8,64]" in so.replace(" ", "") or "out" in so
    got = np.load(out)
    err = util.rel_err(got, io["last_hidden_state"])
    assert err <= case["rtol_fp32"], "tokens vs transformers: rel err %g" % err
    # the picture: reference head-averaged probabilities of that cross layer, item 0
    cfg = R.config_from_json(os.path.join(d, "config.json"))
    sd = util.read_safetensors(os.path.join(d, "model.safetensors"))
    _, _, probs = R.reference(sd, cfg, io["query_embeds"].astype(np.float64),
                              io["encoder_hidden_states"].astype(np.float64), io["encoder_attention_mask"])
    li = len(probs) - 1 if layer is None else layer
    assert ("layer %d of %d" % (li, len(probs))) in so
    ref = probs[li][0].mean(axis=0)                   # [Lq, S]
    img = decode_png(png)
    assert img.shape == (ref.shape[0] * cell, ref.shape[1] * cell, 3)
    lo, hi = ref.min(), ref.max()
    want = np.array([[viridis((v - lo) / (hi - lo)) for v in row] for row in ref])
    cells = img[::cell, ::cell].astype(np.float64)
    assert np.max(np.abs(cells - want)) <= 2.0, "heatmap colors off by %g" % np.max(np.abs(cells - want))


def test_fuse_blip2_pixels_and_features(tmp_path):
    d, case, io = fixture("blip2_opt_0")
    px = save(tmp_path, "px", io["pixel_values"])
    out = str(tmp_path / "o.npy")
    rc, so, se = run(d, "--pixels", px, "--out", out, "--attn-png", str(tmp_path / "a.png"))
    assert rc == 0, se
    err = util.rel_err(np.load(out), io["language_projection"])
    assert err <= case["rtol_fp32"], "BLIP-2 tokens vs transformers: rel err %g" % err
    feats = save(tmp_path, "vf", io["vision_last_hidden_state"])
    rc, so, se = run(d, "--features", feats, "--out", out)
    assert rc == 0, se
    err = util.rel_err(np.load(out), io["qformer_last_hidden_state"])
    assert err <= case["rtol_fp32"], "BLIP-2 Q-Former on features: rel err %g" % err


def test_fuse_blip2_image_equals_pillow_pixels(tmp_path):
    d, case, io = fixture("blip2_opt_0")
    with open(os.path.join(d, "config.json")) as f:
        size = json.load(f)["vision_config"]["image_size"]
    rng = np.random.default_rng(7)
    rgb = rng.integers(0, 256, (45, 61, 3), dtype=np.uint8)
    png = str(tmp_path / "x.png")
    PIL.fromarray(rgb).save(png)
    img = PIL.fromarray(rgb).resize((size, size), resample=3, reducing_gap=None)
    x = (np.asarray(img).astype(np.float64) / 255).astype(np.float32)
    x = (x - np.float32([0.48145466, 0.4578275, 0.40821073])) / np.float32([0.26862954, 0.26130258, 0.27577711])
    px = save(tmp_path, "px", x.transpose(2, 0, 1)[None].copy())
    o1, o2 = str(tmp_path / "o1.npy"), str(tmp_path / "o2.npy")
    rc, so, se = run(d, "--image", png, "--out", o1)
    assert rc == 0, se
    assert "pixel_values [1,3,%d,%d]" % (size, size) in so
    rc, _, se = run(d, "--pixels", px, "--out", o2)
    assert rc == 0, se
    assert util.rel_err(np.load(o1), np.load(o2)) <= 1e-5


def test_fuse_usage_errors(tmp_path):
    d, _, io = fixture("qformer_0")
    f = save(tmp_path, "f", io["encoder_hidden_states"])
    q = save(tmp_path, "q", io["query_embeds"])
    rc, _, err = run(d, "--features", f)
    assert rc == 2 and "--queries" in err
    bad = save(tmp_path, "bad", io["encoder_hidden_states"][..., :7])
    rc, _, err = run(d, "--features", bad, "--queries", q)
    assert rc == 2 and "--features" in err and "encoder_hidden_size" in err and "[3,17,7]" in err
    rc, _, err = run(d, "--features", f, "--queries", q, "--audio", f)
    assert rc == 2 and "--audio" in err and "blip_2_qformer" in err
    rc, _, err = run(d, "--features", f, "--queries", q, "--attn-png", str(tmp_path / "m.png"), "--layer", 9)
    assert rc == 2 and "--layer 9" in err and "2 cross-attention layers" in err
    rc, _, err = run(d, "--features", f, "--queries", q, "--bogus")
    assert rc == 2 and "--bogus" in err
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    rc, _, err = run(str(other), "--features", f)
    assert rc == 1 and "llama" in err and "affectgpt_prefusion" in err
    rc, _, err = run(str(tmp_path / "absent"), "--features", f)
    assert rc == 1 and "config.json" in err


# ---- fusion models: random checkpoints, float64 references of tests/python/ref_fusion.py -------

def _write_model(folder, cfg, sd):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    util.write_safetensors(os.path.join(folder, "model.safetensors"),
                           {k: np.asarray(v, np.float32) for k, v in sd.items()})


def _cells(png, cell):
    from test_heatmap import decode_png
    img = decode_png(png)
    white = [x for x in range(img.shape[1]) if np.all(img[:, x] == 255)]
    keep = [x for x in range(img.shape[1]) if x not in white]
    return img[:, keep][::cell, ::cell].astype(np.float64), white


def _want_colors(avg):
    from test_heatmap import viridis
    lo, hi = avg.min(), avg.max()
    return np.array([[viridis((v - lo) / (hi - lo)) for v in row] for row in avg])


@pytest.mark.parametrize("order", [None, ["audio", "face"]])
def test_fuse_prefusion(tmp_path, order):
    RF = pytest.importorskip("ref_fusion")
    rng = np.random.default_rng(21)
    q = RF.qformer_config(hidden=32, heads=4, layers=2, inter=48, freq=1)
    cfg = RF.prefusion_config(12, 20, 5, 24, q, pos_size=40, fusion_order=order)
    sd = RF.random_prefusion(cfg, rng)
    d = str(tmp_path / "affect")
    _write_model(d, cfg, sd)
    B, ta, tf = 2, 3, 6
    audio = rng.standard_normal((B, ta, 12)).astype(np.float32)
    face = rng.standard_normal((B, tf, 20)).astype(np.float32)
    am = np.ones((B, ta), np.uint8)
    am[1, 2] = 0
    ref, _, probs = RF.prefusion_reference(sd, cfg, audio.astype(np.float64), face.astype(np.float64),
                                           audio_mask=am)
    out, png, cell = str(tmp_path / "o.npy"), str(tmp_path / "a.png"), 2
    rc, so, se = run(d, "--audio", save(tmp_path, "a", audio), "--face", save(tmp_path, "f", face),
                     "--audio-mask", save(tmp_path, "am", am), "--out", out, "--attn-png", png, "--cell", cell,
                     "--layer", 0)
    assert rc == 0, se
    err = util.rel_err(np.load(out), ref)
    assert err <= 1e-4, "pre-fusion tokens vs float64 reference: rel err %g" % err
    cells, white = _cells(png, cell)
    bound = tf if order is None else ta                  # face|audio unless the order is reversed
    assert white == [bound * cell]
    assert np.max(np.abs(cells - _want_colors(probs[0][0].mean(axis=0)))) <= 2.0
    assert ("face|audio" if order is None else "audio|face") in so


def test_fuse_kvprefix(tmp_path):
    RF = pytest.importorskip("ref_fusion")
    rng = np.random.default_rng(22)
    q = RF.qformer_config(hidden=32, heads=4, layers=2, inter=48, freq=1)
    cfg = RF.kvprefix_config(4, 3, 10, q, encoder_hidden_size=24)
    sd = RF.random_kvprefix(cfg, rng, projection_dim=16)
    d = str(tmp_path / "kv")
    _write_model(d, cfg, sd)
    B, S = 2, 7
    enc = rng.standard_normal((B, S, 24)).astype(np.float32)
    g = rng.standard_normal((B, 10)).astype(np.float32)
    ref, _, probs = RF.kvprefix_reference(sd, cfg, enc.astype(np.float64), g.astype(np.float64))
    out, png, cell = str(tmp_path / "o.npy"), str(tmp_path / "a.png"), 2
    fe, ge = save(tmp_path, "e", enc), save(tmp_path, "g", g)
    rc, so, se = run(d, "--features", fe, "--global", ge, "--out", out, "--attn-png", png, "--cell", cell)
    assert rc == 0, se
    err = util.rel_err(np.load(out), ref)
    assert err <= 1e-4, "KV-prefix tokens vs float64 reference: rel err %g" % err
    cells, white = _cells(png, cell)
    assert white == [3 * cell]                           # prefix | features
    assert np.max(np.abs(cells - _want_colors(probs[-1][0].mean(axis=0)))) <= 2.0
    rc, so, se = run(d, "--features", fe, "--global", ge, "--out", out, "--project")
    assert rc == 0, se
    proj = ref @ sd["language_projection.weight"].T + sd["language_projection.bias"]
    assert util.rel_err(np.load(out), proj) <= 1e-4
    rc, _, err = run(d, "--features", fe)
    assert rc == 2 and "--global" in err


# ---- AffectGPT per-modality Q-Formers and attention fusion (float64 refs of ref_modality.py) ---

def _modality_model(tmp_path, modality, rng, D):
    RF = pytest.importorskip("ref_fusion")
    RM = pytest.importorskip("ref_modality")
    q = RF.qformer_config(hidden=32, heads=4, layers=2, inter=48, freq=1)
    cfg = RM.modality_config(modality, D, 5, 24, q)
    sd = RM.random_modality(cfg, rng)
    d = str(tmp_path / modality)
    lav = {k: v for k, v in sd.items()}
    if modality == "video":   # AffectGPT's own (LAVIS) names for one of the two
        lav = {RF.to_lavis(k, RM.NAMES[modality]["qformer"]): v for k, v in sd.items()}
    _write_model(d, cfg, lav)
    return RM, d, cfg, sd


@pytest.mark.parametrize("modality", ["video", "audio"])
def test_fuse_modality_qformer(tmp_path, modality):
    rng = np.random.default_rng(23 if modality == "video" else 24)
    D = 20 if modality == "video" else 12
    RM, d, cfg, sd = _modality_model(tmp_path, modality, rng, D)
    flag, mflag = ("--face", "--face-mask") if modality == "video" else ("--audio", "--audio-mask")
    B, T = 2, 6
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    fm = np.ones((B, T), np.uint8)
    fm[1, 4:] = 0
    ref, _, probs = RM.modality_reference(sd, cfg, x.astype(np.float64), fm)
    out, png, cell = str(tmp_path / "o.npy"), str(tmp_path / "a.png"), 2
    xp, mp = save(tmp_path, "x", x), save(tmp_path, "m", fm)
    rc, so, se = run(d, flag, xp, mflag, mp, "--out", out, "--attn-png", png, "--cell", cell, "--layer", 0)
    assert rc == 0, se
    assert cfg["model_type"] in so
    err = util.rel_err(np.load(out), ref)
    assert err <= 1e-4, "%s Q-Former tokens vs float64 reference: rel err %g" % (modality, err)
    cells, white = _cells(png, cell)
    assert white == []                                   # one modality: no separator
    assert cells.shape[:2] == (5, T)
    assert np.max(np.abs(cells - _want_colors(probs[0][0].mean(axis=0)))) <= 2.0
    # --features is the same input; --mask goes with it
    rc, so, se = run(d, "--features", xp, "--mask", mp, "--out", out)
    assert rc == 0, se
    assert util.rel_err(np.load(out), ref) <= 1e-4
    # the other modality's input is not read by this model
    other = "--audio" if modality == "video" else "--face"
    rc, _, err = run(d, flag, xp, other, xp)
    assert rc == 2 and other in err and cfg["model_type"] in err
    rc, _, err = run(d, flag, xp, "--features", xp)
    assert rc == 2 and "not both" in err
    rc, _, err = run(d, flag, save(tmp_path, "bad", x[..., :-1]))
    assert rc == 2 and "input_dim" in err and "[2,6,%d]" % (D - 1) in err
    P = 32 if modality == "video" else 8
    rc, _, err = run(d, flag, save(tmp_path, "long", np.zeros((1, P + 1, D), np.float32)))
    assert rc == 2 and ("%d" % P) in err and "frame_position_size" in err
    rc, _, err = run(d, flag, xp, mflag, save(tmp_path, "m5", fm[:, :5]))
    assert rc == 2 and mflag in err and "[2,6]" in err
    if modality == "video":   # [B,T,K,D]: K image-Q-Former tokens per frame, mask per frame
        x4 = rng.standard_normal((2, 4, 3, D)).astype(np.float32)
        fm4 = np.array([[1, 1, 0, 0], [1, 1, 1, 1]], np.uint8)
        ref4, _, probs4 = RM.modality_reference(sd, cfg, x4.astype(np.float64), fm4)
        rc, so, se = run(d, "--face", save(tmp_path, "x4", x4), "--face-mask", save(tmp_path, "m4", fm4),
                         "--out", out, "--attn-png", png, "--cell", cell)
        assert rc == 0, se
        assert util.rel_err(np.load(out), ref4) <= 1e-4
        cells, _ = _cells(png, cell)
        assert cells.shape[:2] == (5, 12)
        assert np.max(np.abs(cells - _want_colors(probs4[-1][0].mean(axis=0)))) <= 2.0


def test_fuse_attention_fusion(tmp_path):
    RM = pytest.importorskip("ref_modality")
    rng = np.random.default_rng(25)
    cfg = RM.attention_config(12, 20, 4, 16)
    sd = RM.random_attention(cfg, rng)
    d = str(tmp_path / "attn")
    _write_model(d, cfg, sd)
    B, ta, tf = 3, 5, 7
    a = rng.standard_normal((B, ta, 12)).astype(np.float32)
    f = rng.standard_normal((B, tf, 20)).astype(np.float32)
    am = np.ones((B, ta), np.uint8)
    am[0, 3:] = 0
    fm = np.ones((B, tf), np.uint8)
    fm[2, 1:] = 0
    ref, _, w = RM.attention_reference(sd, cfg, a.astype(np.float64), f.astype(np.float64), am, fm)
    out = str(tmp_path / "o.npy")
    ap, fp = save(tmp_path, "a", a), save(tmp_path, "f", f)
    amp, fmp = save(tmp_path, "am", am), save(tmp_path, "fm", fm)
    rc, so, se = run(d, "--audio", ap, "--face", fp, "--audio-mask", amp, "--face-mask", fmp, "--out", out)
    assert rc == 0, se
    err = util.rel_err(np.load(out), ref)
    assert err <= 1e-4, "attention fusion tokens vs float64 reference: rel err %g" % err
    got = {}
    for line in so.splitlines():
        p = line.split()
        if len(p) == 6 and p[0] == "item" and p[2] == "face" and p[4] == "audio":
            got[int(p[1].rstrip(":"))] = (float(p[3]), float(p[5]))
    assert sorted(got) == list(range(B)), so
    gw = np.array([got[b] for b in range(B)])
    assert np.max(np.abs(gw - w)) <= 1e-4 * max(1.0, np.max(np.abs(w))), (gw, w)
    # there is no attention map to draw: a clear usage error, nothing written
    png = tmp_path / "a.png"
    rc, so, err = run(d, "--audio", ap, "--face", fp, "--attn-png", str(png))
    assert rc == 2 and "--attn-png" in err and "affectgpt_attention_fusion" in err and "weights" in err
    assert not png.exists()
    rc, _, err = run(d, "--audio", ap)
    assert rc == 2 and "--face" in err
    rc, _, err = run(d, "--audio", ap, "--face", fp, "--features", fp)
    assert rc == 2 and "--features" in err
    no_face = fm.copy()
    no_face[1] = 0
    rc, _, err = run(d, "--audio", ap, "--face", fp, "--face-mask", save(tmp_path, "nf", no_face))
    assert rc == 1 and "face_mask" in err and "item 1" in err


def test_fuse_help_names_affectgpt_siblings():
    rc, out, _ = run("--help")
    assert rc == 0
    for word in ("affectgpt_video_qformer", "affectgpt_audio_qformer", "affectgpt_attention_fusion",
                 "--face-mask", "--audio-mask", "[B,T,K,input_dim]", "modality weights"):
        assert word in out, word
