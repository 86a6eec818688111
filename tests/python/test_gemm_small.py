"""test_gemm_small.py - the few-rows GEMM (src/ops/gemm_small.c) that qf_linear_forward uses for
2..32 input rows, against numpy float64 on the same float32 inputs, on every SIMD path this CPU
has and with 1 and 2 threads.

Shapes are chosen to hit every edge of the kernel: rows not a multiple of the row tile (4 on
AVX-512, 2 on AVX2), output columns not a multiple of 4, K below one vector, K with a masked tail,
K over one chunk (256..1024 floats by the L1 size: several chunks, the later ones adding into
the output), with and without bias; and the 1-row (GEMV) and 33..65-row (BLAS) neighbours. Error: max|a-b| /
max|ref| < 2e-6 (float32 accumulation over K <= 1500 of values in [-1, 1)); the seed is in every
failure message (QFUSE_TEST_SEED=<seed> replays it).
Also the Q-Former paths built on it (qformer.c): projections with the residual fused on both sides
of the row cut, and the one-pass copy and screen of the encoder states."""
import os

import numpy as np
import pytest

import qfuse
from qfuse import QfuseError, ops

TOL = 2e-6
SHAPES = [  # (rows M, in K, out N)
    (2, 1, 1), (2, 16, 4), (3, 7, 5), (4, 15, 3), (5, 17, 9), (7, 33, 6), (8, 64, 8),
    (13, 100, 13), (32, 768, 24), (31, 513, 7), (30, 1041, 10), (29, 1500, 11), (17, 2048, 4),
    (33, 1041, 10), (64, 1500, 11),
    (1, 37, 9), (65, 40, 9),
]


def _isa_ok(name):
    try:
        qfuse.set_isa(name)
        return True
    except QfuseError:
        return False


@pytest.fixture(params=["scalar", "avx2", "avx512"])
def isa(request):
    if not _isa_ok(request.param):
        pytest.skip("CPU lacks %s" % request.param)
    qfuse.set_isa(request.param)
    return request.param


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_few_rows_vs_float64(isa, threads, bias):
    seed = int(os.environ.get("QFUSE_TEST_SEED", "0")) or int.from_bytes(os.urandom(4), "little")
    rng = np.random.default_rng(seed)
    qfuse.set_num_threads(threads)
    for M, K, N in SHAPES:
        x = rng.uniform(-1, 1, (M, K)).astype(np.float32)
        w = rng.uniform(-1, 1, (N, K)).astype(np.float32)
        b = rng.uniform(-1, 1, N).astype(np.float32) if bias else None
        got = ops.linear(x, w, b)
        ref = x.astype(np.float64) @ w.astype(np.float64).T
        if bias:
            ref += b.astype(np.float64)
        err = np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30)
        assert err < TOL, "seed %d isa %s threads %d M=%d K=%d N=%d bias=%s: rel err %.3g" % (
            seed, isa, threads, M, K, N, bias, err)


def test_linear_few_rows_strided_batch_view(isa):
    """rows taken from a 3-D batch ([B, L, K] with B*L <= 32) give the same as one row at a time"""
    rng = np.random.default_rng(7)
    x = rng.uniform(-1, 1, (3, 11, 70)).astype(np.float32)
    w = rng.uniform(-1, 1, (21, 70)).astype(np.float32)
    got = ops.linear(x, w)
    ref = np.einsum("blk,nk->bln", x.astype(np.float64), w.astype(np.float64))
    assert np.abs(got - ref).max() / np.abs(ref).max() < TOL


@pytest.mark.parametrize("B,Lq,Lt", [(1, 32, 0), (3, 30, 4)])
def test_qformer_rows_both_sides_of_the_cut(tmp_path, B, Lq, Lt):
    """The Q-Former's projections with their residual fused (qformer.c linear_residual ->
    qf_gemm_nt) on both paths: 32 query rows (the few-rows kernel, bias and residual in its
    epilogue) and 90/102 rows (one bias+residual pass, then the BLAS with beta = 1), forward and
    backward against tests/python/ref_qformer.py (PyTorch float64)."""
    import ref_qformer as R
    import util
    from qfuse.qformer import QFormer
    from test_qformer import TOL as QTOL, _grad_err, _qf_forward, _random_case, _rng, _write_model
    rng, seed = _rng()
    cfg, sd, inp, gout = _random_case(rng, Lt > 0, Lt, 0, 2, "gelu", "pad" if B >= 3 else None, B=B, Lq=Lq, S=9)
    qf = QFormer.load(_write_model(str(tmp_path / "m"), cfg, sd,
                                   model_type="instructblip_qformer" if Lt else "blip_2_qformer"))
    rout, rg, _ = R.reference(sd, cfg, grad_out=gout, **inp)
    assert util.rel_err(_qf_forward(qf, inp), rout) < QTOL, seed
    g = qf.backward(gout)
    assert _grad_err(g, rg, list(sd))[0] < QTOL, seed
    for k in ("query_embeds", "encoder_hidden_states"):
        assert util.rel_err(g[k], rg[k]) < QTOL, (seed, k)


def test_qformer_encoder_nonfinite_named(tmp_path):
    """qformer.c copies and screens the encoder states in one pass (copy_finite): a NaN or Inf is
    still refused with its flat index, and a later good call works."""
    import numpy as np
    from qfuse.qformer import QFormer
    from test_qformer import _qf_forward, _random_case, _rng, _write_model
    rng, seed = _rng()
    cfg, sd, inp, _ = _random_case(rng, False, 0, 0, 2, "gelu", None, B=2, Lq=4, S=6000)  # 288000 floats: the parallel branch
    qf = QFormer.load(_write_model(str(tmp_path / "m"), cfg, sd))
    good = _qf_forward(qf, inp)
    S, E = inp["encoder_hidden_states"].shape[1:]
    for bad, (b, s, e) in ((np.nan, (1, 5000, 3)), (np.inf, (0, 0, 0))):
        enc = inp["encoder_hidden_states"].copy()
        enc[b, s, e] = bad
        with pytest.raises(QfuseError) as ei:
            _qf_forward(qf, dict(inp, encoder_hidden_states=enc))
        assert "encoder_hidden_states[%d]" % ((b * S + s) * E + e) in str(ei.value), (seed, str(ei.value))
    assert np.array_equal(_qf_forward(qf, inp), good)
