"""test_cuda_modality.py - AffectGPT's per-modality Q-Formers (qf_modality_qformer_to_device) and
its "attention" multi-fusion (qf_attn_fusion_to_device) on the GPU, against the float64 PyTorch
references of ref_modality.py (what test_modality.py checks the CPU models with) and against the
same model on the CPU, on fresh random weights and inputs (seed: QFUSE_TEST_SEED or random,
printed on failure).

- Forward: float32 rel err < 1e-4 against the reference and the CPU model, bf16 weights < 3e-2;
  frame masks / variable lengths as the CPU tests use them, 4-D video frames (K tokens per
  frame), the whole position table, changing batch sizes (graph replay with new data and new
  shapes), and the eager path (QFUSE_CUDA_GRAPHS=0).
- Backward on the GPU (float32 weights): every gradient against the reference, as test_modality;
  bf16 weights refused naming bf16; moving back to the CPU keeps the accumulated gradients.
- A NaN / Inf input is named with its flat index; the model works afterwards.
- Placement refusals: unknown device, bf16 on the CPU, and (without a usable GPU) "cuda".
Skips with the library's reason where libqfuse has no CUDA backend or no GPU is usable (the
refusal test runs everywhere). Under `make fakedev` the GPU code paths run on host memory."""
import os

import numpy as np
import pytest

import qfuse.cuda
import ref_modality as RM
import test_modality as TM
import util
from qfuse import QfuseError
from qfuse.modality import AttentionFusion, ModalityQFormer

REASON = qfuse.cuda.unavailable_reason()
TOL = 1e-4
BF16_TOL = 3e-2


@pytest.fixture(autouse=True)
def _needs_gpu(request):
    if REASON is not None and not request.function.__name__.startswith("test_device_argument_"):
        pytest.skip("CUDA backend not usable: %s" % REASON)


def _rng():
    seed = int(os.environ.get("QFUSE_TEST_SEED", "0")) or int.from_bytes(os.urandom(4), "little")
    return np.random.default_rng(seed), seed


def _modality_model(tmp_path, rng, modality):
    D = 20 if modality == "video" else 12
    cfg = RM.modality_config(modality, D, 5, 24, TM._qcfg())
    sd = RM.random_modality(cfg, rng)
    qp = RM.NAMES[modality]["qformer"]
    folder = TM._write(str(tmp_path / modality), cfg, sd, qp, lavis=True)
    return cfg, sd, qp, folder


def _frame_mask(rng, B, T):
    fm = np.zeros((B, T), bool)
    for b in range(B):
        fm[b, :rng.integers(1, T + 1)] = True
    return fm


def _attention_model(tmp_path, rng):
    cfg = RM.attention_config(12, 20, 4, 16)
    sd = RM.random_attention(cfg, rng)
    return cfg, sd, TM._write(str(tmp_path / "attn"), cfg, sd)


def _attention_inputs(rng, B, ta, tf, masked):
    a = rng.standard_normal((B, ta, 12)).astype(np.float32)
    f = rng.standard_normal((B, tf, 20)).astype(np.float32)
    am = fm = None
    if masked:
        am, fm = _frame_mask(rng, B, ta), _frame_mask(rng, B, tf)
    return a, f, am, fm


def test_device_argument_refusals(tmp_path):
    rng, seed = _rng()
    cfg, sd, qp, folder = _modality_model(tmp_path, rng, "audio")
    cfg_a, sd_a, folder_a = _attention_model(tmp_path, rng)
    m, f = ModalityQFormer.load(folder), AttentionFusion.load(folder_a)
    for model in (m, f):
        with pytest.raises(QfuseError) as e:
            model.to("tpu")
        assert "tpu" in str(e.value) and e.value.status == "QF_ERR_ARG"
        with pytest.raises(QfuseError) as e:
            model.to("cpu", "bfloat16")
        assert e.value.status == "QF_ERR_UNSUPPORTED" and "cuda" in str(e.value)
        if REASON is not None:
            with pytest.raises(QfuseError) as e:
                model.to("cuda")
            assert e.value.status == "QF_ERR_UNSUPPORTED"
    if REASON is not None:
        with pytest.raises(QfuseError):
            ModalityQFormer.load(folder, device="cuda")
        with pytest.raises(QfuseError):
            AttentionFusion.load(folder_a, device="cuda")
    # the models still work on the CPU after a refused placement
    x = rng.standard_normal((2, 5, 12)).astype(np.float32)
    assert util.rel_err(m.fuse(x), RM.modality_reference(sd, cfg, x)[0]) < TOL, seed
    a, fc, am, fm = _attention_inputs(rng, 2, 3, 4, True)
    assert util.rel_err(f.fuse(a, fc, am, fm), RM.attention_reference(sd_a, cfg_a, a, fc, am, fm)[0]) < TOL, seed


