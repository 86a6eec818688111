"""test_ops.py - every basic op of qfuse_ops.h, forward and backward, against PyTorch (float64,
autograd) on fresh random inputs, on every SIMD path this CPU has; plus error cases.

Each op's float32 result must be within rel_err < 1e-4 (max|a-b| / max|ref|) of torch's float64
result on the same (float32-rounded) inputs. Inputs are fresh random draws each run; the seed is
in every failure message so a failing draw can be replayed (QFUSE_TEST_SEED=<seed>)."""
import os

import numpy as np
import pytest

import qfuse
import util
from qfuse import QfuseError, ops

TOL = 1e-4
ISAS = [i for i in ("scalar", "avx2", "avx512")]


def _isa_available(name):
    try:
        qfuse.set_isa(name)
        return True
    except QfuseError:
        return False


@pytest.fixture(params=ISAS)
def isa(request):
    if not _isa_available(request.param):
        pytest.skip("CPU lacks %s" % request.param)
    qfuse.set_isa(request.param)  # conftest restores the previous path afterwards
    return request.param


@pytest.fixture
def rng():
    seed = int(os.environ.get("QFUSE_TEST_SEED", "0")) or int.from_bytes(os.urandom(4), "little")
    return _Rng(seed)


class _Rng:
    """numpy Generator that remembers its seed (for failure messages)."""

    def __init__(self, seed):
        self.seed_value = seed
        self._g = np.random.default_rng(seed)

    def __getattr__(self, name):
        return getattr(self._g, name)


def T(a, grad=False):
    t = util.torch()
    return t.tensor(np.asarray(a, np.float64), requires_grad=grad)


def f32(a):
    return np.asarray(a, np.float32)


