"""test_cuda_ops.py - the CUDA backend's model ops (src/backend/backend.h: gemm_nt, layernorm,
gelu, add, add_periodic, embedding, split/merge heads, copy2d, dead-row mean, NaN/Inf screen, graphs) and the
public forward ops that dispatch to them (qf_linear_forward, qf_layernorm_forward,
qf_gelu_forward, qf_residual_forward on GPU pointers). Every case draws fresh random inputs and
runs them on the GPU, on the CPU backend (the same table entry, or the same public op on host
memory) and against a reference computed here (torch float64, or numpy float64 for pure data
movement).

Bounds, all as max|a - ref| / max|ref| (util.rel_err):
- float32 ops (linear, layernorm, gelu, add): GPU and CPU each <= 1e-5 of the float64 reference.
  The gemm tests run on both of gemm_nt's paths (cuBLASLt with epilogue, classic prologue+sgemm).
- gemm_nt with bf16 weights: the reference is float64 on the bf16-ROUNDED weights and x (the GPU
  rounds x to bf16 itself, round-to-nearest-even, then accumulates in float32): <= 1e-4; against
  the unrounded float64 product it must stay <= 2e-2 (what bf16 inputs cost).
  Seen on the H100: 6e-8 to 1.9e-6 vs the rounded reference, 2.2e-3 to 2.8e-3 vs the exact one.
- TF32 (qf_cuda_set_tf32(1)): float32 product error <= 5e-3 and larger than with TF32 off, where
  it is <= 1e-5 (seen: 3.0e-4 on, 9.1e-7 off, both gemm paths).
- data movement (embedding, heads, copy2d) and the dead-row mean (double sums in key order, as
  cpu.c): bit-identical to the CPU table and to numpy.
- graphs: a captured sequence replayed on new inputs equals the eager CPU result within 1e-5;
  a graph is reported stale (not launched) after a scratch buffer it uses has grown.

Skips cleanly (the library's reason) without the CUDA backend or a GPU, except
test_set_tf32_everywhere, which checks the refusal on such machines. Run as a script
(python3 tests/python/test_cuda_ops.py) it runs itself through pytest, the form
bench/device_cuda.sh hands to compute-sanitizer (with QFUSE_TEST_QUICK=1: smaller linears)."""
import ctypes
import os
import sys
from ctypes import POINTER, byref, c_float, c_int, c_int64, c_size_t, c_void_p
from types import SimpleNamespace

import numpy as np
import pytest

import qfuse
import qfuse.cuda
import qfuse.ops  # noqa: F401  (declares qf_linear_forward & co. on the library)
import util
from qfuse._native import QfuseError, check, lib
from util import rel_err

REASON = qfuse.cuda.unavailable_reason()
QUICK = util.QUICK


@pytest.fixture(autouse=True)
def _needs_gpu(request):
    if REASON is not None and not request.function.__name__.endswith("_everywhere"):
        pytest.skip("CUDA backend not usable: %s" % REASON)


@pytest.fixture
def rng():
    seed = int(os.environ.get("QFUSE_TEST_SEED", "0")) or int.from_bytes(os.urandom(4), "little")
    print("seed", seed)
    return np.random.default_rng(seed)


@pytest.fixture(params=["lt", "classic"])
def gemm_path(request):
    """gemm_nt's cuBLASLt path (bias epilogue, residual as C) or the classic one (prologue kernel +
    cublasSgemm/GemmEx), forced through the test hook qf_cuda_test_gemm_lt."""
    if REASON is None:
        lib.qf_cuda_test_gemm_lt(1 if request.param == "lt" else 0)
    yield request.param
    if REASON is None:
        lib.qf_cuda_test_gemm_lt(1)


@pytest.fixture
def dev():
    with qfuse.cuda.DeviceBuffers() as bufs:
        yield bufs


