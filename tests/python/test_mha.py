"""test_mha.py - qfuse.MultiheadAttention (src/models/mha.c) against torch.nn.MultiheadAttention.

- The three reference fixtures tests/fixtures/mha_{0,1,2} (PyTorch 2.11, float64 references).
- Fresh random cases against torch 1.13's nn.MultiheadAttention in float64 (the state dict is
  written to safetensors with util.write_safetensors, an independent writer): both batch_first
  layouts, bias off, kdim/vdim, bool and float masks of both shapes, key padding, averaged and
  per-head weights, need_weights off; forward rel err < 1e-4.
- Backward: input and parameter gradients against torch autograd (float64), rel err < 1e-4;
  self-attention (one tensor used three times); a finite-difference check on a tiny case.
- Loading errors: missing, misshapen, unexpected and unsupported (bias_k) tensors.
Random masks never block key 0, so no query row is fully masked (torch gives NaN there; qfuse
gives zeros, tested separately)."""
import os

import numpy as np
import pytest

import qfuse
import util
from qfuse import QfuseError

TOL = 1e-4


def _rng():
    seed = int(os.environ.get("QFUSE_TEST_SEED", "0")) or int.from_bytes(os.urandom(4), "little")
    return np.random.default_rng(seed), seed


def _need_backward():
    if not qfuse._native.has("qf_sdpa_backward"):
        pytest.skip("library lacks qf_sdpa_backward")


# ---- fixtures (PyTorch 2.11) ------------------------------------------------------------------

@pytest.mark.parametrize("name", util.fixture_names("mha_"))
def test_fixture(name):
    case, io, folder = util.load_fixture(name)
    mha = qfuse.MultiheadAttention.load(os.path.join(folder, "mha.safetensors"), case["embed_dim"],
                                        case["num_heads"], kdim=case["kdim"], vdim=case["vdim"],
                                        bias=case["bias"], batch_first=case["batch_first"])
    kpm = io.get("key_padding_mask")
    attn_mask = io.get("attn_mask_float")
    if "attn_mask_bool" in io:
        attn_mask = io["attn_mask_bool"].astype(bool)
    out, w = mha(io["query"], io["key"], io["value"],
                 key_padding_mask=None if kpm is None else kpm.astype(bool), attn_mask=attn_mask)
    assert util.rel_err(out, io["out"]) < case["rtol_fp32"], name
    assert util.rel_err(w, io["attn_weights_avg"]) < case["rtol_fp32"], name
    # bool masks may also come as uint8 (same meaning: 1 = ignore / not allowed)
    out2, _ = mha(io["query"], io["key"], io["value"], key_padding_mask=None if kpm is None else kpm.astype(bool),
                  attn_mask=attn_mask, need_weights=False)
    assert util.rel_err(out2, io["out"]) < case["rtol_fp32"], name


# ---- random cases vs torch 1.13 ---------------------------------------------------------------

def _make(tmp_path, rng, E, H, kdim=None, vdim=None, bias=True, batch_first=False):
    """(torch module in float64 with float32-representable weights, qfuse module)."""
    t = util.torch()
    ref = t.nn.MultiheadAttention(E, H, bias=bias, kdim=kdim, vdim=vdim, batch_first=batch_first)
    ref = ref.double()
    sd = {}
    with t.no_grad():
        for name, p in ref.named_parameters():
            v = rng.standard_normal(tuple(p.shape)).astype(np.float32) * (0.5 / np.sqrt(p.shape[-1]))
            p.copy_(t.from_numpy(v.astype(np.float64)))
            sd[name] = v
    path = str(tmp_path / "mha.safetensors")
    util.write_safetensors(path, sd)
    mha = qfuse.MultiheadAttention.load(path, E, H, kdim=kdim, vdim=vdim, bias=bias,
                                        batch_first=batch_first)
    return ref, mha


def _inputs(rng, B, L, S, E, kdim, vdim, batch_first):
    def shp(n, d):
        return (B, n, d) if batch_first else (n, B, d)
    q = rng.standard_normal(shp(L, E)).astype(np.float32)
    k = rng.standard_normal(shp(S, kdim or E)).astype(np.float32)
    v = rng.standard_normal(shp(S, vdim or E)).astype(np.float32)
    return q, k, v


