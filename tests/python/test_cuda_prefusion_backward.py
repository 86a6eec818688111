"""test_cuda_prefusion_backward.py - qf_prefusion_backward on a GPU model (src/models/prefusion.c: the
same backward code as the CPU's, through the CUDA backend's table, and the Q-Former's GPU
backward) against the CPU backward of the same model and against PyTorch autograd of the float64
reference ref_fusion.prefusion_reference (the one test_prefusion.py checks the CPU with), on
fresh random models and inputs.

Bounds (float32 on the GPU, TF32 off): every parameter gradient and input gradient (audio,
face) max|g-ref|/max|ref| < 1e-4 on its own scale, ref = the CPU backward and ref = the float64
reference; a tensor that is negligible next to the case's largest gradient (max <= 1e-3 of it,
e.g. self-attention's key bias, zero up to rounding) relative to that largest gradient.
Covered: masked (uneven real frame counts, one item face-only), unmasked, fusion_order
["audio","face"], audio only, face only, cross-attention every other layer; a second backward on
new data and another shape (planned buffers reused, grown); gradients accumulate over two
backward calls and qf_prefusion_zero_grad clears the device copy; grad_out and the input
gradients in GPU memory; moving the model back to the CPU keeps the device gradients; bf16
weights refused with the reason. Skips with the library's reason where no CUDA backend / GPU is
usable. QFUSE_TEST_QUICK=1 (the compute-sanitizer run) keeps two cases.
Device run (H100, library at 96cd9ff, with test_cuda_kvprefix_backward.py, test_cuda_kvprefix.py and
test_cuda_qformer.py's pre-fusion tests: 42 passed): worst own-scale gradient error vs the CPU
6.1e-7 .. 7.5e-7, vs the float64 reference 5.0e-7 .. 6.3e-7 over the six cases; compute-sanitizer
memcheck (QUICK, both backward files): 0 errors."""
import ctypes
import os

import numpy as np
import pytest

import qfuse
import qfuse.cuda
import ref_fusion as RF
import test_prefusion as TP
import util
from qfuse import QfuseError
from qfuse._native import check, lib
from qfuse.fusion import Prefusion, qf_prefusion_args

REASON = qfuse.cuda.unavailable_reason()
TOL = 1e-4
CASES = ["masked", "audio_only"] if util.QUICK else [
    "masked", "unmasked", "audio_first", "audio_only", "face_only", "freq2"]


@pytest.fixture(autouse=True)
def _needs_gpu():
    if REASON is not None:
        pytest.skip("CUDA backend not usable: %s" % REASON)


def _rng():
    seed = int(os.environ.get("QFUSE_TEST_SEED", "0")) or int.from_bytes(os.urandom(4), "little")
    return np.random.default_rng(seed), seed


def _model(tmp_path, rng, case="masked"):
    cfg = TP._cfg(fusion_order=["audio", "face"] if case == "audio_first" else None,
                  layers=3 if case == "freq2" else 2, freq=2 if case == "freq2" else 1)
    sd = RF.random_prefusion(cfg, rng)
    return cfg, sd, TP._write(str(tmp_path / "m"), cfg, sd)


def _lens(case, ta, tf):
    return (ta if case != "face_only" else 0), (tf if case != "audio_only" else 0)


def _run(m, a, f, am, fm, gout):
    m.fuse(audio=a, face=f, audio_mask=am, face_mask=fm)
    return m.backward(gout)


def _check(got, ref, what):
    """Every tensor of ref (a gradient dict): max|g-ref| / max|ref| < TOL on its own scale, and,
    for a tensor that is negligible next to the largest gradient (max|ref| <= 1e-3 of it: e.g.
    self-attention's key bias, zero up to rounding), relative to that largest gradient.
    Returns the worst (own-scale error, name)."""
    assert set(got) == set(ref), set(got) ^ set(ref)
    scale = max(float(np.max(np.abs(v))) for v in ref.values() if np.size(v))
    worst = (0.0, "")
    for k, v in ref.items():
        if not np.size(v):
            continue
        d = float(np.max(np.abs(np.asarray(got[k], np.float64) - v)))
        own = float(np.max(np.abs(v)))
        if own > 1e-3 * scale:
            e = d / own
            worst = max(worst, (e, k))
        else:
            e = d / scale
        assert e < TOL, (what, k, e)
    return worst


@pytest.mark.parametrize("case", CASES)
def test_vs_cpu_and_reference(tmp_path, case):
    rng, seed = _rng()
    cfg, sd, folder = _model(tmp_path, rng, case)
    cpu, gpu = Prefusion.load(folder), Prefusion.load(folder).to("cuda")
    nq, L = cfg["num_multi_query_token"], cfg["llm_hidden_size"]
    masked = case not in ("unmasked", "face_only")
    wc = wr = (0.0, "")
    # a shape twice with new data (buffers reused, the forward's graph replayed), then another
    for B, ta, tf in [(3, 4, 6), (3, 4, 6), (2, 7, 3)]:
        ta, tf = _lens(case, ta, tf)
        a, f, am, fm = TP._inputs(rng, cfg, B, ta, tf, masked)
        gout = rng.standard_normal((B, nq, L)).astype(np.float32)
        gg = _run(gpu, a, f, am, fm, gout)
        gc = _run(cpu, a, f, am, fm, gout)
        _, rg, _ = RF.prefusion_reference(sd, cfg, a, f, am, fm, grad_out=gout)
        wc = max(wc, _check(gg, gc, (case, seed, B, "vs cpu")))
        wr = max(wr, _check(gg, rg, (case, seed, B, "vs reference")))
        if masked and ta and tf and B > 1:
            assert np.all(gg["audio"][1] == 0)      # item 1's audio frames are all padding
    print("%s: vs cpu %.2e (%s), vs reference %.2e (%s)" % (case, wc[0], wc[1], wr[0], wr[1]))


