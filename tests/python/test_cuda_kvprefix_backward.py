"""test_cuda_kvprefix_backward.py - qf_kvprefix_backward and qf_kvprefix_project_backward on a GPU model
(src/models/kvprefix.c: the same backward code as the CPU's, through the CUDA backend's table, and
the Q-Former's GPU backward) against the CPU backward of the same model and against PyTorch
autograd of the float64 reference ref_fusion.kvprefix_reference (the one test_kvprefix.py checks
the CPU with), on fresh random models and inputs.

Bounds (float32 on the GPU, TF32 off): every parameter gradient and input gradient
(encoder_hidden_states, global_feature, query_embeds) max|g-ref|/max|ref| < 1e-4 on its own
scale, ref = the CPU backward and ref = the float64 reference; a tensor that is negligible next to
the case's largest gradient (max <= 1e-3 of it, e.g. self-attention's key bias, zero up to
rounding) relative to that largest gradient.
Covered: with and without an encoder mask, the model's own query tokens and caller query_embeds,
cross-attention every layer and every other layer; a second backward on new data and another
shape; an item whose encoder tokens are all padding; language_projection's backward (project
then project_backward) vs the CPU and torch; gradients accumulate over two backward calls and
qf_kvprefix_zero_grad clears the device copy; grad_out and the input gradients in GPU memory;
moving the model back to the CPU keeps the device gradients; bf16 weights refused (backward and
project_backward) with the reason. Skips with the library's reason where no CUDA backend / GPU
is usable. QFUSE_TEST_QUICK=1 (the compute-sanitizer run) keeps two cases.
Device run (H100, library at 96cd9ff, 42 passed with the pre-fusion files): worst own-scale gradient
error vs the CPU 5.9e-7 .. 1.2e-6, vs the float64 reference 5.5e-7 .. 7.9e-7 over the eight cases
and the all-padding item; project_backward vs torch 1.0e-7; compute-sanitizer memcheck (QUICK):
0 errors."""
import ctypes
import os

import numpy as np
import pytest

import qfuse
import qfuse.cuda
import ref_fusion as RF
import test_kvprefix as TK
import util
from qfuse import QfuseError
from qfuse._native import check, lib
from qfuse.blip2 import qf_qformer_args
from qfuse.fusion import KVPrefix
from test_cuda_prefusion_backward import _check, _param_grad

REASON = qfuse.cuda.unavailable_reason()
TOL = 1e-4
CASES = [(True, True, 1), (True, False, 2)] if util.QUICK else [
    (m, o, f) for m in (False, True) for o in (True, False) for f in (1, 2)]


@pytest.fixture(autouse=True)
def _needs_gpu():
    if REASON is not None:
        pytest.skip("CUDA backend not usable: %s" % REASON)


def _rng():
    seed = int(os.environ.get("QFUSE_TEST_SEED", "0")) or int.from_bytes(os.urandom(4), "little")
    return np.random.default_rng(seed), seed


def _model(tmp_path, rng, freq=1, projection_dim=0):
    cfg = TK._cfg(layers=3 if freq == 2 else 2, freq=freq)
    sd = RF.random_kvprefix(cfg, rng, projection_dim=projection_dim)
    return cfg, sd, TK._write(str(tmp_path / "m"), cfg, sd)


def _run(m, enc, g, q, mask, gout):
    m.fuse(encoder_hidden_states=enc, global_feature=g, query_embeds=q, encoder_attention_mask=mask)
    return m.backward(gout)


def _ref(sd, cfg, enc, g, q, mask, gout):
    """The reference's gradients under the names backward() returns (its query_embeds: the
    gradient of the broadcast queries, per item, also for the model's own tokens)."""
    _, rg, _ = RF.kvprefix_reference(sd, cfg, enc, g, q, mask, grad_out=gout)
    rg = {k: v for k, v in rg.items() if not k.startswith("language_projection.")}
    return rg


def _compare(gg, gc, rg, own_queries, what):
    wc = _check(gg, gc, what + ("vs cpu",))
    if own_queries:  # the reference has no per-item query_embeds then: their sum over B is query_tokens
        assert util.rel_err(gg["query_embeds"].sum(axis=0, keepdims=True), rg["query_tokens"]) < TOL, what
    # language_projection (zero here) is project_backward's
    gg = {k: v for k, v in gg.items() if not k.startswith("language_projection.")
          and not (own_queries and k == "query_embeds")}
    wr = _check(gg, rg, what + ("vs reference",))
    return wc, wr