def _masks(rng, kind, B, H, L, S):
    """(key_padding_mask, attn_mask) as numpy; key 0 is never blocked."""
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


def _torch_forward(ref, q, k, v, kpm, am, need_weights, average, requires_grad=False):
    t = util.torch()
    tq, tk, tv = (t.tensor(x.astype(np.float64), requires_grad=requires_grad) for x in (q, k, v))
    out, w = ref(tq, tk, tv, key_padding_mask=None if kpm is None else t.from_numpy(kpm),
                 attn_mask=None if am is None else t.from_numpy(am if am.dtype == bool else am.astype(np.float64)),
                 need_weights=need_weights, average_attn_weights=average)
    return (tq, tk, tv), out, w


CASES = [
    # E, H, kdim, vdim, bias, batch_first, B, L, S, masks, need_weights, average
    (16, 4, None, None, True, False, 2, 5, 7, "", True, True),
    (16, 2, None, None, True, True, 3, 4, 4, "kpm", True, False),
    (12, 3, None, None, False, True, 2, 6, 5, "bool", True, True),
    (24, 4, 10, 14, True, False, 2, 3, 9, "kpm+float", True, True),
    (8, 2, 5, None, True, True, 3, 7, 6, "bool3d", True, False),
    (20, 5, None, 7, False, False, 1, 4, 11, "kpm+float3d", True, True),
    (16, 4, None, None, True, False, 2, 5, 5, "kpm+bool3d", False, True),
    (32, 1, None, None, True, True, 2, 17, 33, "float", True, True),
]


@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
def test_random_vs_torch(tmp_path, case):
    E, H, kdim, vdim, bias, bf, B, L, S, mk, need_w, avg = case
    rng, seed = _rng()
    ref, mha = _make(tmp_path, rng, E, H, kdim, vdim, bias, bf)
    q, k, v = _inputs(rng, B, L, S, E, kdim, vdim, bf)
    kpm, am = _masks(rng, mk, B, H, L, S)
    _, tout, tw = _torch_forward(ref, q, k, v, kpm, am, need_w, avg)
    out, w = mha(q, k, v, key_padding_mask=kpm, attn_mask=am, need_weights=need_w,
                 average_attn_weights=avg)
    e = util.rel_err(out, tout.detach().numpy())
    assert e < TOL, "out rel err %.3g (seed %d)" % (e, seed)
    if need_w:
        e = util.rel_err(w, tw.detach().numpy())
        assert e < TOL, "weights rel err %.3g (seed %d)" % (e, seed)
    else:
        assert w is None


def test_uint8_masks_mean_bool(tmp_path):
    """The Python API takes bool masks as numpy bool or uint8 (nonzero = ignore / not allowed)."""
    rng, seed = _rng()
    E, H, B, L, S = 16, 4, 2, 5, 6
    ref, mha = _make(tmp_path, rng, E, H, batch_first=True)
    q, k, v = _inputs(rng, B, L, S, E, None, None, True)
    kpm, am = _masks(rng, "kpm+bool3d", B, H, L, S)
    _, tout, _ = _torch_forward(ref, q, k, v, kpm, am, False, True)
    out, _ = mha(q, k, v, key_padding_mask=kpm.astype(np.uint8), attn_mask=am.astype(np.uint8),
                 need_weights=False)
    assert util.rel_err(out, tout.detach().numpy()) < TOL, "uint8 masks (seed %d)" % seed


