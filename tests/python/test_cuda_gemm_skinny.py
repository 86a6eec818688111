"""test_cuda_gemm_skinny.py - qfuse's few-rows GEMM on the GPU (src/backend/cuda/gemm_skinny.cu),
reached through the CUDA backend table's gemm_nt: out[M, N] = [out +] x · wᵀ + bias + res.

Every case draws fresh random inputs and checks the GPU result against a float64 PyTorch
reference on the same data, with the skinny kernel forced on for every shape it can run
(qf_cuda_test_gemm_skinny_force(1)), and again with it off (qf_cuda_test_gemm_skinny(0):
cuBLAS), so both paths are held to the same bound and to each other.

Bounds, as max|a - ref| / max|ref| (util.rel_err):
- float32 weights and x: <= 1e-5 of the float64 product (exact float32 FMAs, no TF32); skinny on
  and off agree within 2e-5.
- bf16 weights: the reference is float64 on the bf16-ROUNDED weights and x (both paths round a
  float32 x to bf16, round to nearest even, and accumulate in float32): <= 1e-4; vs the unrounded
  product <= 2e-2. With out_bf16 the stored value is the float32 result rounded to bf16 once, so
  <= 1e-4 + 2^-8 (4.0e-3) of the rounded-input reference; the skinny kernel's out_bf16 must be
  bit-identical to bf16(its own float32 output) for the same inputs.
- every result: columns N..ldo-1 of out untouched; two identical calls give identical bits.
Shapes: M = 1..64 (odd sizes included), N and K not multiples of 8 or 16 (K a multiple of 4 for
float32, of 8 for bf16: the kernel's 16-byte rows; other K fall back to cuBLAS and are tested
as such), strided x, residual with ldr != ldo, accumulate, res == out.

Skips cleanly (the library's reason) without the CUDA backend or a GPU. Run as a script it runs
itself through pytest (the form compute-sanitizer is given; QFUSE_TEST_QUICK=1: fewer shapes)."""
import ctypes
import os
import sys
from ctypes import POINTER, byref, c_int, c_int64, c_void_p

import numpy as np
import pytest

import qfuse
import qfuse.cuda
import util
from qfuse._native import check, lib
from util import rel_err

REASON = qfuse.cuda.unavailable_reason()
QUICK = util.QUICK


class Args(ctypes.Structure):
    """qf_gemm_nt_args of src/ops/gemm_small.h, field for field (x_bf16 and out_bf16 included)."""
    _fields_ = [("x", c_void_p), ("ldx", c_int64), ("w", c_void_p), ("bias", c_void_p),
                ("res", c_void_p), ("ldr", c_int64), ("out", c_void_p), ("ldo", c_int64),
                ("M", c_int64), ("N", c_int64), ("K", c_int64), ("accumulate", c_int),
                ("w_bf16", c_void_p), ("x_bf16", c_void_p), ("out_bf16", c_void_p)]


if REASON is None:
    lib.qf_cuda_test_gemm_skinny.argtypes = [c_int]
    lib.qf_cuda_test_gemm_skinny.restype = None
    lib.qf_cuda_test_gemm_skinny_force.argtypes = [c_int]
    lib.qf_cuda_test_gemm_skinny_force.restype = None
    _E = lambda op, res, args: qfuse.cuda.backend_entry("cuda", op, res, args)  # noqa: E731
    _gemm = _E("gemm_nt", c_int, [POINTER(Args)])
    _sync = _E("synchronize", c_int, [])
    _cap_begin = _E("capture_begin", c_int, [])
    _cap_end = _E("capture_end", c_int, [POINTER(c_void_p)])
    _launch = _E("graph_launch", c_int, [c_void_p, POINTER(c_int)])
    _gfree = _E("graph_free", None, [c_void_p])


@pytest.fixture(autouse=True)
def _needs_gpu():
    if REASON is not None:
        pytest.skip("CUDA backend not usable: %s" % REASON)
    yield
    lib.qf_cuda_test_gemm_skinny(1)
    lib.qf_cuda_test_gemm_skinny_force(0)


@pytest.fixture
def rng():
    seed = int(os.environ.get("QFUSE_TEST_SEED", "0")) or int.from_bytes(os.urandom(4), "little")
    print("seed", seed)
    return np.random.default_rng(seed)


@pytest.fixture
def dev():
    with qfuse.cuda.DeviceBuffers() as bufs:
        yield bufs


def randn(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def bf16_round(a):
    """(bf16 bits as uint16, their values as float32): round to nearest even (torch's rule)."""
    u = np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.uint64)
    bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return bits, (bits.astype(np.uint32) << 16).view(np.float32)


def bf16_value(bits):
    return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32)


