"""test_cuda_vision_backward.py - qf_vision_backward and qf_blip2_backward on a GPU model
(src/models/vision.c and blip2.c: the same backward code as the CPU's, through the CUDA backend's
table, with the Q-Former's GPU backward in between) against the CPU backward of the same model,
and the fuse's gradients against the float64 PyTorch reference test_blip2._fuse_ref (the one
test_blip2.py checks the CPU with), on fresh random pixels and output gradients.

Models: the fixtures blip2_opt_0 and instructblip_llama_0 (with its instruction ids), and
test_cuda_vision's second model (one head of 48, 3 layers, 36x36 images whose border pixels no
patch reads: their gradient is 0) with perturbed random weights.

Bounds (float32 on the GPU, TF32 off): every parameter gradient and the pixel gradient
max|g-ref|/max|ref| < 1e-4 on its own scale, ref = the CPU backward; a tensor that is negligible
next to the case's largest gradient (max <= 1e-3 of it: e.g. the qkv bias's key part, zero up to
rounding) relative to that largest gradient. Against the float64 reference: the worst error
relative to the largest reference gradient < 1e-4 (test_blip2's rule).
Covered: a shape twice with new data (planned buffers reused, graphs replayed) and another B;
frozen vision tower (no parameter gradients; the pixel gradient still comes: the GPU forward of a
frozen tower keeps no activations and its backward runs the forward again), frozen after the
forward and unfrozen after the forward; the fuse with every group trainable, the vision tower
frozen, vision + Q-Former frozen, everything frozen, no pixel gradient; gradients accumulate over
two backward calls and zero_grad clears the device copy (vision and BLIP-2's own parameters);
moving back to the CPU keeps the device gradients; grad_out and the pixel gradient in GPU
memory; bf16 weights refused with the reason (vision and fuse). Skips with the library's reason
where no CUDA backend / GPU is usable. QFUSE_TEST_QUICK=1 (the compute-sanitizer run) keeps the
fixture cases and skips the float64 reference."""
import ctypes
import os

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
VISION_CASES = ["blip2_opt_0"] if util.QUICK else ["blip2_opt_0", "wide"]
FUSE_CASES = ["blip2_opt_0"] if util.QUICK else ["blip2_opt_0", "instructblip_llama_0"]


@pytest.fixture(autouse=True)
def _needs_gpu():
    if REASON is not None:
        pytest.skip("CUDA backend not usable: %s" % REASON)


def _rng():
    seed = int(os.environ.get("QFUSE_TEST_SEED", "0")) or int.from_bytes(os.urandom(4), "little")
    return np.random.default_rng(seed), seed


def _check(got, ref, what):
    """Every tensor of ref (a gradient dict): max|g-ref| / max|ref| < TOL on its own scale, or,
    for a tensor negligible next to the largest gradient (max|ref| <= 1e-3 of it), relative to
    that largest gradient. Returns the worst (own-scale error, name)."""
    assert set(got) == set(ref), (what, set(got) ^ set(ref))
    scale = max(float(np.max(np.abs(v))) for v in ref.values() if np.size(v))
    assert scale > 0, what
    worst = (0.0, "")
    for k, v in ref.items():
        d = float(np.max(np.abs(np.asarray(got[k], np.float64) - v)))
        own = float(np.max(np.abs(v)))
        if own > 1e-3 * scale:
            e = d / own
            worst = max(worst, (e, k))
        else:
            e = d / scale
        assert e < TOL, (what, k, e)
    return worst


def _folder(tmp_path, rng, case):
    if case == "wide":
        import test_cuda_vision
        folder, cfg, _ = test_cuda_vision._wide_head_model(tmp_path, rng)
        return folder, cfg["vision_config"]["image_size"]
    _, _, folder = util.load_fixture(case)
    return folder, 32


def _pixels(rng, B, S):
    return rng.standard_normal((B, 3, S, S)).astype(np.float32)