def randn(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def ptr(a):
    return None if a is None else a.ctypes.data


def up(dev, a):
    return None if a is None else dev.upload(np.ascontiguousarray(a))


def down(p, shape, dtype=np.float32):
    out = np.empty(shape, dtype)
    check(lib.qf_cuda_download(out.ctypes.data, p, out.nbytes))
    return out


_P, _I = c_void_p, c_int64
_SIGS = {
    "gemm_nt": (c_int, [POINTER(qfuse.cuda.GemmNtArgs)]),
    "layernorm_forward": (c_int, [_P, _P, _P, _P, _P, _P, _I, _I, c_float]),
    "gelu_forward": (c_int, [_P, _P, _I, c_int]),
    "add": (c_int, [_P, _P, _P, _I]),
    "embedding_forward": (c_int, [_P, _P, _P, _P, _I, _I, _I]),
    "split_heads": (c_int, [_P, _P, _I, _P, _I, _I, _I, _I, _I, _I]),
    "merge_heads": (c_int, [_P, _I, _P, _I, _I, _I, _I, _I, _I, c_int]),
    "copy2d": (c_int, [_P, c_size_t, _P, c_size_t, c_size_t, c_size_t]),
    "dead_rows_mean": (c_int, [_P, _P, _P, _I, _I, _I, _I, _I]),
    "add_periodic": (c_int, [_P, _P, _P, _I, _I, _I]),
    "screen_nonfinite": (c_int, [_P, _I, _P]),
    "synchronize": (c_int, []),
    "capture_begin": (c_int, []),
    "capture_end": (c_int, [POINTER(c_void_p)]),
    "graph_launch": (c_int, [_P, POINTER(c_int)]),
    "graph_free": (None, [_P]),
}
_tables = {}


def table(which):
    """The CPU ("cpu") or CUDA ("cuda") backend table as callables; each call is checked."""
    if which not in _tables:
        ns = {}
        for name, (res, args) in _SIGS.items():
            if not lib.qf_cuda_backend_entry(1 if which == "cuda" else 0, name.encode()):
                continue  # the CPU table has no memory/graph entries
            f = qfuse.cuda.backend_entry(which, name, res, args)
            ns[name] = (lambda f: lambda *a: check(f(*a)))(f) if res is c_int else f
        _tables[which] = SimpleNamespace(**ns)
    return _tables[which]


def bf16_round(a):
    """(bf16 bits as uint16, the bf16 values as float32): round to nearest even (torch's rule)."""
    u = np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.uint64)
    bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return bits, (bits.astype(np.uint32) << 16).view(np.float32)


def gemm_args(x, ldx, w, bias, res, ldr, out, ldo, M, N, K, acc=0, w_bf16=None):
    return qfuse.cuda.GemmNtArgs(x, ldx, w, bias, res, ldr, out, ldo, M, N, K, acc, w_bf16)


# ---- runs everywhere ------------------------------------------------------------------------------

def test_set_tf32_everywhere():
    """qf_cuda_set_tf32: accepted with a GPU; without one, QF_ERR_UNSUPPORTED with the reason."""
    if REASON is None:
        qfuse.cuda.set_tf32(False)
        return
    with pytest.raises(QfuseError) as e:
        qfuse.cuda.set_tf32(True)
    assert e.value.status == "QF_ERR_UNSUPPORTED" and e.value.message


# ---- linear (public op -> gemm_nt) ----------------------------------------------------------------

LINEAR_M = (1, 3, 33) if QUICK else (1, 3, 32, 257)
LINEAR_K = (768,) if QUICK else (1408, 768)