def check(name, got, ref, rng, tol=TOL, floor=0.0):
    """rel err < tol; floor bounds the denominator below (for references that are ~0 by
    construction, e.g. layer norm over one element, where rel err would divide rounding noise
    by rounding noise)."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    e = float(np.max(np.abs(got - ref))) / max(float(np.max(np.abs(ref))), floor, 1e-30)
    assert e < tol, "%s: rel err %.3g >= %g (seed %d)" % (name, e, tol, rng.seed_value)


# ---- linear ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 7, 6), (2, 33, 17, 40)])
def test_linear(shape, bias, rng):
    *lead, I, O = shape
    x = f32(rng.standard_normal(tuple(lead) + (I,)))
    w = f32(rng.standard_normal((O, I)) / np.sqrt(I))
    b = f32(rng.standard_normal(O)) if bias else None
    g = f32(rng.standard_normal(tuple(lead) + (O,)))
    t = util.torch()
    tx, tw = T(x, True), T(w, True)
    tb = T(b, True) if bias else None
    ty = t.nn.functional.linear(tx, tw, tb)
    ty.backward(T(g))
    check("linear out", ops.linear(x, w, b), ty.detach().numpy(), rng)
    dx, dw, db = ops.linear_backward(g, x, w, bias=bias)
    check("linear d_x", dx, tx.grad.numpy(), rng)
    check("linear d_weight", dw, tw.grad.numpy(), rng)
    if bias:
        check("linear d_bias", db, tb.grad.numpy(), rng)


def test_linear_accumulates_parameter_grads(rng):
    x, w = f32(rng.standard_normal((4, 3))), f32(rng.standard_normal((5, 3)))
    g = f32(rng.standard_normal((4, 5)))
    dw0 = f32(rng.standard_normal((5, 3)))
    db0 = f32(rng.standard_normal(5))
    dw, db, dx = dw0.copy(), db0.copy(), np.full((4, 3), np.nan, np.float32)
    qfuse._native.check(ops.raw("qf_linear_backward")(dx.ctypes.data, dw.ctypes.data, db.ctypes.data,
                                                      g.ctypes.data, x.ctypes.data, w.ctypes.data, 4, 3, 5))
    check("accumulated d_weight", dw, dw0.astype(np.float64) + g.T.astype(np.float64) @ x, rng)
    check("accumulated d_bias", db, db0.astype(np.float64) + g.astype(np.float64).sum(0), rng)
    check("overwritten d_in", dx, g.astype(np.float64) @ w, rng)  # NaN start must not leak


# ---- layer norm -----------------------------------------------------------------------------------

@pytest.mark.parametrize("affine", ["both", "weight", "none"])
@pytest.mark.parametrize("C", [1, 7, 16, 37, 130])
def test_layer_norm(isa, C, affine, rng):
    N = 9
    x = f32(rng.standard_normal((3, N // 3, C)) * 2 + 0.5)
    w = f32(rng.standard_normal(C)) if affine != "none" else None
    b = f32(rng.standard_normal(C)) if affine == "both" else None
    g = f32(rng.standard_normal(x.shape))
    t = util.torch()
    tx = T(x, True)
    tw = T(w, True) if w is not None else None
    tb = T(b, True) if b is not None else None
    ty = t.nn.functional.layer_norm(tx, (C,), tw, tb, eps=1e-5)
    ty.backward(T(g))
    y, mean, rstd = ops.layer_norm(x, w, b, eps=1e-5)
    floor = 1.0 if C == 1 else 0.0  # C = 1: out = bias, d_x = 0 exactly; torch has 1e-14 noise
    check("layer_norm out", y, ty.detach().numpy(), rng, floor=floor)
    x64 = x.astype(np.float64)
    check("layer_norm mean", mean, x64.mean(-1), rng)
    check("layer_norm rstd", rstd, 1 / np.sqrt(x64.var(-1) + 1e-5), rng)
    dx, dw, db = ops.layer_norm_backward(g, x, w, mean, rstd, bias=b is not None)
    check("layer_norm d_x", dx, tx.grad.numpy(), rng, floor=floor)
    if w is not None:
        check("layer_norm d_weight", dw, tw.grad.numpy(), rng, floor=floor)
    if b is not None:
        check("layer_norm d_bias", db, tb.grad.numpy(), rng)


# ---- GELU -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("n", [1, 15, 4099])
def test_gelu(isa, approximate, n, rng):
    x = f32(rng.standard_normal(n) * 3)
    if n >= 6:  # tails and zero; torch's float64 erf form cancels below x ~ -8, so not alone
        x[:6] = [-12.0, -6.0, -0.0, 1e-6, 6.0, 12.0]
    g = f32(rng.standard_normal(n))
    t = util.torch()
    tx = T(x, True)
    ty = t.nn.functional.gelu(tx, approximate=approximate)
    ty.backward(T(g))
    # floor 1e-2: a lone draw deep in the negative tail (x ~ -7, |y| ~ 1e-12) would otherwise
    # compare rounding noise with rounding noise -- torch's float64 tanh form computes 1 + tanh(u)
    # with cancellation there, and the SIMD erfc is accurate to ~1e-14 absolute, not relative.
    check("gelu out", ops.gelu(x, approximate), ty.detach().numpy(), rng, floor=1e-2)
    check("gelu d_x", ops.gelu_backward(g, x, approximate), tx.grad.numpy(), rng, floor=1e-2)


def test_gelu_paths_agree_pointwise(rng):
    """Tighter than the torch check: every SIMD path within 1e-6 of the scalar (libm) path,
    element by element, relative to max(1, |y|)."""
    x = f32(np.concatenate([np.linspace(-10, 10, 2001), rng.standard_normal(1000) * 4]))
    res = {}
    for name in ISAS:
        if not _isa_available(name):
            continue
        qfuse.set_isa(name)
        res[name] = [ops.gelu(x, a) for a in ("none", "tanh")] + \
                    [ops.gelu_backward(np.ones_like(x), x, a) for a in ("none", "tanh")]
    for name, outs in res.items():
        for got, ref in zip(outs, res["scalar"]):
            err = np.max(np.abs(got.astype(np.float64) - ref) / np.maximum(1.0, np.abs(ref)))
            assert err < 1e-6, "%s vs scalar: %.3g" % (name, err)


# ---- softmax --------------------------------------------------------------------------------------

@pytest.mark.parametrize("C", [1, 5, 16, 33, 257])
def test_softmax(isa, C, rng):
    x = f32(rng.standard_normal((4, 3, C)) * 5)
    if C > 1:
        x[0, 0, ::2] = -np.inf  # masked entries get probability 0
        x[1, 2, :] += 80.0      # large logits: the max subtraction must keep it finite
    g = f32(rng.standard_normal(x.shape))
    t = util.torch()
    tx = T(x, True)
    ty = t.softmax(tx, -1)
    ty.backward(T(g))
    y = ops.softmax(x)
    check("softmax out", y, ty.detach().numpy(), rng)
    check("softmax d_x", ops.softmax_backward(g, y), tx.grad.numpy(), rng)


def test_softmax_all_masked_row_is_zero(isa):
    x = np.full((2, 19), -np.inf, np.float32)
    x[1, 3] = 0.0
    y = ops.softmax(x)
    assert np.all(y[0] == 0.0)
    assert y[1, 3] == 1.0 and np.sum(y[1]) == 1.0


# ---- dropout --------------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9])
def test_dropout(p, rng):
    n = 10007
    x = f32(rng.standard_normal(n))
    g = f32(rng.standard_normal(n))
    seed, offset = int(rng.integers(0, 2**63)), int(rng.integers(0, 2**40))
    # the mask comes from the documented stream, computed independently in numpy (util.py)
    keep = util.philox_uniform(seed, offset, np.arange(n)) >= p
    t = util.torch()
    tx = T(x, True)
    ty = tx * T(keep.astype(np.float64)) / (1 - p)
    ty.backward(T(g))
    y = ops.dropout(x, p, seed, offset)
    check("dropout out", y, ty.detach().numpy(), rng)
    check("dropout d_x", ops.dropout_backward(g, p, seed, offset), tx.grad.numpy(), rng)
    kept = np.mean(y != 0)
    assert abs(kept - (1 - p)) < 5 * np.sqrt(p * (1 - p) / n) + 1e-9, "kept fraction %.4f" % kept
    # a different offset gives a different mask
    if 0 < p:
        assert np.any((ops.dropout(x, p, seed, offset + 1) != 0) != (y != 0))


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan")])
def test_dropout_rejects_p(p):
    with pytest.raises(QfuseError, match="p = .*expected 0 <= p < 1") as e:
        ops.dropout(np.ones(3, np.float32), p)
    assert e.value.status == "QF_ERR_ARG"


# ---- embedding ------------------------------------------------------------------------------------

def test_embedding(rng):
    V, C = 11, 13
    ids = rng.integers(0, V, size=(4, 7)).astype(np.int32)
    ids[0, :3] = 5  # repeated ids must add in backward
    table = f32(rng.standard_normal((V, C)))
    g = f32(rng.standard_normal((4, 7, C)))
    t = util.torch()
    tt = T(table, True)
    ty = t.nn.functional.embedding(t.from_numpy(ids.astype(np.int64)), tt)
    ty.backward(T(g))
    check("embedding out", ops.embedding(ids, table), ty.detach().numpy(), rng)
    check("embedding d_table", ops.embedding_backward(g, ids, V), tt.grad.numpy(), rng)


@pytest.mark.parametrize("bad", [-1, 11, 2**31 - 1])
def test_embedding_rejects_id(bad):
    ids = np.array([0, 3, bad, 1], np.int32)
    with pytest.raises(QfuseError) as e:
        ops.embedding(ids, np.zeros((11, 4), np.float32))
    assert e.value.status == "QF_ERR_ARG"
    assert "ids[2] = %d" % bad in str(e.value) and "11 rows" in str(e.value)


# ---- residual -------------------------------------------------------------------------------------

def test_residual(rng):
    a, b = f32(rng.standard_normal((3, 70001))), f32(rng.standard_normal((3, 70001)))
    t = util.torch()
    ta, tb = T(a, True), T(b, True)
    ty = ta + tb
    g = f32(rng.standard_normal(a.shape))
    ty.backward(T(g))
    check("residual out", ops.residual(a, b), ty.detach().numpy(), rng)
    da, db = ops.residual_backward(g)
    check("residual d_a", da, ta.grad.numpy(), rng)
    check("residual d_b", db, tb.grad.numpy(), rng)


# ---- argument errors (through the raw C entry points) ---------------------------------------------

def test_null_and_size_errors():
    buf = np.zeros(64, np.float32)
    p = buf.ctypes.data
    cases = [
        ("qf_linear_forward", (None, p, p, None, 2, 2, 2), "out is NULL"),
        ("qf_linear_forward", (p, p, None, None, 2, 2, 2), "weight is NULL"),
        ("qf_linear_forward", (p, p, p, None, 0, 2, 2), "sizes must be >= 1"),
        ("qf_layernorm_forward", (p, None, None, None, None, None, 2, 2, 1e-5), "in is NULL"),
        ("qf_layernorm_forward", (p, None, None, p, None, None, 2, -1, 1e-5), "C = -1"),
        ("qf_layernorm_forward", (p, None, None, p, None, None, 2, 2, -1.0), "eps = -1"),
        ("qf_layernorm_backward", (p, None, None, p, p, None, None, p, 2, 2), "mean is NULL"),
        ("qf_gelu_forward", (p, p, 0, 0), "n must be >= 1"),
        ("qf_gelu_forward", (p, p, 4, 7), "kind = 7"),
        ("qf_gelu_backward", (p, None, p, 4, 0), "d_out is NULL"),
        ("qf_softmax_forward", (p, p, 2, 0), "C = 0"),
        ("qf_softmax_backward", (p, p, None, 2, 2), "out is NULL"),
        ("qf_dropout_forward", (None, p, 4, 0.5, 0, 0), "out is NULL"),
        ("qf_embedding_forward", (p, None, p, 2, 2, 2), "ids is NULL"),
        ("qf_embedding_backward", (p, p, p, 2, 0, 2), "V = 0"),
        ("qf_residual_forward", (p, p, None, 4), "b is NULL"),
        ("qf_residual_backward", (p, p, None, 4), "d_out is NULL"),
    ]
    for name, args, needle in cases:
        s = ops.raw(name)(*args)
        assert qfuse._native.status_name(s) == "QF_ERR_ARG", (name, args)
        msg = qfuse._native.last_error()
        assert name in msg and needle in msg, (name, msg)
