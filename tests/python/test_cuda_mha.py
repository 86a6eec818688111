"""test_cuda_mha.py - torch.nn.MultiheadAttention on the CUDA backend (qf_mha_to_device: src/models/mha.c
running its one code path on the ops of src/backend/cuda) against torch.nn.MultiheadAttention and
against qfuse on the CPU.

- Fresh random weights and inputs each run (QFUSE_TEST_SEED=n repeats one): self- and
  cross-attention, kdim/vdim different from embed_dim (separate q/k/v_proj_weight), bias off,
  batch_first both ways, key_padding_mask, bool and float attn_mask ([L,S] and [B*H,L,S]),
  is_causal, need_weights head-averaged / per-head / off (off: the GPU reads the heads in place
  from the projection rows, backward splits them). Forward (out, weights) and backward (query, key,
  value and every parameter gradient) on the GPU against torch's float64 autograd: max|x-ref| /
  max|ref| < 1e-4 (float32, TF32 off); and GPU against CPU qfuse on the same inputs (< 1e-4).
- GPU-resident inputs/outputs through the C API (device pointers used in place), buffers that
  grow and are reused across shapes, NaN/Inf screening (named), a mask in GPU memory refused,
  dropout and bf16 backward refused, bf16 weights forward (< 3e-2), moving back to the CPU,
  parameter gradients accumulating across placements, fully masked rows.
Device run (H100, torch 2.11): 19 passed; the worst of every comparison per case (GPU and CPU vs
torch, GPU vs CPU, every output and gradient) 2.5e-7..7.3e-7; bf16 weights out 2.8e-3, weights
7.5e-4; compute-sanitizer memcheck (QUICK, 12 tests) 0 errors.
Every GPU test skips with the library's reason where libqfuse has no CUDA backend or no GPU is
usable; test_device_argument_* run everywhere. QFUSE_TEST_QUICK=1 runs a subset (the sanitizer run
of bench/device_cuda.sh: `python3 tests/python/test_cuda_mha.py`)."""
import ctypes
import os
import sys

import numpy as np
import pytest

import qfuse
import qfuse.cuda
import util
from qfuse import QfuseError, _native
from qfuse._native import check, lib

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


def _make(tmp_path, rng, E, H, kdim=None, vdim=None, bias=True, batch_first=False):
    """(torch float64 module with float32-representable weights, path of its safetensors)."""
    t = util.torch()
    ref = t.nn.MultiheadAttention(E, H, bias=bias, kdim=kdim, vdim=vdim, batch_first=batch_first).double()
    sd = {}
    with t.no_grad():
        for name, p in ref.named_parameters():
            v = rng.standard_normal(tuple(p.shape)).astype(np.float32) * (0.5 / np.sqrt(p.shape[-1]))
            p.copy_(t.from_numpy(v.astype(np.float64)))
            sd[name] = v
    path = str(tmp_path / "mha.safetensors")
    util.write_safetensors(path, sd)
    return ref, path


def _load(path, E, H, kdim=None, vdim=None, bias=True, batch_first=False, **kw):
    return qfuse.MultiheadAttention.load(path, E, H, kdim=kdim, vdim=vdim, bias=bias, batch_first=batch_first, **kw)


def _inputs(rng, B, L, S, E, kdim, vdim, batch_first):
    def shp(n, d):
        return (B, n, d) if batch_first else (n, B, d)
    return (rng.standard_normal(shp(L, E)).astype(np.float32),
            rng.standard_normal(shp(S, kdim or E)).astype(np.float32),
            rng.standard_normal(shp(S, vdim or E)).astype(np.float32))


def _masks(rng, kind, B, H, L, S):
    """(key_padding_mask, attn_mask); key 0 is never blocked (no fully masked row: torch gives NaN)."""
    kpm = am = None
    if "kpm" in kind:
        kpm = rng.random((B, S)) < 0.3
        kpm[:, 0] = False
    shape = (B * H, L, S) if "3d" in kind else (L, S)
    if "bool" in kind:
        am = rng.random(shape) < 0.3
        am[..., 0] = False
    elif "float" in kind:
        am = rng.standard_normal(shape).astype(np.float32)
        am[..., 1::3] = -np.inf if S > 1 else 0.0
        am[..., 0] = 0.0
    return kpm, am