@pytest.mark.parametrize("M", LINEAR_M)
@pytest.mark.parametrize("K", LINEAR_K)
def test_linear_float32(rng, dev, gemm_path, M, K):
    N = 2304
    t = util.torch()
    x, w, b = randn(rng, M, K), randn(rng, N, K) * 0.05, randn(rng, N)
    for bias in (b, None):
        ref = t.nn.functional.linear(t.tensor(x, dtype=t.float64), t.tensor(w, dtype=t.float64),
                                     None if bias is None else t.tensor(bias, dtype=t.float64)).numpy()
        out_c = np.empty((M, N), np.float32)
        check(lib.qf_linear_forward(ptr(out_c), ptr(x), ptr(w), ptr(bias), M, K, N))
        dout = dev.empty((M, N))
        check(lib.qf_linear_forward(dout, up(dev, x), up(dev, w), up(dev, bias), M, K, N))
        out_g = down(dout, (M, N))
        eg, ec = rel_err(out_g, ref), rel_err(out_c, ref)
        assert eg <= 1e-5 and ec <= 1e-5, "M=%d K=%d bias=%s: gpu %.3g cpu %.3g" % (M, K, bias is not None, eg, ec)


def test_linear_mixed_devices_refused(dev):
    x = np.ones((2, 4), np.float32)
    w = up(dev, np.ones((3, 4), np.float32))
    out = dev.empty((2, 3))
    with pytest.raises(QfuseError, match="in is in GPU memory but|out is in GPU memory but .* in host"):
        check(lib.qf_linear_forward(out, ptr(x), w, None, 2, 4, 3))


@pytest.mark.parametrize("skew", [0, 1])
def test_gemm_nt_strides_residual_accumulate(rng, dev, gemm_path, skew):
    """Row strides on every side, bias + residual (its own row stride or out's), accumulate,
    res == out: CUDA vs CPU table vs numpy. skew = 1 offsets every device pointer by one float
    (4-byte alignment only)."""
    M, N, K, ldx, ldo = 37, 129, 70, 75, 133
    x, w, bias = randn(rng, M, ldx), randn(rng, N, K), randn(rng, N)
    res_flat, out0 = randn(rng, M * ldo), randn(rng, M, ldo)
    prod = x[:, :K].astype(np.float64) @ w.T.astype(np.float64)
    cases = [  # (accumulate, bias, res is out, res row stride or 0 for none)
        (0, True, False, 131), (0, True, False, ldo), (0, False, False, ldo), (1, True, False, 131),
        (1, False, False, 0), (1, True, False, 0), (0, False, True, ldo), (0, True, True, ldo), (0, False, False, 0),
        (0, True, False, 0)]
    for acc, use_bias, res_is_out, ldr in cases:
        res = res_flat[:M * ldr].reshape(M, ldr) if ldr and not res_is_out else None
        ref = prod + (bias if use_bias else 0)
        if res_is_out:
            ref = ref + out0[:, :N]
        elif res is not None:
            ref = ref + res[:, :N]
        if acc:
            ref = ref + out0[:, :N]
        results = []
        for which in ("cpu", "cuda"):
            o = out0.copy()
            if which == "cpu":
                r_ptr = ptr(o) if res_is_out else ptr(res)
                a = gemm_args(ptr(x), ldx, ptr(w), ptr(bias) if use_bias else None, r_ptr, ldr, ptr(o), ldo,
                              M, N, K, acc)
                table("cpu").gemm_nt(byref(a))
            else:
                def sk(a):  # a device copy starting `skew` floats into its buffer
                    if a is None:
                        return None
                    p = dev.alloc(a.nbytes + 4)
                    check(lib.qf_cuda_upload(p + 4 * skew, np.ascontiguousarray(a).ctypes.data, a.nbytes))
                    return p + 4 * skew
                do = sk(o)
                r_ptr = do if res_is_out else sk(res)
                a = gemm_args(sk(x), ldx, sk(w), sk(bias) if use_bias else None, r_ptr, ldr, do, ldo, M, N, K, acc)
                table("cuda").gemm_nt(byref(a))
                o = down(do, (M, ldo))
            assert np.array_equal(o[:, N:], out0[:, N:]), "%s wrote past N" % which
            results.append(o[:, :N])
        for which, o in zip(("cpu", "cuda"), results):
            e = rel_err(o, ref)
            assert e <= 1e-5, "%s acc=%d bias=%d res_is_out=%d ldr=%d: %.3g" % (which, acc, use_bias, res_is_out, ldr, e)