@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
def test_backward_vs_torch(tmp_path, case):
    _need_backward()
    E, H, kdim, vdim, bias, bf, B, L, S, mk, need_w, avg = case
    rng, seed = _rng()
    ref, mha = _make(tmp_path, rng, E, H, kdim, vdim, bias, bf)
    q, k, v = _inputs(rng, B, L, S, E, kdim, vdim, bf)
    kpm, am = _masks(rng, mk, B, H, L, S)
    (tq, tk, tv), tout, _ = _torch_forward(ref, q, k, v, kpm, am, need_w, avg, requires_grad=True)
    g = rng.standard_normal(tout.shape).astype(np.float32)
    util.torch()  # noqa: B018
    tout.backward(util.torch().from_numpy(g.astype(np.float64)))
    mha(q, k, v, key_padding_mask=kpm, attn_mask=am, need_weights=need_w, average_attn_weights=avg)
    grads = mha.backward(g)
    refs = {"query": tq.grad, "key": tk.grad, "value": tv.grad}
    refs.update({n: p.grad for n, p in ref.named_parameters()})
    assert set(grads) == set(refs), (sorted(grads), sorted(refs))
    for name, r in refs.items():
        e = util.rel_err(grads[name], r.numpy())
        assert e < TOL, "grad %s rel err %.3g (seed %d)" % (name, e, seed)
    # a second backward gives the same parameter gradients (the class zeroes them first)
    again = mha.backward(g)
    assert np.array_equal(again["in_proj_weight" if kdim is None and vdim is None else "q_proj_weight"],
                          grads["in_proj_weight" if kdim is None and vdim is None else "q_proj_weight"])


def test_self_attention_grads_sum(tmp_path):
    """query == key == value: qfuse returns three gradients; their sum is torch's grad of x."""
    _need_backward()
    rng, seed = _rng()
    E, H, B, L = 16, 4, 2, 6
    ref, mha = _make(tmp_path, rng, E, H, batch_first=True)
    t = util.torch()
    x = rng.standard_normal((B, L, E)).astype(np.float32)
    tx = t.tensor(x.astype(np.float64), requires_grad=True)
    tout, _ = ref(tx, tx, tx)
    g = rng.standard_normal(tout.shape).astype(np.float32)
    tout.backward(t.from_numpy(g.astype(np.float64)))
    out, _ = mha(x, x, x)
    assert util.rel_err(out, tout.detach().numpy()) < TOL
    gr = mha.backward(g)
    e = util.rel_err(gr["query"].astype(np.float64) + gr["key"] + gr["value"], tx.grad.numpy())
    assert e < TOL, "self-attention grad rel err %.3g (seed %d)" % (e, seed)


def test_is_causal_matches_explicit_mask(tmp_path):
    """is_causal (C API flag) == a bool attn_mask blocking j > i, alone and with key padding."""
    rng, seed = _rng()
    E, H, B, L = 16, 2, 2, 7
    ref, mha = _make(tmp_path, rng, E, H)
    q, k, v = _inputs(rng, B, L, L, E, None, None, False)
    causal = np.triu(np.ones((L, L), bool), 1)
    kpm = np.zeros((B, L), bool)
    kpm[1, 4:] = True
    for pad in (None, kpm):
        _, tout, tw = _torch_forward(ref, q, k, v, pad, causal, True, True)
        out, w = mha(q, k, v, key_padding_mask=pad, is_causal=True)
        assert util.rel_err(out, tout.detach().numpy()) < TOL, seed
        assert util.rel_err(w, tw.detach().numpy()) < TOL, seed


def test_fully_masked_row_is_zero(tmp_path):
    rng, _ = _rng()
    E, H = 8, 2
    ref, mha = _make(tmp_path, rng, E, H, bias=False)
    q, k, v = _inputs(rng, 1, 3, 4, E, None, None, False)
    am = np.zeros((3, 4), bool)
    am[1, :] = True  # query 1 may attend to nothing
    out, w = mha(q, k, v, attn_mask=am)
    assert np.all(np.isfinite(out)) and np.all(w[0, 1] == 0)
    assert np.all(out[1] == 0)  # no bias: zero attention output stays zero through out_proj


