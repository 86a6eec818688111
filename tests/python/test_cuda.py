"""test_cuda.py - the cross-backend test of the CUDA backend: every SDPA fixture (PyTorch 2.11
references in tests/fixtures/sdpa_*) and fresh random cases (bool/float masks broadcast in every
way the CPU accepts, causal with L != S, GQA, odd sizes, fully masked rows, custom scale) run on
the CPU and on the GPU (qfuse.sdpa / sdpa_backward with device="cuda"), and both must agree with
each other and, for fixtures, with the reference.

Tolerances (the issue's): forward max|gpu-cpu|/max|cpu| <= 1e-4; gradients max|gpu-cpu| over
the largest CPU gradient magnitude of the case <= 1e-4; fixtures the same against the reference.
Every GPU test skips, with the library's reason, when libqfuse has no CUDA backend (make CUDA=1)
or no GPU is usable (CI machines have none); test_device_argument_* run everywhere."""
import ctypes

import numpy as np
import pytest

import qfuse
import qfuse.cuda
import util
from util import rel_err

REASON = qfuse.cuda.unavailable_reason()


@pytest.fixture(autouse=True)
def _needs_gpu(request):
    """Every test needs the GPU except test_device_argument_*, which check the device argument
    and the clean refusal and therefore also run (and can fail) on CI machines without one."""
    if REASON is not None and not request.function.__name__.startswith("test_device_argument_"):
        pytest.skip("CUDA backend not usable: %s" % REASON)

TOL = 1e-4