@pytest.mark.parametrize("M,N,K", [(1, 2304, 768), (32, 2304, 768), (257, 768, 1408), (5, 33, 19)])
def test_gemm_nt_bf16_weights(rng, dev, gemm_path, M, N, K):
    x, w, bias = randn(rng, M, K), randn(rng, N, K), randn(rng, N)
    wbits, wr = bf16_round(w)
    _, xr = bf16_round(x)
    exact = x.astype(np.float64) @ w.T.astype(np.float64) + bias
    ref = xr.astype(np.float64) @ wr.T.astype(np.float64) + bias
    do = dev.empty((M, N))
    a = gemm_args(up(dev, x), K, None, up(dev, bias), None, 0, do, N, M, N, K, 0, up(dev, wbits))
    table("cuda").gemm_nt(byref(a))
    o = down(do, (M, N))
    e, e_exact = rel_err(o, ref), rel_err(o, exact)
    print("bf16 %s M=%d N=%d K=%d: vs rounded ref %.3g, vs exact %.3g" % (gemm_path, M, N, K, e, e_exact))
    assert e <= 1e-4 and e_exact <= 2e-2, "vs rounded %.3g, vs exact %.3g" % (e, e_exact)
    with pytest.raises(QfuseError, match="float32 weights only"):  # the CPU table refuses bf16
        table("cpu").gemm_nt(byref(gemm_args(ptr(x), K, None, None, None, 0, ptr(o), N, M, N, K, 0, ptr(wbits))))


def test_tf32_toggle(rng, dev, gemm_path):
    M, N, K = 257, 2304, 1408
    x, w = randn(rng, M, K), randn(rng, N, K)
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    dx, dw, do = up(dev, x), up(dev, w), dev.empty((M, N))
    errs = {}
    try:
        for on in (True, False):
            qfuse.cuda.set_tf32(on)
            check(lib.qf_linear_forward(do, dx, dw, None, M, K, N))
            errs[on] = rel_err(down(do, (M, N)), ref)
    finally:
        qfuse.cuda.set_tf32(False)
    print("tf32 %s: on %.3g, off %.3g" % (gemm_path, errs[True], errs[False]))
    assert errs[False] <= 1e-5 and errs[True] <= 5e-3 and errs[True] > 3 * errs[False], errs


# ---- layernorm, gelu, add (public ops) ---------------------------------------------------------------

@pytest.mark.parametrize("rows,C,affine,stats,skew", [
    (32, 768, True, True, 0), (257, 1408, True, False, 0), (5, 7, False, True, 0), (3, 768, True, True, 1),
    (64, 1000, False, False, 0)])
def test_layernorm(rng, dev, rows, C, affine, stats, skew):
    """skew = 1 offsets every device pointer by one float (the scalar kernel)."""
    t = util.torch()
    x = randn(rng, rows, C) * 3 + 5  # a mean far from 0: the two-pass variance matters
    w, b = (randn(rng, C), randn(rng, C)) if affine else (None, None)
    eps = 1e-5
    tt = lambda a: None if a is None else t.tensor(a, dtype=t.float64)  # noqa: E731
    ref = t.nn.functional.layer_norm(tt(x), (C,), tt(w), tt(b), eps).numpy()
    x64 = x.astype(np.float64)
    mean_ref, rstd_ref = x64.mean(1), 1 / np.sqrt(x64.var(1) + eps)
    out_c, mean_c, rstd_c = np.empty_like(x), np.empty(rows, np.float32), np.empty(rows, np.float32)
    check(lib.qf_layernorm_forward(ptr(out_c), ptr(mean_c), ptr(rstd_c), ptr(x), ptr(w), ptr(b), rows, C, eps))

    def dup(a):  # a device copy at the chosen offset
        if a is None:
            return None
        p = dev.alloc(a.nbytes + 4 * skew)
        check(lib.qf_cuda_upload(p + 4 * skew, a.ctypes.data, a.nbytes))
        return p + 4 * skew
    dx, dwt, db = dup(x), dup(w), dup(b)
    do = dup(np.zeros_like(x))
    dm, dr = (dup(np.zeros(rows, np.float32)), dup(np.zeros(rows, np.float32))) if stats else (None, None)
    check(lib.qf_layernorm_forward(do, dm, dr, dx, dwt, db, rows, C, eps))
    out_g = down(do, x.shape)
    for name, a in (("gpu", out_g), ("cpu", out_c)):
        assert rel_err(a, ref) <= 1e-5, "%s: %.3g" % (name, rel_err(a, ref))
    if stats:
        assert rel_err(down(dm, (rows,)), mean_ref) <= 1e-6
        assert rel_err(down(dr, (rows,)), rstd_ref) <= 1e-5


