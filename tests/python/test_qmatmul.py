"""test_qmatmul.py - src/ops/qmatmul.c (quantized linear weights) against independent references:

- bf16: the dequantized weight equals torch 1.13's w.to(torch.bfloat16) bit for bit (round to
  nearest, ties to even; tie patterns included).
- int8: scale = max|w| over the row (or block) / 127 in float32, and the codes equal
  torch.quantize_per_channel(w, scales, zero_points=0, axis=0, dtype=torch.qint8).int_repr()
  (round half to even of w * (1/scale), as torch/fbgemm; tie rows included). Per-block scales
  are checked the same way on w reshaped to [out*in/block, block]. The C API returns only the
  dequantized weight, so the check is dequant == float32(scale * q_torch) exactly: for a fixed
  scale > 0 that product is one-to-one in q, so equal weights mean equal codes.
- q4: dequant equals a numpy implementation of the format documented in qmatmul.c (scale =
  the largest-|w| element / -8, q = clip(rint(w * (1/scale)), -8, 7)).
- matmul: y = x W^T (+ bias) against float64 numpy x @ dequant(W)^T, max|y - ref| / max|ref|
  <= 1e-5, on every ISA path, N in {1, 3, 8, 12, 37}, sizes that are not multiples of the
  vector widths, per-row and per-block scales, and on several panels / threads; the q4 VNNI
  path with int8 activations (N <= 8) against its own stated bound (q8_bound); the multi-weight
  entry equal to single calls.
- accuracy of each format vs the float32 weight (relative Frobenius error, Gaussian 256 x 1024):
  bounds bf16 <= 2^-8, int8 per row <= 1%, int8 block 32 <= 0.6%, q4 block 32 <= 10%.
- errors: block rules, NULLs, sizes, non-finite weights, unknown formats; each message names the
  tensor and the rule.
"""
import ctypes

import numpy as np
import pytest

import qfuse
from qfuse import _native
from qfuse._native import QfuseError, c_int, c_int64, c_size_t, c_void_p, c_char_p, check, lib

import util

_native.declare({
    "qf_qweight_quantize": (c_int, [c_int, c_int64, c_void_p, c_int64, c_int64, c_char_p,
                                    ctypes.POINTER(c_void_p)]),
    "qf_qweight_free": (None, [c_void_p]),
    "qf_qweight_format": (c_int, [c_void_p]),
    "qf_qweight_bytes": (c_size_t, [c_void_p]),
    "qf_qweight_dequantize": (c_int, [c_void_p, c_void_p]),
    "qf_qweight_matmul": (c_int, [c_void_p, c_void_p, c_void_p, c_void_p, c_int64]),
    "qf_qweight_matmul_multi": (c_int, [c_int, c_void_p, c_void_p, c_void_p, c_void_p, c_int64]),
    "qf_qweight_matmul_glu": (c_int, [c_void_p, c_void_p, c_void_p, c_void_p, c_void_p, c_void_p, c_void_p,
                                      c_int64]),
})

BF16, INT8, Q4 = 1, 2, 3
ISAS = [i for i in ("scalar", "avx2", "avx512")]
MATMUL_RTOL = 1e-5
with open("/proc/cpuinfo") as _f:
    HAVE_VNNI = " avx512_vnni" in _f.read()


class QW:
    """An owned qf_qweight (freed on close/garbage collection)."""

    def __init__(self, fmt, w, block=0, what="test.weight"):
        w = np.ascontiguousarray(w, np.float32)
        self.out, self.inp = w.shape
        h = c_void_p()
        check(lib.qf_qweight_quantize(fmt, block, w.ctypes.data, self.out, self.inp,
                                      what.encode(), ctypes.byref(h)))
        self.h = h

    def dequant(self):
        w = np.empty((self.out, self.inp), np.float32)
        check(lib.qf_qweight_dequantize(self.h, w.ctypes.data))
        return w

    def matmul(self, x, bias=None):
        x = np.ascontiguousarray(x, np.float32)
        y = np.full((x.shape[0], self.out), np.nan, np.float32)
        b = None if bias is None else np.ascontiguousarray(bias, np.float32)
        check(lib.qf_qweight_matmul(y.ctypes.data, x.ctypes.data, self.h,
                                    None if b is None else b.ctypes.data, x.shape[0]))
        return y

    def __del__(self):
        if getattr(self, "h", None):
            lib.qf_qweight_free(self.h)
            self.h = None


