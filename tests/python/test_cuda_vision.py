"""test_cuda_vision.py - the BLIP-2 / InstructBLIP vision tower and the whole BLIP-2 fuse on the
CUDA backend (qf_vision_to_device / qf_blip2_to_device, src/models/vision.c and blip2.c running
on the ops of src/backend/cuda) against the transformers fixtures and the CPU path.

References: tests/fixtures/blip2_opt_0 (vision_last_hidden_state, qformer_last_hidden_state,
language_projection; transformers' Blip2ForConditionalGeneration) and instructblip_llama_0
(vision_last_hidden_state in io.safetensors; the Q-Former output and the projection with the
instruction ids in extra.safetensors). A second model, the blip2_opt_0 weights changed to one
head of 48 (the vectorised attention path), 3 layers and 36x36 images (pixels beyond the 4x4
patches of 8, which no column reads), is checked against test_blip2.vision_ref (float64 torch,
itself checked against transformers there) and against the CPU path.

Bounds, max|out - ref| / max|ref|: float32 on the GPU (TF32 off, the default) < TOL = 1e-4, as
on the CPU. bf16 weights (every GEMM reads a bfloat16 copy of its weight and accumulates in
float32; activations, LayerNorm and softmax stay float32) < BF16_TOL = 3e-2: bf16 rounds each
weight by up to 2^-9 relative, compounded through 2 vision layers, the Q-Former and the
projection (test_cuda_qformer.py measures ~1e-2 on the Q-Former alone).
Also: repeated forwards (the first runs eagerly and is captured, the next replay the graph), a
different B and back, the eager path (QFUSE_CUDA_GRAPHS=0), output to GPU memory, NaN/Inf pixels
named pixel_values[b,c,y,x] as on the CPU (inside the patches: the device screen; outside
them: the host check), backward on a GPU model (its values: test_cuda_vision_backward.py) and
refused with bf16 weights, .to("cpu") giving the CPU results and backward again. GPU tests skip with the library's reason without a usable CUDA backend;
test_device_argument_* run everywhere.

Measured (H100, 2026-11-23, 34 passed with test_cuda_qformer.py): blip2_opt_0 f32 vision 3.7e-7,
Q-Former 3.2e-7, fuse 2.9e-7; bf16 2.6e-3 / 1.2e-3 / 4.4e-3. instructblip_llama_0 f32 5.2e-7 /
2.7e-7 / 2.2e-7; bf16 2.8e-3 / 7.6e-4 / 2.3e-3."""
import ctypes
import json
import os
import shutil

import numpy as np
import pytest

import qfuse
import qfuse.cuda
import util
from qfuse import QfuseError
from qfuse._native import check, lib
from qfuse.blip2 import Blip2

REASON = qfuse.cuda.unavailable_reason()
TOL = 1e-4
BF16_TOL = 3e-2
DTYPES = ["float32", "bfloat16"]


@pytest.fixture(autouse=True)
def _needs_gpu(request):
    if REASON is not None and not request.function.__name__.startswith("test_device_argument_"):
        pytest.skip("CUDA backend not usable: %s" % REASON)


def _tol(dtype):
    return TOL if dtype == "float32" else BF16_TOL


def _rng():
    seed = int(os.environ.get("QFUSE_TEST_SEED", "0")) or int.from_bytes(os.urandom(4), "little")
    return np.random.default_rng(seed), seed