def up(dev, a):
    return None if a is None else dev.upload(np.ascontiguousarray(a))


def down(p, shape, dtype):
    out = np.empty(shape, dtype)
    check(lib.qf_cuda_download(out.ctypes.data, p, out.nbytes))
    return out


def torch_ref(x, w, bias=None):
    """float64 x · wᵀ (+ bias) by torch.nn.functional.linear."""
    t = util.torch()
    d = lambda a: t.tensor(np.asarray(a, np.float64))  # noqa: E731
    return t.nn.functional.linear(d(x), d(w), None if bias is None else d(bias)).numpy()


def run(dev, skinny, *, x, ldx, w=None, wbits=None, xbits=None, bias=None, res=None, ldr=0, out0, ldo, M, N, K,
        acc=0, res_is_out=False, out_bf16=False):
    """One gemm_nt on fresh device copies with skinny forced on (1) or off (0); returns out [M, ldo]
    (float32, or the bf16 bits when out_bf16)."""
    lib.qf_cuda_test_gemm_skinny(1 if skinny else 0)
    lib.qf_cuda_test_gemm_skinny_force(1 if skinny else 0)
    try:
        do = up(dev, out0)
        a = Args(None if xbits is not None else up(dev, x), ldx, up(dev, w), up(dev, bias),
                 do if res_is_out else up(dev, res), ldr, None if out_bf16 else do, ldo, M, N, K, acc,
                 up(dev, wbits), up(dev, xbits), do if out_bf16 else None)
        check(_gemm(byref(a)))
        check(_sync())
        return down(do, out0.shape, out0.dtype)
    finally:
        lib.qf_cuda_test_gemm_skinny(1)
        lib.qf_cuda_test_gemm_skinny_force(0)


F32_SHAPES = ([(1, 300, 388), (17, 1001, 772), (32, 2304, 768), (64, 257, 3076)] if QUICK else
              [(1, 300, 388), (2, 2304, 768), (7, 1001, 772), (13, 130, 68), (17, 1001, 772), (31, 771, 196),
               (32, 2304, 768), (32, 768, 3072), (33, 300, 1540), (47, 999, 44), (64, 257, 3076), (64, 3072, 768)])
# (acc, bias, residual: None / "own" (ldr != ldo) / "out" (res == out), ldx pad)
F32_COMBOS = [(0, False, None, 0), (0, True, None, 4), (0, True, "own", 0), (1, False, None, 8), (1, True, "own", 4),
              (0, False, "out", 0), (0, True, "out", 12)]


@pytest.mark.parametrize("M,N,K", F32_SHAPES)
def test_float32(rng, dev, M, N, K):
    """Every argument combination on fresh inputs: skinny vs torch float64, cuBLAS vs the same, and
    the two against each other; out's padding columns untouched."""
    ldo = N + 5
    for acc, use_bias, res_kind, pad in F32_COMBOS:
        ldx, ldr = K + pad, N + 3
        x, w, bias = randn(rng, M, ldx), randn(rng, N, K) * 0.05, randn(rng, N)
        out0 = randn(rng, M, ldo)
        res = randn(rng, M, ldr) if res_kind == "own" else None
        ref = torch_ref(x[:, :K], w, bias if use_bias else None)
        if res_kind == "own":
            ref += res[:, :N]
        if res_kind == "out" or acc:
            ref += out0[:, :N]
        kw = dict(x=x, ldx=ldx, w=w, bias=bias if use_bias else None, res=res, ldr=ldr if res_kind == "own" else
                  (ldo if res_kind == "out" else 0), out0=out0, ldo=ldo, M=M, N=N, K=K, acc=acc,
                  res_is_out=res_kind == "out")
        on, off = run(dev, True, **kw), run(dev, False, **kw)
        tag = "M=%d N=%d K=%d acc=%d bias=%d res=%s ldx=%d" % (M, N, K, acc, use_bias, res_kind, ldx)
        for name, o in (("skinny", on), ("cublas", off)):
            assert np.array_equal(o[:, N:], out0[:, N:]), "%s %s wrote past N" % (name, tag)
        e_on, e_off, e_pair = rel_err(on[:, :N], ref), rel_err(off[:, :N], ref), rel_err(on[:, :N], off[:, :N])
        print("f32 %s: skinny %.3g cublas %.3g on-vs-off %.3g" % (tag, e_on, e_off, e_pair))
        assert e_on <= 1e-5 and e_off <= 1e-5 and e_pair <= 2e-5, "%s: skinny %.3g cublas %.3g on-vs-off %.3g" % (
            tag, e_on, e_off, e_pair)