def _torch(ref, q, k, v, kpm, am, need_w, avg, causal, g):
    """torch float64 forward (out, weights) and the gradients of sum(out * g) by name."""
    t = util.torch()
    self_attn = q is k and k is v
    tq = t.tensor(q.astype(np.float64), requires_grad=True)
    tk, tv = (tq, tq) if self_attn else (t.tensor(x.astype(np.float64), requires_grad=True) for x in (k, v))
    if causal:  # torch's is_causal is a hint that needs the mask itself
        L, S = q.shape[1 if ref.batch_first else 0], k.shape[1 if ref.batch_first else 0]
        cm = np.triu(np.ones((L, S), bool), 1)
        am = cm if am is None else (am | cm if am.dtype == bool else np.where(cm, -np.inf, am))
    out, w = ref(tq, tk, tv, key_padding_mask=None if kpm is None else t.from_numpy(kpm),
                 attn_mask=None if am is None else t.from_numpy(am if am.dtype == bool else am.astype(np.float64)),
                 need_weights=need_w, average_attn_weights=avg)
    for p in ref.parameters():
        p.grad = None
    out.backward(t.from_numpy(g.astype(np.float64)))
    grads = {n: p.grad.numpy() for n, p in ref.named_parameters()}
    if self_attn:
        grads["x"] = tq.grad.numpy()
    else:
        grads.update(query=tq.grad.numpy(), key=tk.grad.numpy(), value=tv.grad.numpy())
    return out.detach().numpy(), None if w is None else w.detach().numpy(), grads


def _qfuse(m, q, k, v, kpm, am, need_w, avg, causal, g):
    out, w = m(q, k, v, key_padding_mask=kpm, attn_mask=am, need_weights=need_w, average_attn_weights=avg,
               is_causal=causal)
    grads = m.backward(g)
    if q is k and k is v:
        grads["x"] = grads.pop("query").astype(np.float64) + grads.pop("key") + grads.pop("value")
    return out, w, grads


CASES = [
    # E, H, kdim, vdim, bias, batch_first, B, L, S, masks, need_weights, average, self, causal
    (16, 4, None, None, True, False, 2, 5, 7, "", True, True, False, False),
    (16, 2, None, None, True, True, 3, 4, 4, "kpm", True, False, False, False),
    (12, 4, None, None, False, True, 2, 6, 5, "bool", True, True, False, False),      # head dim 3
    (24, 4, 10, 14, True, False, 2, 3, 9, "kpm+float", True, True, False, False),
    (8, 2, 5, None, True, True, 3, 7, 6, "bool3d", True, False, False, False),
    (20, 5, None, 7, False, False, 1, 4, 11, "kpm+float3d", True, True, False, False),
    (16, 4, None, None, True, False, 2, 5, 5, "kpm+bool3d", False, True, False, False),  # strided
    (32, 4, None, None, True, True, 3, 9, 9, "", False, True, True, False),              # self, strided
    (32, 4, None, None, True, False, 2, 8, 8, "kpm", False, True, True, True),           # self, causal
    (64, 2, 48, 40, False, True, 2, 33, 70, "kpm+float", False, True, False, False),     # head dim 32
    (64, 1, None, None, True, False, 2, 17, 33, "float3d", True, False, False, False),   # head dim 64
    (48, 3, None, None, True, True, 2, 12, 12, "", True, True, True, True),              # causal flag, weights
]
QUICK_CASES = [0, 3, 6, 8, 9]
RUN = [c for i, c in enumerate(CASES) if not util.QUICK or i in QUICK_CASES]