def test_device_argument_refusals():
    case, io, folder = util.load_fixture("blip2_opt_0")
    m = Blip2.load(folder)
    with pytest.raises(QfuseError) as e:
        m.to("tpu")
    assert e.value.status == "QF_ERR_ARG" and "tpu" in str(e.value)
    with pytest.raises(QfuseError) as e:
        m.to("cpu", "bfloat16")
    assert e.value.status == "QF_ERR_UNSUPPORTED" and "cuda" in str(e.value)
    if REASON is not None:
        with pytest.raises(QfuseError) as e:
            m.to("cuda")
        assert e.value.status == "QF_ERR_UNSUPPORTED"
    # still a working CPU model after the refusals
    assert util.rel_err(m.fuse(io["pixel_values"]), io["language_projection"]) < TOL
    m.fuse_backward(np.ones_like(io["language_projection"]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fixture_blip2_opt(dtype):
    case, io, folder = util.load_fixture("blip2_opt_0")
    tol = _tol(dtype)
    m = Blip2.load(folder).to("cuda", dtype)
    px = io["pixel_values"]
    errs = {}
    for rep in range(3):  # eager + capture, then graph replays
        vis = m.vision(px)
        errs["vision"] = util.rel_err(vis, io["vision_last_hidden_state"])
        q = m.qformer(encoder_hidden_states=io["vision_last_hidden_state"])
        errs["qformer"] = util.rel_err(q, io["qformer_last_hidden_state"])
        tok = m.fuse(px)
        errs["fuse"] = util.rel_err(tok, io["language_projection"])
        assert max(errs.values()) < tol, (dtype, rep, errs)
    print("blip2_opt_0 %s: %s" % (dtype, ", ".join("%s %.2e" % kv for kv in errs.items())))
    # another B (new planned block, new graphs), then the first B again
    assert util.rel_err(m.fuse(px[1:2])[0], io["language_projection"][1]) < tol
    assert util.rel_err(m.vision(px[:1]), io["vision_last_hidden_state"][:1]) < tol
    assert util.rel_err(m.fuse(px), io["language_projection"]) < tol
    # backward runs on the GPU with float32 weights (test_cuda_vision_backward.py checks its
    # values); bf16 weights are refused
    if dtype == "float32":
        g = m.fuse_backward(np.ones_like(tok))
        assert np.all(np.isfinite(g["pixel_values"]))
        m.vision(px)
        assert np.all(np.isfinite(m.vision_backward(np.ones_like(vis))["pixel_values"]))
    else:
        with pytest.raises(QfuseError) as e:
            m.fuse_backward(np.ones_like(tok))
        assert e.value.status == "QF_ERR_UNSUPPORTED" and "bf16" in str(e.value), str(e.value)
        m.vision(px)
        with pytest.raises(QfuseError) as e:
            m.vision_backward(np.ones_like(vis))
        assert e.value.status == "QF_ERR_UNSUPPORTED" and "bf16" in str(e.value), str(e.value)
    # back on the CPU: the CPU's results and backward again
    m.to("cpu")
    assert util.rel_err(m.vision(px), io["vision_last_hidden_state"]) < TOL
    tok = m.fuse(px)
    assert util.rel_err(tok, io["language_projection"]) < TOL
    g = m.fuse_backward(np.ones_like(tok))
    assert np.all(np.isfinite(g["pixel_values"]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fixture_instructblip(dtype):
    _, io, folder = util.load_fixture("instructblip_llama_0")
    extra = os.path.join(folder, "extra.safetensors")
    if not os.path.exists(extra):
        pytest.skip("tests/fixtures/instructblip_llama_0/extra.safetensors not made yet")
    ref = util.read_safetensors(extra)
    tol = _tol(dtype)
    m = Blip2.load(folder).to("cuda", dtype)
    px, ids, mask = io["pixel_values"], io["qformer_input_ids"], io["qformer_attention_mask"]
    errs = {}
    for rep in range(2):
        errs["vision"] = util.rel_err(m.vision(px), io["vision_last_hidden_state"])
        q = m.qformer(encoder_hidden_states=io["vision_last_hidden_state"], qformer_input_ids=ids,
                      qformer_attention_mask=mask)
        errs["qformer"] = util.rel_err(q, ref["qformer_last_hidden_state"])
        tok = m.fuse(px, qformer_input_ids=ids, qformer_attention_mask=mask)
        errs["fuse"] = util.rel_err(tok, ref["language_projection"])
        assert max(errs.values()) < tol, (dtype, rep, errs)
    print("instructblip_llama_0 %s: %s" % (dtype, ", ".join("%s %.2e" % kv for kv in errs.items())))
    # one item alone (another B, another Q-Former text shape) equals its row of the batch
    tok1 = m.fuse(px[1:2], qformer_input_ids=ids[1:2], qformer_attention_mask=mask[1:2])
    assert util.rel_err(tok1[0], ref["language_projection"][1]) < tol
    if dtype == "float32":
        assert np.all(np.isfinite(m.fuse_backward(np.ones_like(tok1))["pixel_values"]))
    else:
        with pytest.raises(QfuseError) as e:
            m.fuse_backward(np.ones_like(tok1))
        assert e.value.status == "QF_ERR_UNSUPPORTED" and "bf16" in str(e.value), str(e.value)
    m.to("cpu")
    tok = m.fuse(px, qformer_input_ids=ids, qformer_attention_mask=mask)
    assert util.rel_err(tok, ref["language_projection"]) < TOL


# ---- a second model: one head of 48, 3 layers, 36x36 images (uncovered border pixels) ----

def _wide_head_model(tmp_path, rng):
    """blip2_opt_0 with vision_config num_attention_heads 1, num_hidden_layers 3, image_size
    36 (patches 8: 4x4 of them, N = 17 as before, so the Q-Former and the position embedding
    keep their shapes); vision weights perturbed so no layer repeats another."""
    src = os.path.join(util.FIXTURES, "blip2_opt_0")
    dst = str(tmp_path / "wide")
    os.makedirs(dst)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    vc = cfg["vision_config"]
    vc.update(num_attention_heads=1, num_hidden_layers=3, image_size=36)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    sd = util.read_safetensors(os.path.join(src, "model.safetensors"))
    for k in [k for k in sd if k.startswith("vision_model.encoder.layers.1.")]:
        sd[k.replace("layers.1.", "layers.2.")] = sd[k].copy()
    for k in sd:
        if k.startswith("vision_model."):
            a = np.asarray(sd[k], np.float32)
            sd[k] = (a + 0.05 * rng.standard_normal(a.shape) * (np.abs(a).max() + 1e-3)).astype(np.float32)
    util.write_safetensors(os.path.join(dst, "model.safetensors"), sd)
    shutil.copy(os.path.join(src, "generation_config.json"), dst)
    return dst, cfg, sd


def test_wide_head_vs_reference_and_cpu(tmp_path):
    rng, seed = _rng()
    folder, cfg, sd = _wide_head_model(tmp_path, rng)
    cpu = Blip2.load(folder)
    gpu = Blip2.load(folder).to("cuda")
    bf = Blip2.load(folder).to("cuda", "bfloat16")
    t = util.torch()
    import test_blip2
    tsd = {k: t.tensor(np.asarray(v, np.float64)) for k, v in sd.items() if k.startswith("vision_model.")}
    for B in (5, 5, 2, 5):
        px = rng.standard_normal((B, 3, 36, 36)).astype(np.float32)
        ref = test_blip2.vision_ref(tsd, cfg["vision_config"], t.tensor(px, dtype=t.float64)).numpy()
        vis = gpu.vision(px)
        assert util.rel_err(vis, ref) < TOL, (seed, B)
        assert util.rel_err(vis, cpu.vision(px)) < TOL, (seed, B)
        assert util.rel_err(bf.vision(px), ref) < BF16_TOL, (seed, B)
        assert util.rel_err(gpu.fuse(px), cpu.fuse(px)) < TOL, (seed, B)
    # a NaN outside every patch (x = 35 > 4*8) is named too, as on the CPU
    bad = px.copy()
    bad[3, 1, 2, 35] = np.nan
    for m in (gpu, cpu):
        with pytest.raises(QfuseError) as e:
            m.fuse(bad)
        assert e.value.status == "QF_ERR_NONFINITE" and "pixel_values[3,1,2,35]" in str(e.value), str(e.value)


def test_eager_path_without_graphs(monkeypatch):
    _, io, folder = util.load_fixture("blip2_opt_0")
    monkeypatch.setenv("QFUSE_CUDA_GRAPHS", "0")
    m = Blip2.load(folder).to("cuda")
    for _ in range(2):
        assert util.rel_err(m.vision(io["pixel_values"]), io["vision_last_hidden_state"]) < TOL
        assert util.rel_err(m.fuse(io["pixel_values"]), io["language_projection"]) < TOL


def test_nonfinite_pixels_named():
    _, io, folder = util.load_fixture("blip2_opt_0")
    m = Blip2.load(folder).to("cuda")
    px = np.ascontiguousarray(io["pixel_values"], np.float32)
    good = m.fuse(px)
    for idx, val in [((1, 2, 5, 7), np.nan), ((0, 0, 31, 0), np.inf), ((1, 1, 16, 9), -np.inf)]:
        bad = px.copy()
        bad[idx] = val
        for call in (m.fuse, m.vision):
            with pytest.raises(QfuseError) as e:
                call(bad)
            assert e.value.status == "QF_ERR_NONFINITE"
            assert "pixel_values[%d,%d,%d,%d]" % idx in str(e.value), str(e.value)
    # two bad pixels: the first in memory order is named, as on the CPU
    bad = px.copy()
    bad[1, 0, 20, 20] = np.nan
    bad[0, 2, 3, 30] = np.nan
    with pytest.raises(QfuseError) as e:
        m.fuse(bad)
    assert "pixel_values[0,2,3,30]" in str(e.value)
    # the model is intact afterwards
    assert util.rel_err(m.fuse(px), good) < 1e-6


def test_device_memory_out_and_pixels_refused():
    """out may be GPU memory (qf_vision_forward, qf_blip2_fuse); pixels on the GPU are refused."""
    _, io, folder = util.load_fixture("blip2_opt_0")
    m = Blip2.load(folder).to("cuda")
    px = np.ascontiguousarray(io["pixel_values"], np.float32)
    B = px.shape[0]
    vshape = (B, m.num_image_tokens, m.vision_hidden_size)
    tshape = (B, m.num_query_tokens, m.projection_dim)
    with qfuse.cuda.DeviceBuffers() as bufs:
        dvis, dtok, dpx = bufs.empty(vshape), bufs.empty(tshape), bufs.upload(px)
        for _ in range(2):
            check(lib.qf_vision_forward(m._vh, B, px.ctypes.data, dvis))
            check(lib.qf_blip2_fuse(m._h, B, px.ctypes.data, 0, None, None, dtok))
        assert util.rel_err(bufs.download(dvis, vshape), io["vision_last_hidden_state"]) < TOL
        assert util.rel_err(bufs.download(dtok, tshape), io["language_projection"]) < TOL
        with pytest.raises(QfuseError) as e:
            check(lib.qf_vision_forward(m._vh, B, dpx, dvis))
        assert e.value.status == "QF_ERR_ARG" and "pixel_values" in str(e.value)


def test_part_moved_back_alone_refused():
    from qfuse.qformer import _to_device
    _, io, folder = util.load_fixture("blip2_opt_0")
    m = Blip2.load(folder).to("cuda")
    _to_device(m._qh, "cpu", "float32", "test")
    with pytest.raises(QfuseError) as e:
        m.fuse(io["pixel_values"])
    assert e.value.status == "QF_ERR_ARG" and "Q-Former" in str(e.value)
    m.to("cuda")
    assert util.rel_err(m.fuse(io["pixel_values"]), io["language_projection"]) < TOL


def test_fusion_model_places_the_whole_blip2():
    _, io, folder = util.load_fixture("blip2_opt_0")
    fm = qfuse.load(folder, device="cuda", part="fusion")
    assert fm.impl.device == "cuda"
    assert util.rel_err(fm.impl.fuse(io["pixel_values"]), io["language_projection"]) < TOL
    fm.close()