BF16_SHAPES = ([(1, 2304, 768), (19, 300, 392), (32, 771, 3072), (64, 1001, 136)] if QUICK else
               [(1, 2304, 768), (3, 130, 40), (8, 3072, 768), (19, 300, 392), (32, 2304, 768), (32, 771, 3072),
                (33, 999, 776), (48, 517, 1416), (64, 1001, 136), (64, 768, 3072)])


@pytest.mark.skipif(os.environ.get("QFUSE_TEST_SKINNY_BF16") != "1",
                    reason="the bf16 skinny kernel is off by default (skinny_wins): an intermittent illegal address "
                           "seen once on the H100 in this test, not reproduced under compute-sanitizer; "
                           "QFUSE_TEST_SKINNY_BF16=1 runs it")
@pytest.mark.parametrize("M,N,K", BF16_SHAPES)
@pytest.mark.parametrize("x_bf16", [False, True])
@pytest.mark.parametrize("out_bf16", [False, True])
def test_bf16(rng, dev, M, N, K, x_bf16, out_bf16):
    """bf16 weights with float32 or bf16 x and float32 or bf16 out, bias, strided x; plus a
    residual with ldr != ldo and accumulate for float32 out."""
    ldx, ldo = K + 8, N + 5
    combos = [(0, True, False)] if out_bf16 else [(0, True, False), (0, False, True), (1, True, True)]
    for acc, use_bias, use_res in combos:
        x, w, bias = randn(rng, M, ldx), randn(rng, N, K), randn(rng, N)
        wbits, wr = bf16_round(w)
        xbits, xr = bf16_round(x)
        ldr = N + 3
        res = randn(rng, M, ldr) if use_res else None
        out0 = bf16_round(randn(rng, M, ldo))[0] if out_bf16 else randn(rng, M, ldo)
        ref = torch_ref(xr[:, :K], wr, bias if use_bias else None)
        exact = torch_ref(x[:, :K] if not x_bf16 else xr[:, :K], w, bias if use_bias else None)
        if use_res:
            ref += res[:, :N]
            exact += res[:, :N]
        if acc:
            ref += out0[:, :N]
            exact += out0[:, :N]
        kw = dict(x=x, ldx=ldx, wbits=wbits, xbits=xbits if x_bf16 else None, bias=bias if use_bias else None,
                  res=res, ldr=ldr if use_res else 0, out0=out0, ldo=ldo, M=M, N=N, K=K, acc=acc, out_bf16=out_bf16)
        on, off = run(dev, True, **kw), run(dev, False, **kw)
        tag = "M=%d N=%d K=%d x_bf16=%d out_bf16=%d acc=%d bias=%d res=%d" % (M, N, K, x_bf16, out_bf16, acc,
                                                                                 use_bias, use_res)
        for name, o in (("skinny", on), ("cublas", off)):
            assert np.array_equal(o[:, N:], out0[:, N:]), "%s %s wrote past N" % (name, tag)
        val = (lambda o: bf16_value(o[:, :N])) if out_bf16 else (lambda o: o[:, :N])
        bound = 1e-4 + 2.0 ** -8 if out_bf16 else 1e-4
        e_on, e_off = rel_err(val(on), ref), rel_err(val(off), ref)
        e_pair, e_exact = rel_err(val(on), val(off)), rel_err(val(on), exact)
        print("bf16 %s: skinny %.3g cublas %.3g on-vs-off %.3g vs-exact %.3g" % (tag, e_on, e_off, e_pair, e_exact))
        assert e_on <= bound and e_off <= bound and e_pair <= 2 * bound and e_exact <= 2e-2, \
            "%s: skinny %.3g cublas %.3g on-vs-off %.3g exact %.3g" % (tag, e_on, e_off, e_pair, e_exact)
        if out_bf16:  # the kernel's bf16 output is its own float32 result rounded once
            kw32 = dict(kw, out0=np.zeros((M, ldo), np.float32), out_bf16=False)
            f32 = run(dev, True, **kw32)
            assert np.array_equal(on[:, :N], bf16_round(f32[:, :N])[0]), "%s: out_bf16 != bf16(float32 out)" % tag


