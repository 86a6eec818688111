"""test_cuda_bf16.py - bfloat16 scaled dot-product attention on the CUDA backend
(qf_sdpa_forward_bf16 / qf_sdpa_backward_bf16 through qfuse.ops.sdpa_bf16 / sdpa_backward_bf16)
against the float64 PyTorch reference (util.sdpa_ref) computed from the SAME bf16-rounded inputs,
on fresh random cases: head dims 64 and 128 (the fast ones) and 32, 20 (not a multiple of 8: the
element-copy path), Dv != D, odd lengths (1, 7, 257, 1000), causal with L != S, GQA, bool and float
masks in several broadcasts, fully masked rows, custom scale, unbatched [H,L,D] inputs, the
Q-Former's 8x12x32x257x64. Which forward kernel runs depends on the shape and the build (mma.sync:
L <= 64, D not in {64, 128}, Dv != D; wgmma when built for sm_90a: the rest), so both are covered;
QFUSE_SDPA_BF16_KERNEL=mma (or wgmma1) runs every case on the other kernels.

Bounds (stated in include/qfuse_ops.h): forward max|out - ref| / max|ref| <= 1e-2 (the result is
itself rounded to bf16: 2^-9 relative, P is rounded to bf16 before P V); each gradient
max|g - ref| / max|ref_g| <= 2e-2 (dS and P are rounded to bf16 for the tensor cores, delta uses
the bf16 output). Typical values are printed by test_report_errors (pytest -s).

GPU tests skip with the library's reason when libqfuse has no CUDA backend or no GPU is usable;
test_host_* run everywhere: the rounding helper against torch's bf16 conversion, and the clean
QF_ERR_UNSUPPORTED refusals (no CUDA build / host pointers / device="cpu")."""
import ctypes

import numpy as np
import pytest

import qfuse
import qfuse.cuda
import util
from qfuse import ops
from util import QUICK, rel_err

REASON = qfuse.cuda.unavailable_reason()
TOL_OUT = 1e-2
TOL_GRAD = 2e-2
ERRORS = []  # (case, out err, worst grad err) for test_report_errors


@pytest.fixture(autouse=True)
def _needs_gpu(request):
    if REASON is not None and not request.function.__name__.startswith("test_host_"):
        pytest.skip("CUDA backend not usable: %s" % REASON)


def bf16_randn(rng, *shape):
    """standard normal values already representable in bf16 (float32 array)"""
    return ops.from_bf16(ops.to_bf16(rng.standard_normal(shape).astype(np.float32)))


def check_case(name, q, k, v, g=None, **kw):
    """bf16 GPU forward (and backward) vs the float64 reference on the same (bf16) inputs."""
    enable_gqa = q.shape[-3] != k.shape[-3]
    out = ops.sdpa_bf16(q, k, v, enable_gqa=enable_gqa, **kw)
    ref_kw = {x: kw[x] for x in ("attn_mask", "is_causal", "scale") if x in kw}
    assert out.dtype == np.float32 and np.all(np.isfinite(out))
    if g is None:
        ref = util.sdpa_ref(q, k, v, **ref_kw)
        e = rel_err(out, ref)
        ERRORS.append((name, e, None))
        assert e <= TOL_OUT, "%s: forward rel err %.3g" % (name, e)
        return e, None
    ref, rdq, rdk, rdv = util.sdpa_ref(q, k, v, grad_out=g, **ref_kw)
    e = rel_err(out, ref)
    assert e <= TOL_OUT, "%s: forward rel err %.3g" % (name, e)
    grads = ops.sdpa_backward_bf16(q, k, v, g, enable_gqa=enable_gqa, **kw)
    worst = 0.0
    for gname, a, r in zip(("dq", "dk", "dv"), grads, (rdq, rdk, rdv)):
        assert a.shape == r.shape and np.all(np.isfinite(a)), gname
        if np.abs(r).max() == 0:  # every key masked, or S = 1 (softmax of one score is 1): dq = 0
            assert np.abs(a).max() <= 1e-5 * max(np.abs(x).max() for x in (rdk, rdv, g)), \
                "%s: %s should be zero, max %.3g" % (name, gname, np.abs(a).max())
            continue
        eg = rel_err(a, r)
        worst = max(worst, eg)
        assert eg <= TOL_GRAD, "%s: %s rel err %.3g" % (name, gname, eg)
    ERRORS.append((name, e, worst))
    return e, worst