def randn(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def grad_err(a, ref, gmax):
    return float(np.abs(a.astype(np.float64) - ref).max()) / max(gmax, 1e-30)


def compare(q, k, v, g=None, tol=TOL, **kw):
    """Runs forward (and backward if g is given) on both backends; asserts agreement."""
    out_c = qfuse.sdpa(q, k, v, **kw)
    out_g = qfuse.sdpa(q, k, v, device="cuda", **kw)
    assert out_g.shape == out_c.shape and out_g.dtype == np.float32
    assert np.all(np.isfinite(out_g))
    err = rel_err(out_g, out_c)
    assert err <= tol, "forward: gpu vs cpu rel err %.3g" % err
    if g is None:
        return err, None
    gc = qfuse.sdpa_backward(q, k, v, g, **kw)
    gg = qfuse.sdpa_backward(q, k, v, g, device="cuda", **kw)
    gmax = max(float(np.abs(x).max()) for x in gc)
    worst = 0.0
    for name, a, r in zip(("dq", "dk", "dv"), gg, gc):
        assert a.shape == r.shape and np.all(np.isfinite(a)), name
        e = grad_err(a, r, gmax)
        worst = max(worst, e)
        assert e <= tol, "%s: gpu vs cpu rel err %.3g (case max grad %.3g)" % (name, e, gmax)
    return err, worst


def case(seed, B, Hq, Hkv, L, S, D, Dv=None, mask=None, backward=True, **kw):
    rng = np.random.default_rng(seed)
    Dv = D if Dv is None else Dv
    q, k, v = randn(rng, B, Hq, L, D), randn(rng, B, Hkv, S, D), randn(rng, B, Hkv, S, Dv)
    m = mask(rng, B, Hq, L, S) if mask else None
    g = randn(rng, B, Hq, L, Dv) if backward else None
    return compare(q, k, v, g, attn_mask=m, enable_gqa=Hq != Hkv, **kw)


# ---- the device argument (runs without a GPU too) ---------------------------------------------------

def test_device_argument_is_checked():
    q = np.ones((1, 1, 2, 4), np.float32)
    for fn in (lambda: qfuse.sdpa(q, q, q, device="gpu"),
               lambda: qfuse.sdpa_backward(q, q, q, q, device="GPU")):
        with pytest.raises(qfuse.QfuseError, match="device = .*expected 'cpu' or 'cuda'"):
            fn()


def test_device_argument_cuda_without_backend_is_refused_cleanly():
    rng = np.random.default_rng(30)
    q = randn(rng, 1, 2, 5, 8)
    if REASON is None:  # a usable GPU: the call works and matches the CPU
        assert rel_err(qfuse.sdpa(q, q, q, device="cuda"), qfuse.sdpa(q, q, q)) <= TOL
        return
    for fn in (lambda: qfuse.sdpa(q, q, q, device="cuda"),
               lambda: qfuse.sdpa_backward(q, q, q, q, device="cuda")):
        with pytest.raises(qfuse.QfuseError) as e:
            fn()
        assert e.value.status == "QF_ERR_UNSUPPORTED" and e.value.message == REASON
    assert "make CUDA=1" in REASON or "no usable GPU" in REASON or "not usable" in REASON, REASON


# ---- fixtures: GPU vs the PyTorch reference and vs the CPU ---------------------------------------

SDPA_FIXTURES = util.fixture_names("sdpa_")


def test_fixtures_present():
    assert len(SDPA_FIXTURES) >= 5, SDPA_FIXTURES


@pytest.mark.parametrize("name", SDPA_FIXTURES)
def test_fixture(name):
    c, t, _ = util.load_fixture(name)
    mask = t["mask_bool"].astype(bool) if "mask_bool" in t else t.get("mask_float")
    kw = dict(attn_mask=mask, is_causal=c["is_causal"], scale=c["scale"], enable_gqa=c["enable_gqa"])
    tol = c.get("rtol_fp32", TOL)
    out = qfuse.sdpa(t["q"], t["k"], t["v"], device="cuda", **kw)
    assert rel_err(out, t["out"]) <= tol, rel_err(out, t["out"])
    grads = qfuse.sdpa_backward(t["q"], t["k"], t["v"], t["grad_out"], device="cuda", **kw)
    gmax = max(np.abs(t[n]).max() for n in ("grad_q", "grad_k", "grad_v"))
    for a, n in zip(grads, ("grad_q", "grad_k", "grad_v")):
        assert grad_err(a, t[n], gmax) <= tol, "%s: %s rel err %.3g" % (name, n, grad_err(a, t[n], gmax))
    compare(t["q"], t["k"], t["v"], t["grad_out"], tol=tol, **kw)


# ---- random cases: GPU vs CPU ----------------------------------------------------------------------

@pytest.mark.parametrize("D", [1, 8, 24, 40, 63, 64, 72, 96, 127, 128])
def test_head_dims(D):
    case(D, 2, 2, 2, 17, 23, D)


def test_value_dim_differs():
    case(1, 2, 3, 3, 19, 33, 40, Dv=24)
    case(2, 1, 2, 2, 70, 65, 16, Dv=100)


@pytest.mark.parametrize("L,S", [(1, 1), (1, 130), (130, 1), (5, 64), (64, 5), (65, 64),
                                 (100, 130), (3, 257), (257, 200)])
def test_lengths(L, S):
    case(L * 1000 + S, 1, 3, 3, L, S, 32)


@pytest.mark.parametrize("L,S", [(37, 37), (20, 150), (150, 20), (64, 128), (129, 65), (1, 9), (9, 1)])
def test_causal(L, S):
    case(L + 7 * S, 2, 2, 2, L, S, 64, is_causal=True)


@pytest.mark.parametrize("Hq,Hkv", [(4, 1), (8, 2), (6, 3)])
def test_gqa(Hq, Hkv):
    case(Hq * 10 + Hkv, 2, Hq, Hkv, 45, 70, 32)
    case(Hq * 10 + Hkv + 1, 1, Hq, Hkv, 90, 90, 64, is_causal=True)


def _bool_mask(shape, density=0.7):
    return lambda rng, B, Hq, L, S: rng.random(shape(B, Hq, L, S)) < density


def _float_mask(shape, neg_inf=0.2):
    def make(rng, B, Hq, L, S):
        m = rng.standard_normal(shape(B, Hq, L, S)).astype(np.float32)
        m[rng.random(m.shape) < neg_inf] = -np.inf
        return m
    return make


MASK_SHAPES = {
    "LS": lambda B, Hq, L, S: (L, S),
    "S": lambda B, Hq, L, S: (S,),
    "B1LS": lambda B, Hq, L, S: (B, 1, L, S),
    "1H1S": lambda B, Hq, L, S: (1, Hq, 1, S),
    "BHLS": lambda B, Hq, L, S: (B, Hq, L, S),
    "B11S": lambda B, Hq, L, S: (B, 1, 1, S),
}


@pytest.mark.parametrize("shape", sorted(MASK_SHAPES))
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_mask_broadcast(shape, kind):
    make = (_bool_mask if kind == "bool" else _float_mask)(MASK_SHAPES[shape])
    case(sorted(MASK_SHAPES).index(shape) * 2 + (kind == "bool"), 2, 4, 2, 70, 90, 48, mask=make)


def test_mask_with_causal_gqa_scale():
    case(5, 2, 6, 2, 80, 100, 64, mask=_bool_mask(MASK_SHAPES["B1LS"]), is_causal=True, scale=0.37)
    case(6, 1, 4, 4, 66, 66, 32, mask=_float_mask(MASK_SHAPES["LS"]), is_causal=True)


@pytest.mark.parametrize("scale", [0.05, 0.3, 2.0])
def test_custom_scale(scale):
    case(int(scale * 100), 1, 2, 2, 40, 50, 64, scale=scale)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_fully_masked_rows_give_zeros(kind):
    rng = np.random.default_rng(11)
    B, H, L, S, D = 1, 2, 70, 80, 32
    q, k, v, g = randn(rng, B, H, L, D), randn(rng, B, H, S, D), randn(rng, B, H, S, D), randn(rng, B, H, L, D)
    allow = rng.random((L, S)) < 0.5
    allow[[0, 5, 69]] = False  # rows with no attendable key, one in the second query tile
    m = allow if kind == "bool" else np.where(allow, 0.0, -np.inf).astype(np.float32)
    out = qfuse.sdpa(q, k, v, attn_mask=m, device="cuda")
    assert np.all(out[:, :, [0, 5, 69]] == 0)
    dq, dk, dv = qfuse.sdpa_backward(q, k, v, g, attn_mask=m, device="cuda")
    assert np.all(dq[:, :, [0, 5, 69]] == 0)
    compare(q, k, v, g, attn_mask=m)


def test_everything_masked():
    rng = np.random.default_rng(12)
    q, k, v, g = (randn(rng, 1, 2, 9, 16) for _ in range(4))
    m = np.zeros((9, 9), bool)
    out = qfuse.sdpa(q, k, v, attn_mask=m, device="cuda")
    assert np.all(out == 0)
    for x in qfuse.sdpa_backward(q, k, v, g, attn_mask=m, device="cuda"):
        assert np.all(x == 0)


def test_return_weights():
    rng = np.random.default_rng(13)
    q, k, v = randn(rng, 2, 4, 33, 40), randn(rng, 2, 2, 47, 40), randn(rng, 2, 2, 47, 40)
    m = rng.random((33, 47)) < 0.8
    kw = dict(attn_mask=m, is_causal=True, enable_gqa=True, return_weights=True)
    out_c, w_c = qfuse.sdpa(q, k, v, **kw)
    out_g, w_g = qfuse.sdpa(q, k, v, device="cuda", **kw)
    assert rel_err(out_g, out_c) <= TOL and rel_err(w_g, w_c) <= TOL
    # short queries, long keys: the forward splits the keys and merges (lse from sdpa_combine)
    q, k, v = randn(rng, 1, 2, 20, 32), randn(rng, 1, 2, 150, 32), randn(rng, 1, 2, 150, 32)
    m = rng.random((20, 150)) < 0.7
    out_c, w_c = qfuse.sdpa(q, k, v, attn_mask=m, return_weights=True)
    out_g, w_g = qfuse.sdpa(q, k, v, attn_mask=m, return_weights=True, device="cuda")
    assert rel_err(out_g, out_c) <= TOL and rel_err(w_g, w_c) <= TOL


def test_three_dim_inputs():
    rng = np.random.default_rng(14)
    q, k, v = randn(rng, 3, 20, 16), randn(rng, 3, 25, 16), randn(rng, 3, 25, 16)
    out = qfuse.sdpa(q, k, v, device="cuda")
    assert out.shape == (3, 20, 16) and rel_err(out, qfuse.sdpa(q, k, v)) <= TOL


def test_bigger_shapes_several_tiles():
    # several query and key tiles per head, the shapes the benchmark uses, scaled down
    case(15, 2, 4, 4, 300, 300, 128, is_causal=True)
    case(16, 2, 4, 4, 257, 257, 64)
    case(17, 8, 12, 12, 32, 257, 64)


def test_random_sweep():
    rng = np.random.default_rng(99)
    for _ in range(12):
        Hkv = int(rng.integers(1, 4))
        Hq = Hkv * int(rng.integers(1, 4))
        L, S, D = (int(x) for x in rng.integers(1, 150, 3))
        D = min(D, 128)
        mask = None
        r = rng.random()
        if r < 0.3:
            mask = _bool_mask(MASK_SHAPES["B1LS"])
        elif r < 0.5:
            mask = _float_mask(MASK_SHAPES["LS"])
        case(int(rng.integers(1 << 30)), int(rng.integers(1, 3)), Hq, Hkv, L, S, D, mask=mask,
             is_causal=bool(rng.random() < 0.4))


# ---- errors: the GPU path keeps the CPU path's contract -------------------------------------------

def test_nan_is_reported_like_cpu():
    rng = np.random.default_rng(20)
    q, k, v = randn(rng, 1, 2, 10, 16), randn(rng, 1, 2, 12, 16), randn(rng, 1, 2, 12, 16)
    k[0, 1, 7, 3] = np.nan
    msgs = []
    for dev in ("cpu", "cuda"):
        with pytest.raises(qfuse.QfuseError) as e:
            qfuse.sdpa(q, k, v, device=dev)
        assert e.value.status == "QF_ERR_NONFINITE"
        msgs.append(e.value.message)
    assert msgs[0] == msgs[1] and "k contains NaN at [0,1,7,3]" in msgs[1]
    m = np.zeros((10, 10), np.float32)
    m[2, 3] = np.inf
    with pytest.raises(qfuse.QfuseError, match=r"attn_mask contains \+Inf at flat index 23"):
        qfuse.sdpa(q, q, q, attn_mask=m, device="cuda")


def test_unsupported_is_clean():
    rng = np.random.default_rng(21)
    q = randn(rng, 1, 1, 4, 200)
    with pytest.raises(qfuse.QfuseError, match="at most 128") as e:
        qfuse.sdpa(q, q, q, device="cuda")
    assert e.value.status == "QF_ERR_UNSUPPORTED"
    with pytest.raises(qfuse.QfuseError, match="dropout_p") as e:
        qfuse.sdpa(q[..., :16], q[..., :16], q[..., :16], dropout_p=0.1, device="cuda")
    assert e.value.status == "QF_ERR_UNSUPPORTED"


def test_mixed_host_and_device_tensors_are_refused():
    lib = qfuse._native.lib
    B, H, L, D = 1, 1, 4, 8
    p = lib.qf_sdpa_defaults(B, H, H, L, L, D)
    host = np.zeros((B, H, L, D), np.float32)
    with qfuse.cuda.DeviceBuffers() as bufs:
        dq = bufs.upload(host)
        dout = bufs.empty(host.shape)
        st = lib.qf_sdpa_forward(ctypes.byref(p), dq, host.ctypes.data, dq, dout, None, None)
        assert qfuse._native.status_name(st) == "QF_ERR_ARG"
        msg = qfuse._native.last_error()
        assert "q is in GPU memory but k is in host memory" in msg, msg


# ---- compute-sanitizer driver ------------------------------------------------------------------------

def sanitizer_cases():
    """Small cases touching every kernel and path (forward, backward, weights, screen; masks,
    causal, GQA, ragged tiles, each head-dim tile size) for
    `compute-sanitizer --tool memcheck|racecheck python3 tests/python/test_cuda.py`."""
    case(1, 1, 4, 2, 70, 90, 40, mask=_bool_mask(MASK_SHAPES["B1LS"]), is_causal=True)
    case(2, 1, 2, 2, 33, 65, 64, mask=_float_mask(MASK_SHAPES["LS"]))
    case(3, 1, 2, 1, 20, 70, 128, Dv=96)
    case(4, 1, 1, 1, 5, 7, 9)
    test_return_weights()
    test_nan_is_reported_like_cpu()


if __name__ == "__main__":
    if REASON is not None:
        raise SystemExit("CUDA backend not usable: %s" % REASON)
    sanitizer_cases()
    print("sanitizer cases done")
