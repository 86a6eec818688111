"""test_cuda_qformer_backward.py - qf_qformer_backward on a GPU model (src/models/qformer_backward.c
through the CUDA backend's table: ops_backward.cu, the SDPA backward of sdpa.cu) against the same
references as the CPU backward: the transformers fixtures tests/fixtures/qformer_{0,1} (every
parameter gradient), the float64 PyTorch reference ref_qformer.py (input gradients, random models)
and the CPU backward of the same model.

Bounds: float32 with TF32 off, as test_qformer.py: parameter gradients max|g-ref| over all
tensors / max|ref| over all tensors (_grad_err) < 1e-4, input gradients max|g-ref|/max|ref| < 1e-4.
Random cases: InstructBLIP text with padded text, KV prefix, both, all-padding encoder items
(autograd's uniform-softmax gradient), no masks. Also: a frozen model (input gradients only,
the same as unfrozen), two backward calls accumulate like the CPU (qf_qformer_zero_grad resets
the device copy too), GPU-resident grad_out and input gradients, bf16 weights refused, the model
moved back to the CPU. Skips with the library's reason where no CUDA backend / GPU is usable.

Device run 1 (H100, at ca74509, with test_cuda_qformer.py): 34 passed; fixture parameter
gradients 3.0e-7 (qformer_0) / 1.7e-7 (qformer_1) of max|ref|, input gradients 2.5-3.0e-7."""
import ctypes
import os

import numpy as np
import pytest

import qfuse
import qfuse.cuda
import ref_qformer as R
import util
from qfuse import QfuseError
from qfuse._native import check, lib
from qfuse.qformer import QFormer, qf_qformer_args
from test_cuda_qformer import CASES, _fwd, _random_case, _write

REASON = qfuse.cuda.unavailable_reason()
TOL = 1e-4


@pytest.fixture(autouse=True)
def _needs_gpu():
    if REASON is not None:
        pytest.skip("CUDA backend not usable: %s" % REASON)


def _rng():
    seed = int(os.environ.get("QFUSE_TEST_SEED", "0")) or int.from_bytes(os.urandom(4), "little")
    return np.random.default_rng(seed), seed


def _grad_err(got, ref, names):
    """max over names of max|g - ref| / (max over names of max|ref|), and the worst name."""
    scale = max(float(np.max(np.abs(np.asarray(ref[n], np.float64)))) for n in names)
    return max((float(np.max(np.abs(np.asarray(got[n], np.float64) - ref[n]))) / scale, n) for n in names)


def _param_names(g):
    return [k for k in g if k not in ("query_embeds", "encoder_hidden_states", "prefix_k", "prefix_v")]


@pytest.mark.parametrize("name", util.fixture_names("qformer_"))
def test_fixture_grads(name):
    case, io, folder = util.load_fixture(name)
    qf = QFormer.load(folder, device="cuda")
    args = (io["query_embeds"], io["encoder_hidden_states"], io["encoder_attention_mask"])
    refs = {k[5:]: v.astype(np.float64) for k, v in io.items() if k.startswith("grad.")}
    cfg = R.config_from_json(os.path.join(folder, "config.json"))
    sd = util.read_safetensors(os.path.join(folder, "model.safetensors"))
    _, rg, _ = R.reference(sd, cfg, *args, grad_out=io["grad_out"])
    for rep in range(2):  # the second backward reuses the planned buffers (and the forward's graph)
        out = qf.forward(*args)
        assert util.rel_err(out, io["last_hidden_state"]) < TOL
        g = qf.backward(io["grad_out"])
        assert set(_param_names(g)) == set(refs)
        err, worst = _grad_err(g, refs, list(refs))
        assert err < TOL, (name, rep, worst, err)
        for k in ("query_embeds", "encoder_hidden_states"):
            e = util.rel_err(g[k], rg[k])
            assert e < TOL, (name, k, e)
    print("%s: param grad err %.2e (worst %s), query %.2e, encoder %.2e" % (
        name, err, worst, util.rel_err(g["query_embeds"], rg["query_embeds"]),
        util.rel_err(g["encoder_hidden_states"], rg["encoder_hidden_states"])))


@pytest.mark.parametrize("case", sorted(CASES))
def test_random_vs_cpu_and_reference(tmp_path, case):
    rng, seed = _rng()
    has_text, Lt, P, freq, act, mk = CASES[case]
    cfg, sd, inp = _random_case(rng, has_text, Lt, P, freq, act, mk)
    B, Lq = inp["query_embeds"].shape[:2]
    gout = rng.standard_normal((B, Lq + Lt, cfg["hidden_size"])).astype(np.float32)
    folder = _write(str(tmp_path / "m"), cfg, sd, has_text)
    cpu, gpu = QFormer.load(folder), QFormer.load(folder, device="cuda")
    _fwd(cpu, inp)
    gc = cpu.backward(gout)
    _fwd(gpu, inp)
    gg = gpu.backward(gout)
    assert set(gg) == set(gc)
    _, rg, _ = R.reference(sd, cfg, grad_out=gout, **inp)
    names = _param_names(gc)
    err, worst = _grad_err(gg, gc, names)
    assert err < TOL, (case, seed, worst, err, "vs cpu")
    err, worst = _grad_err(gg, rg, list(sd))
    assert err < TOL, (case, seed, worst, err, "vs reference")
    if has_text:
        assert np.all(gg["embeddings.word_embeddings.weight"][0] == 0)  # padding_idx row
    for k in ["query_embeds", "encoder_hidden_states"] + (["prefix_k", "prefix_v"] if P else []):
        assert util.rel_err(gg[k], rg[k]) < TOL, (case, seed, k)
        assert util.rel_err(gg[k], gc[k]) < TOL, (case, seed, k)