def case(name, seed, B, Hq, Hkv, L, S, D, Dv=None, mask=None, backward=True, **kw):
    rng = np.random.default_rng(seed)
    Dv = D if Dv is None else Dv
    q, k, v = bf16_randn(rng, B, Hq, L, D), bf16_randn(rng, B, Hkv, S, D), bf16_randn(rng, B, Hkv, S, Dv)
    g = bf16_randn(rng, B, Hq, L, Dv) if backward else None
    m = mask(rng, B, Hq, L, S) if mask else None
    return check_case(name, q, k, v, g, attn_mask=m, **kw)


# ---- everywhere: the rounding helper and the refusals -------------------------------------------

def test_host_to_bf16_matches_torch():
    t = util.torch()
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.standard_normal(20000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 20000),
                        np.array([np.inf, -np.inf, 3.4e38, -3.4e38, 0.0, -0.0, 1e-40, 1.0 + 2.0 ** -8,
                                  1.0 + 3 * 2.0 ** -8], np.float32)]).astype(np.float32)
    ref = t.from_numpy(x).to(t.bfloat16).view(t.int16).numpy().view(np.uint16)
    got = ops.to_bf16(x)
    assert np.array_equal(got, ref), np.flatnonzero(got != ref)[:5]
    assert np.array_equal(ops.from_bf16(got), t.from_numpy(ref.view(np.int16)).view(t.bfloat16).float().numpy())
    assert np.isnan(ops.from_bf16(ops.to_bf16(np.array([np.nan], np.float32))))[0]


def test_host_bf16_is_refused_cleanly_off_the_gpu():
    q = np.ones((1, 1, 4, 8), np.float32)
    for fn in (lambda: ops.sdpa(q, q, q, dtype="bfloat16"),
               lambda: ops.sdpa_backward(q, q, q, q, dtype="bfloat16", device="cpu")):
        with pytest.raises(qfuse.QfuseError) as e:
            fn()
        assert e.value.status == "QF_ERR_UNSUPPORTED" and "CUDA backend only" in e.value.message
    with pytest.raises(qfuse.QfuseError, match="dtype"):
        ops.sdpa(q, q, q, dtype="float16")
    # host pointers straight into the C entry points
    p = qfuse._native.lib.qf_sdpa_defaults(1, 1, 1, 4, 4, 8)
    u = np.zeros((1, 1, 4, 8), np.uint16)
    o = np.zeros_like(u)
    lse = np.zeros((1, 1, 4), np.float32)
    lib = qfuse._native.lib
    calls = (lambda: lib.qf_sdpa_forward_bf16(ctypes.byref(p), u.ctypes.data, u.ctypes.data, u.ctypes.data,
                                              o.ctypes.data, None),
             lambda: lib.qf_sdpa_backward_bf16(ctypes.byref(p), u.ctypes.data, u.ctypes.data, u.ctypes.data,
                                               o.ctypes.data, lse.ctypes.data, u.ctypes.data, o.ctypes.data,
                                               o.ctypes.data, o.ctypes.data))
    for call in calls:
        with pytest.raises(qfuse.QfuseError) as e:
            qfuse._native.check(call())
        assert e.value.status == "QF_ERR_UNSUPPORTED" and "CUDA backend only" in e.value.message, e.value.message
    if REASON is not None:  # no GPU: the Python wrapper says why
        with pytest.raises(qfuse.QfuseError) as e:
            ops.sdpa_bf16(q, q, q)
        assert e.value.status == "QF_ERR_UNSUPPORTED"