def _modality_cases(rng, modality, P):
    """(frames, frame_mask) of several shapes: masked, unmasked, the whole table, 4-D video."""
    D = 20 if modality == "video" else 12
    cases = [(rng.standard_normal((3, 6, D)), _frame_mask(rng, 3, 6)),
             (rng.standard_normal((3, 6, D)), _frame_mask(rng, 3, 6)),     # same shape, new data
             (rng.standard_normal((3, 6, D)), None),
             (rng.standard_normal((2, P, D)), None)]
    if modality == "video":
        cases.append((rng.standard_normal((2, 4, 3, D)), np.array([[1, 1, 0, 0], [1, 1, 1, 1]], bool)))
    return [(x.astype(np.float32), fm) for x, fm in cases]


@pytest.mark.parametrize("modality", ["video", "audio"])
def test_modality_vs_reference_and_cpu(tmp_path, modality):
    rng, seed = _rng()
    cfg, sd, qp, folder = _modality_model(tmp_path, rng, modality)
    cpu = ModalityQFormer.load(folder)
    gpu = ModalityQFormer.load(folder).to("cuda")
    bf = ModalityQFormer.load(folder, device="cuda", dtype="bfloat16")
    for x, fm in _modality_cases(rng, modality, cpu.frame_position_size):
        ref = RM.modality_reference(sd, cfg, x, fm)[0]
        out = gpu.fuse(x, frame_mask=fm)
        assert util.rel_err(out, ref) < TOL, (modality, seed, x.shape)
        assert util.rel_err(out, cpu.fuse(x, frame_mask=fm)) < TOL, (modality, seed, x.shape)
        assert util.rel_err(bf.fuse(x, frame_mask=fm), ref) < BF16_TOL, (modality, seed, x.shape)
    with pytest.raises(QfuseError) as e:
        bf.backward(np.ones_like(out))
    assert e.value.status == "QF_ERR_UNSUPPORTED" and "bf16" in str(e.value)


@pytest.mark.parametrize("modality", ["video", "audio"])
def test_modality_backward_on_gpu(tmp_path, modality):
    rng, seed = _rng()
    cfg, sd, qp, folder = _modality_model(tmp_path, rng, modality)
    gpu = ModalityQFormer.load(folder, device="cuda")
    for x, fm in _modality_cases(rng, modality, gpu.frame_position_size)[::2]:
        out = gpu.fuse(x, frame_mask=fm)
        g = rng.standard_normal(out.shape)
        ref, rg, _ = RM.modality_reference(sd, cfg, x, fm, grad_out=g)
        assert util.rel_err(out, ref) < TOL, (modality, seed)
        got = gpu.backward(g.astype(np.float32))
        TM._check_grads(got, rg, seed, qp)
        if fm is not None:   # padded frames get no gradient
            assert np.all(got["frames"][~np.asarray(fm, bool)] == 0)
    # two backwards accumulate on the device; moving back to the CPU brings them along
    from qfuse._native import check, lib
    g32 = np.ascontiguousarray(g, np.float32)
    lib.qf_modality_qformer_zero_grad(gpu._h)
    for _ in range(2):
        check(lib.qf_modality_qformer_backward(gpu._h, g32.ctypes.data, None))
    name = RM.NAMES[modality]["pos"]
    two = dict(gpu._grads())[name]
    gpu.to("cpu")
    back = dict(gpu._grads())[name]
    assert util.rel_err(back, 2 * rg[name]) < 1e-3, seed
    assert np.array_equal(two, back)
    out = gpu.fuse(x, frame_mask=fm)   # and the CPU path works again, with backward
    got = gpu.backward(g.astype(np.float32))
    TM._check_grads(got, rg, seed, qp)


def test_modality_eager_and_nonfinite(tmp_path, monkeypatch):
    rng, seed = _rng()
    cfg, sd, qp, folder = _modality_model(tmp_path, rng, "video")
    monkeypatch.setenv("QFUSE_CUDA_GRAPHS", "0")
    gpu = ModalityQFormer.load(folder, device="cuda")
    monkeypatch.delenv("QFUSE_CUDA_GRAPHS")
    x = rng.standard_normal((2, 4, 3, 20)).astype(np.float32)
    fm = np.array([[1, 0, 1, 0], [1, 1, 1, 1]], bool)
    good = gpu.fuse(x, frame_mask=fm)
    assert util.rel_err(good, RM.modality_reference(sd, cfg, x, fm)[0]) < TOL, seed
    for idx, val in [((1, 2, 0, 3), np.nan), ((0, 1, 2, 19), np.inf)]:
        bad = x.copy()
        bad[idx] = val
        with pytest.raises(QfuseError) as e:
            gpu.fuse(bad, frame_mask=fm)
        assert e.value.status == "QF_ERR_NONFINITE"
        assert "frames[%d]" % np.ravel_multi_index(idx, x.shape) in str(e.value), str(e.value)
    with pytest.raises(QfuseError):   # no successful forward to differentiate
        gpu.backward(np.ones_like(good))
    assert util.rel_err(gpu.fuse(x, frame_mask=fm), good) < 1e-6