def test_deterministic_and_declines(rng, dev):
    """Repeated calls are bit-identical; shapes and arguments the kernel does not take (M > 64,
    K not a multiple of 4, unaligned x, TF32 on) still give cuBLAS's correct result."""
    M, N, K = 32, 2304, 768
    x, w, bias = randn(rng, M, K), randn(rng, N, K) * 0.05, randn(rng, N)
    kw = dict(x=x, ldx=K, w=w, bias=bias, out0=np.zeros((M, N), np.float32), ldo=N, M=M, N=N, K=K)
    a, b = run(dev, True, **kw), run(dev, True, **kw)
    assert np.array_equal(a, b), "two identical calls differ"
    assert rel_err(a, torch_ref(x, w, bias)) <= 1e-5
    for M2, N2, K2 in ((65, 300, 388), (5, 300, 387)):
        x2, w2 = randn(rng, M2, K2), randn(rng, N2, K2)
        o = run(dev, True, x=x2, ldx=K2, w=w2, out0=np.zeros((M2, N2), np.float32), ldo=N2, M=M2, N=N2, K=K2)
        assert rel_err(o, torch_ref(x2, w2)) <= 1e-5, "declined %dx%dx%d" % (M2, N2, K2)
    # TF32 on: the float32 kernel steps aside, so the error is TF32's (larger than the exact kernel's)
    ref = torch_ref(x, w, bias)
    try:
        qfuse.cuda.set_tf32(True)
        t = run(dev, True, **kw)
    finally:
        qfuse.cuda.set_tf32(False)
    e_tf32, e_exact = rel_err(t, ref), rel_err(a, ref)
    print("tf32 on %.3g, skinny %.3g" % (e_tf32, e_exact))
    assert e_tf32 <= 5e-3 and e_tf32 > 3 * e_exact, (e_tf32, e_exact)


def test_rule_and_graph(rng, dev):
    """The default rule takes the Q-Former's batch-1 float32 shapes and nothing above 64 rows; a
    captured graph of skinny products (cluster launches) replays on new inputs with the eager results."""
    lib.qf_cuda_test_gemm_skinny_wins.argtypes = [c_int64, c_int64, c_int64, c_int]
    for M, N, K in ((32, 2304, 768), (32, 768, 768), (32, 3072, 768), (32, 768, 3072)):
        assert lib.qf_cuda_test_gemm_skinny_wins(M, N, K, 0), "float32 %dx%dx%d" % (M, N, K)
    for kind in (0, 1, 2):  # float32; bf16 weights; bf16 weights and x
        assert not lib.qf_cuda_test_gemm_skinny_wins(65, 768, 768, kind)
    shapes = [(32, 2304, 768, False), (32, 768, 3072, True), (1, 3072, 768, False), (64, 768, 768, True)]
    if os.environ.get("QFUSE_TEST_SKINNY_BF16") != "1":  # the bf16 kernel: see test_bf16's skip
        shapes = [sh for sh in shapes if not sh[3]]
    bufs = []
    for M, N, K, b16 in shapes:
        x, w = dev.alloc(4 * M * K), dev.alloc((2 if b16 else 4) * N * K)
        bias, out = dev.alloc(4 * N), dev.alloc(4 * M * N)
        bufs.append((M, N, K, b16, x, w, bias, out,
                     Args(x, K, None if b16 else w, bias, None, 0, out, N, M, N, K, 0, w if b16 else None, None, None)))

    def fill():
        refs = []
        for M, N, K, b16, x, w, bias, out, _ in bufs:
            hx, hw, hb = randn(rng, M, K), randn(rng, N, K), randn(rng, N)
            if b16:
                hwb, hw = bf16_round(hw)
                hx = bf16_round(hx)[1]
                check(lib.qf_cuda_upload(w, hwb.ctypes.data, hwb.nbytes))
            else:
                check(lib.qf_cuda_upload(w, hw.ctypes.data, hw.nbytes))
            check(lib.qf_cuda_upload(x, hx.ctypes.data, hx.nbytes))
            check(lib.qf_cuda_upload(bias, hb.ctypes.data, hb.nbytes))
            refs.append(torch_ref(hx, hw, hb))
        return refs

    lib.qf_cuda_test_gemm_skinny_force(1)
    fill()
    for a in bufs:
        check(_gemm(byref(a[-1])))  # eager first (kernel attributes set outside the capture)
    check(_sync())
    check(_cap_begin())
    try:
        for a in bufs:
            check(_gemm(byref(a[-1])))
    finally:
        g = c_void_p()
        check(_cap_end(byref(g)))
    try:
        for _ in range(2):
            refs = fill()
            stale = c_int(-1)
            check(_launch(g, byref(stale)))
            check(_sync())
            assert stale.value == 0
            for (M, N, K, b16, *_r, out, _a), ref in zip(bufs, refs):
                e = rel_err(down(out, (M, N), np.float32), ref)
                assert e <= (1e-4 if b16 else 1e-5), "graph %dx%dx%d bf16=%d: %.3g" % (M, N, K, b16, e)
    finally:
        _gfree(g)


if __name__ == "__main__":  # the form compute-sanitizer runs (QFUSE_TEST_QUICK=1: fewer shapes)
    if REASON is not None:
        raise SystemExit("CUDA backend not usable: %s" % REASON)
    sys.exit(pytest.main([os.path.abspath(__file__), "-q", "-p", "no:cacheprovider"]))