def test_host_null_and_shape_errors_come_first():
    p = qfuse._native.lib.qf_sdpa_defaults(1, 1, 1, 4, 4, 0)
    st = qfuse._native.lib.qf_sdpa_forward_bf16(ctypes.byref(p), None, None, None, None, None)
    assert qfuse._native.status_name(st) == "QF_ERR_SHAPE"
    p = qfuse._native.lib.qf_sdpa_defaults(1, 1, 1, 4, 4, 8)
    st = qfuse._native.lib.qf_sdpa_forward_bf16(ctypes.byref(p), None, None, None, None, None)
    assert qfuse._native.status_name(st) == "QF_ERR_ARG"


# ---- GPU: accuracy against the float64 reference ------------------------------------------------

@pytest.mark.parametrize("D", [64, 128, 32, 20])
def test_head_dims(D):
    case("D=%d" % D, D, 2, 3, 3, 100, 130, D)


def test_value_dim_differs():
    case("D=64 Dv=32", 2, 1, 2, 2, 70, 90, 64, Dv=32)
    case("D=40 Dv=128", 3, 1, 2, 2, 65, 64, 40, Dv=128)


@pytest.mark.parametrize("L,S", [(1, 1), (7, 7), (1, 257), (257, 1), (7, 1000), (257, 257)]
                         + ([] if QUICK else [(1000, 1000)]))
def test_lengths(L, S):
    case("L=%d S=%d" % (L, S), L * 7 + S, 1, 2, 2, L, S, 64)
    case("L=%d S=%d D=128" % (L, S), L + S, 1, 1, 1, L, S, 128, backward=L * S < 500000)


@pytest.mark.parametrize("L,S", [(100, 300), (300, 100), (257, 257), (64, 64), (1000, 257)])
def test_causal(L, S):
    case("causal L=%d S=%d" % (L, S), L + 3 * S, 1, 2, 2, L, S, 64, is_causal=True)
    case("causal L=%d S=%d D=128" % (L, S), L + 5 * S, 1, 2, 1, L, S, 128, is_causal=True)


@pytest.mark.parametrize("Hq,Hkv", [(8, 2), (6, 3), (4, 1)])
def test_gqa(Hq, Hkv):
    case("gqa %d/%d" % (Hq, Hkv), Hq * 10 + Hkv, 2, Hq, Hkv, 70, 150, 64)
    case("gqa %d/%d causal" % (Hq, Hkv), Hq * 11 + Hkv, 1, Hq, Hkv, 130, 130, 128, is_causal=True)


def _bool_mask(shape_fn, density=0.7):
    return lambda rng, B, H, L, S: rng.random(shape_fn(B, H, L, S)) < density


def _float_mask(shape_fn, neg_inf=0.2):
    def make(rng, B, H, L, S):
        m = rng.standard_normal(shape_fn(B, H, L, S)).astype(np.float32)
        m[rng.random(m.shape) < neg_inf] = -np.inf
        return m
    return make


MASK_SHAPES = {"LS": lambda B, H, L, S: (L, S), "B1LS": lambda B, H, L, S: (B, 1, L, S),
               "BHLS": lambda B, H, L, S: (B, H, L, S), "S": lambda B, H, L, S: (S,),
               "1H1S": lambda B, H, L, S: (1, H, 1, S)}


@pytest.mark.parametrize("shape", sorted(MASK_SHAPES))
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_masks(shape, kind):
    make = (_bool_mask if kind == "bool" else _float_mask)(MASK_SHAPES[shape])
    case("%s mask %s" % (kind, shape), len(shape) * 3 + (kind == "bool"), 2, 4, 2, 70, 90, 64, mask=make)