def _param_grad(m, name):
    for n, p in m._params():
        if n == name:
            return np.ctypeslib.as_array(p.grad, tuple(p.shape[:p.ndim])).copy()
    raise KeyError(name)


def test_accumulate_zero_grad_and_back_to_cpu(tmp_path):
    rng, seed = _rng()
    cfg, sd, folder = _model(tmp_path, rng)
    gpu = Prefusion.load(folder).to("cuda")
    B, nq, L = 2, cfg["num_multi_query_token"], cfg["llm_hidden_size"]
    a, f, am, fm = TP._inputs(rng, cfg, B, 3, 5, True)
    gout = rng.standard_normal((B, nq, L)).astype(np.float32)
    one = _run(gpu, a, f, am, fm, gout)             # zeroes first: one call's gradients
    names = ["multi_position_embedding.weight", "multi_query_tokens", "multi_audio_embs.weight",
             "multi_llama_proj.bias", "multi_Qformer.encoder.layer.0.crossattention.attention.key.weight"]
    # two raw backward calls accumulate on the device, as on the CPU
    go = np.ascontiguousarray(gout)
    for _ in range(2):
        check(lib.qf_prefusion_backward(gpu._h, go.ctypes.data, None, None))
    for n in names:
        np.testing.assert_allclose(_param_grad(gpu, n), 3 * one[n], rtol=1e-5,
                                   atol=1e-5 * np.abs(one[n]).max(), err_msg=n)
    # zero_grad clears the device copy: one more backward gives one call's gradients
    lib.qf_prefusion_zero_grad(gpu._h)
    check(lib.qf_prefusion_backward(gpu._h, go.ctypes.data, None, None))
    for n in names:
        assert util.rel_err(_param_grad(gpu, n), one[n]) < 1e-6, n
    # the device gradients reach the host when the model moves back to the CPU
    check(lib.qf_prefusion_backward(gpu._h, go.ctypes.data, None, None))
    gpu.to("cpu")
    for n in names:
        assert util.rel_err(_param_grad(gpu, n), 2 * one[n]) < 1e-5, n
    # and the CPU backward is intact
    g = _run(gpu, a, f, am, fm, gout)
    _, rg, _ = RF.prefusion_reference(sd, cfg, a, f, am, fm, grad_out=gout)
    _check(g, rg, ("back on the cpu", seed))


def test_device_pointers(tmp_path):
    """inputs, output, grad_out and the input gradients in GPU memory."""
    rng, seed = _rng()
    cfg, sd, folder = _model(tmp_path, rng)
    gpu = Prefusion.load(folder).to("cuda")
    B, ta, tf, nq, L = 2, 3, 5, cfg["num_multi_query_token"], cfg["llm_hidden_size"]
    a, f, am, fm = TP._inputs(rng, cfg, B, ta, tf, True)
    gout = rng.standard_normal((B, nq, L)).astype(np.float32)
    ref, rg, _ = RF.prefusion_reference(sd, cfg, a, f, am, fm, grad_out=gout)
    am8, fm8 = np.ascontiguousarray(am, np.uint8), np.ascontiguousarray(fm, np.uint8)
    args = qf_prefusion_args(B=B, audio_len=ta, face_len=tf)
    args.audio_mask, args.face_mask = am8.ctypes.data, fm8.ctypes.data
    lib.qf_prefusion_zero_grad(gpu._h)
    with qfuse.cuda.DeviceBuffers() as bufs:
        da, df, dout, dg = bufs.upload(a), bufs.upload(f), bufs.empty((B, nq, L)), bufs.upload(gout)
        dga, dgf = bufs.empty(a.shape), bufs.empty(f.shape)
        check(lib.qf_prefusion_forward(gpu._h, ctypes.byref(args), da, df, dout))
        check(lib.qf_prefusion_backward(gpu._h, dg, dga, dgf))
        out = bufs.download(dout, (B, nq, L))
        ga, gf = bufs.download(dga, a.shape), bufs.download(dgf, f.shape)
    assert util.rel_err(out, ref) < TOL, seed
    assert util.rel_err(ga, rg["audio"]) < TOL, seed
    assert util.rel_err(gf, rg["face"]) < TOL, seed
    assert util.rel_err(_param_grad(gpu, "multi_video_embs.weight"), rg["multi_video_embs.weight"]) < TOL, seed


def test_bf16_backward_refused(tmp_path):
    rng, seed = _rng()
    cfg, sd, folder = _model(tmp_path, rng)
    bf = Prefusion.load(folder).to("cuda", "bfloat16")
    a, f, am, fm = TP._inputs(rng, cfg, 2, 3, 5, True)
    out = bf.fuse(audio=a, face=f, audio_mask=am, face_mask=fm)
    with pytest.raises(QfuseError) as e:
        bf.backward(np.ones_like(out))
    msg = str(e.value)
    assert e.value.status == "QF_ERR_UNSUPPORTED" and "bf16" in msg and "float32" in msg, msg
    assert "qf_prefusion_backward" in msg, msg
    # the same model placed with float32 weights differentiates
    bf.to("cuda")
    bf.fuse(audio=a, face=f, audio_mask=am, face_mask=fm)
    g = bf.backward(np.ones_like(out))
    _, rg, _ = RF.prefusion_reference(sd, cfg, a, f, am, fm, grad_out=np.ones_like(out))
    _check(g, rg, ("f32 after bf16", seed))