@pytest.mark.parametrize("case", RUN, ids=[str(i) for i in range(len(RUN))])
def test_vs_torch_and_cpu(tmp_path, case):
    E, H, kdim, vdim, bias, bf, B, L, S, mk, need_w, avg, self_attn, causal = case
    rng, seed = _rng()
    ref, path = _make(tmp_path, rng, E, H, kdim, vdim, bias, bf)
    q, k, v = _inputs(rng, B, L, L if self_attn else S, E, kdim, vdim, bf)
    if self_attn:
        k = v = q
        S = L
    kpm, am = _masks(rng, mk, B, H, L, S)
    g = rng.standard_normal(q.shape[:2] + (E,)).astype(np.float32)
    tout, tw, tgrads = _torch(ref, q, k, v, kpm, am, need_w, avg, causal, g)
    gpu = _load(path, E, H, kdim, vdim, bias, bf, device="cuda")
    cpu = _load(path, E, H, kdim, vdim, bias, bf)
    res = {"gpu": _qfuse(gpu, q, k, v, kpm, am, need_w, avg, causal, g),
           "cpu": _qfuse(cpu, q, k, v, kpm, am, need_w, avg, causal, g)}
    errs = []
    for side, (out, w, grads) in res.items():
        errs.append(("%s out" % side, util.rel_err(out, tout)))
        if need_w:
            errs.append(("%s weights" % side, util.rel_err(w, tw)))
        else:
            assert w is None
        assert set(grads) == set(tgrads), (sorted(grads), sorted(tgrads))
        errs += [("%s grad %s" % (side, n), util.rel_err(grads[n], r)) for n, r in tgrads.items()]
    errs.append(("gpu-cpu out", util.rel_err(res["gpu"][0], res["cpu"][0])))
    errs += [("gpu-cpu grad %s" % n, util.rel_err(res["gpu"][2][n], res["cpu"][2][n])) for n in tgrads]
    if need_w:
        errs.append(("gpu-cpu weights", util.rel_err(res["gpu"][1], res["cpu"][1])))
    worst = max(errs, key=lambda e: e[1])
    print("case %s: worst %s %.2e" % (case, worst[0], worst[1]))
    for name, e in errs:
        assert e < TOL, "%s rel err %.3g (seed %d)" % (name, e, seed)


def test_device_argument_refusals(tmp_path):
    rng, _ = _rng()
    ref, path = _make(tmp_path, rng, 8, 2)
    m = _load(path, 8, 2)
    with pytest.raises(QfuseError) as e:
        m.to("tpu")
    assert "tpu" in str(e.value)
    with pytest.raises(QfuseError) as e:
        m.to("cpu", "bfloat16")
    assert e.value.status == "QF_ERR_UNSUPPORTED" and "cuda" in str(e.value)
    if REASON is not None:
        with pytest.raises(QfuseError) as e:
            m.to("cuda")
        assert e.value.status == "QF_ERR_UNSUPPORTED"
        with pytest.raises(QfuseError):
            _load(path, 8, 2, device="cuda")
    # still a working CPU module after the refusals
    q, k, v = _inputs(rng, 2, 3, 4, 8, None, None, False)
    g = rng.standard_normal(q.shape).astype(np.float32)
    tout, _, _ = _torch(ref, q, k, v, None, None, False, True, False, g)
    out, _ = m(q, k, v, need_weights=False)
    assert util.rel_err(out, tout) < TOL


def test_shapes_change_and_back(tmp_path):
    """Planned device buffers grow and are reused: big, small, big again, and both weight modes
    on one module, each against torch."""
    rng, seed = _rng()
    E, H = 32, 4
    ref, path = _make(tmp_path, rng, E, H, batch_first=True)
    m = _load(path, E, H, batch_first=True, device="cuda")
    for B, L, S, need_w, avg in [(3, 20, 30, True, False), (1, 3, 9, False, True), (2, 5, 7, True, True),
                                 (3, 20, 30, False, True), (3, 20, 30, True, False)]:
        q, k, v = _inputs(rng, B, L, S, E, None, None, True)
        kpm, am = _masks(rng, "kpm+bool", B, H, L, S)
        g = rng.standard_normal(q.shape).astype(np.float32)
        tout, tw, tg = _torch(ref, q, k, v, kpm, am, need_w, avg, False, g)
        out, w, grads = _qfuse(m, q, k, v, kpm, am, need_w, avg, False, g)
        assert util.rel_err(out, tout) < TOL, (B, L, S, seed)
        if need_w:
            assert util.rel_err(w, tw) < TOL, (B, L, S, seed)
        for n, r in tg.items():
            assert util.rel_err(grads[n], r) < TOL, (n, B, L, S, seed)


