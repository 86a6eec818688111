"""test_cuda_act16.py - the CUDA backend's bf16 activations (backend.h: gemm_nt's x_bf16 and
out_bf16, layernorm_forward_x16, gelu_forward_x16; the strided bf16 attention they feed is
covered through the Q-Former in test_cuda_qformer.py). Fresh random inputs each run.

Bounds (max|a - ref| / max|ref|, util.rel_err):
- gemm_nt with bf16 x given (x_bf16) and/or a bf16 out (with the bias as float32 or also as its
  bf16 copy, bias_bf16): the reference is float64 on the
  bf16-rounded x and w; a float32 out <= 1e-4 of it (float32 accumulation only), a bf16 out
  <= 8e-3 (one rounding of each output to bf16: 2^-8 relative at most, on top of that) and
  equal to the float32 out rounded to bf16 except where the two accumulation orders straddle a
  rounding boundary (at most one bf16 ulp apart). Both gemm paths (cuBLASLt, classic).
- layernorm_forward_x16: out within 1e-5 of float64 torch (as layernorm_forward) and out16 exactly
  bf16(out) (round to nearest even), at widths that take the warp-per-row kernel (C = 128 n, n <= 8)
  and the block kernel.
- stage_x16: exactly bf16(src), and the first NaN/Inf index found; a bf16 Q-Former forward
  staging its encoder input that way (host and device input) within 3e-2 of the float32 CPU
  model, a NaN named with its index and value.
- gelu_forward_x16 (bf16 in and out, in place too): exactly bf16 of the float32 GELU the same
  backend computes (gelu_forward) on the same bf16 values.
Skips cleanly without the CUDA backend or a GPU."""
import os
from ctypes import POINTER, byref, c_float, c_int, c_int64, c_void_p

import numpy as np
import pytest

import qfuse
import qfuse.cuda
import util
from qfuse._native import QfuseError, check, lib
from util import rel_err

REASON = qfuse.cuda.unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason="CUDA backend not usable: %s" % REASON)
_P, _I = c_void_p, c_int64


@pytest.fixture
def rng():
    seed = int(os.environ.get("QFUSE_TEST_SEED", "0")) or int.from_bytes(os.urandom(4), "little")
    print("seed", seed)
    return np.random.default_rng(seed)


@pytest.fixture(params=["lt", "classic"])
def gemm_path(request):
    lib.qf_cuda_test_gemm_lt(1 if request.param == "lt" else 0)
    yield request.param
    lib.qf_cuda_test_gemm_lt(1)


@pytest.fixture
def dev():
    with qfuse.cuda.DeviceBuffers() as bufs:
        yield bufs


def entry(op, res, args):
    return qfuse.cuda.backend_entry("cuda", op, res, args)


def bf16_round(a):
    u = np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.uint64)
    bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return bits, (bits.astype(np.uint32) << 16).view(np.float32)