@pytest.mark.parametrize("masked,own_queries,freq", CASES)
def test_vs_cpu_and_reference(tmp_path, masked, own_queries, freq):
    rng, seed = _rng()
    cfg, sd, folder = _model(tmp_path, rng, freq=freq)
    cpu, gpu = KVPrefix.load(folder), KVPrefix.load(folder).to("cuda")
    H = cfg["qformer_config"]["hidden_size"]
    wc = wr = (0.0, "")
    # a shape twice with new data (buffers reused, the forward's graph replayed), then another
    for B, S in [(3, 7), (3, 7), (2, 11)]:
        enc, g, q, mask = TK._inputs(rng, cfg, B, S, masked, own_queries)
        Lq = cfg["num_query_tokens"] if q is None else q.shape[1]
        gout = rng.standard_normal((B, Lq, H)).astype(np.float32)
        gg = _run(gpu, enc, g, q, mask, gout)
        gc = _run(cpu, enc, g, q, mask, gout)
        c, r = _compare(gg, gc, _ref(sd, cfg, enc, g, q, mask, gout), own_queries, (masked, own_queries, freq,
                                                                                   seed, B))
        wc, wr = max(wc, c), max(wr, r)
    print("masked=%s own=%s freq=%d: vs cpu %.2e (%s), vs reference %.2e (%s)" % (
        masked, own_queries, freq, wc[0], wc[1], wr[0], wr[1]))


def test_dead_item_and_projection(tmp_path):
    rng, seed = _rng()
    cfg, sd, folder = _model(tmp_path, rng, projection_dim=9)
    cpu, gpu = KVPrefix.load(folder), KVPrefix.load(folder).to("cuda")
    H = cfg["qformer_config"]["hidden_size"]
    enc, g, _, mask = TK._inputs(rng, cfg, 3, 6, True, True)
    mask[1, :] = False                      # every encoder token of item 1 is padding: prefix only
    gout = rng.standard_normal((3, cfg["num_query_tokens"], H)).astype(np.float32)
    gg = _run(gpu, enc, g, None, mask, gout)
    gc = _run(cpu, enc, g, None, mask, gout)
    c, r = _compare(gg, gc, _ref(sd, cfg, enc, g, None, mask, gout), True, ("dead item", seed))
    print("dead item: vs cpu %.2e (%s), vs reference %.2e (%s)" % (c + r))
    # language_projection's backward on the GPU vs the CPU and torch autograd (float64)
    out = gpu.fuse(encoder_hidden_states=enc, global_feature=g, encoder_attention_mask=mask)
    go = rng.standard_normal(out.shape[:-1] + (9,)).astype(np.float32)
    t = util.torch()
    xt = t.tensor(out.astype(np.float64), requires_grad=True)
    wt = t.tensor(sd["language_projection.weight"].astype(np.float64), requires_grad=True)
    bt = t.tensor(sd["language_projection.bias"].astype(np.float64), requires_grad=True)
    (t.nn.functional.linear(xt, wt, bt) * t.tensor(go.astype(np.float64))).sum().backward()
    ref = {"x": xt.grad.numpy(), "language_projection.weight": wt.grad.numpy(),
           "language_projection.bias": bt.grad.numpy()}
    for rep in range(2):                    # the second reuses the staging block
        gx, gp = gpu.project_backward(out, go)
        gxc, gpc = cpu.project_backward(out, go)
        _check(dict(gp, x=gx), dict(gpc, x=gxc), ("project_backward vs cpu", rep, seed))
        e = _check(dict(gp, x=gx), ref, ("project_backward vs torch", rep, seed))
    print("project_backward vs torch %.2e (%s)" % e)


def test_accumulate_zero_grad_and_back_to_cpu(tmp_path):
    rng, seed = _rng()
    cfg, sd, folder = _model(tmp_path, rng, projection_dim=5)
    gpu = KVPrefix.load(folder).to("cuda")
    H = cfg["qformer_config"]["hidden_size"]
    enc, g, _, mask = TK._inputs(rng, cfg, 2, 5, True, True)
    gout = rng.standard_normal((2, cfg["num_query_tokens"], H)).astype(np.float32)
    one = _run(gpu, enc, g, None, mask, gout)      # zeroes first: one call's gradients
    names = ["query_tokens", "kv_prefix.prefix_tokens", "kv_prefix.feature_proj.0.weight", "kv_prefix.v_proj.bias",
             "qformer.encoder.layer.0.crossattention.attention.value.weight"]
    go = np.ascontiguousarray(gout)
    for _ in range(2):                              # raw calls accumulate on the device
        check(lib.qf_kvprefix_backward(gpu._h, go.ctypes.data, None, None, None))
    for n in names:
        np.testing.assert_allclose(_param_grad(gpu, n), 3 * one[n], rtol=1e-5,
                                   atol=1e-5 * np.abs(one[n]).max(), err_msg=n)
    lib.qf_kvprefix_zero_grad(gpu._h)               # clears the device copy
    check(lib.qf_kvprefix_backward(gpu._h, go.ctypes.data, None, None, None))
    for n in names:
        assert util.rel_err(_param_grad(gpu, n), one[n]) < 1e-6, n
    # project_backward accumulates into the same device block
    x = rng.standard_normal((4, H)).astype(np.float32)
    gp = rng.standard_normal((4, 5)).astype(np.float32)
    check(lib.qf_kvprefix_project_backward(gpu._h, 4, x.ctypes.data, gp.ctypes.data, None))
    pw = gp.astype(np.float64).T @ x.astype(np.float64)
    assert util.rel_err(_param_grad(gpu, "language_projection.weight"), pw) < TOL
    # the device gradients reach the host when the model moves back to the CPU
    check(lib.qf_kvprefix_backward(gpu._h, go.ctypes.data, None, None, None))
    gpu.to("cpu")
    for n in names:
        assert util.rel_err(_param_grad(gpu, n), 2 * one[n]) < 1e-5, n
    assert util.rel_err(_param_grad(gpu, "language_projection.weight"), pw) < TOL
    g2 = _run(gpu, enc, g, None, mask, gout)       # and the CPU backward is intact
    _compare(g2, one, _ref(sd, cfg, enc, g, None, mask, gout), True, ("back on the cpu", seed))