@pytest.mark.parametrize("n", [4096 * 3, 100003])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu(rng, dev, n, approximate):
    t = util.torch()
    x = (randn(rng, n) * 4).astype(np.float32)
    x[:6] = [-30, -9, -0.0, 1e-30, 9, 30]  # the tails and zero
    ref = t.nn.functional.gelu(t.tensor(x, dtype=t.float64), approximate=approximate).numpy()
    kind = 1 if approximate == "tanh" else 0
    out_c = np.empty_like(x)
    check(lib.qf_gelu_forward(ptr(out_c), ptr(x), n, kind))
    dx = up(dev, x)
    check(lib.qf_gelu_forward(dx, dx, n, kind))  # in place
    out_g = down(dx, (n,))
    for name, a in (("gpu", out_g), ("cpu", out_c)):
        assert rel_err(a, ref) <= 1e-5, "%s: %.3g" % (name, rel_err(a, ref))
    # elementwise relative error where |ref| is not tiny (tails keep their precision)
    big = np.abs(ref) > 1e-6
    assert np.max(np.abs(out_g[big] - ref[big]) / np.abs(ref[big])) <= 1e-5


@pytest.mark.parametrize("n", [4096, 1001])
def test_add(rng, dev, n):
    a, b = randn(rng, n), randn(rng, n)
    ref = a.astype(np.float64) + b
    da, db = up(dev, a), up(dev, b)
    do = dev.empty((n,))
    check(lib.qf_residual_forward(do, da, db, n))
    check(lib.qf_residual_forward(da, da, db, n))  # out == a
    out_c = np.empty_like(a)
    check(lib.qf_residual_forward(ptr(out_c), ptr(a), ptr(b), n))
    for name, o in (("gpu", down(do, (n,))), ("gpu in place", down(da, (n,))), ("cpu", out_c)):
        assert rel_err(o, ref) <= 1e-7, name
    # the table entry directly, at an odd offset (scalar kernel)
    table("cuda").add(do + 4, db + 4, da + 4, n - 1)
    assert np.array_equal(down(do, (n,))[1:], (a + b + b)[1:].astype(np.float32))


@pytest.mark.parametrize("C", [768, 7])
@pytest.mark.parametrize("with_a", [True, False])
def test_add_periodic(rng, dev, C, with_a):
    rows, period = 96, 32
    a, b = randn(rng, rows, C), randn(rng, period, C)
    ref = (a if with_a else 0) + b[np.arange(rows) % period]
    out_c = np.empty((rows, C), np.float32)
    table("cpu").add_periodic(ptr(out_c), ptr(a) if with_a else None, ptr(b), rows, period, C)
    da = up(dev, a)
    table("cuda").add_periodic(da, da if with_a else None, up(dev, b), rows, period, C)  # out == a
    assert np.array_equal(down(da, (rows, C)), ref) and np.array_equal(out_c, ref)


# ---- data movement -------------------------------------------------------------------------------