def available_isas():
    out = []
    for name in ISAS:
        try:
            qfuse.set_isa(name)
            out.append(name)
        except QfuseError:
            pass
    return out


def rng(seed):
    return np.random.default_rng(seed)


# ---- references ---------------------------------------------------------------------------

def torch_bf16(w):
    t = util.torch()
    return t.from_numpy(w).to(t.bfloat16).to(t.float32).numpy()


def torch_int8(w, block):
    """(scales [rows], codes) of w's rows of `block` values (block = in: per output row)."""
    t = util.torch()
    rows = np.ascontiguousarray(w.reshape(-1, block))
    scales = np.max(np.abs(rows), axis=1).astype(np.float32) / np.float32(127)
    assert np.all(scales > 0), "torch reference needs nonzero rows"
    q = t.quantize_per_channel(t.from_numpy(rows), t.from_numpy(scales.astype(np.float64)),
                               t.zeros(rows.shape[0], dtype=t.int64), 0, t.qint8)
    return scales, q.int_repr().numpy().astype(np.int32)


def int8_dequant_ref(w, block):
    scales, q = torch_int8(w, block)
    return (scales[:, None] * q.astype(np.float32)).astype(np.float32).reshape(w.shape)


def q4_dequant_ref(w, block):
    rows = w.reshape(-1, block).astype(np.float32)
    m = rows[np.arange(rows.shape[0]), np.argmax(np.abs(rows), axis=1)]
    scale = (m / np.float32(-8)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(scale != 0, np.float32(1) / scale, np.float32(0)).astype(np.float32)
    q = np.clip(np.rint(rows * inv[:, None]), -8, 7).astype(np.float32)
    return (scale[:, None] * q).astype(np.float32).reshape(w.shape)


def gaussian_weight(r, out, inp):
    """Gaussian rows with row magnitudes over three decades (per-row scales matter)."""
    return (r.standard_normal((out, inp)) * np.exp(r.uniform(-3, 3, (out, 1)))).astype(np.float32)


# ---- formats vs references ----------------------------------------------------------------

def test_bf16_matches_torch():
    r = rng(1)
    w = gaussian_weight(r, 23, 77)
    bits = w.view(np.uint32).copy()
    # ties: low 16 bits exactly 0x8000, with even and odd high halves; plus round-up carries
    bits[0, :8] = (bits[0, :8] & 0xFFFF0000) | 0x8000
    bits[1, :8] = (bits[1, :8] & 0xFFFE0000) | 0x18000
    bits[2, :4] = 0x3F7FFFFF  # just below 1 -> 1.0
    w = bits.view(np.float32)
    w[3, :4] = [3.39e38, -3.4e38, 1e-40, -0.0]  # overflow to inf as torch; subnormal; -0
    ref = torch_bf16(w)
    for isa in available_isas():
        qfuse.set_isa(isa)
        got = QW(BF16, w).dequant()
        np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32), err_msg=isa)


@pytest.mark.parametrize("shape,block", [((19, 96), 0), ((21, 100), 0), ((13, 96), 16),
                                         ((9, 100), 20), ((5, 35), 7)])