def test_frozen_and_accumulation(tmp_path):
    rng, seed = _rng()
    cfg, sd, inp = _random_case(rng, True, 3, 2, 2, "gelu", "pad")
    B, Lq = inp["query_embeds"].shape[:2]
    gout = rng.standard_normal((B, Lq + 3, cfg["hidden_size"])).astype(np.float32)
    folder = _write(str(tmp_path / "m"), cfg, sd, True)
    cpu, qf = QFormer.load(folder), QFormer.load(folder, device="cuda")
    _fwd(qf, inp)
    g = qf.backward(gout)
    qf.set_frozen(True)
    gf = qf.backward(gout)
    assert set(gf) == {"query_embeds", "encoder_hidden_states", "prefix_k", "prefix_v"}
    for k in gf:
        np.testing.assert_allclose(gf[k], g[k], rtol=0, atol=1e-6 * np.abs(g[k]).max(), err_msg=k)
    qf.set_frozen(False)
    # parameter gradients accumulate across backward calls on the device, as on the CPU
    name = "encoder.layer.0.crossattention.attention.value.weight"
    go = np.ascontiguousarray(gout)
    _fwd(cpu, inp)
    for m in (qf, cpu):
        m.zero_grad()
        for _ in range(2):
            assert lib.qf_qformer_backward(m._h, go.ctypes.data, None, None, None, None) == 0
    acc = {}
    for m, tag in ((qf, "gpu"), (cpu, "cpu")):
        p = qfuse._native.qf_param()
        assert lib.qf_qformer_find_param(m._h, name.encode(), ctypes.byref(p)) == 0
        acc[tag] = np.ctypeslib.as_array(p.grad, shape=(p.shape[0], p.shape[1])).copy()
    np.testing.assert_allclose(acc["gpu"], 2 * g[name], rtol=1e-5, atol=1e-6 * np.abs(g[name]).max())
    assert util.rel_err(acc["gpu"], acc["cpu"]) < TOL
    # zero_grad clears the device copy too: one more backward gives one call's gradients
    qf.zero_grad()
    assert lib.qf_qformer_backward(qf._h, go.ctypes.data, None, None, None, None) == 0
    p = qfuse._native.qf_param()
    assert lib.qf_qformer_find_param(qf._h, name.encode(), ctypes.byref(p)) == 0
    one = np.ctypeslib.as_array(p.grad, shape=(p.shape[0], p.shape[1]))
    np.testing.assert_allclose(one, g[name], rtol=1e-5, atol=1e-6 * np.abs(g[name]).max())


def test_device_pointers_and_back_to_cpu():
    """grad_out and the input gradients in GPU memory; then the model on the CPU again."""
    case, io, folder = util.load_fixture("qformer_1")
    qf = QFormer.load(folder, device="cuda")
    q = np.ascontiguousarray(io["query_embeds"], np.float32)
    enc = np.ascontiguousarray(io["encoder_hidden_states"], np.float32)
    mask = np.ascontiguousarray(io["encoder_attention_mask"], np.uint8)
    gout = np.ascontiguousarray(io["grad_out"], np.float32)
    B, Lq, H = q.shape
    ref = QFormer.load(folder)
    ref.forward(q, enc, mask)
    gr = ref.backward(gout)
    with qfuse.cuda.DeviceBuffers() as bufs:
        dq, denc, dout, dg = bufs.upload(q), bufs.upload(enc), bufs.empty((B, Lq, H)), bufs.upload(gout)
        dgq, dge = bufs.empty(q.shape), bufs.empty(enc.shape)
        a = qf_qformer_args(B=B, num_queries=Lq, encoder_len=enc.shape[1])
        a.encoder_attention_mask = mask.ctypes.data
        check(lib.qf_qformer_forward(qf._h, ctypes.byref(a), dq, denc, dout))
        check(lib.qf_qformer_backward(qf._h, dg, dgq, dge, None, None))
        gq, ge = np.empty_like(q), np.empty_like(enc)
        check(lib.qf_cuda_download(gq.ctypes.data, dgq, gq.nbytes))
        check(lib.qf_cuda_download(ge.ctypes.data, dge, ge.nbytes))
    assert util.rel_err(gq, gr["query_embeds"]) < TOL
    assert util.rel_err(ge, gr["encoder_hidden_states"]) < TOL
    qf.to("cpu")
    qf.forward(q, enc, mask)
    g = qf.backward(gout)
    names = _param_names(gr)
    assert _grad_err(g, gr, names)[0] < 1e-6


def test_bf16_backward_refused():
    case, io, folder = util.load_fixture("qformer_0")
    qf = QFormer.load(folder, device="cuda", dtype="bfloat16")
    qf.forward(io["query_embeds"], io["encoder_hidden_states"], io["encoder_attention_mask"])
    with pytest.raises(QfuseError) as e:
        qf.backward(io["grad_out"])
    assert e.value.status == "QF_ERR_UNSUPPORTED" and "bf16" in str(e.value)