@pytest.mark.parametrize("C", [768, 7])
@pytest.mark.parametrize("with_pos", [True, False])
def test_embedding(rng, dev, C, with_pos):
    V, N, pos_rows = 50, 45, 32
    tab = randn(rng, V, C)
    ids = rng.integers(0, V, N).astype(np.int32)
    pos = randn(rng, pos_rows, C) if with_pos else None
    ref = tab[ids] + (pos[np.arange(N) % pos_rows] if with_pos else 0)
    out_c = np.empty((N, C), np.float32)
    table("cpu").embedding_forward(ptr(out_c), ptr(ids), ptr(tab), ptr(pos), pos_rows, N, C)
    do = dev.empty((N, C))
    table("cuda").embedding_forward(do, up(dev, ids), up(dev, tab), up(dev, pos), pos_rows, N, C)
    out_g = down(do, (N, C))
    assert np.array_equal(out_g, ref) and np.array_equal(out_c, ref)


@pytest.mark.parametrize("hd,with_bias", [(64, True), (64, False), (6, True)])
def test_split_merge_heads(rng, dev, hd, with_bias):
    """A fused qkv row layout (ld = 3*nh*hd, the k part at column nh*hd) into rows [off, off+len)
    of heads [B, nh, tot, hd], then back (write and accumulate)."""
    B, nh, tot, off, ln = 2, 12, 40, 8, 32
    ld = 3 * nh * hd
    tok = randn(rng, B * ln, ld)
    bias = randn(rng, nh * hd) if with_bias else None
    heads0 = randn(rng, B, nh, tot, hd)
    src = tok[:, nh * hd:2 * nh * hd] + (bias if with_bias else 0)
    ref = heads0.copy()
    ref[:, :, off:off + ln, :] = src.reshape(B, ln, nh, hd).transpose(0, 2, 1, 3)
    h_c = heads0.copy()
    table("cpu").split_heads(ptr(h_c), tok.ctypes.data + 4 * nh * hd, ld, ptr(bias), B, nh, tot, off, ln, hd)
    dh = up(dev, heads0)
    table("cuda").split_heads(dh, up(dev, tok) + 4 * nh * hd, ld, up(dev, bias), B, nh, tot, off, ln, hd)
    h_g = down(dh, heads0.shape)
    assert np.array_equal(h_c, ref) and np.array_equal(h_g, ref)
    # merge: tok columns [nh*hd, 2*nh*hd) (= or +=) heads rows [off, off+len)
    for acc in (0, 1):
        mref = tok.copy()
        part = heads0[:, :, off:off + ln, :].transpose(0, 2, 1, 3).reshape(B * ln, nh * hd)
        mref[:, nh * hd:2 * nh * hd] = (mref[:, nh * hd:2 * nh * hd] + part) if acc else part
        t_c = tok.copy()
        table("cpu").merge_heads(t_c.ctypes.data + 4 * nh * hd, ld, ptr(heads0), B, nh, tot, off, ln, hd, acc)
        dt = up(dev, tok)
        table("cuda").merge_heads(dt + 4 * nh * hd, ld, up(dev, heads0), B, nh, tot, off, ln, hd, acc)
        t_g = down(dt, tok.shape)
        assert np.array_equal(t_c, mref) and np.array_equal(t_g, mref), "acc=%d" % acc