def bf16_value(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def down(p, shape, dtype=np.float32):
    out = np.empty(shape, dtype)
    check(lib.qf_cuda_download(out.ctypes.data, p, out.nbytes))
    return out


def up(dev, a):
    return None if a is None else dev.upload(np.ascontiguousarray(a))


@pytest.mark.parametrize("M,N,K", [(32, 2304, 768), (257, 1536, 1408), (5, 40, 24), (64, 768, 3072)])
@pytest.mark.parametrize("x16,o16,bias16", [(True, False, False), (False, True, False), (True, True, False),
                                            (True, True, True)])
def test_gemm_nt_bf16_activations(rng, dev, gemm_path, M, N, K, x16, o16, bias16):
    """bias16: the bias's bf16 copy given too (bias_bf16, which cuBLASLt's bf16-out epilogue reads);
    the bias values are drawn bf16-exact so both forms mean the same sum."""
    gemm = entry("gemm_nt", c_int, [POINTER(qfuse.cuda.GemmNtArgs)])
    ldx = K + 8  # a strided x (row stride a multiple of 8: 16-byte rows)
    x, w, bias = rng.standard_normal((M, ldx), np.float32), rng.standard_normal((N, K), np.float32), \
        rng.standard_normal(N, np.float32)
    bbits, bias = bf16_round(bias)
    xbits, xr = bf16_round(x)
    wbits, wr = bf16_round(w)
    ref = xr[:, :K].astype(np.float64) @ wr.T.astype(np.float64) + bias
    dxf, dxb, dw, db, dbb = up(dev, x), up(dev, xbits), up(dev, wbits), up(dev, bias), up(dev, bbits)
    # the float32-out product from the float32 x (converted inside gemm_nt): the comparison point
    do32 = dev.empty((M, N))
    check(gemm(byref(qfuse.cuda.GemmNtArgs(dxf, ldx, None, db, None, 0, do32, N, M, N, K, 0, dw, None, None))))
    o32 = down(do32, (M, N))
    assert rel_err(o32, ref) <= 1e-4
    if o16:
        do16 = dev.alloc(M * N * 2)
        a = qfuse.cuda.GemmNtArgs(None if x16 else dxf, ldx, None, db, None, 0, None, N, M, N, K, 0, dw,
                                  dxb if x16 else None, do16, dbb if bias16 else None)
        check(gemm(byref(a)))
        o = bf16_value(down(do16, (M, N), np.uint16))
        e = rel_err(o, ref)
        rounded = bf16_value(bf16_round(o32)[0])
        ulp = np.abs(rounded) * 2.0 ** -7 + 1e-30
        far = np.abs(o - rounded) > ulp
        print("%s %dx%dx%d out16 (x16=%d bias16=%d): %.3g, %d of %d off the rounded float32 out by <= 1 ulp"
              % (gemm_path, M, N, K, x16, bias16, e, np.count_nonzero(o != rounded), o.size))
        assert e <= 8e-3 and not far.any(), (e, np.count_nonzero(far))
    else:
        do = dev.empty((M, N))
        check(gemm(byref(qfuse.cuda.GemmNtArgs(None, ldx, None, db, None, 0, do, N, M, N, K, 0, dw, dxb, None))))
        o = down(do, (M, N))
        print("%s %dx%dx%d x16: %.3g" % (gemm_path, M, N, K, rel_err(o, ref)))
        assert rel_err(o, ref) <= 1e-4


def test_gemm_nt_bf16_activations_refused(dev):
    gemm = entry("gemm_nt", c_int, [POINTER(qfuse.cuda.GemmNtArgs)])
    M, N, K = 4, 8, 16
    dx, dw, do = dev.empty((M, K)), dev.empty((N, K)), dev.empty((M, N))
    d16 = dev.alloc(M * N * 2)
    with pytest.raises(QfuseError, match="needs bf16 weights"):
        check(gemm(byref(qfuse.cuda.GemmNtArgs(dx, K, dw, None, None, 0, do, N, M, N, K, 0, None, None, d16))))
    with pytest.raises(QfuseError, match="no residual"):
        check(gemm(byref(qfuse.cuda.GemmNtArgs(dx, K, None, None, do, N, None, N, M, N, K, 0, dw, None, d16))))


@pytest.mark.parametrize("rows,C", [(32, 768), (2048, 768), (7, 128), (33, 1024), (5, 1408), (3, 100)])
def test_layernorm_x16(rng, dev, rows, C):
    t = util.torch()
    ln = entry("layernorm_forward_x16", c_int, [_P, _P, _P, _P, _P, _P, _P, _I, _I, c_float])
    x = rng.standard_normal((rows, C)).astype(np.float32) * 3 + 5
    w, b = rng.standard_normal(C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
    ref = t.nn.functional.layer_norm(t.tensor(x, dtype=t.float64), (C,), t.tensor(w, dtype=t.float64),
                                     t.tensor(b, dtype=t.float64), 1e-12).numpy()
    x64 = x.astype(np.float64)
    do, d16 = dev.empty((rows, C)), dev.alloc(rows * C * 2)
    dm, dr = dev.empty((rows,)), dev.empty((rows,))
    ln(do, d16, dm, dr, up(dev, x), up(dev, w), up(dev, b), rows, C, 1e-12)
    out = down(do, (rows, C))
    assert rel_err(out, ref) <= 1e-5
    assert rel_err(down(dm, (rows,)), x64.mean(1)) <= 1e-6
    assert rel_err(down(dr, (rows,)), 1 / np.sqrt(x64.var(1) + 1e-12)) <= 1e-5
    assert np.array_equal(down(d16, (rows, C), np.uint16), bf16_round(out)[0])


@pytest.mark.parametrize("n", [2048 * 3072, 1001])
@pytest.mark.parametrize("kind", [0, 1])
def test_gelu_x16(rng, dev, n, kind):
    """bf16 in, bf16 out (in place too) == bf16 of the float32 GELU of the same bf16 values."""
    gelu16 = entry("gelu_forward_x16", c_int, [_P, _P, _I, c_int])
    gelu = entry("gelu_forward", c_int, [_P, _P, _I, c_int])
    xbits, xr = bf16_round((rng.standard_normal(n) * 4).astype(np.float32))
    dxr, do, dx16, d16 = up(dev, xr), dev.empty((n,)), up(dev, xbits), dev.alloc(n * 2)
    check(gelu(do, dxr, n, kind))
    want = bf16_round(down(do, (n,)))[0]
    check(gelu16(d16, dx16, n, kind))
    assert np.array_equal(down(d16, (n,), np.uint16), want)
    check(gelu16(dx16, dx16, n, kind))  # in place
    assert np.array_equal(down(dx16, (n,), np.uint16), want)


@pytest.mark.parametrize("on_device", [False, True])
def test_qformer_bf16_encoder_staging(tmp_path, rng, on_device):
    """A bf16 Q-Former takes the encoder input into bf16 in one screening pass (stage_x16), read in
    place when it is GPU memory (on_device) or after its upload: the output matches the float32
    CPU model within the bf16 bound (3e-2, as test_cuda_qformer.py), and a NaN is reported with
    its tensor, flat index and value either way."""
    import ctypes
    import test_cuda_qformer as TQ
    from qfuse.qformer import QFormer, qf_qformer_args
    cfg, sd, inp = TQ._random_case(rng, False, 0, 0, 2, "gelu", "pad")
    folder = TQ._write(str(tmp_path / "m"), cfg, sd, False)
    want = TQ._fwd(QFormer.load(folder), inp)
    gpu = QFormer.load(folder, device="cuda", dtype="bfloat16")
    mask = np.ascontiguousarray(inp["encoder_attention_mask"], np.uint8)

    def run(enc):
        if not on_device:
            return TQ._fwd(gpu, dict(inp, encoder_hidden_states=enc))
        q = inp["query_embeds"]
        B, Lq, H = q.shape
        with qfuse.cuda.DeviceBuffers() as bufs:
            dq, denc, dout = bufs.upload(q), bufs.upload(np.ascontiguousarray(enc)), bufs.empty((B, Lq, H))
            a = qf_qformer_args(B=B, num_queries=Lq, encoder_len=enc.shape[1])
            a.encoder_attention_mask = mask.ctypes.data
            check(lib.qf_qformer_forward(gpu._h, ctypes.byref(a), dq, denc, dout))
            return down(dout, (B, Lq, H))
    for _ in range(2):  # eager, then the captured graph
        e = rel_err(run(inp["encoder_hidden_states"]), want)
        assert e < 3e-2, e
    bad = inp["encoder_hidden_states"].copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(QfuseError) as err:
        run(bad)
    flat = int(np.ravel_multi_index((1, 2, 3), bad.shape))
    assert err.value.status == "QF_ERR_NONFINITE"
    assert "encoder_hidden_states[%d] = nan" % flat in str(err.value), str(err.value)
    assert rel_err(run(inp["encoder_hidden_states"]), want) < 3e-2  # intact afterwards


def test_stage_x16(rng, dev):
    """dst16 == bf16(src) exactly; the screen folds the first NaN/Inf index into *first."""
    stage = entry("stage_x16", c_int, [_P, _P, _I, _P])
    for n in (4096 * 3 + 4, 1001):
        x = rng.standard_normal(n).astype(np.float32) * 10
        d16, first = dev.alloc(n * 2), dev.upload(np.array([n], np.int64))
        check(stage(d16, up(dev, x), n, first))
        assert np.array_equal(down(d16, (n,), np.uint16), bf16_round(x)[0])
        assert down(first, (1,), np.int64)[0] == n
        x[[n - 5, 700, 901]] = [np.inf, np.nan, -np.inf]
        check(stage(d16, up(dev, x), n, first))
        assert down(first, (1,), np.int64)[0] == 700
