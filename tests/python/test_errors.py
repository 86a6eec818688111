"""test_errors.py - every argument or file problem raises qfuse.QfuseError whose message names
the broken thing, with the right status; nothing crashes, prints or returns garbage.
Malformed state dicts are written with util's independent safetensors writer."""
import json
import struct

import numpy as np
import pytest

import qfuse
import util


def r(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def raises(fn, *substrings, status=None):
    """Runs fn, expects QfuseError whose message contains every substring; returns it."""
    with pytest.raises(qfuse.QfuseError) as info:
        fn()
    e = info.value
    for s in substrings:
        assert s in str(e), "message %r lacks %r" % (str(e), s)
    if status:
        assert e.status == status, (e.status, str(e))
    return e


Q, K, V = r(2, 4, 7, 16), r(2, 4, 9, 16, seed=1), r(2, 4, 9, 16, seed=2)


# ---- SDPA shapes -------------------------------------------------------------------------------

def test_rank_mismatch_q3_k4():
    raises(lambda: qfuse.sdpa(Q[0], K, V), "k", "rank", status="QF_ERR_SHAPE")


def test_rank_too_small_or_large():
    raises(lambda: qfuse.sdpa(Q[0, 0], K[0, 0], V[0, 0]), "q", "rank 2")
    raises(lambda: qfuse.sdpa(Q[None], K[None], V[None]), "q", "rank 5")


def test_head_dim_mismatch():
    raises(lambda: qfuse.sdpa(Q, r(2, 4, 9, 32), V), "k", "head dim D", "32 vs 16",
           status="QF_ERR_SHAPE")


def test_batch_mismatch():
    raises(lambda: qfuse.sdpa(Q, r(3, 4, 9, 16), r(3, 4, 9, 16)), "k", "batch", status="QF_ERR_SHAPE")
    raises(lambda: qfuse.sdpa(Q, K, r(3, 4, 9, 16)), "v", "batch", status="QF_ERR_SHAPE")


def test_key_length_mismatch():
    raises(lambda: qfuse.sdpa(Q, K, r(2, 4, 8, 16)), "v", "S", status="QF_ERR_SHAPE")


def test_kv_heads_mismatch():
    raises(lambda: qfuse.sdpa(Q, K, r(2, 2, 9, 16)), "v", "head", status="QF_ERR_SHAPE")


def test_hq_not_multiple_of_hkv():
    raises(lambda: qfuse.sdpa(r(1, 6, 5, 8), r(1, 4, 5, 8), r(1, 4, 5, 8), enable_gqa=True),
           "Hq", "Hkv", status="QF_ERR_SHAPE")


def test_gqa_needs_enable_gqa():
    raises(lambda: qfuse.sdpa(r(1, 8, 5, 8), r(1, 2, 5, 8), r(1, 2, 5, 8)), "enable_gqa",
           status="QF_ERR_SHAPE")
    raises(lambda: qfuse.sdpa_backward(r(1, 8, 5, 8), r(1, 2, 5, 8), r(1, 2, 5, 8), r(1, 8, 5, 8)),
           "enable_gqa", status="QF_ERR_SHAPE")


@pytest.mark.parametrize("shape", [(7, 8), (3, 1, 7, 9), (1, 5, 1, 9), (8,), (2, 2, 4, 7, 9)])
def test_mask_does_not_broadcast(shape):
    m = np.ones(shape, bool)
    raises(lambda: qfuse.sdpa(Q, K, V, attn_mask=m), "attn_mask", status="QF_ERR_SHAPE")


def test_mask_dtype_rejected():
    raises(lambda: qfuse.sdpa(Q, K, V, attn_mask=np.ones((7, 9), np.int32)), "attn_mask", "int32",
           status="QF_ERR_DTYPE")


def test_integer_inputs_rejected():
    raises(lambda: qfuse.sdpa(Q.astype(np.int32), K, V), "q", "int32", status="QF_ERR_DTYPE")


def test_grad_out_shape():
    raises(lambda: qfuse.sdpa_backward(Q, K, V, r(2, 4, 7, 8)), "grad_out", "[2,4,7,16]",
           status="QF_ERR_SHAPE")


@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_inputs(which, bad):
    args = {"q": Q.copy(), "k": K.copy(), "v": V.copy()}
    args[which][1, 2, 3, 4] = bad
    word = "NaN" if np.isnan(bad) else "Inf"
    raises(lambda: qfuse.sdpa(args["q"], args["k"], args["v"]), which, word, "[1,2,3,4]",
           status="QF_ERR_NONFINITE")
    raises(lambda: qfuse.sdpa_backward(args["q"], args["k"], args["v"], r(2, 4, 7, 16)), which, word,
           status="QF_ERR_NONFINITE")


def test_nan_in_float_mask():
    m = np.zeros((7, 9), np.float32)
    m[3, 3] = np.nan
    raises(lambda: qfuse.sdpa(Q, K, V, attn_mask=m), "attn_mask", "NaN", status="QF_ERR_NONFINITE")


def test_bad_dropout_and_scale():
    raises(lambda: qfuse.sdpa(Q, K, V, dropout_p=1.0), "dropout_p", status="QF_ERR_ARG")
    raises(lambda: qfuse.sdpa(Q, K, V, dropout_p=-0.1), "dropout_p", status="QF_ERR_ARG")
    raises(lambda: qfuse.sdpa(Q, K, V, scale=float("inf")), "scale", status="QF_ERR_ARG")


def test_error_does_not_poison_next_call():
    with pytest.raises(qfuse.QfuseError):
        qfuse.sdpa(Q, r(2, 4, 9, 32), V)
    out = qfuse.sdpa(Q, K, V)
    assert np.all(np.isfinite(out))


# ---- MultiheadAttention.load -------------------------------------------------------------------

E, H = 8, 2


def state_dict(seed=0):
    return {"in_proj_weight": r(3 * E, E, seed=seed), "in_proj_bias": r(3 * E, seed=seed + 1),
            "out_proj.weight": r(E, E, seed=seed + 2), "out_proj.bias": r(E, seed=seed + 3)}


def load(path, **kw):
    return qfuse.MultiheadAttention.load(str(path), E, H, **kw)


def test_valid_state_dict_loads(tmp_path):
    """Control: the file the negative tests corrupt is accepted when intact."""
    p = util.write_safetensors(str(tmp_path / "ok.safetensors"), state_dict())
    m = load(p)
    out, w = m(r(3, 2, E), r(4, 2, E), r(4, 2, E))
    assert out.shape == (3, 2, E) and w.shape == (2, 3, 4)
    m.close()
    raises(lambda: m(r(3, 2, E), r(4, 2, E), r(4, 2, E)), "close")


def test_nonexistent_file(tmp_path):
    p = str(tmp_path / "nope.safetensors")
    raises(lambda: load(p), "nope.safetensors", status="QF_ERR_IO")


def test_truncated_file(tmp_path):
    blob = util.safetensors_bytes(state_dict())
    p = tmp_path / "trunc.safetensors"
    p.write_bytes(blob[:-40])
    raises(lambda: load(p), "trunc.safetensors", status="QF_ERR_FORMAT")
    p.write_bytes(blob[:5])
    raises(lambda: load(p), "trunc.safetensors", status="QF_ERR_FORMAT")


def test_bad_json_header(tmp_path):
    blob = util.safetensors_bytes(state_dict())
    (n,) = struct.unpack("<Q", blob[:8])
    bad = bytearray(blob)
    bad[8] = ord("[")  # '{' -> '[': not an object / not valid JSON
    bad[9:12] = b"!!!"
    p = tmp_path / "badjson.safetensors"
    p.write_bytes(bytes(bad))
    raises(lambda: load(p), "badjson.safetensors", "JSON", status="QF_ERR_FORMAT")


def test_header_length_too_big(tmp_path):
    blob = util.safetensors_bytes(state_dict())
    p = tmp_path / "hlen.safetensors"
    p.write_bytes(struct.pack("<Q", len(blob) * 2) + blob[8:])
    raises(lambda: load(p), "hlen.safetensors", "header length", status="QF_ERR_FORMAT")


def test_missing_tensor(tmp_path):
    sd = state_dict()
    del sd["out_proj.weight"]
    p = util.write_safetensors(str(tmp_path / "missing.safetensors"), sd)
    raises(lambda: load(p), "out_proj.weight", status="QF_ERR_NOT_FOUND")


def test_wrong_shape(tmp_path):
    sd = state_dict()
    sd["in_proj_weight"] = r(3 * E, E + 1)
    p = util.write_safetensors(str(tmp_path / "shape.safetensors"), sd)
    raises(lambda: load(p), "in_proj_weight", "24,9", status="QF_ERR_SHAPE")


def test_wrong_embed_dim_for_file(tmp_path):
    p = util.write_safetensors(str(tmp_path / "dim.safetensors"), state_dict())
    raises(lambda: qfuse.MultiheadAttention.load(p, 16, 2), "in_proj_weight", status="QF_ERR_SHAPE")


def test_wrong_dtype_i32(tmp_path):
    p = util.write_safetensors(str(tmp_path / "i32.safetensors"), state_dict(),
                               dtypes={"in_proj_weight": "I32"})
    raises(lambda: load(p), "in_proj_weight", "I32", status="QF_ERR_DTYPE")


def test_embed_dim_not_divisible_by_heads(tmp_path):
    p = util.write_safetensors(str(tmp_path / "ok.safetensors"), state_dict())
    raises(lambda: qfuse.MultiheadAttention.load(p, E, 3), "num_heads")


def test_bias_missing_when_expected(tmp_path):
    sd = state_dict()
    del sd["in_proj_bias"]
    p = util.write_safetensors(str(tmp_path / "nobias.safetensors"), sd)
    raises(lambda: load(p), "in_proj_bias", status="QF_ERR_NOT_FOUND")


def test_mha_forward_shape_errors(tmp_path):
    m = load(util.write_safetensors(str(tmp_path / "ok.safetensors"), state_dict()))
    raises(lambda: m(r(3, 2, E + 1), r(4, 2, E), r(4, 2, E)), "query", "last dim", status="QF_ERR_SHAPE")
    raises(lambda: m(r(3, 2, E), r(4, 3, E), r(4, 3, E)), "key", "batch", status="QF_ERR_SHAPE")
    raises(lambda: m(r(3, 2, E), r(4, 2, E), r(5, 2, E)), "value", "key length", status="QF_ERR_SHAPE")
    raises(lambda: m(r(3, 2, E), r(4, 2, E), r(4, 2, E), key_padding_mask=np.zeros((2, 5), bool)),
           "key_padding_mask", status="QF_ERR_SHAPE")
    raises(lambda: m(r(3, 2, E), r(4, 2, E), r(4, 2, E), attn_mask=np.zeros((3, 5), bool)),
           "attn_mask", status="QF_ERR_SHAPE")
    raises(lambda: m.backward(r(3, 2, E)), "no forward")


@pytest.mark.parametrize("which", ["q", "k", "v", "grad_out"])
@pytest.mark.parametrize("causal", [False, True])
def test_nonfinite_found_by_fused_screen(which, causal):
    """Enough (batch, head) pairs that every thread takes whole pairs (the path where the kernel
    screens inputs while packing them); the bad value sits in the last key, which a 257-key
    problem handles in its tail, or for causal in a key no query row reaches."""
    B, H, L, S, D = 4, 6, 5, 257, 16
    t = {"q": r(B, H, L, D, seed=3), "k": r(B, H, S, D, seed=4), "v": r(B, H, S, D, seed=5),
         "grad_out": r(B, H, L, D, seed=6)}
    idx = (3, 5, L - 1, 7) if which in ("q", "grad_out") else (3, 5, S - 1, 7)
    t[which][idx] = np.nan
    where = "[%d,%d,%d,%d]" % idx
    if which != "grad_out":
        raises(lambda: qfuse.sdpa(t["q"], t["k"], t["v"], is_causal=causal), which, "NaN", where,
               status="QF_ERR_NONFINITE")
    raises(lambda: qfuse.sdpa_backward(t["q"], t["k"], t["v"], t["grad_out"], is_causal=causal), which,
           "NaN", where, status="QF_ERR_NONFINITE")