def _args(B, L, S, need_w=0, avg=1):
    a = _native.qf_mha_args()
    a.B, a.L, a.S = B, L, S
    a.need_weights, a.average_attn_weights = need_w, avg
    return a


def test_device_pointers(tmp_path):
    """The C API on GPU memory: inputs, out, weights, grad_out and the input gradients used in
    place; the same numbers as through host memory."""
    rng, seed = _rng()
    E, H, kd, vd, B, L, S = 16, 2, 12, 20, 2, 5, 6
    ref, path = _make(tmp_path, rng, E, H, kd, vd)
    m = _load(path, E, H, kd, vd, device="cuda")
    q, k, v = _inputs(rng, B, L, S, E, kd, vd, False)
    g = rng.standard_normal(q.shape).astype(np.float32)
    host_out, host_w, host_g = _qfuse(m, q, k, v, None, None, True, False, False, g)
    with qfuse.cuda.DeviceBuffers() as d:
        dq, dk, dv, dg = (d.upload(x) for x in (q, k, v, g))
        dout, dw = d.empty(q.shape), d.empty((B, H, L, S))
        dgq, dgk, dgv = d.empty(q.shape), d.empty(k.shape), d.empty(v.shape)
        check(lib.qf_mha_forward(m._h, ctypes.byref(_args(B, L, S, 1, 0)), dq, dk, dv, dout, dw))
        lib.qf_mha_zero_grad(m._h)
        check(lib.qf_mha_backward(m._h, dg, dgq, dgk, dgv))
        got = {"out": d.download(dout, q.shape), "w": d.download(dw, (B, H, L, S)),
               "query": d.download(dgq, q.shape), "key": d.download(dgk, k.shape),
               "value": d.download(dgv, v.shape)}
        # a mask in GPU memory is refused by name
        a = _args(B, L, S)
        a.key_padding_mask = dq
        with pytest.raises(QfuseError) as e:
            check(lib.qf_mha_forward(m._h, ctypes.byref(a), dq, dk, dv, dout, None))
        assert "key_padding_mask" in str(e.value) and "host" in str(e.value)
    assert np.array_equal(got["out"], host_out) and np.array_equal(got["w"], host_w), seed
    for n in ("query", "key", "value"):
        assert np.array_equal(got[n], host_g[n]), (n, seed)


def test_nonfinite_named(tmp_path):
    rng, _ = _rng()
    E, H, B, L, S = 16, 4, 2, 3, 5
    ref, path = _make(tmp_path, rng, E, H, batch_first=True)
    m = _load(path, E, H, batch_first=True, device="cuda")
    q, k, v = _inputs(rng, B, L, S, E, None, None, True)
    bad = v.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(QfuseError) as e:
        m(q, k, bad)
    assert e.value.status == "QF_ERR_NONFINITE" and "value" in str(e.value) and "NaN" in str(e.value)
    assert "flat index %d" % ((1 * S + 2) * E + 3) in str(e.value)
    with pytest.raises(QfuseError):  # no forward to differentiate after a failed one
        m.backward(np.zeros(q.shape, np.float32))
    m(q, k, v)
    g = np.zeros(q.shape, np.float32)
    g[0, 1, 2] = np.inf
    with pytest.raises(QfuseError) as e:
        m.backward(g)
    assert e.value.status == "QF_ERR_NONFINITE" and "grad_out" in str(e.value) and "Inf" in str(e.value)
    am = np.zeros((L, S), np.float32)
    am[1, 1] = np.nan
    with pytest.raises(QfuseError) as e:
        m(q, k, v, attn_mask=am)
    assert e.value.status == "QF_ERR_NONFINITE" and "attn_mask" in str(e.value)


