"""test_sdpa.py - qfuse.sdpa / qfuse.sdpa_backward against the real reference: the PyTorch 2.11
fixtures in tests/fixtures/sdpa_*, and fresh random cases against torch 1.13 float64 math
(util.sdpa_ref), plus float32 finite differences and the dropout contract.

Tolerances: forward max|out-ref|/max|ref| <= 1e-4; gradients relative to the largest reference
gradient magnitude of the case (fixtures README) <= 1e-4. QFUSE_TEST_QUICK=1 shrinks counts and
the big shapes (sanitizer run)."""
import numpy as np
import pytest

import qfuse
import util
from util import QUICK, rel_err, sdpa_ref

TOL = 1e-4
ISAS = ["scalar", "avx2", "avx512"]


def _supported(isa):
    try:
        qfuse.set_isa(isa)
        return True
    except qfuse.QfuseError:
        return False


def randn(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def check_case(rng, B, Hq, Hkv, L, S, D, Dv=None, mask=None, is_causal=False, scale=None,
               backward=True, tol=TOL):
    """Random q/k/v/grad_out; compares forward and (optionally) gradients with the reference.
    mask: None or a callable (rng, B, Hq, L, S) -> mask array."""
    Dv = D if Dv is None else Dv
    q, k, v = randn(rng, B, Hq, L, D), randn(rng, B, Hkv, S, D), randn(rng, B, Hkv, S, Dv)
    m = mask(rng, B, Hq, L, S) if mask else None
    gqa = Hq != Hkv
    out = qfuse.sdpa(q, k, v, attn_mask=m, is_causal=is_causal, scale=scale, enable_gqa=gqa)
    assert out.dtype == np.float32 and out.shape == (B, Hq, L, Dv)
    assert np.all(np.isfinite(out))
    if not backward:
        ref = sdpa_ref(q, k, v, m, is_causal, scale)
        assert rel_err(out, ref) <= tol, "forward rel err %.3g" % rel_err(out, ref)
        return
    g = randn(rng, B, Hq, L, Dv)
    ref, rdq, rdk, rdv = sdpa_ref(q, k, v, m, is_causal, scale, grad_out=g)
    assert rel_err(out, ref) <= tol, "forward rel err %.3g" % rel_err(out, ref)
    dq, dk, dv = qfuse.sdpa_backward(q, k, v, g, attn_mask=m, is_causal=is_causal, scale=scale,
                                     enable_gqa=gqa)
    gmax = max(np.abs(r).max() for r in (rdq, rdk, rdv))
    for name, a, r in (("dq", dq, rdq), ("dk", dk, rdk), ("dv", dv, rdv)):
        assert a.dtype == np.float32 and a.shape == r.shape, name
        assert np.all(np.isfinite(a)), name
        err = np.abs(a - r).max() / max(gmax, 1e-30)
        assert err <= tol, "%s rel err %.3g (case max grad %.3g)" % (name, err, gmax)


# ---- fixtures (PyTorch 2.11) -------------------------------------------------------------------

SDPA_FIXTURES = util.fixture_names("sdpa_")


def test_fixtures_present():
    assert len(SDPA_FIXTURES) >= 5, SDPA_FIXTURES


@pytest.mark.parametrize("name", SDPA_FIXTURES)
def test_fixture(name):
    case, t, _ = util.load_fixture(name)
    mask = None
    if "mask_bool" in t:
        mask = t["mask_bool"].astype(bool)
    elif "mask_float" in t:
        mask = t["mask_float"]
    kw = dict(attn_mask=mask, is_causal=case["is_causal"], scale=case["scale"],
              enable_gqa=case["enable_gqa"])
    tol = case.get("rtol_fp32", TOL)
    out = qfuse.sdpa(t["q"], t["k"], t["v"], **kw)
    assert rel_err(out, t["out"]) <= tol, rel_err(out, t["out"])
    dq, dk, dv = qfuse.sdpa_backward(t["q"], t["k"], t["v"], t["grad_out"], **kw)
    gmax = max(np.abs(t[n]).max() for n in ("grad_q", "grad_k", "grad_v"))
    for a, n in ((dq, "grad_q"), (dk, "grad_k"), (dv, "grad_v")):
        err = np.abs(a - t[n]).max() / gmax
        assert err <= tol, "%s: %s rel err %.3g" % (name, n, err)


# ---- random cases vs torch float64 -------------------------------------------------------------

@pytest.mark.parametrize("D", [8, 24, 40, 64, 72, 96, 128, 200, 256])
def test_head_dims(D):
    check_case(np.random.default_rng(D), 2, 2, 2, 17, 23, D)


@pytest.mark.parametrize("L,S", [(1, 1), (1, 37), (37, 1), (5, 64), (64, 5), (100, 130), (3, 257)])
def test_lengths(L, S):
    check_case(np.random.default_rng(L * 1000 + S), 1, 3, 3, L, S, 32)


def test_value_dim_differs():
    check_case(np.random.default_rng(7), 2, 2, 2, 9, 11, 32, Dv=48)


def test_batch_64():
    check_case(np.random.default_rng(64), 64, 2, 2, 3, 5, 16)


def _bool_mask(shape_fn):
    def make(rng, B, Hq, L, S):
        m = rng.random(shape_fn(B, Hq, L, S)) > 0.3
        m[..., 0] = True  # keep every row alive; fully masked rows have their own test
        return m
    return make


BOOL_MASKS = {
    "LS": _bool_mask(lambda B, H, L, S: (L, S)),
    "B1LS": _bool_mask(lambda B, H, L, S: (B, 1, L, S)),
    "1H1S": _bool_mask(lambda B, H, L, S: (1, H, 1, S)),
    "S": _bool_mask(lambda B, H, L, S: (S,)),
    "BHLS": _bool_mask(lambda B, H, L, S: (B, H, L, S)),
}


@pytest.mark.parametrize("kind", sorted(BOOL_MASKS))
def test_bool_mask_broadcast(kind):
    check_case(np.random.default_rng(len(kind)), 2, 3, 3, 6, 10, 16, mask=BOOL_MASKS[kind])


def _float_mask(rng, B, Hq, L, S):
    m = rng.standard_normal((B, 1, L, S))
    m[rng.random((B, 1, L, S)) < 0.3] = -np.inf
    m[..., 0] = 0.5
    return m.astype(np.float32)


def test_float_mask_with_neg_inf():
    check_case(np.random.default_rng(11), 2, 3, 3, 7, 12, 24, mask=_float_mask)


def test_float64_mask_is_converted():
    check_case(np.random.default_rng(12), 1, 2, 2, 5, 6, 8,
               mask=lambda rng, B, H, L, S: rng.standard_normal((L, S)))


@pytest.mark.parametrize("L,S", [(7, 13), (13, 7), (9, 9), (1, 5), (5, 1)])
def test_causal(L, S):
    check_case(np.random.default_rng(L + 31 * S), 2, 2, 2, L, S, 16, is_causal=True)


def test_causal_with_mask():
    check_case(np.random.default_rng(5), 2, 2, 2, 8, 12, 16, is_causal=True,
               mask=BOOL_MASKS["B1LS"])


@pytest.mark.parametrize("Hq,Hkv", [(8, 2), (6, 3), (4, 1)])
def test_gqa(Hq, Hkv):
    check_case(np.random.default_rng(Hq * 10 + Hkv), 2, Hq, Hkv, 9, 14, 32)


def test_gqa_causal_mask_scale():
    check_case(np.random.default_rng(99), 2, 8, 2, 10, 15, 40, is_causal=True, scale=0.21,
               mask=_float_mask)


@pytest.mark.parametrize("scale", [0.3, 2.0, 1e-3])
def test_custom_scale(scale):
    check_case(np.random.default_rng(int(scale * 1000)), 2, 2, 2, 8, 8, 16, scale=scale)


def test_random_sweep():
    """Random configurations (fixed seed): every feature mixed with every other."""
    rng = np.random.default_rng(2024)
    dims = [8, 16, 24, 40, 64, 72, 96, 128]
    for i in range(8 if QUICK else 40):
        Hkv = int(rng.integers(1, 4))
        Hq = Hkv * int(rng.integers(1, 4))
        L, S = (int(x) for x in rng.integers(1, 70, size=2))
        mk = [None, BOOL_MASKS["LS"], BOOL_MASKS["1H1S"], _float_mask][int(rng.integers(0, 4))]
        causal = bool(rng.integers(0, 2))
        scale = None if rng.random() < 0.5 else float(rng.uniform(0.05, 1.0))
        try:
            check_case(rng, int(rng.integers(1, 5)), Hq, Hkv, L, S, dims[int(rng.integers(0, len(dims)))],
                       mask=mk, is_causal=causal, scale=scale)
        except AssertionError as e:
            raise AssertionError("sweep case %d (Hq %d Hkv %d L %d S %d causal %s scale %s): %s"
                                 % (i, Hq, Hkv, L, S, causal, scale, e)) from None


@pytest.mark.parametrize("isa", ISAS)
def test_each_isa(isa):
    if not _supported(isa):
        pytest.skip("CPU lacks " + isa)
    assert qfuse.get_isa() == isa
    rng = np.random.default_rng(3)
    for D in (8, 40, 64, 200):
        check_case(rng, 2, 4, 2, 19, 33, D, mask=_float_mask, is_causal=(D == 40))
    check_case(rng, 1, 2, 2, 1, 300, 128, mask=BOOL_MASKS["S"])
    check_case(rng, 1, 2, 2, 70, 3, 24, is_causal=True)
    assert qfuse.get_isa() == isa


@pytest.mark.parametrize("isa", ISAS)
def test_isas_agree_with_reference_on_one_long_row(isa):
    """S large enough for several key blocks (online softmax across blocks)."""
    if not _supported(isa):
        pytest.skip("CPU lacks " + isa)
    check_case(np.random.default_rng(8), 1, 1, 1, 4, 1000, 72)


# ---- big shapes (forward on a sample of rows; one big backward) --------------------------------

BIG = 1024 if QUICK else 4096


def test_big_square_forward_sampled_rows():
    rng = np.random.default_rng(4096)
    L = S = BIG
    q, k, v = randn(rng, 1, 1, L, 64), randn(rng, 1, 1, S, 64), randn(rng, 1, 1, S, 64)
    for causal in (False, True):
        out = qfuse.sdpa(q, k, v, is_causal=causal)
        rows = np.unique(np.concatenate([[0, 1, L - 1], rng.integers(0, L, 61)]))
        if causal:
            # rows i of the causal product see keys 0..i: the reference of a row alone.
            for i in rows[:: max(1, len(rows) // 8)]:
                ref = sdpa_ref(q[:, :, i:i + 1], k[:, :, :i + 1], v[:, :, :i + 1])
                assert rel_err(out[:, :, i:i + 1], ref) <= TOL, i
        else:
            ref = sdpa_ref(q[:, :, rows], k, v)
            assert rel_err(out[:, :, rows], ref) <= TOL


def test_decode_row_long_keys():
    check_case(np.random.default_rng(1), 1, 4, 4, 1, BIG, 64)


def test_long_queries_one_key():
    check_case(np.random.default_rng(2), 1, 2, 2, BIG, 1, 64)


def test_big_backward_once():
    n = 256 if QUICK else 1024
    check_case(np.random.default_rng(6), 1, 2, 2, n, n, 64, is_causal=True)


# ---- fully masked rows -------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["bool", "float"])
def test_fully_masked_rows_give_zeros(kind):
    rng = np.random.default_rng(17)
    B, H, L, S, D = 2, 2, 6, 9, 16
    q, k, v = randn(rng, B, H, L, D), randn(rng, B, H, S, D), randn(rng, B, H, S, D)
    g = randn(rng, B, H, L, D)
    allow = rng.random((B, 1, L, S)) > 0.3
    allow[..., 0] = True
    allow[0, 0, 2, :] = False
    allow[1, 0, 5, :] = False
    m = allow if kind == "bool" else np.where(allow, 0.0, -np.inf).astype(np.float32)
    out, w = qfuse.sdpa(q, k, v, attn_mask=m, return_weights=True)
    dq, dk, dv = qfuse.sdpa_backward(q, k, v, g, attn_mask=m)
    for a in (out, w, dq, dk, dv):
        assert np.all(np.isfinite(a))
    for b, i in ((0, 2), (1, 5)):
        assert np.all(out[b, :, i] == 0) and np.all(w[b, :, i] == 0) and np.all(dq[b, :, i] == 0)
    ref, rdq, rdk, rdv = sdpa_ref(q, k, v, m, grad_out=g)
    assert rel_err(out, ref) <= TOL
    gmax = max(np.abs(r).max() for r in (rdq, rdk, rdv))
    for a, r in ((dq, rdq), (dk, rdk), (dv, rdv)):
        assert np.abs(a - r).max() / gmax <= TOL


def test_everything_masked():
    rng = np.random.default_rng(18)
    q, k, v = randn(rng, 1, 2, 3, 8), randn(rng, 1, 2, 4, 8), randn(rng, 1, 2, 4, 8)
    m = np.zeros((3, 4), bool)
    out = qfuse.sdpa(q, k, v, attn_mask=m)
    dq, dk, dv = qfuse.sdpa_backward(q, k, v, randn(rng, 1, 2, 3, 8), attn_mask=m)
    for a in (out, dq, dk, dv):
        assert np.all(a == 0)


# ---- weights, layouts, dtypes ------------------------------------------------------------------

def test_return_weights_match_softmax():
    rng = np.random.default_rng(21)
    q, k, v = randn(rng, 2, 2, 5, 16), randn(rng, 2, 2, 7, 16), randn(rng, 2, 2, 7, 16)
    out, w = qfuse.sdpa(q, k, v, is_causal=True, return_weights=True)
    t = util.torch()
    s = t.tensor(q, dtype=t.float64) @ t.tensor(k, dtype=t.float64).transpose(-2, -1) / 4.0
    s = s.masked_fill(~t.ones(5, 7, dtype=t.bool).tril(), float("-inf"))
    assert w.shape == (2, 2, 5, 7)
    assert rel_err(w, t.softmax(s, -1).numpy()) <= TOL


def test_three_dim_inputs():
    rng = np.random.default_rng(22)
    q, k, v, g = randn(rng, 3, 5, 16), randn(rng, 3, 8, 16), randn(rng, 3, 8, 16), randn(rng, 3, 5, 16)
    out = qfuse.sdpa(q, k, v)
    assert out.shape == (3, 5, 16)
    ref, rdq, rdk, rdv = sdpa_ref(q, k, v, grad_out=g)
    assert rel_err(out, ref) <= TOL
    dq, dk, dv = qfuse.sdpa_backward(q, k, v, g)
    assert dq.shape == (3, 5, 16) and dk.shape == (3, 8, 16)
    assert rel_err(dq, rdq) <= 1e-3 and rel_err(dk, rdk) <= 1e-3 and rel_err(dv, rdv) <= 1e-3


def test_float64_and_noncontiguous_inputs():
    rng = np.random.default_rng(23)
    q64 = rng.standard_normal((2, 2, 16, 6))      # transposed below: not contiguous
    k = rng.standard_normal((2, 2, 9, 16))
    v = np.asfortranarray(rng.standard_normal((2, 2, 9, 16)))
    q = q64.transpose(0, 1, 3, 2)
    out = qfuse.sdpa(q, k, v)
    assert out.dtype == np.float32 and out.shape == (2, 2, 6, 16)
    ref = sdpa_ref(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32))
    assert rel_err(out, ref) <= TOL


def test_threads_do_not_change_results():
    rng = np.random.default_rng(24)
    q, k, v = randn(rng, 2, 4, 33, 64), randn(rng, 2, 4, 47, 64), randn(rng, 2, 4, 47, 64)
    qfuse.set_num_threads(1)
    a = qfuse.sdpa(q, k, v, is_causal=True, dropout_p=0.2, seed=5)
    qfuse.set_num_threads(2)
    b = qfuse.sdpa(q, k, v, is_causal=True, dropout_p=0.2, seed=5)
    assert np.array_equal(a, b)


# ---- finite differences (float32) --------------------------------------------------------------

def test_finite_differences():
    """Central differences of loss = sum(out * g) agree with sdpa_backward on sampled entries."""
    rng = np.random.default_rng(31)
    B, H, L, S, D = 1, 2, 3, 5, 8
    q, k, v, g = randn(rng, B, H, L, D), randn(rng, B, H, S, D), randn(rng, B, H, S, D), randn(rng, B, H, L, D)
    mask = _float_mask(rng, B, H, L, S)
    kw = dict(attn_mask=mask, scale=0.5)
    grads = qfuse.sdpa_backward(q, k, v, g, **kw)
    eps = 1e-2

    def loss(qq, kk, vv):
        return float(np.sum(qfuse.sdpa(qq, kk, vv, **kw).astype(np.float64) * g))

    for which, (x, gx) in enumerate(zip((q, k, v), grads)):
        flat = rng.choice(x.size, size=min(x.size, 12), replace=False)
        for idx in flat:
            xp, xm = x.copy(), x.copy()
            xp.flat[idx] += eps
            xm.flat[idx] -= eps
            args_p = [q, k, v]
            args_m = [q, k, v]
            args_p[which], args_m[which] = xp, xm
            fd = (loss(*args_p) - loss(*args_m)) / (2 * eps)
            an = float(gx.flat[idx])
            assert abs(fd - an) <= 1e-2 * max(1.0, np.abs(gx).max()), \
                "%s[%d]: finite difference %.5f vs backward %.5f" % ("qkv"[which], idx, fd, an)


# ---- dropout -----------------------------------------------------------------------------------

def _drop_inputs(seed=41, B=2, H=2, L=64, S=64, D=32):
    rng = np.random.default_rng(seed)
    return randn(rng, B, H, L, D) * 0.3, randn(rng, B, H, S, D) * 0.3, randn(rng, B, H, S, D), \
        randn(rng, B, H, L, D)


def test_dropout_repeats_with_seed_and_differs_across_seeds():
    q, k, v, _ = _drop_inputs()
    a, wa = qfuse.sdpa(q, k, v, dropout_p=0.3, seed=123, return_weights=True)
    b, wb = qfuse.sdpa(q, k, v, dropout_p=0.3, seed=123, return_weights=True)
    c, wc = qfuse.sdpa(q, k, v, dropout_p=0.3, seed=124, return_weights=True)
    assert np.array_equal(a, b) and np.array_equal(wa, wb)
    assert not np.array_equal(wa == 0, wc == 0)
    assert np.abs(a - c).max() > 1e-3


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_fraction(p):
    q, k, v, _ = _drop_inputs(B=2, H=4, L=64, S=64)
    _, w = qfuse.sdpa(q, k, v, dropout_p=p, seed=9, return_weights=True)
    frac = float(np.mean(w == 0))
    # n = 32768 draws: the standard deviation of the fraction is <= 0.003.
    assert abs(frac - p) < 0.02, frac
    # kept weights are softmax / (1 - p)
    ref_p = sdpa_ref(q, k, np.eye(64, dtype=np.float32)[None, None].repeat(2, 0).repeat(4, 1))
    kept = w != 0
    assert rel_err(w[kept], (ref_p / (1 - p))[kept]) <= TOL


def test_dropout_forward_and_backward_match_torch_with_same_mask():
    q, k, v, g = _drop_inputs()
    p = 0.25
    out, w = qfuse.sdpa(q, k, v, dropout_p=p, seed=77, return_weights=True, is_causal=True)
    causal = np.tril(np.ones((64, 64), bool))
    keep = (w != 0) | ~causal  # masked-out entries are zero anyway; keep them out of the count
    assert abs(float(np.mean(~keep[..., causal])) - p) < 0.03
    ref, rdq, rdk, rdv = sdpa_ref(q, k, v, is_causal=True, grad_out=g, keep=keep, dropout_p=p)
    assert rel_err(out, ref) <= TOL
    dq, dk, dv = qfuse.sdpa_backward(q, k, v, g, dropout_p=p, seed=77, is_causal=True)
    gmax = max(np.abs(r).max() for r in (rdq, rdk, rdv))
    for a, r in ((dq, rdq), (dk, rdk), (dv, rdv)):
        assert np.abs(a - r).max() / gmax <= TOL


def test_dropout_zero_is_exact_no_dropout():
    q, k, v, _ = _drop_inputs(L=8, S=8)
    assert np.array_equal(qfuse.sdpa(q, k, v), qfuse.sdpa(q, k, v, dropout_p=0.0, seed=3))


def test_dropout_mask_follows_documented_stream():
    """qfuse.h: element (b,h,i,j) draws index ((b*Hq+h)*L+i)*S+j of stream (seed, offset);
    qfuse's dropout keeps an element iff that uniform >= p (src/ops/dropout.c)."""
    B, H, L, S = 2, 3, 9, 11
    q, k, v, _ = _drop_inputs(B=B, H=H, L=L, S=S)
    p, seed = 0.3, 0x1234567890
    _, w = qfuse.sdpa(q, k, v, dropout_p=p, seed=seed, return_weights=True)
    u = util.philox_uniform(seed, 0, np.arange(B * H * L * S)).reshape(B, H, L, S)
    assert np.array_equal(w == 0, u < p)