def test_finite_differences(tmp_path):
    """Backward against central differences of qfuse's own float32 forward on a tiny case
    (h = 1e-2, loss = sum(out * g); tolerance 1e-2 relative to the largest gradient)."""
    _need_backward()
    rng, seed = _rng()
    E, H, kdim, vdim, B, L, S = 4, 2, 3, 5, 2, 3, 4
    ref, mha = _make(tmp_path, rng, E, H, kdim=kdim, vdim=vdim)
    q, k, v = _inputs(rng, B, L, S, E, kdim, vdim, False)
    kpm = np.zeros((B, S), bool)
    kpm[0, 3] = True
    am = rng.standard_normal((L, S)).astype(np.float32)
    g = rng.standard_normal((L, B, E)).astype(np.float32)

    def loss(q_, k_, v_):
        out, _ = mha(q_, k_, v_, key_padding_mask=kpm, attn_mask=am, need_weights=False)
        return float(np.sum(out.astype(np.float64) * g))

    mha(q, k, v, key_padding_mask=kpm, attn_mask=am, need_weights=False)
    grads = mha.backward(g)
    h = 1e-2
    for name, x in (("query", q), ("key", k), ("value", v)):
        num = np.zeros(x.shape)
        for idx in np.ndindex(x.shape):
            xp, xm = x.copy(), x.copy()
            xp[idx] += h
            xm[idx] -= h
            args = [q, k, v]
            i = ("query", "key", "value").index(name)
            args[i] = xp
            lp = loss(*args)
            args[i] = xm
            num[idx] = (lp - loss(*args)) / (2 * h)
        e = util.rel_err(grads[name], num)
        assert e < 1e-2, "%s: finite-difference rel err %.3g (seed %d)" % (name, e, seed)


# ---- loading errors ---------------------------------------------------------------------------

def _good_sd(E=8, kdim=None, bias=True):
    sd = {}
    if kdim is None:
        sd["in_proj_weight"] = np.zeros((3 * E, E), np.float32)
    else:
        sd["q_proj_weight"] = np.zeros((E, E), np.float32)
        sd["k_proj_weight"] = np.zeros((E, kdim), np.float32)
        sd["v_proj_weight"] = np.zeros((E, E), np.float32)
    sd["out_proj.weight"] = np.zeros((E, E), np.float32)
    if bias:
        sd["in_proj_bias"] = np.zeros(3 * E, np.float32)
        sd["out_proj.bias"] = np.zeros(E, np.float32)
    return sd


@pytest.mark.parametrize("edit,kw,status,needle", [
    (lambda sd: sd.pop("out_proj.weight"), {}, "QF_ERR_NOT_FOUND", "out_proj.weight"),
    (lambda sd: sd.__setitem__("in_proj_bias", np.zeros(23, np.float32)), {}, "QF_ERR_SHAPE", "in_proj_bias"),
    (lambda sd: sd.__setitem__("bias_k", np.zeros((1, 1, 8), np.float32)), {}, "QF_ERR_UNSUPPORTED", "bias_k"),
    (lambda sd: sd.__setitem__("extra.weight", np.zeros(2, np.float32)), {}, "QF_ERR_FORMAT", "extra.weight"),
    (lambda sd: None, {"bias": False}, "QF_ERR_FORMAT", "bias = 0"),
    (lambda sd: None, {"kdim": 5}, "QF_ERR_FORMAT", "in_proj_weight"),
    (lambda sd: None, {"num_heads": 3}, "QF_ERR_ARG", "not divisible"),
])
def test_load_errors(tmp_path, edit, kw, status, needle):
    sd = _good_sd()
    edit(sd)
    path = str(tmp_path / "bad.safetensors")
    util.write_safetensors(path, sd)
    args = {"embed_dim": 8, "num_heads": 2}
    args.update(kw)
    with pytest.raises(QfuseError) as e:
        qfuse.MultiheadAttention.load(path, **args)
    assert e.value.status == status, str(e.value)
    assert needle in str(e.value), str(e.value)


def test_load_separate_projections_and_f64(tmp_path):
    """kdim != E needs q/k/v_proj_weight; tensors may be stored as F64 (read as float32)."""
    sd = {k: v.astype(np.float64) for k, v in _good_sd(kdim=5).items()}
    path = str(tmp_path / "sep.safetensors")
    util.write_safetensors(path, sd)
    mha = qfuse.MultiheadAttention.load(path, 8, 2, kdim=5)
    names = sorted(mha.state_dict())
    assert names == sorted(sd), names