def _text(case, B):
    """InstructBLIP's instruction ids and mask for B items (None for BLIP-2)."""
    if case != "instructblip_llama_0":
        return None, None
    _, io, _ = util.load_fixture(case)
    ids, mask = io["qformer_input_ids"], io["qformer_attention_mask"]
    reps = -(-B // ids.shape[0])
    return np.tile(ids, (reps, 1))[:B], np.tile(mask, (reps, 1))[:B]


def _vision_grads(m, px, gout):
    m.vision(px)
    return m.vision_backward(gout)


def _grad(m, name):
    for n, p in m._params():
        if n == name:
            return np.ctypeslib.as_array(p.grad, tuple(p.shape[:p.ndim])).copy()
    raise KeyError(name)


# ---- the vision tower alone ------------------------------------------------------------------

@pytest.mark.parametrize("case", VISION_CASES)
def test_vision_vs_cpu(tmp_path, case):
    rng, seed = _rng()
    folder, S = _folder(tmp_path, rng, case)
    cpu, gpu = Blip2.load(folder), Blip2.load(folder).to("cuda")
    N, Hv = gpu.num_image_tokens, gpu.vision_hidden_size
    worst = (0.0, "")
    for B in (2, 2, 3):
        px = _pixels(rng, B, S)
        gout = rng.standard_normal((B, N, Hv)).astype(np.float32)
        gg, gc = _vision_grads(gpu, px, gout), _vision_grads(cpu, px, gout)
        assert any(k.startswith("vision_model.") for k in gc)
        worst = max(worst, _check(gg, gc, (case, seed, B)))
    if case == "wide":  # pixels beyond the 4x4 patches of 8 reach no column
        assert np.all(gg["pixel_values"][:, :, 32:, :] == 0) and np.all(gg["pixel_values"][:, :, :, 32:] == 0)
    print("%s vision: worst vs cpu %.2e (%s)" % (case, worst[0], worst[1]))

    # frozen: only the pixel gradient, equal to the unfrozen one; the GPU forward of a frozen
    # tower keeps nothing, so its backward runs the forward again
    for m in (cpu, gpu):
        m.set_frozen(["vision"], True)
    fg, fc = _vision_grads(gpu, px, gout), _vision_grads(cpu, px, gout)
    assert set(fg) == {"pixel_values"}, set(fg)
    _check(fg, fc, (case, seed, "frozen"))
    assert util.rel_err(fg["pixel_values"], gg["pixel_values"]) < 1e-6
    # frozen at the forward, unfrozen before the backward: parameter gradients again
    gpu.vision(px)
    gpu.set_frozen(["vision"], False)
    cpu.set_frozen(["vision"], False)
    _check(gpu.vision_backward(gout), gc, (case, seed, "unfrozen after the forward"))
    # unfrozen at the forward, frozen before the backward
    gpu.vision(px)
    gpu.set_frozen(["vision"], True)
    again = gpu.vision_backward(gout)
    assert set(again) == {"pixel_values"}
    assert util.rel_err(again["pixel_values"], gg["pixel_values"]) < 1e-6
    # no pixel gradient asked and frozen: nothing to do
    gpu.vision(px)
    assert gpu.vision_backward(gout, pixel_grad=False) == {}


# ---- the whole fuse -------------------------------------------------------------------------

@pytest.mark.parametrize("case", FUSE_CASES)
def test_fuse_vs_cpu_and_reference(tmp_path, case):
    rng, seed = _rng()
    folder, S = _folder(tmp_path, rng, case)
    cpu, gpu = Blip2.load(folder), Blip2.load(folder).to("cuda")
    nq, D = gpu.num_query_tokens, gpu.projection_dim
    worst = (0.0, "")
    for B in (2, 2, 3):
        px = _pixels(rng, B, S)
        ids, mask = _text(case, B)
        gout = rng.standard_normal((B, nq, D)).astype(np.float32)
        gpu.fuse(px, ids, mask)
        gg = gpu.fuse_backward(gout)
        cpu.fuse(px, ids, mask)
        gc = cpu.fuse_backward(gout)
        worst = max(worst, _check(gg, gc, (case, seed, B)))
    print("%s fuse: worst vs cpu %.2e (%s)" % (case, worst[0], worst[1]))
    if not util.QUICK:
        import test_blip2
        _, ref = test_blip2._fuse_ref(folder, px, ids, mask, grad_out=gout)
        err, where = test_blip2._grad_err(gg, ref)
        print("%s fuse: vs float64 reference %.2e (%s)" % (case, err, where))
        assert err < TOL, (case, seed, where, err)

    # frozen groups, as BLIP-2 is trained (vision frozen), and further
    for groups, pixel_grad in [(["vision"], True), (["vision"], False), (["vision", "qformer"], True),
                               ("all", True), ("all", False)]:
        for m in (cpu, gpu):
            m.set_frozen("all", False)
            m.set_frozen(groups, True)
        gpu.fuse(px, ids, mask)
        fg = gpu.fuse_backward(gout, pixel_grad=pixel_grad)
        cpu.fuse(px, ids, mask)
        fc = cpu.fuse_backward(gout, pixel_grad=pixel_grad)
        if fc:
            _check(fg, fc, (case, seed, groups, pixel_grad))
        else:
            assert fg == {}, (groups, pixel_grad)
        for k, v in fg.items():
            assert util.rel_err(v, gg[k]) < 1e-5, (groups, k)


# ---- accumulation, zero_grad, back to the CPU ------------------------------------------------

def test_accumulate_zero_grad_and_back_to_cpu():
    rng, seed = _rng()
    _, io, folder = util.load_fixture("blip2_opt_0")
    gpu = Blip2.load(folder).to("cuda")
    B, nq, D = 2, gpu.num_query_tokens, gpu.projection_dim
    px = _pixels(rng, B, 32)
    gout = np.ascontiguousarray(rng.standard_normal((B, nq, D)).astype(np.float32))
    gpu.fuse(px)
    one = gpu.fuse_backward(gout)  # zeroes first: one call's gradients
    names = ["vision_model.embeddings.patch_embedding.weight", "vision_model.embeddings.position_embedding",
             "vision_model.embeddings.class_embedding", "vision_model.encoder.layers.0.self_attn.qkv.weight",
             "vision_model.post_layernorm.bias", "qformer.encoder.layer.0.crossattention.attention.key.weight",
             "query_tokens", "language_projection.weight", "language_projection.bias"]
    names = [n for n in names if n in one]
    assert len(names) >= 8, names
    # two raw backward calls accumulate on the device, as on the CPU
    for _ in range(2):
        check(lib.qf_blip2_backward(gpu._h, gout.ctypes.data, None))
    for n in names:
        np.testing.assert_allclose(_grad(gpu, n), 3 * one[n], rtol=1e-5, atol=1e-5 * np.abs(one[n]).max(), err_msg=n)
    # zero_grad clears the device copies: one more backward gives one call's gradients
    lib.qf_blip2_zero_grad(gpu._h)
    check(lib.qf_blip2_backward(gpu._h, gout.ctypes.data, None))
    for n in names:
        assert util.rel_err(_grad(gpu, n), one[n]) < 1e-6, n
    # the vision tower's own zero_grad and backward
    gv = np.ascontiguousarray(rng.standard_normal((B, gpu.num_image_tokens, gpu.vision_hidden_size)), np.float32)
    gpu.vision(px)
    vone = gpu.vision_backward(gv)
    check(lib.qf_vision_backward(gpu._vh, gv.ctypes.data, None))
    w = "vision_model.encoder.layers.1.mlp.fc1.weight"
    assert util.rel_err(_grad(gpu, w), 2 * vone[w]) < 1e-5
    # the device gradients reach the host when the model moves back to the CPU
    check(lib.qf_vision_backward(gpu._vh, gv.ctypes.data, None))
    gpu.to("cpu")
    assert util.rel_err(_grad(gpu, w), 3 * vone[w]) < 1e-5
    # and the CPU backward is intact
    cpu = Blip2.load(folder)
    for m in (gpu, cpu):
        m.fuse(px)
    _check(gpu.fuse_backward(gout), cpu.fuse_backward(gout), ("back on the cpu", seed))


def test_device_pointers():
    """grad_out and the pixel gradient in GPU memory (qf_vision_backward, qf_blip2_backward)."""
    rng, seed = _rng()
    _, io, folder = util.load_fixture("blip2_opt_0")
    gpu = Blip2.load(folder).to("cuda")
    B = 2
    px = _pixels(rng, B, 32)
    gv = rng.standard_normal((B, gpu.num_image_tokens, gpu.vision_hidden_size)).astype(np.float32)
    gf = rng.standard_normal((B, gpu.num_query_tokens, gpu.projection_dim)).astype(np.float32)
    ref_v = _vision_grads(gpu, px, gv)
    gpu.fuse(px)
    ref_f = gpu.fuse_backward(gf)
    w = "vision_model.encoder.layers.0.mlp.fc2.weight"
    with qfuse.cuda.DeviceBuffers() as bufs:
        dgv, dgf, dgpx = bufs.upload(gv), bufs.upload(gf), bufs.empty(px.shape)
        gpu.vision(px)
        lib.qf_vision_zero_grad(gpu._vh)
        check(lib.qf_vision_backward(gpu._vh, dgv, dgpx))
        assert util.rel_err(bufs.download(dgpx, px.shape), ref_v["pixel_values"]) < 1e-6, seed
        assert util.rel_err(_grad(gpu, w), ref_v[w]) < 1e-6, seed
        gpu.fuse(px)
        lib.qf_blip2_zero_grad(gpu._h)
        check(lib.qf_blip2_backward(gpu._h, dgf, dgpx))
        assert util.rel_err(bufs.download(dgpx, px.shape), ref_f["pixel_values"]) < 1e-6, seed
        assert util.rel_err(_grad(gpu, "query_tokens"), ref_f["query_tokens"]) < 1e-6, seed


def test_bf16_backward_refused():
    rng, seed = _rng()
    _, io, folder = util.load_fixture("blip2_opt_0")
    bf = Blip2.load(folder).to("cuda", "bfloat16")
    px = _pixels(rng, 2, 32)
    out = bf.fuse(px)
    with pytest.raises(QfuseError) as e:
        bf.fuse_backward(np.ones_like(out))
    msg = str(e.value)
    assert e.value.status == "QF_ERR_UNSUPPORTED" and "bf16" in msg and "float32" in msg, msg
    assert "qf_blip2_backward" in msg, msg
    vis = bf.vision(px)
    with pytest.raises(QfuseError) as e:
        bf.vision_backward(np.ones_like(vis))
    msg = str(e.value)
    assert e.value.status == "QF_ERR_UNSUPPORTED" and "bf16" in msg and "qf_vision_backward" in msg, msg
    # the same model placed with float32 weights differentiates
    bf.to("cuda")
    cpu = Blip2.load(folder)
    for m in (bf, cpu):
        m.fuse(px)
    _check(bf.fuse_backward(np.ones_like(out)), cpu.fuse_backward(np.ones_like(out)), ("f32 after bf16", seed))