def test_copy2d(rng, dev):
    rows, width, sp, dp = 33, 100, 130, 120  # in floats
    src = randn(rng, rows, sp)
    ref = np.zeros((rows, dp), np.float32)
    ref[:, :width] = src[:, :width]
    cp = table("cuda").copy2d
    ds = up(dev, src)
    dd = up(dev, np.zeros((rows, dp), np.float32))
    cp(dd, 4 * dp, ds, 4 * sp, 4 * width, rows)  # device -> device
    assert np.array_equal(down(dd, ref.shape), ref)
    dd2 = up(dev, np.zeros((rows, dp), np.float32))
    cp(dd2, 4 * dp, ptr(src), 4 * sp, 4 * width, rows)  # host -> device
    assert np.array_equal(down(dd2, ref.shape), ref)
    host = np.zeros((rows, dp), np.float32)
    table("cuda").gelu_forward(ds, ds, rows * sp, 0)  # queued work the download must wait for
    cp(ptr(host), 4 * dp, ds, 4 * sp, 4 * width, rows)  # device -> host
    t = util.torch()
    g = t.nn.functional.gelu(t.tensor(src[:, :width], dtype=t.float64)).numpy()
    assert rel_err(host[:, :width], g) <= 1e-5 and not host[:, width:].any()
    table("cuda").copy2d(dd, 0, ds, 0, 0, 0)  # nothing to copy


def test_dead_rows_mean(rng, dev):
    B, nh, L, S, hd = 3, 4, 32, 257, 64
    v = randn(rng, B, nh, S, hd)
    dead = np.array([1, 0, 1], np.uint8)
    out0 = randn(rng, B, nh, L, hd)
    ref = out0.copy()
    for b in np.flatnonzero(dead):
        ref[b] = np.broadcast_to(v[b].astype(np.float64).mean(1, keepdims=True), (nh, L, hd)).astype(np.float32)
    o_c = out0.copy()
    table("cpu").dead_rows_mean(ptr(o_c), ptr(v), ptr(dead), B, nh, L, S, hd)
    do = up(dev, out0)
    table("cuda").dead_rows_mean(do, up(dev, v), up(dev, dead), B, nh, L, S, hd)
    o_g = down(do, out0.shape)
    assert np.array_equal(o_g, o_c), "gpu vs cpu"
    assert rel_err(o_g, ref) <= 1e-7 and np.array_equal(o_g[1], out0[1])


def test_screen_nonfinite(rng, dev):
    n = 300001
    x = randn(rng, n)
    x[200000], x[12345], x[250000] = np.inf, np.nan, -np.inf
    first = dev.empty((2,))  # one int64
    dx = up(dev, x)
    cases = [  # (device pointer, count, initial value, expected)
        (dx, n, n, 12345), (dx, 12345, 12345, 12345), (dx, 12346, 1 << 40, 12345),
        (dx + 4 * 200001, n - 200001, 10**9, 49999),  # -Inf counts too
        (dx, n, 7, 7)]  # the old value is kept when smaller
    for p, cnt, init, want in cases:
        v = np.array([init], np.int64)
        check(lib.qf_cuda_upload(first, v.ctypes.data, 8))
        table("cuda").screen_nonfinite(p, cnt, first)
        got = int(down(first, (1,), np.int64)[0])
        assert got == want, (cnt, init, got, want)
    v = np.array([n], np.int64)  # the CPU entry agrees on the first case
    table("cpu").screen_nonfinite(ptr(x), n, ptr(v))
    assert v[0] == 12345


# ---- graphs ---------------------------------------------------------------------------------------