def test_mask_with_causal_gqa_scale():
    case("bool mask+causal+gqa+scale", 5, 2, 6, 2, 80, 100, 64, mask=_bool_mask(MASK_SHAPES["B1LS"]),
         is_causal=True, scale=0.37)
    case("float mask+causal D=128", 6, 1, 4, 4, 66, 66, 128, mask=_float_mask(MASK_SHAPES["LS"]), is_causal=True)


def test_fully_masked_rows_give_zeros():
    rng = np.random.default_rng(40)
    B, H, L, S, D = 2, 2, 20, 30, 64
    q, k, v, g = (bf16_randn(rng, B, H, n, D) for n in (L, S, S, L))
    m = rng.random((B, 1, L, S)) < 0.6
    m[0, 0, 3, :] = False
    m[1, 0, 11, :] = False
    out = ops.sdpa_bf16(q, k, v, attn_mask=m)
    assert np.all(out[0, :, 3] == 0) and np.all(out[1, :, 11] == 0)
    dq, _, _ = ops.sdpa_backward_bf16(q, k, v, g, attn_mask=m)
    assert np.all(dq[0, :, 3] == 0) and np.all(dq[1, :, 11] == 0)
    check_case("fully masked rows", q, k, v, g, attn_mask=m)
    _, lse = ops.sdpa_bf16(q, k, v, attn_mask=m, return_lse=True)
    assert lse[0, 0, 3] == -np.inf and np.all(np.isfinite(lse[0, 0, :3]))
    # every key of every row masked
    m[:] = False
    out = ops.sdpa_bf16(q, k, v, attn_mask=m)
    assert np.all(out == 0)
    for x in ops.sdpa_backward_bf16(q, k, v, g, attn_mask=m):
        assert np.all(x == 0)


def test_lse_matches_reference():
    rng = np.random.default_rng(41)
    q, k, v = bf16_randn(rng, 1, 2, 50, 64), bf16_randn(rng, 1, 2, 77, 64), bf16_randn(rng, 1, 2, 77, 64)
    _, lse = ops.sdpa_bf16(q, k, v, is_causal=True, return_lse=True)
    s = np.einsum("bhld,bhsd->bhls", q.astype(np.float64), k.astype(np.float64)) / 8.0
    s[:, :, np.triu(np.ones((50, 77), bool), 1)] = -np.inf
    ref = np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1)) + s.max(-1)
    assert np.abs(lse - ref).max() <= 1e-3, np.abs(lse - ref).max()


def test_custom_scale_unbatched_and_bits_in():
    rng = np.random.default_rng(42)
    q, k, v, g = (rng.standard_normal((3, n, 64)).astype(np.float32) for n in (33, 45, 45, 33))
    qb, kb, vb, gb = (ops.to_bf16(x) for x in (q, k, v, g))
    # float inputs are rounded on the way in: the same as passing the bf16 bits
    a = ops.sdpa_bf16(q, k, v, scale=0.3)
    b = ops.sdpa_bf16(qb, kb, vb, scale=0.3)
    assert a.shape == (3, 33, 64) and np.array_equal(a, b)
    ga = ops.sdpa_backward_bf16(q, k, v, g, scale=0.3)
    gb_ = ops.sdpa_backward_bf16(qb, kb, vb, gb, scale=0.3)
    assert all(np.array_equal(x, y) for x, y in zip(ga, gb_))
    check_case("unbatched scale=0.3", *(ops.from_bf16(x) for x in (qb, kb, vb, gb)), scale=0.3)
    # and the results are bf16 values
    assert np.array_equal(ops.from_bf16(ops.to_bf16(a)), a)


def test_qformer_shape():
    case("qformer 8x12x32x257x64", 50, 8, 12, 12, 32, 257, 64)


def test_several_tiles_causal_128():
    n = 512 if QUICK else 1024
    case("1x4x%dx%dx128 causal" % (n, n), 51, 1, 4, 4, n, n, 128, is_causal=True)
    case("1x4x%dx%dx64" % (n, n), 52, 1, 4, 2, n, n + 64, 64)


