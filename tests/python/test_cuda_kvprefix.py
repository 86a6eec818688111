"""test_cuda_kvprefix.py - the KV-prefix model on the CUDA backend (qf_kvprefix_to_device,
src/models/kvprefix.c: the global-feature MLP, the prefix tokens, the prefix K/V projections and
the Q-Former as one captured graph per shape) against the float64 PyTorch reference
ref_fusion.kvprefix_reference on fresh random models and inputs, and against the CPU forward of
the same model.

Bounds (as test_cuda_qformer.py): float32 on the GPU (TF32 off) max|out-ref|/max|ref| < 1e-4;
bf16 weights (every GEMM reads a bfloat16 copy of its weight, float32 accumulation and
activations) < 3e-2 of max|ref|.
Covered: own query tokens and caller query_embeds, with and without an encoder mask,
cross-attention every layer and every other layer; one model over two shapes with new data
(eager + capture, two graph replays, a second shape, back again); language_projection through
project() on the GPU; an item whose encoder tokens are all padding (it attends to its prefix
only); the eager path (QFUSE_CUDA_GRAPHS=0); GPU-resident inputs and output; NaN/Inf in
global_feature / encoder_hidden_states / query_embeds named with their flat index; backward and
project_backward refused with bf16 weights (float32 GPU backward: test_cuda_kvprefix_backward.py);
.to("cpu") gives the CPU path (and backward) back;
qfuse.load(device="cuda") places the whole model. Every GPU test skips with the library's reason
where libqfuse has no CUDA backend or no GPU is usable; test_device_argument_* run everywhere.
Device run (H100, 2026-11-23, library built from 55faa51): every test passed; float32 vs the
float64 reference 2.3e-7 .. 4.0e-7, bf16 weights 3.4e-4 .. 7.1e-4 (8 configurations x 5 shapes);
compute-sanitizer memcheck of the GPU path (eager, capture, replays, project, a NaN input): 0 errors."""
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


def _model(tmp_path, rng, freq=1, layers=2, projection_dim=0, name="m"):
    cfg = TK._cfg(layers=layers, freq=freq)
    sd = RF.random_kvprefix(cfg, rng, projection_dim=projection_dim)
    return cfg, sd, TK._write(str(tmp_path / name), cfg, sd)


def _fuse(m, enc, g, q, mask):
    return m.fuse(encoder_hidden_states=enc, global_feature=g, query_embeds=q, encoder_attention_mask=mask)


def test_device_argument_refusals(tmp_path):
    rng, seed = _rng()
    cfg, sd, folder = _model(tmp_path, rng)
    m = KVPrefix.load(folder)
    with pytest.raises(QfuseError) as e:
        m.to("tpu")
    assert "tpu" in str(e.value)
    with pytest.raises(QfuseError) as e:
        m.to("cpu", "bfloat16")
    assert e.value.status == "QF_ERR_UNSUPPORTED" and "cuda" in str(e.value)
    if REASON is not None:
        with pytest.raises(QfuseError) as e:
            m.to("cuda")
        assert e.value.status == "QF_ERR_UNSUPPORTED" and "qf_kvprefix_to_device" in str(e.value)
        with pytest.raises(QfuseError):
            qfuse.load(folder, device="cuda")
    # still a working CPU model after a refused placement
    enc, g, q, mask = TK._inputs(rng, cfg, 2, 5, True, True)
    ref = RF.kvprefix_reference(sd, cfg, enc, g, q, mask)[0]
    assert util.rel_err(_fuse(m, enc, g, q, mask), ref) < TOL, seed


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("own_queries", [True, False])
@pytest.mark.parametrize("freq", [1, 2])
def test_vs_reference_and_cpu(tmp_path, masked, own_queries, freq):
    rng, seed = _rng()
    cfg, sd, folder = _model(tmp_path, rng, freq=freq, layers=3 if freq == 2 else 2)
    cpu = KVPrefix.load(folder)
    gpu = KVPrefix.load(folder).to("cuda")
    bf = KVPrefix.load(folder).to("cuda", "bfloat16")
    worst = worst_bf = 0.0
    # one shape three times (eager + capture, then two replays) with new data, another, back
    for B, S in [(3, 7), (3, 7), (3, 7), (2, 11), (3, 7)]:
        enc, g, q, mask = TK._inputs(rng, cfg, B, S, masked, own_queries)
        ref = RF.kvprefix_reference(sd, cfg, enc, g, q, mask)[0]
        out = _fuse(gpu, enc, g, q, mask)
        e = util.rel_err(out, ref)
        assert e < TOL, (B, S, seed, e)
        assert util.rel_err(out, _fuse(cpu, enc, g, q, mask)) < TOL, (B, S, seed)
        eb = util.rel_err(_fuse(bf, enc, g, q, mask), ref)
        assert eb < BF16_TOL, (B, S, seed, eb)
        worst, worst_bf = max(worst, e), max(worst_bf, eb)
    print("masked=%s own=%s freq=%d: f32 %.2e bf16 %.2e" % (masked, own_queries, freq, worst, worst_bf))