def test_graph_replay(rng, dev):
    """gemm_nt (+bias), layernorm, gelu, add, split_heads captured once, replayed on new inputs."""
    M, K, N, nh = 32, 96, 128, 4
    hd = N // nh
    w, bias, lw, lb = randn(rng, N, K), randn(rng, N), randn(rng, N), randn(rng, N)
    dw, dbias, dlw, dlb = up(dev, w), up(dev, bias), up(dev, lw), up(dev, lb)
    dx, dh, dy, dz = dev.empty((M, K)), dev.empty((M, N)), dev.empty((M, N)), dev.empty((M, N))
    dheads = dev.empty((1, nh, M, hd))
    cu = table("cuda")

    def run(be, x, h, y, z, heads, W, Bi, LW, LB):
        be.gemm_nt(byref(gemm_args(x, K, W, Bi, None, 0, h, N, M, N, K)))
        be.layernorm_forward(y, None, None, h, LW, LB, M, N, 1e-5)
        be.gelu_forward(y, y, M * N, 1)
        be.add(z, y, h, M * N)
        be.split_heads(heads, z, N, Bi, 1, nh, M, 0, M, hd)

    def cpu_ref(x):
        h, y, z = (np.empty((M, N), np.float32) for _ in range(3))
        heads = np.empty((1, nh, M, hd), np.float32)
        run(table("cpu"), ptr(x), ptr(h), ptr(y), ptr(z), ptr(heads), ptr(w), ptr(bias), ptr(lw), ptr(lb))
        return heads

    x0 = randn(rng, M, K)
    check(lib.qf_cuda_upload(dx, x0.ctypes.data, x0.nbytes))
    run(cu, dx, dh, dy, dz, dheads, dw, dbias, dlw, dlb)  # eager first (as the model does)
    assert rel_err(down(dheads, (1, nh, M, hd)), cpu_ref(x0)) <= 1e-5
    cu.capture_begin()
    try:
        run(cu, dx, dh, dy, dz, dheads, dw, dbias, dlw, dlb)
    finally:
        graph = c_void_p()
        cu.capture_end(byref(graph))
    try:
        for _ in range(2):
            x = randn(rng, M, K)
            check(lib.qf_cuda_upload(dx, x.ctypes.data, x.nbytes))
            check(lib.qf_cuda_upload(dheads, np.zeros(nh * M * hd, np.float32).ctypes.data, 4 * nh * M * hd))
            stale = c_int(-1)
            cu.graph_launch(graph, byref(stale))
            assert stale.value == 0
            e = rel_err(down(dheads, (1, nh, M, hd)), cpu_ref(x))
            assert e <= 1e-5, "replay vs eager cpu %.3g" % e
    finally:
        cu.graph_free(graph)


def test_graph_stale_and_failed_capture(rng, dev):
    """A graph using the bf16 scratch slot goes stale when the slot grows; growing it inside a
    capture is refused and the stream stays usable after capture_end."""
    cu = table("cuda")
    N, K = 64, 32
    wbits, _ = bf16_round(randn(rng, N, K))
    dwb = up(dev, wbits)

    big = 1 << 16  # rows: larger than any earlier use of the slot in this process
    bufs = {M: (up(dev, randn(rng, M, K)), dev.empty((M, N))) for M in (4, big, 4 * big)}  # no allocation

    def bf16_gemm(M):  # inside a capture
        x, o = bufs[M]
        cu.gemm_nt(byref(gemm_args(x, K, None, None, None, 0, o, N, M, N, K, 0, dwb)))

    bf16_gemm(4)
    cu.capture_begin()
    try:
        bf16_gemm(4)
    finally:
        graph = c_void_p()
        cu.capture_end(byref(graph))
    stale = c_int(-1)
    cu.graph_launch(graph, byref(stale))
    assert stale.value == 0
    bf16_gemm(big)  # the slot grows
    cu.graph_launch(graph, byref(stale))
    assert stale.value == 1
    cu.graph_free(graph)
    # growth inside a capture: refused, capture ends, the stream works afterwards
    cu.capture_begin()
    with pytest.raises(QfuseError, match="captured"):
        bf16_gemm(4 * big)
    g2 = c_void_p()
    try:
        cu.capture_end(byref(g2))
    except QfuseError:
        pass
    if g2.value:
        cu.graph_free(g2)
    cu.synchronize()
    a = randn(rng, 1000)
    da = up(dev, a)
    cu.add(da, da, da, 1000)
    assert np.array_equal(down(da, (1000,)), a + a)


if __name__ == "__main__":  # bench/device_cuda.sh sets QFUSE_TEST_QUICK=1 for the sanitizers
    if REASON is not None:
        raise SystemExit("CUDA backend not usable: %s" % REASON)
    sys.exit(pytest.main([os.path.abspath(__file__), "-q", "-p", "no:cacheprovider"]))