def test_deterministic_forward():
    rng = np.random.default_rng(43)
    q, k, v = (bf16_randn(rng, 2, 4, 300, 128) for _ in range(3))
    a = ops.sdpa_bf16(q, k, v, is_causal=True)
    assert np.array_equal(a, ops.sdpa_bf16(q, k, v, is_causal=True))


# ---- GPU: refusals -------------------------------------------------------------------------------

def test_unsupported_are_refused():
    q = np.ones((1, 1, 4, 160), np.float32)
    with pytest.raises(qfuse.QfuseError) as e:
        ops.sdpa_bf16(q, q, q)
    assert e.value.status == "QF_ERR_UNSUPPORTED" and "at most 128" in e.value.message
    q = np.ones((1, 1, 4, 64), np.float32)
    with pytest.raises(qfuse.QfuseError) as e:
        ops.sdpa_bf16(q, q, q, dropout_p=0.1)
    assert e.value.status == "QF_ERR_UNSUPPORTED" and "dropout" in e.value.message
    with pytest.raises(qfuse.QfuseError) as e:
        ops.sdpa_backward_bf16(q, q, q, q, dropout_p=0.1)
    assert e.value.status == "QF_ERR_UNSUPPORTED"


def test_pointers_on_the_host_with_cuda_active_are_refused():
    qfuse.cuda.init()
    p = qfuse._native.lib.qf_sdpa_defaults(1, 1, 1, 4, 4, 8)
    u = np.zeros((1, 1, 4, 8), np.uint16)
    st = qfuse._native.lib.qf_sdpa_forward_bf16(ctypes.byref(p), u.ctypes.data, u.ctypes.data, u.ctypes.data,
                                                u.ctypes.data, None)
    with pytest.raises(qfuse.QfuseError) as e:
        qfuse._native.check(st)
    assert e.value.status == "QF_ERR_UNSUPPORTED" and "host memory" in e.value.message, e.value.message


def test_nonfinite_inputs_are_named():
    rng = np.random.default_rng(44)
    q, k, v, g = (bf16_randn(rng, 1, 2, 9, 64) for _ in range(4))
    k[0, 1, 4, 7] = np.nan
    with pytest.raises(qfuse.QfuseError) as e:
        ops.sdpa_bf16(q, k, v)
    assert e.value.status == "QF_ERR_NONFINITE" and "k contains NaN at [0,1,4,7]" in e.value.message
    k[0, 1, 4, 7] = 0
    g[0, 0, 2, 3] = np.inf
    with pytest.raises(qfuse.QfuseError) as e:
        ops.sdpa_backward_bf16(q, k, v, g)
    assert e.value.status == "QF_ERR_NONFINITE" and "grad_out contains Inf at [0,0,2,3]" in e.value.message
    ops.sdpa_backward_bf16(q, k, v, g, check_finite=False)  # not screened: runs
    m = np.zeros((9, 9), np.float32)
    m[2, 2] = np.inf
    with pytest.raises(qfuse.QfuseError, match="attn_mask contains"):
        ops.sdpa_bf16(q, q, v, attn_mask=m)


def test_report_errors():
    """prints the measured errors of the cases above (pytest -s); asserts they were all in bound"""
    assert ERRORS, "no case ran"
    worst_out = max(e for _, e, _ in ERRORS)
    worst_grad = max((w for _, _, w in ERRORS if w is not None), default=0.0)
    print("\nbf16 sdpa: %d cases, worst forward rel err %.3g (bound %g), worst gradient rel err %.3g (bound %g)"
          % (len(ERRORS), worst_out, TOL_OUT, worst_grad, TOL_GRAD))
    for name, e, w in ERRORS:
        print("  %-36s out %.2e  grads %s" % (name, e, "-" if w is None else "%.2e" % w))
    assert worst_out <= TOL_OUT and worst_grad <= TOL_GRAD