def test_int8_matches_torch_quantize_per_channel(shape, block):
    r = rng(2 + shape[1] + block)
    w = gaussian_weight(r, *shape)
    # a row of exact ties (scale 1 when the row max is 127): 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, ...
    ties = np.array([127, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5], np.float32)
    w[0, :] = 0.25
    w[0, :len(ties)] = ties
    if block:
        w[0, :block] = 0.25
        w[0, :min(block, len(ties))] = ties[:min(block, len(ties))]
        w[0, 0] = 127.0
    ref = int8_dequant_ref(w, block or shape[1])
    for isa in available_isas():
        qfuse.set_isa(isa)
        q = QW(INT8, w, block)
        np.testing.assert_array_equal(q.dequant(), ref, err_msg=isa)
        nb = shape[1] // (block or shape[1])
        # codes + scales (+ the per-row code sums the VNNI path uses, per-row scales only)
        assert lib.qf_qweight_bytes(q.h) == shape[0] * shape[1] + 4 * shape[0] * nb + \
            (4 * shape[0] if not block else 0)
        assert lib.qf_qweight_format(q.h) == INT8


def test_int8_zero_row_and_block():
    w = rng(3).standard_normal((4, 64)).astype(np.float32)
    w[1] = 0.0
    w[2, 32:] = 0.0
    got = QW(INT8, w, 32).dequant()
    assert np.all(got[1] == 0) and np.all(got[2, 32:] == 0)
    ref = int8_dequant_ref(np.delete(w, 1, axis=0)[[0, 2]], 32)
    np.testing.assert_array_equal(got[[0, 3]], ref)
    assert np.all(QW(INT8, w).dequant()[1] == 0)


@pytest.mark.parametrize("shape,block", [((17, 96), 0), ((11, 100), 10), ((7, 128), 64),
                                         ((6, 60), 6), ((3, 2), 2)])
def test_q4_matches_numpy_reference(shape, block):
    r = rng(4 + block)
    w = gaussian_weight(r, *shape)
    b = block or 32
    # ties of w * (1/scale) with scale 1 (the block's largest |w| is -8): 0.5, 2.5 round to even;
    # 7.5 -> 8 clamps to 7
    if b >= 8:
        w[0, :8] = [-8, 0.5, 1.5, 2.5, -3.5, 7.5, -7.5, 6.5]
        w[0, 8:b] = 0.125
    w[1, :b] = 0.0  # zero block
    ref = q4_dequant_ref(w, b)
    if b >= 8:
        np.testing.assert_array_equal(ref[0, :8], [-8, 0, 2, 2, -4, 7, -8, 6])
    for isa in available_isas():
        qfuse.set_isa(isa)
        q = QW(Q4, w, block)
        np.testing.assert_array_equal(q.dequant(), ref, err_msg=isa)
        assert lib.qf_qweight_bytes(q.h) == shape[0] * shape[1] // 2 + 4 * shape[0] * (shape[1] // b)


# ---- matmul ---------------------------------------------------------------------------------

CASES = [  # (format, block, out, in)
    (BF16, 0, 37, 100), (BF16, 0, 33, 37),
    (INT8, 0, 37, 100), (INT8, 0, 19, 96), (INT8, 20, 37, 100), (INT8, 32, 29, 96),
    (Q4, 0, 37, 96), (Q4, 10, 37, 100), (Q4, 64, 17, 128), (Q4, 6, 5, 42),
]


@pytest.mark.parametrize("fmt,block,out,inp", CASES)
def test_matmul_every_isa(fmt, block, out, inp):
    r = rng(10 * fmt + out + inp + block)
    w = gaussian_weight(r, out, inp)
    bias = r.standard_normal(out).astype(np.float32)
    Ns = [1, 3, 8, 37] if util.QUICK else [1, 2, 3, 5, 8, 12, 16, 37]
    worst = {}
    for isa in available_isas():
        qfuse.set_isa(isa)
        q = QW(fmt, w, block)
        deq = q.dequant().astype(np.float64)
        for N in Ns:
            x = r.standard_normal((N, inp)).astype(np.float32)
            for b in (None, bias):
                ref = x.astype(np.float64) @ deq.T + (0 if b is None else b.astype(np.float64))
                err = util.rel_err(q.matmul(x, b), ref)
                worst[isa] = max(worst.get(isa, 0.0), err)
                assert err <= MATMUL_RTOL, "fmt %d block %d %s N=%d bias=%s: rel err %.3g" % (
                    fmt, block, isa, N, b is not None, err)
    print("fmt %d block %d [%d,%d]: worst rel err %s" % (
        fmt, block, out, inp, ", ".join("%s %.2g" % kv for kv in worst.items())))