def test_refusals_and_bf16(tmp_path):
    rng, seed = _rng()
    E, H, B, L, S = 32, 4, 2, 6, 9
    ref, path = _make(tmp_path, rng, E, H)
    q, k, v = _inputs(rng, B, L, S, E, None, None, False)
    g = rng.standard_normal(q.shape).astype(np.float32)
    tout, tw, _ = _torch(ref, q, k, v, None, None, True, True, False, g)
    # dropout in training mode: CPU only
    md = qfuse.MultiheadAttention.load(path, E, H, dropout=0.1, device="cuda")
    with pytest.raises(QfuseError) as e:
        md(q, k, v, training=True)
    assert e.value.status == "QF_ERR_UNSUPPORTED" and "dropout" in str(e.value)
    out, _ = md(q, k, v, training=False)  # eval mode runs
    assert util.rel_err(out, tout) < TOL
    # bf16 weights: forward within bf16's rounding, backward refused
    mb = _load(path, E, H, device="cuda", dtype="bfloat16")
    out, w = mb(q, k, v)
    e_out, e_w = util.rel_err(out, tout), util.rel_err(w, tw)
    print("bf16 weights: out %.2e weights %.2e" % (e_out, e_w))
    assert e_out < BF16_TOL and e_w < BF16_TOL, seed
    with pytest.raises(QfuseError) as e:
        mb.backward(g)
    assert e.value.status == "QF_ERR_UNSUPPORTED" and "float32" in str(e.value)
    # back to the CPU (float32): CPU results, and backward works there
    mb.to("cpu")
    out, _ = mb(q, k, v)
    assert util.rel_err(out, tout) < TOL
    mb.backward(g)


def test_fully_masked_row_is_zero(tmp_path):
    rng, _ = _rng()
    E, H = 8, 2
    ref, path = _make(tmp_path, rng, E, H, bias=False)
    m = _load(path, E, H, bias=False, device="cuda")
    q, k, v = _inputs(rng, 1, 3, 4, E, None, None, False)
    am = np.zeros((3, 4), bool)
    am[1, :] = True
    for need_w in (True, False):
        out, w = m(q, k, v, attn_mask=am, need_weights=need_w)
        assert np.all(np.isfinite(out)) and np.all(out[1] == 0)
        if need_w:
            assert np.all(w[0, 1] == 0)
        grads = m.backward(np.ones(out.shape, np.float32))
        assert all(np.all(np.isfinite(x)) for x in grads.values())


def test_grads_accumulate_across_placement(tmp_path):
    """C-level gradients accumulate (qf_mha_backward adds; only zero_grad clears), also across a
    move to the GPU and back: two backwards = twice one."""
    rng, seed = _rng()
    E, H, B, L, S = 16, 2, 2, 4, 5
    ref, path = _make(tmp_path, rng, E, H)
    m = _load(path, E, H)
    q, k, v = _inputs(rng, B, L, S, E, None, None, False)
    g = rng.standard_normal(q.shape).astype(np.float32)
    once = _qfuse(m, q, k, v, None, None, False, True, False, g)[2]["in_proj_weight"]
    m(q, k, v, need_weights=False)
    check(lib.qf_mha_backward(m._h, g.ctypes.data, None, None, None))  # adds: 2x once
    m.to("cuda")
    m(q, k, v, need_weights=False)
    check(lib.qf_mha_backward(m._h, g.ctypes.data, None, None, None))
    m.to("cpu")
    total = dict((n, np.ctypeslib.as_array(p.grad, tuple(p.shape[:p.ndim])).copy()) for n, p in m._params())
    # backward() zeroed before its call: grads = once (backward) + once (C, CPU) + once (C, GPU)
    assert util.rel_err(total["in_proj_weight"], 3 * once) < TOL, seed


if __name__ == "__main__":  # bench/device_cuda.sh-style sanitizer runs set QFUSE_TEST_QUICK=1
    if REASON is not None:
        raise SystemExit("CUDA backend not usable: %s" % REASON)
    sys.exit(pytest.main([os.path.abspath(__file__), "-q", "-s", "-p", "no:cacheprovider"]))