def test_projection_dead_item_bf16_backward_refused_and_back_to_cpu(tmp_path):
    rng, seed = _rng()
    cfg, sd, folder = _model(tmp_path, rng, projection_dim=9)
    gpu = KVPrefix.load(folder).to("cuda")
    enc, g, _, mask = TK._inputs(rng, cfg, 3, 6, True, True)
    mask[1, :] = False                      # every encoder token of item 1 is padding
    for _ in range(3):
        out = _fuse(gpu, enc, g, None, mask)
        ref = RF.kvprefix_reference(sd, cfg, enc, g, None, mask)[0]
        assert util.rel_err(out, ref) < TOL, seed
        proj = gpu.project(out)
        pref = out.astype(np.float64) @ sd["language_projection.weight"].T + sd["language_projection.bias"]
        assert proj.shape == (3, cfg["num_query_tokens"], 9) and util.rel_err(proj, pref) < TOL, seed
    # bf16: the projection reads the bf16 weight too
    bf = KVPrefix.load(folder).to("cuda", "bfloat16")
    assert util.rel_err(bf.project(out), pref) < BF16_TOL
    # backward runs on the GPU in float32 (test_cuda_kvprefix_backward.py); bf16 weights refuse it
    with pytest.raises(QfuseError) as e:
        bf.project_backward(out, np.ones_like(proj))
    assert e.value.status == "QF_ERR_UNSUPPORTED" and "bf16" in str(e.value)
    # and back: the CPU path, with backward, against the reference's gradients
    gpu.to("cpu")
    out = _fuse(gpu, enc, g, None, mask)
    go = rng.standard_normal(out.shape)
    ref, rg, _ = RF.kvprefix_reference(sd, cfg, enc, g, None, mask, grad_out=go)
    assert util.rel_err(out, ref) < TOL
    got = gpu.backward(go.astype(np.float32))
    for k in ("global_feature", "encoder_hidden_states", "kv_prefix.k_proj.weight", "kv_prefix.prefix_tokens"):
        assert util.rel_err(got[k], rg[k]) < 1e-3, (k, seed)
    assert util.rel_err(gpu.project(out), out.astype(np.float64) @ sd["language_projection.weight"].T
                        + sd["language_projection.bias"]) < TOL


def test_nonfinite_inputs_named(tmp_path):
    rng, seed = _rng()
    cfg, sd, folder = _model(tmp_path, rng)
    gpu = KVPrefix.load(folder).to("cuda")
    enc, g, q, mask = TK._inputs(rng, cfg, 3, 7, True, False)
    good = _fuse(gpu, enc, g, q, mask)
    for key, idx, val in [("global_feature", (2, 3), np.nan), ("encoder_hidden_states", (1, 2, 3), np.inf),
                          ("query_embeds", (0, 1, 5), -np.inf)]:
        ins = {"global_feature": g, "encoder_hidden_states": enc, "query_embeds": q}
        bad = ins[key].copy()
        bad[idx] = val
        ins[key] = bad
        with pytest.raises(QfuseError) as e:
            _fuse(gpu, ins["encoder_hidden_states"], ins["global_feature"], ins["query_embeds"], mask)
        flat = int(np.ravel_multi_index(idx, bad.shape))
        assert e.value.status == "QF_ERR_NONFINITE"
        assert "%s[%d]" % (key, flat) in str(e.value), str(e.value)
    # the model is intact afterwards (the same graph replays)
    assert util.rel_err(_fuse(gpu, enc, g, q, mask), good) < 1e-6