def test_matmul_threads_and_panels():
    """Many rows (several threads' row ranges in decode; several 4 MiB panels in prefill)."""
    r = rng(7)
    out, inp = (1100, 1024) if not util.QUICK else (520, 2048)
    w = gaussian_weight(r, out, inp)
    bias = r.standard_normal(out).astype(np.float32)
    qfuse.set_num_threads(2)
    for fmt, block in ((Q4, 0), (INT8, 0), (BF16, 0)):
        q = QW(fmt, w, block)
        deq = q.dequant().astype(np.float64)
        for isa in available_isas():
            qfuse.set_isa(isa)
            for N in (1, 8, 17):
                x = r.standard_normal((N, inp)).astype(np.float32)
                y = q.matmul(x, bias)
                ref = x.astype(np.float64) @ deq.T + bias
                if q4_act8(fmt, block, inp, isa, N):  # q8 activations: their stated bound
                    assert np.all(np.abs(y - ref) <= q8_bound(x, deq, ref)), "q4 %s N=%d" % (isa, N)
                    continue
                err = util.rel_err(y, ref)
                assert err <= MATMUL_RTOL, "fmt %d %s N=%d: rel err %.3g" % (fmt, isa, N, err)


def q4_act8(fmt, block, inp, isa, N):
    """Whether qmatmul.c takes the q4 VNNI path with int8 (q8_0-like) activations."""
    return fmt == Q4 and block in (0, 32) and inp % 128 == 0 and isa == "avx512" and HAVE_VNNI and N <= 8