def test_device_pointers(tmp_path):
    """inputs, output, grad_out and every input gradient in GPU memory."""
    rng, seed = _rng()
    cfg, sd, folder = _model(tmp_path, rng, projection_dim=7)
    gpu = KVPrefix.load(folder).to("cuda")
    enc, g, q, mask = TK._inputs(rng, cfg, 2, 6, True, False)
    B, S, Lq, H = enc.shape[0], enc.shape[1], q.shape[1], cfg["qformer_config"]["hidden_size"]
    gout = rng.standard_normal((B, Lq, H)).astype(np.float32)
    rg = _ref(sd, cfg, enc, g, q, mask, gout)
    m8 = np.ascontiguousarray(mask, np.uint8)
    a = qf_qformer_args(B=B, num_queries=Lq, encoder_len=S)
    a.encoder_attention_mask = m8.ctypes.data
    x = rng.standard_normal((3, H)).astype(np.float32)
    gp = rng.standard_normal((3, 7)).astype(np.float32)
    with qfuse.cuda.DeviceBuffers() as bufs:
        dg, dq, denc, dout = bufs.upload(g), bufs.upload(q), bufs.upload(enc), bufs.empty((B, Lq, H))
        dgo, dgg, dgq, dge = bufs.upload(gout), bufs.empty(g.shape), bufs.empty(q.shape), bufs.empty(enc.shape)
        check(lib.qf_kvprefix_forward(gpu._h, ctypes.byref(a), dg, dq, denc, dout))
        check(lib.qf_kvprefix_backward(gpu._h, dgo, dgg, dgq, dge))
        got = {"global_feature": bufs.download(dgg, g.shape), "query_embeds": bufs.download(dgq, q.shape),
               "encoder_hidden_states": bufs.download(dge, enc.shape)}
        dx, dgp, dgx = bufs.upload(x), bufs.upload(gp), bufs.empty(x.shape)
        check(lib.qf_kvprefix_project_backward(gpu._h, 3, dx, dgp, dgx))
        gx = bufs.download(dgx, x.shape)
    for k, v in got.items():
        assert util.rel_err(v, rg[k]) < TOL, (k, seed)
    assert util.rel_err(gx, gp.astype(np.float64) @ sd["language_projection.weight"]) < TOL, seed


def test_bf16_backward_refused(tmp_path):
    rng, seed = _rng()
    cfg, sd, folder = _model(tmp_path, rng, projection_dim=5)
    bf = KVPrefix.load(folder).to("cuda", "bfloat16")
    enc, g, _, mask = TK._inputs(rng, cfg, 2, 5, True, True)
    out = bf.fuse(encoder_hidden_states=enc, global_feature=g, encoder_attention_mask=mask)
    for call, fn in [(lambda: bf.backward(np.ones_like(out)), "qf_kvprefix_backward"),
                     (lambda: bf.project_backward(out, np.ones(out.shape[:-1] + (5,), np.float32)),
                      "qf_kvprefix_project_backward")]:
        with pytest.raises(QfuseError) as e:
            call()
        msg = str(e.value)
        assert e.value.status == "QF_ERR_UNSUPPORTED" and "bf16" in msg and "float32" in msg and fn in msg, msg
    # the same model placed with float32 weights differentiates
    bf.to("cuda")
    gout = np.ones_like(out)
    g2 = _run(bf, enc, g, None, mask, gout)
    _compare(g2, g2, _ref(sd, cfg, enc, g, None, mask, gout), True, ("f32 after bf16", seed))