def test_backward_without_forward_fails(tmp_path):
    util.write_safetensors(str(tmp_path / "m.safetensors"), _good_sd())
    mha = qfuse.MultiheadAttention.load(str(tmp_path / "m.safetensors"), 8, 2)
    s = qfuse._native.lib.qf_mha_backward(mha._h, np.zeros(8, np.float32).ctypes.data, None, None, None)
    assert qfuse._native.status_name(s) == "QF_ERR_ARG"
    assert "no successful qf_mha_forward" in qfuse._native.last_error()


def test_training_dropout_vs_manual_reference(tmp_path):
    """training=True: attention dropout on qfuse's documented stream. The float64 reference is
    MHA written out in torch with the keep mask computed independently (util.philox_uniform at
    index ((b*H + h)*L + i)*S + j, offset 0); returned weights are post-dropout as in torch.
    Output, weights and (when the library has sdpa backward) all gradients are compared."""
    rng, seed = _rng()
    E, H, B, L, S, p = 12, 3, 2, 4, 5, 0.3
    hd = E // H
    t = util.torch()
    sd = {"in_proj_weight": rng.standard_normal((3 * E, E)).astype(np.float32) * 0.3,
          "in_proj_bias": rng.standard_normal(3 * E).astype(np.float32) * 0.1,
          "out_proj.weight": rng.standard_normal((E, E)).astype(np.float32) * 0.3,
          "out_proj.bias": rng.standard_normal(E).astype(np.float32) * 0.1}
    path = str(tmp_path / "d.safetensors")
    util.write_safetensors(path, sd)
    mha = qfuse.MultiheadAttention.load(path, E, H, batch_first=True, dropout=p)
    q, k, v = _inputs(rng, B, L, S, E, None, None, True)
    kpm = np.zeros((B, S), bool)
    kpm[1, 3:] = True
    dseed = int(rng.integers(0, 2**62))
    keep = util.philox_uniform(dseed, 0, np.arange(B * H * L * S)).reshape(B, H, L, S) >= p

    P = {n: t.tensor(a.astype(np.float64), requires_grad=True) for n, a in sd.items()}
    X = [t.tensor(a.astype(np.float64), requires_grad=True) for a in (q, k, v)]
    W, bias = P["in_proj_weight"], P["in_proj_bias"]
    heads = [(X[i] @ W[i * E:(i + 1) * E].T + bias[i * E:(i + 1) * E]).reshape(B, -1, H, hd).transpose(1, 2)
             for i in range(3)]
    scores = heads[0] @ heads[1].transpose(-1, -2) / np.sqrt(hd)
    scores = scores.masked_fill(t.from_numpy(kpm)[:, None, None, :], float("-inf"))
    probs = t.softmax(scores, -1) * t.from_numpy(keep.astype(np.float64)) / (1 - p)
    merged = (probs @ heads[2]).transpose(1, 2).reshape(B, L, E)
    ref_out = merged @ P["out_proj.weight"].T + P["out_proj.bias"]

    out, w = mha(q, k, v, key_padding_mask=kpm, training=True, seed=dseed, average_attn_weights=False)
    assert util.rel_err(out, ref_out.detach().numpy()) < TOL, seed
    assert util.rel_err(w, probs.detach().numpy()) < TOL, seed
    out_eval, _ = mha(q, k, v, key_padding_mask=kpm)  # training off: no dropout
    assert util.rel_err(out_eval, ref_out.detach().numpy()) > 1e-3
    try:
        _need_backward()
    except pytest.skip.Exception:
        return
    g = rng.standard_normal(out.shape).astype(np.float32)
    ref_out.backward(t.from_numpy(g.astype(np.float64)))
    mha(q, k, v, key_padding_mask=kpm, training=True, seed=dseed)
    gr = mha.backward(g)
    for name, r in list(zip(("query", "key", "value"), X)) + list(P.items()):
        e = util.rel_err(gr[name], r.grad.numpy())
        assert e < TOL, "grad %s rel err %.3g (seed %d)" % (name, e, seed)