def q8_bound(x, deq, ref):
    """The q4 VNNI path's stated bound (qmatmul.c): x rounded per block of 32 to sx * int8 with
    sx = max|x_blk| / 127, so |y - x.dequant(W)^T| <= sum_blocks max|x_blk| / 254 * sum_blk |w|,
    plus float32 rounding of the block terms."""
    N, inp = x.shape
    xb = np.abs(x.astype(np.float64)).reshape(N, inp // 32, 32).max(axis=2)
    wb = np.abs(deq).reshape(deq.shape[0], inp // 32, 32).sum(axis=2)
    return xb / 254.0 @ wb.T + 2.0 ** -21 * (np.abs(x.astype(np.float64)) @ np.abs(deq).T) + 1e-30


def test_q4_vnni_act8_bound():
    """q4 (block 32, in % 128 == 0) at N <= 8 on AVX-512 VNNI: activations as int8 per block of 32
    (see qmatmul.c). Checked per output against float64 x @ dequant(W)^T with the stated bound on
    rows with outliers 1e3x the typical value and a zero block; the error must also be a real
    rounding error (above 1e-5 relative on Gaussian x, or the path is not taken), and exactly
    representable x (sx * int8 per block, sx a power of two) must give float32-accurate sums."""
    r = rng(12)
    out, inp = 70, 384
    w = gaussian_weight(r, out, inp)
    q = QW(Q4, w)
    deq = q.dequant().astype(np.float64)
    for isa in available_isas():
        qfuse.set_isa(isa)
        for N in (1, 2, 5, 8, 9):
            x = r.standard_normal((N, inp)).astype(np.float32)
            x[:, 7] = 3e3
            x[:, 200] = -1e3
            x[:, 32:64] = 0
            ref = x.astype(np.float64) @ deq.T
            y = q.matmul(x).astype(np.float64)
            if q4_act8(Q4, 32, inp, isa, N):
                assert np.all(np.abs(y - ref) <= q8_bound(x, deq, ref)), "%s N=%d: worst excess %.3g" % (
                    isa, N, float(np.max(np.abs(y - ref) / q8_bound(x, deq, ref))))
                xg = r.standard_normal((N, inp)).astype(np.float32)
                assert util.rel_err(q.matmul(xg), xg.astype(np.float64) @ deq.T) > 1e-5, "q8 path not taken?"
                xi = r.integers(-127, 128, (N, inp)).astype(np.float64)
                xi[:, ::32] = 127  # every block's max is 127: sx = 2^-5 exactly
                xi = (xi * 2.0 ** -5).astype(np.float32)
                refi = xi.astype(np.float64) @ deq.T
                assert util.rel_err(q.matmul(xi), refi) <= MATMUL_RTOL
            else:
                assert util.rel_err(y, ref) <= MATMUL_RTOL, "%s N=%d" % (isa, N)
    x = np.ones((1, inp), np.float32)  # non-finite x: the float path (inf/nan propagate)
    x[0, 3] = np.inf
    assert not np.all(np.isfinite(q.matmul(x)))


def test_matmul_multi_equals_single():
    """qf_qweight_matmul_multi (one parallel region over several weights sharing x) gives the
    same values as one qf_qweight_matmul per weight, bit for bit, for mixed formats and biases."""
    r = rng(13)
    inp = 256
    ws = [(Q4, 0, 96), (INT8, 0, 40), (BF16, 0, 33), (Q4, 64, 17), (INT8, 32, 8)]
    qs = [QW(f, gaussian_weight(r, o, inp), b) for f, b, o in ws]
    biases = [r.standard_normal(o).astype(np.float32) if i % 2 == 0 else None for i, (f, b, o) in enumerate(ws)]
    n = len(qs)
    for isa in available_isas():
        qfuse.set_isa(isa)
        for N in (1, 2, 5, 12, 20):
            x = r.standard_normal((N, inp)).astype(np.float32)
            ys = [np.full((N, q.out), np.nan, np.float32) for q in qs]
            arr_y = (c_void_p * n)(*[y.ctypes.data for y in ys])
            arr_q = (c_void_p * n)(*[q.h.value for q in qs])
            arr_b = (c_void_p * n)(*[None if b is None else b.ctypes.data for b in biases])
            check(lib.qf_qweight_matmul_multi(n, arr_y, x.ctypes.data, arr_q, arr_b, N))
            for q, y, b in zip(qs, ys, biases):
                np.testing.assert_array_equal(y, q.matmul(x, b), err_msg="%s N=%d" % (isa, N))
    x = np.ones((1, inp), np.float32)
    other = QW(Q4, gaussian_weight(r, 8, 128))
    arr_q = (c_void_p * 2)(qs[0].h.value, other.h.value)
    ys = [np.zeros((1, 96), np.float32), np.zeros((1, 8), np.float32)]
    arr_y = (c_void_p * 2)(*[y.ctypes.data for y in ys])
    st = lib.qf_qweight_matmul_multi(2, arr_y, x.ctypes.data, arr_q, None, 1)
    assert _native.status_name(st) == "QF_ERR_ARG" and "must share x" in _native.last_error()


def test_matmul_glu():
    """qf_qweight_matmul_glu: g = silu(x Wg^T + bg) * (x Wu^T + bu), u = the up projection; against
    single qf_qweight_matmul calls (u bit for bit) and float64 silu on them (g), at decoding and
    prefill sizes, mixed formats; shape mismatch refused by name."""
    r = rng(14)
    inp, out = 256, 72
    for fg, fu in ((Q4, Q4), (INT8, BF16)):
        gate, up = QW(fg, gaussian_weight(r, out, inp)), QW(fu, gaussian_weight(r, out, inp))
        bg, bu = r.standard_normal(out).astype(np.float32), None
        for isa in available_isas():
            qfuse.set_isa(isa)
            for N in (1, 3, 8, 20):
                x = r.standard_normal((N, inp)).astype(np.float32)
                g = np.full((N, out), np.nan, np.float32)
                u = np.full((N, out), np.nan, np.float32)
                check(lib.qf_qweight_matmul_glu(g.ctypes.data, u.ctypes.data, x.ctypes.data, gate.h, up.h,
                                                bg.ctypes.data, None, N))
                yg, yu = gate.matmul(x, bg).astype(np.float64), up.matmul(x)
                np.testing.assert_array_equal(u, yu, err_msg="%s N=%d" % (isa, N))
                with np.errstate(over="ignore"):  # exp(-g) = inf for very negative g: silu -> -0
                    ref = yg / (1.0 + np.exp(-yg)) * yu
                assert np.all(np.abs(g - ref) <= 1e-6 * np.abs(ref) + 1e-30), "%s N=%d" % (isa, N)
    other = QW(Q4, gaussian_weight(r, out + 1, inp))
    st = lib.qf_qweight_matmul_glu(g.ctypes.data, u.ctypes.data, x.ctypes.data, gate.h, other.h, None, None, 1)
    assert _native.status_name(st) == "QF_ERR_ARG" and "must have one shape" in _native.last_error()


def test_int8_vnni_outlier_bound():
    """int8 per row at N <= 2 on AVX-512 takes the VNNI path (x rounded to 24 bits per row, see
    qmatmul.c). Its bound, |y - x.dequant(W)^T| <= 2^-24 max|x_n| sum_i |w_oi| + float rounding,
    is checked per output on rows with outliers 1e4x the typical value (LLM activations have
    such), where the relative 1e-5 of Gaussian inputs need not hold; and the path must still be
    exact for an x that is already 24-bit (a power-of-two scale of small integers)."""
    r = rng(11)
    out, inp = 67, 200
    w = gaussian_weight(r, out, inp)
    q = QW(INT8, w)
    deq = q.dequant().astype(np.float64)
    scales, codes = torch_int8(w, inp)
    np.testing.assert_array_equal(deq, scales[:, None].astype(np.float32) * codes.astype(np.float32))
    for isa in available_isas():
        qfuse.set_isa(isa)
        for N in (1, 2):
            x = r.standard_normal((N, inp)).astype(np.float32)
            x[:, 5] = 3e4
            x[:, 17] = -1e4
            ref = x.astype(np.float64) @ deq.T
            y = q.matmul(x).astype(np.float64)
            bound = (2.0 ** -24 * np.abs(x).max(axis=1, keepdims=True) * np.abs(deq).sum(axis=1)
                     + 2.0 ** -23 * np.abs(ref) + 1e-30)
            assert np.all(np.abs(y - ref) <= bound), "%s N=%d: worst excess %.3g" % (
                isa, N, float(np.max(np.abs(y - ref) / bound)))
            xi = (r.integers(-2 ** 20, 2 ** 20, (N, inp)) * 2.0 ** -12).astype(np.float32)
            xi[:, 0] = 2.0 ** 11 - 2.0 ** -12  # max|x| = (2^23 - 1) * 2^-12: sx = 2^-12 exactly
            ref = xi.astype(np.float64) @ deq.T
            y = q.matmul(xi).astype(np.float64)
            if isa == "avx512" and HAVE_VNNI:
                # integer sums: scale_o * sum_i q_oi x_i exactly, rounded once (with torch's codes)
                exact = (xi.astype(np.float64) @ codes.T.astype(np.float64)) * scales.astype(np.float64)
                assert np.all(np.abs(y - exact) <= 2.0 ** -24 * np.abs(exact)), "VNNI not exact"
            else:
                assert util.rel_err(y, ref) <= MATMUL_RTOL
    # non-finite x falls back to the float path (inf/nan propagate as in float arithmetic)
    x = np.ones((1, inp), np.float32)
    x[0, 3] = np.inf
    assert not np.all(np.isfinite(q.matmul(x)))


# ---- accuracy of the formats -----------------------------------------------------------------

BOUNDS = [(BF16, 0, 2.0 ** -8), (INT8, 0, 0.010), (INT8, 32, 0.006), (Q4, 0, 0.10),
          (Q4, 64, 0.12)]


@pytest.mark.parametrize("fmt,block,bound", BOUNDS)
def test_format_error_vs_float32(fmt, block, bound):
    w = rng(8).standard_normal((256, 1024)).astype(np.float32)
    deq = QW(fmt, w, block).dequant().astype(np.float64)
    err = np.linalg.norm(deq - w) / np.linalg.norm(w.astype(np.float64))
    print("format %d block %d: relative Frobenius error %.4g (bound %.4g)" % (fmt, block, err, bound))
    assert err <= bound


# ---- errors ------------------------------------------------------------------------------------

def quantize_error(fmt, block, w, out, inp, what="model.layers.0.mlp.up_proj", null_out=False):
    h = c_void_p()
    st = lib.qf_qweight_quantize(fmt, block, None if w is None else w.ctypes.data, out, inp,
                                 what.encode(), None if null_out else ctypes.byref(h))
    assert st != 0, "expected an error"
    assert not h.value
    return _native.status_name(st), _native.last_error()


def test_quantize_errors():
    w = np.ones((4, 100), np.float32)
    name = "model.layers.0.mlp.up_proj"
    st, msg = quantize_error(Q4, 32, w, 4, 100)
    assert st == "QF_ERR_ARG" and msg.startswith("q4: block 32 does not divide in = 100 of " + name), msg
    st, msg = quantize_error(Q4, 0, w, 4, 100)
    assert "q4: block 32 does not divide in = 100" in msg, msg
    st, msg = quantize_error(Q4, 5, w, 4, 100)
    assert "q4: block 5" in msg and "even" in msg and name in msg, msg
    st, msg = quantize_error(INT8, 7, w, 4, 100)
    assert msg.startswith("int8: block 7 does not divide in = 100 of " + name), msg
    st, msg = quantize_error(INT8, -4, w, 4, 100)
    assert "int8: block -4" in msg, msg
    st, msg = quantize_error(INT8, 0, None, 4, 100)
    assert "w is NULL" in msg and name in msg, msg
    st, msg = quantize_error(INT8, 0, w, 4, 100, null_out=True)
    assert "NULL" in msg and name in msg, msg
    st, msg = quantize_error(BF16, 0, w, 0, 100)
    assert "sizes must be >= 1" in msg and "out = 0" in msg, msg
    st, msg = quantize_error(0, 0, w, 4, 100)
    assert "format 0 (f32) is not a quantized format" in msg, msg
    st, msg = quantize_error(9, 0, w, 4, 100)
    assert "format 9" in msg, msg
    for fmt in (BF16, INT8, Q4):
        bad = np.ones((4, 96), np.float32)
        bad[2, 17] = np.nan
        bad[3, 1] = np.inf
        st, msg = quantize_error(fmt, 0, bad, 4, 96)
        assert st == "QF_ERR_NONFINITE" and name + "[2,17] = nan" in msg, msg


def test_matmul_errors():
    q = QW(INT8, np.ones((4, 8), np.float32), what="lm_head")
    x = np.ones((2, 8), np.float32)
    y = np.zeros((2, 4), np.float32)
    cases = [((None, x.ctypes.data, q.h, None, 2), "lm_head: y is NULL"),
             ((y.ctypes.data, None, q.h, None, 2), "lm_head: x is NULL"),
             ((y.ctypes.data, x.ctypes.data, None, None, 2), "q (the weight) is NULL"),
             ((y.ctypes.data, x.ctypes.data, q.h, None, 0), "lm_head: N = 0")]
    for args, want in cases:
        st = lib.qf_qweight_matmul(*args)
        assert _native.status_name(st) == "QF_ERR_ARG" and want in _native.last_error(), \
            _native.last_error()
    assert np.all(y == 0)
    st = lib.qf_qweight_dequantize(q.h, None)
    assert st != 0 and "lm_head" in _native.last_error()