# ---- attention fusion (qf_attn_fusion_to_device) ----

def test_attention_vs_reference_cpu_and_backward(tmp_path):
    rng, seed = _rng()
    cfg, sd, folder = _attention_model(tmp_path, rng)
    cpu = AttentionFusion.load(folder)
    gpu = AttentionFusion.load(folder).to("cuda")
    bf = AttentionFusion.load(folder, device="cuda", dtype="bfloat16")
    for B, ta, tf, masked in ((3, 5, 7, True), (3, 5, 7, True), (3, 5, 7, False), (2, 8, 1, True), (4, 2, 3, False)):
        a, f, am, fm = _attention_inputs(rng, B, ta, tf, masked)
        out = gpu.fuse(a, f, am, fm)
        g = rng.standard_normal(out.shape)
        ref, rg, w = RM.attention_reference(sd, cfg, a, f, am, fm, grad_out=g)
        assert util.rel_err(out, ref) < TOL, (seed, B, ta, tf)
        assert util.rel_err(out, cpu.fuse(a, f, am, fm)) < TOL, (seed, B, ta, tf)
        assert util.rel_err(gpu.modality_weights(), w) < TOL, seed
        assert util.rel_err(bf.fuse(a, f, am, fm), ref) < BF16_TOL, (seed, B, ta, tf)
        got = gpu.backward(g.astype(np.float32))
        TM._check_grads(got, rg, seed)
        if masked:   # padded frames get no gradient
            assert np.all(got["audio"][~am] == 0) and np.all(got["face"][~fm] == 0)
    with pytest.raises(QfuseError) as e:
        bf.backward(np.ones_like(out))
    assert e.value.status == "QF_ERR_UNSUPPORTED" and "bf16" in str(e.value)
    # an item without a real frame is refused before anything runs; NaN / Inf inputs are named
    a, f, am, fm = _attention_inputs(rng, 2, 3, 4, True)
    am[1] = False
    with pytest.raises(QfuseError) as e:
        gpu.fuse(a, f, am, fm)
    assert e.value.status == "QF_ERR_ARG" and "audio_mask" in str(e.value)
    am[1, 0] = True
    good = gpu.fuse(a, f, am, fm)
    for key, idx, val in [("audio", (1, 2, 5), np.nan), ("face", (0, 3, 19), -np.inf)]:
        x = {"audio": a.copy(), "face": f.copy()}
        x[key][idx] = val
        with pytest.raises(QfuseError) as e:
            gpu.fuse(x["audio"], x["face"], am, fm)
        assert e.value.status == "QF_ERR_NONFINITE"
        assert "%s[%d]" % (key, np.ravel_multi_index(idx, x[key].shape)) in str(e.value), str(e.value)
    assert util.rel_err(gpu.fuse(a, f, am, fm), good) < 1e-6
    # gradients accumulated on the device come back with the model
    g32 = np.ones_like(good)
    two = {}
    for _ in range(2):
        two = gpu.backward(g32)
    from qfuse._native import lib
    gpu.to("cpu")
    back = {n: np.ctypeslib.as_array(p.grad, tuple(p.shape[:p.ndim])).copy() for n, p in gpu._params()}
    assert util.rel_err(back["fc_att.weight"], two["fc_att.weight"]) < 1e-6   # backward() zeroes first
    lib.qf_attn_fusion_zero_grad(gpu._h)
    out = gpu.fuse(a, f, am, fm)   # and the CPU path works again
    assert util.rel_err(out, good) < TOL


def test_attention_eager(tmp_path, monkeypatch):
    rng, seed = _rng()
    cfg, sd, folder = _attention_model(tmp_path, rng)
    monkeypatch.setenv("QFUSE_CUDA_GRAPHS", "0")
    gpu = AttentionFusion.load(folder, device="cuda")
    for B, ta, tf in ((2, 3, 4), (3, 6, 2)):
        a, f, am, fm = _attention_inputs(rng, B, ta, tf, True)
        ref = RM.attention_reference(sd, cfg, a, f, am, fm)[0]
        assert util.rel_err(gpu.fuse(a, f, am, fm), ref) < TOL, seed