def test_eager_path_without_graphs(tmp_path, monkeypatch):
    rng, seed = _rng()
    cfg, sd, folder = _model(tmp_path, rng, freq=2, layers=3)
    monkeypatch.setenv("QFUSE_CUDA_GRAPHS", "0")
    gpu = KVPrefix.load(folder).to("cuda")
    for B, S in [(2, 5), (2, 5), (3, 9)]:
        enc, g, q, mask = TK._inputs(rng, cfg, B, S, True, True)
        ref = RF.kvprefix_reference(sd, cfg, enc, g, q, mask)[0]
        assert util.rel_err(_fuse(gpu, enc, g, q, mask), ref) < TOL, seed


def test_device_pointers_in_and_out(tmp_path):
    """GPU-resident global_feature / encoder states / output (what a GPU pipeline passes)."""
    rng, seed = _rng()
    cfg, sd, folder = _model(tmp_path, rng)
    m = KVPrefix.load(folder).to("cuda")
    enc, g, _, mask = TK._inputs(rng, cfg, 2, 6, True, True)
    ref = RF.kvprefix_reference(sd, cfg, enc, g, None, mask)[0]
    B, S = enc.shape[:2]
    nq, H = cfg["num_query_tokens"], cfg["qformer_config"]["hidden_size"]
    m8 = np.ascontiguousarray(mask, np.uint8)
    with qfuse.cuda.DeviceBuffers() as bufs:
        dg, denc, dout = bufs.upload(g), bufs.upload(enc), bufs.empty((B, nq, H))
        a = qf_qformer_args(B=B, num_queries=nq, encoder_len=S)
        a.encoder_attention_mask = m8.ctypes.data
        for _ in range(3):
            check(lib.qf_kvprefix_forward(m._h, ctypes.byref(a), dg, None, denc, dout))
        out = np.empty((B, nq, H), np.float32)
        check(lib.qf_cuda_download(out.ctypes.data, dout, out.nbytes))
    assert util.rel_err(out, ref) < TOL, seed


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_via_qfuse_load(tmp_path, dtype):
    """qfuse.load(device="cuda") places the whole KV-prefix model (not only its Q-Former)."""
    rng, seed = _rng()
    cfg, sd, folder = _model(tmp_path, rng, projection_dim=7)
    m = qfuse.load(folder, device="cuda", dtype=dtype)
    assert m.kind == "kv_prefix" and m.device == "cuda"
    enc, g, _, mask = TK._inputs(rng, cfg, 2, 5, False, True)
    ref = RF.kvprefix_reference(sd, cfg, enc, g)[0]
    tol = TOL if dtype == "float32" else BF16_TOL
    assert util.rel_err(m.qformer(encoder_hidden_states=enc, global_feature=g), ref) < tol, seed
    pref = ref @ sd["language_projection.weight"].T + sd["language_projection.bias"]
    assert util.rel_err(m.fuse(encoder_hidden_states=enc, global_feature=g), pref) < tol, seed
    gout = np.ones_like(ref, np.float32)
    if dtype == "bfloat16":  # backward is float32 only
        with pytest.raises(QfuseError) as e:
            m.qformer_backward(gout, encoder_hidden_states=enc, global_feature=g)
        assert e.value.status == "QF_ERR_UNSUPPORTED" and "bf16" in str(e.value)
        return
    got = m.qformer_backward(gout, encoder_hidden_states=enc, global_feature=g)   # on the GPU
    rg = RF.kvprefix_reference(sd, cfg, enc, g, grad_out=gout)[1]
    for k in ("global_feature", "encoder_hidden_states", "kv_prefix.prefix_tokens", "query_tokens"):
        assert util.rel_err(got[k], rg[k]) < TOL, (k, seed)
