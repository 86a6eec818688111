"""qfuse.ops - numpy wrappers of the basic ops in include/qfuse_ops.h (forward and backward).

    from qfuse import ops
    y = ops.linear(x, w, b)                        # x [..., I], w [O, I] (torch layout)
    dx, dw, db = ops.linear_backward(dy, x, w, bias=True)
    y, mean, rstd = ops.layer_norm(x, w, b, eps=1e-5)
    y = ops.gelu(x, approximate="tanh");  y = ops.softmax(x)
    y = ops.dropout(x, p, seed, offset);  y = ops.embedding(ids, table)
    out = ops.sdpa(q, k, v, is_causal=True, device="cuda", dtype="bfloat16")   # bf16 on the GPU
    dq, dk, dv = ops.sdpa_backward(q, k, v, g, device="cuda", dtype="bfloat16")

Conventions (invariants of this module):
- Arrays are converted to C-contiguous float32 (ids to int32) before they reach C; outputs are
  new float32 arrays. Ops "over the last dim" flatten every leading dim into rows.
- Backward functions return fresh gradients: parameter gradients start from zero here (the C
  functions accumulate into whatever they are given; see qfuse_ops.h), input gradients are
  overwritten by C anyway.
- Every library failure raises qfuse.QfuseError carrying qf_last_error()'s message.
- bfloat16 attention (sdpa / sdpa_backward with dtype="bfloat16", CUDA backend only): q, k, v,
  grad_out are either float arrays, rounded to bf16 to nearest even on the way in (to_bf16), or
  uint16 arrays taken as bf16 bit patterns; results come back as float32 holding the bf16 values
  exactly (from_bf16), lse as float32. Masks stay bool / float32 as for float32 attention.
"""
import ctypes
from ctypes import c_float, c_int, c_int64, c_uint64, c_void_p

import numpy as np

from . import _native
from ._native import QfuseError, check, lib

__all__ = ["linear", "linear_backward", "layer_norm", "layer_norm_backward", "gelu",
           "gelu_backward", "softmax", "softmax_backward", "dropout", "dropout_backward",
           "embedding", "embedding_backward", "residual", "residual_backward",
           "sdpa", "sdpa_backward", "sdpa_bf16", "sdpa_backward_bf16", "to_bf16", "from_bf16"]

_P = c_void_p
_SIGNATURES = {
    "qf_linear_forward": [_P, _P, _P, _P, c_int64, c_int64, c_int64],
    "qf_linear_backward": [_P, _P, _P, _P, _P, _P, c_int64, c_int64, c_int64],
    "qf_layernorm_forward": [_P, _P, _P, _P, _P, _P, c_int64, c_int64, c_float],
    "qf_layernorm_backward": [_P, _P, _P, _P, _P, _P, _P, _P, c_int64, c_int64],
    "qf_gelu_forward": [_P, _P, c_int64, c_int],
    "qf_gelu_backward": [_P, _P, _P, c_int64, c_int],
    "qf_softmax_forward": [_P, _P, c_int64, c_int64],
    "qf_softmax_backward": [_P, _P, _P, c_int64, c_int64],
    "qf_dropout_forward": [_P, _P, c_int64, c_float, c_uint64, c_uint64],
    "qf_dropout_backward": [_P, _P, c_int64, c_float, c_uint64, c_uint64],
    "qf_embedding_forward": [_P, _P, _P, c_int64, c_int64, c_int64],
    "qf_embedding_backward": [_P, _P, _P, c_int64, c_int64, c_int64],
    "qf_residual_forward": [_P, _P, _P, c_int64],
    "qf_residual_backward": [_P, _P, _P, c_int64],
}
_fn = {}
for _name, _args in _SIGNATURES.items():
    _f = getattr(lib, _name, None)
    if _f is None or not hasattr(_f, "argtypes"):
        continue
    _f.restype = c_int
    _f.argtypes = _args
    _fn[_name] = _f


def _call(name, *args):
    f = _fn.get(name)
    if f is None:
        raise QfuseError("%s: not exported by %s" % (name, _native.library_path),
                         "QF_ERR_UNSUPPORTED")
    check(f(*args))


def _f32(x, what):
    a = np.asarray(x)
    if not np.issubdtype(a.dtype, np.floating):
        raise QfuseError("%s has dtype %s; expected a floating dtype" % (what, a.dtype),
                         "QF_ERR_DTYPE")
    return np.ascontiguousarray(a, dtype=np.float32)


def _ptr(a):
    return None if a is None else a.ctypes.data


def _rows(a):
    """(N, C) of an array seen as rows over its last dim."""
    if a.ndim == 0:
        raise QfuseError("expected at least one dimension, got a scalar", "QF_ERR_SHAPE")
    C = a.shape[-1]
    return (a.size // C if C else 0), C


def _last_dim(a, n, what):
    if a.shape[-1:] != (n,):
        raise QfuseError("%s has shape %s; its last dim must be %d" % (what, list(a.shape), n),
                         "QF_ERR_SHAPE")


# ---- linear --------------------------------------------------------------------------------------

def linear(x, weight, bias=None):
    """torch.nn.functional.linear: x [..., I] @ weight[O, I]^T + bias[O]."""
    x, w = _f32(x, "linear: x"), _f32(weight, "linear: weight")
    if w.ndim != 2:
        raise QfuseError("linear: weight has shape %s; expected [O,I]" % list(w.shape), "QF_ERR_SHAPE")
    O, I = w.shape
    _last_dim(x, I, "linear: x")
    b = None if bias is None else _f32(bias, "linear: bias")
    if b is not None and b.shape != (O,):
        raise QfuseError("linear: bias has shape %s; expected [%d]" % (list(b.shape), O), "QF_ERR_SHAPE")
    N, _ = _rows(x)
    out = np.empty(x.shape[:-1] + (O,), np.float32)
    _call("qf_linear_forward", _ptr(out), _ptr(x), _ptr(w), _ptr(b), N, I, O)
    return out


def linear_backward(d_out, x, weight, bias=True):
    """(d_x, d_weight, d_bias) of sum(linear(x, weight, b) * d_out); d_bias None if not bias."""
    d, x, w = _f32(d_out, "linear_backward: d_out"), _f32(x, "linear_backward: x"), \
        _f32(weight, "linear_backward: weight")
    O, I = w.shape
    _last_dim(x, I, "linear_backward: x")
    if d.shape != x.shape[:-1] + (O,):
        raise QfuseError("linear_backward: d_out has shape %s; expected %s"
                         % (list(d.shape), list(x.shape[:-1] + (O,))), "QF_ERR_SHAPE")
    N, _ = _rows(x)
    dx = np.empty(x.shape, np.float32)
    dw = np.zeros((O, I), np.float32)
    db = np.zeros((O,), np.float32) if bias else None
    _call("qf_linear_backward", _ptr(dx), _ptr(dw), _ptr(db), _ptr(d), _ptr(x), _ptr(w), N, I, O)
    return dx, dw, db


# ---- layer norm ----------------------------------------------------------------------------------

def layer_norm(x, weight=None, bias=None, eps=1e-5):
    """Layer norm over the last dim. Returns (out, mean, rstd); mean/rstd have x.shape[:-1]."""
    x = _f32(x, "layer_norm: x")
    N, C = _rows(x)
    w = None if weight is None else _f32(weight, "layer_norm: weight")
    b = None if bias is None else _f32(bias, "layer_norm: bias")
    for name, t in (("weight", w), ("bias", b)):
        if t is not None and t.shape != (C,):
            raise QfuseError("layer_norm: %s has shape %s; expected [%d]" % (name, list(t.shape), C),
                             "QF_ERR_SHAPE")
    out = np.empty(x.shape, np.float32)
    mean = np.empty(x.shape[:-1], np.float32)
    rstd = np.empty(x.shape[:-1], np.float32)
    _call("qf_layernorm_forward", _ptr(out), _ptr(mean), _ptr(rstd), _ptr(x), _ptr(w), _ptr(b),
          N, C, float(eps))
    return out, mean, rstd


def layer_norm_backward(d_out, x, weight, mean, rstd, bias=True):
    """(d_x, d_weight, d_bias); d_weight None if weight is None, d_bias None if not bias."""
    d, x = _f32(d_out, "layer_norm_backward: d_out"), _f32(x, "layer_norm_backward: x")
    N, C = _rows(x)
    if d.shape != x.shape:
        raise QfuseError("layer_norm_backward: d_out has shape %s but x %s"
                         % (list(d.shape), list(x.shape)), "QF_ERR_SHAPE")
    w = None if weight is None else _f32(weight, "layer_norm_backward: weight")
    mean, rstd = _f32(mean, "layer_norm_backward: mean"), _f32(rstd, "layer_norm_backward: rstd")
    if mean.size != N or rstd.size != N:
        raise QfuseError("layer_norm_backward: mean/rstd must have %d elements" % N, "QF_ERR_SHAPE")
    dx = np.empty(x.shape, np.float32)
    dw = np.zeros((C,), np.float32) if w is not None else None
    db = np.zeros((C,), np.float32) if bias else None
    _call("qf_layernorm_backward", _ptr(dx), _ptr(dw), _ptr(db), _ptr(d), _ptr(x), _ptr(w),
          _ptr(mean), _ptr(rstd), N, C)
    return dx, dw, db


# ---- elementwise and row ops ---------------------------------------------------------------------

_GELU = {"none": 0, "tanh": 1}


def _gelu_kind(approximate):
    if approximate not in _GELU:
        raise QfuseError("gelu: approximate = %r; expected 'none' or 'tanh'" % (approximate,))
    return _GELU[approximate]


def gelu(x, approximate="none"):
    """torch.nn.functional.gelu (approximate 'none' = erf form, 'tanh')."""
    x = _f32(x, "gelu: x")
    out = np.empty(x.shape, np.float32)
    _call("qf_gelu_forward", _ptr(out), _ptr(x), x.size, _gelu_kind(approximate))
    return out


def gelu_backward(d_out, x, approximate="none"):
    d, x = _f32(d_out, "gelu_backward: d_out"), _f32(x, "gelu_backward: x")
    if d.shape != x.shape:
        raise QfuseError("gelu_backward: d_out has shape %s but x %s" % (list(d.shape), list(x.shape)),
                         "QF_ERR_SHAPE")
    dx = np.empty(x.shape, np.float32)
    _call("qf_gelu_backward", _ptr(dx), _ptr(d), _ptr(x), x.size, _gelu_kind(approximate))
    return dx


def softmax(x):
    """Softmax over the last dim; an all -inf row gives zeros (torch: NaN)."""
    x = _f32(x, "softmax: x")
    N, C = _rows(x)
    out = np.empty(x.shape, np.float32)
    _call("qf_softmax_forward", _ptr(out), _ptr(x), N, C)
    return out


def softmax_backward(d_out, out):
    d, y = _f32(d_out, "softmax_backward: d_out"), _f32(out, "softmax_backward: out")
    if d.shape != y.shape:
        raise QfuseError("softmax_backward: d_out has shape %s but out %s"
                         % (list(d.shape), list(y.shape)), "QF_ERR_SHAPE")
    N, C = _rows(y)
    dx = np.empty(y.shape, np.float32)
    _call("qf_softmax_backward", _ptr(dx), _ptr(d), _ptr(y), N, C)
    return dx


def dropout(x, p, seed=0, offset=0):
    """Inverted dropout on qfuse's Philox stream: element i kept iff
    qf_philox_uniform(seed, offset, i) >= p, scaled by 1/(1-p)."""
    x = _f32(x, "dropout: x")
    out = np.empty(x.shape, np.float32)
    _call("qf_dropout_forward", _ptr(out), _ptr(x), x.size, float(p), seed & (2**64 - 1),
          offset & (2**64 - 1))
    return out


def dropout_backward(d_out, p, seed=0, offset=0):
    d = _f32(d_out, "dropout_backward: d_out")
    dx = np.empty(d.shape, np.float32)
    _call("qf_dropout_backward", _ptr(dx), _ptr(d), d.size, float(p), seed & (2**64 - 1),
          offset & (2**64 - 1))
    return dx


def _ids(ids, what):
    a = np.asarray(ids)
    if not np.issubdtype(a.dtype, np.integer):
        raise QfuseError("%s has dtype %s; expected integers" % (what, a.dtype), "QF_ERR_DTYPE")
    if a.size and (a.min() < -2**31 or a.max() >= 2**31):
        raise QfuseError("%s holds values outside int32" % what, "QF_ERR_ARG")
    return np.ascontiguousarray(a, dtype=np.int32)


def embedding(ids, table):
    """table[ids]: ids any integer array (as int32), table [V,C] -> [*ids.shape, C]."""
    i, t = _ids(ids, "embedding: ids"), _f32(table, "embedding: table")
    if t.ndim != 2:
        raise QfuseError("embedding: table has shape %s; expected [V,C]" % list(t.shape), "QF_ERR_SHAPE")
    V, C = t.shape
    out = np.empty(i.shape + (C,), np.float32)
    _call("qf_embedding_forward", _ptr(out), _ptr(i), _ptr(t), i.size, V, C)
    return out


def embedding_backward(d_out, ids, num_embeddings):
    """d_table [V,C] of sum(embedding(ids, table) * d_out) (repeated ids add)."""
    i = _ids(ids, "embedding_backward: ids")
    d = _f32(d_out, "embedding_backward: d_out")
    C = d.shape[-1]
    if d.shape != i.shape + (C,):
        raise QfuseError("embedding_backward: d_out has shape %s; expected ids.shape + [C]"
                         % list(d.shape), "QF_ERR_SHAPE")
    dt = np.zeros((int(num_embeddings), C), np.float32)
    _call("qf_embedding_backward", _ptr(dt), _ptr(d), _ptr(i), i.size, int(num_embeddings), C)
    return dt


def residual(a, b):
    a, b = _f32(a, "residual: a"), _f32(b, "residual: b")
    if a.shape != b.shape:
        raise QfuseError("residual: a has shape %s but b %s" % (list(a.shape), list(b.shape)),
                         "QF_ERR_SHAPE")
    out = np.empty(a.shape, np.float32)
    _call("qf_residual_forward", _ptr(out), _ptr(a), _ptr(b), a.size)
    return out


def residual_backward(d_out):
    d = _f32(d_out, "residual_backward: d_out")
    da, db = np.empty(d.shape, np.float32), np.empty(d.shape, np.float32)
    _call("qf_residual_backward", _ptr(da), _ptr(db), _ptr(d), d.size)
    return da, db


# ---- bfloat16 scaled dot-product attention (CUDA backend) -----------------------------------------

_native.declare({
    "qf_sdpa_forward_bf16": (c_int, [ctypes.POINTER(_native.qf_sdpa_params), _P, _P, _P, _P, _P]),
    "qf_sdpa_backward_bf16": (c_int, [ctypes.POINTER(_native.qf_sdpa_params)] + [_P] * 9),
})


def to_bf16(x):
    """float array -> uint16 bfloat16 bit patterns, rounded to nearest even (torch's
    .to(torch.bfloat16)); NaN stays a quiet NaN, overflow rounds to +-inf."""
    a = np.ascontiguousarray(x, np.float32)
    u = a.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(a)
    if nan.any():
        r[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return r


def from_bf16(bits):
    """uint16 bfloat16 bit patterns -> float32 (exact)."""
    b = np.ascontiguousarray(bits, np.uint16)
    return (b.astype(np.uint32) << 16).view(np.float32)


def _bf16_in(x, what):
    a = np.asarray(x)
    if a.dtype == np.uint16:
        return np.ascontiguousarray(a)
    if not np.issubdtype(a.dtype, np.floating):
        raise QfuseError("%s has dtype %s; expected a floating dtype or uint16 bf16 bits" % (what, a.dtype),
                         "QF_ERR_DTYPE")
    return to_bf16(a)


def _bf16_call(fn, q, k, v, attn_mask, is_causal, scale, enable_gqa, dropout_p, check_finite):
    """(bf16 q, k, v with a batch axis, qfuse's _SdpaCall holding the validated params)."""
    from . import _SdpaCall  # at call time: qfuse/__init__ has finished loading by then
    qb, kb, vb = _bf16_in(q, fn + ": q"), _bf16_in(k, fn + ": k"), _bf16_in(v, fn + ": v")
    c = _SdpaCall(fn, from_bf16(qb), from_bf16(kb), from_bf16(vb), attn_mask, is_causal, scale,
                  enable_gqa, dropout_p, 0, check_finite, "cuda")
    if c.unbatched:
        qb, kb, vb = qb[None], kb[None], vb[None]
    return qb, kb, vb, c


def _download_bf16(ptr, shape):
    out = np.empty(shape, np.uint16)
    check(lib.qf_cuda_download(out.ctypes.data, ptr, out.nbytes))
    return from_bf16(out)


def sdpa_bf16(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False,
              dropout_p=0.0, check_finite=True, return_lse=False):
    """qfuse.sdpa in bfloat16 on the GPU (qf_sdpa_forward_bf16): out float32 (bf16 values), and
    lse float32 [B,Hq,L] with return_lse. See the module notes for the dtypes; dropout_p must be 0."""
    from . import cuda
    qb, kb, vb, c = _bf16_call("sdpa_bf16", q, k, v, attn_mask, is_causal, scale, enable_gqa,
                               dropout_p, check_finite)
    B, Hq, L, S, D, Dv = c.shape
    cuda.init()
    with cuda.DeviceBuffers() as bufs:
        p = cuda._device_params(c, bufs)
        pq, pk, pv = bufs.upload(qb), bufs.upload(kb), bufs.upload(vb)
        out = bufs.alloc(2 * B * Hq * L * Dv)
        lse = bufs.empty((B, Hq, L))
        check(lib.qf_sdpa_forward_bf16(ctypes.byref(p), pq, pk, pv, out, lse))
        o = c.back(_download_bf16(out, (B, Hq, L, Dv)))
        if return_lse:
            return o, c.back(bufs.download(lse, (B, Hq, L)))
        return o


def sdpa_backward_bf16(q, k, v, grad_out, attn_mask=None, is_causal=False, scale=None,
                       enable_gqa=False, dropout_p=0.0, check_finite=True):
    """(dq, dk, dv) float32 (bf16 values) of sum(sdpa_bf16(q, k, v, ...) * grad_out): the bf16
    forward then qf_sdpa_backward_bf16 on the GPU (out and lse stay there)."""
    from . import cuda
    qb, kb, vb, c = _bf16_call("sdpa_backward_bf16", q, k, v, attn_mask, is_causal, scale,
                               enable_gqa, dropout_p, check_finite)
    B, Hq, L, S, D, Dv = c.shape
    gb = _bf16_in(grad_out, "sdpa_backward_bf16: grad_out")
    if c.unbatched and gb.ndim == 3:
        gb = gb[None]
    if gb.shape != (B, Hq, L, Dv):
        raise QfuseError("sdpa_backward_bf16: grad_out has shape %s but the output is [%s]"
                         % (list(np.shape(grad_out)), ",".join(map(str, (B, Hq, L, Dv)))),
                         "QF_ERR_SHAPE")
    cuda.init()
    with cuda.DeviceBuffers() as bufs:
        p = cuda._device_params(c, bufs)
        pq, pk, pv, pg = bufs.upload(qb), bufs.upload(kb), bufs.upload(vb), bufs.upload(gb)
        out, lse = bufs.alloc(2 * B * Hq * L * Dv), bufs.empty((B, Hq, L))
        check(lib.qf_sdpa_forward_bf16(ctypes.byref(p), pq, pk, pv, out, lse))
        gq, gk, gv = bufs.alloc(2 * qb.size), bufs.alloc(2 * kb.size), bufs.alloc(2 * vb.size)
        check(lib.qf_sdpa_backward_bf16(ctypes.byref(p), pq, pk, pv, out, lse, pg, gq, gk, gv))
        return tuple(c.back(_download_bf16(ptr, a.shape)) for ptr, a in ((gq, qb), (gk, kb), (gv, vb)))


def _dtype_name(dtype, fn):
    name = getattr(dtype, "__name__", None) or str(dtype)
    name = {"bf16": "bfloat16", "float": "float32", "f32": "float32"}.get(name, name)
    if name not in ("float32", "bfloat16"):
        raise QfuseError("%s: dtype = %r; expected 'float32' or 'bfloat16'" % (fn, dtype), "QF_ERR_DTYPE")
    return name


def sdpa(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, dropout_p=0.0,
         check_finite=True, device="cpu", dtype="float32", **kw):
    """qfuse.sdpa with a dtype: "float32" is qfuse.sdpa itself (either device); "bfloat16" is
    sdpa_bf16 and needs device="cuda" (QF_ERR_UNSUPPORTED otherwise: no CPU bf16 attention)."""
    if _dtype_name(dtype, "sdpa") == "float32":
        import qfuse
        return qfuse.sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                          enable_gqa=enable_gqa, dropout_p=dropout_p, check_finite=check_finite,
                          device=device, **kw)
    if device != "cuda":
        raise QfuseError("sdpa: dtype bfloat16 runs on the CUDA backend only (device = %r)" % (device,),
                         "QF_ERR_UNSUPPORTED")
    return sdpa_bf16(q, k, v, attn_mask, is_causal, scale, enable_gqa, dropout_p, check_finite, **kw)


def sdpa_backward(q, k, v, grad_out, attn_mask=None, is_causal=False, scale=None,
                  enable_gqa=False, dropout_p=0.0, check_finite=True, device="cpu",
                  dtype="float32", **kw):
    """qfuse.sdpa_backward with a dtype, as sdpa above."""
    if _dtype_name(dtype, "sdpa_backward") == "float32":
        import qfuse
        return qfuse.sdpa_backward(q, k, v, grad_out, attn_mask=attn_mask, is_causal=is_causal,
                                   scale=scale, enable_gqa=enable_gqa, dropout_p=dropout_p,
                                   check_finite=check_finite, device=device, **kw)
    if device != "cuda":
        raise QfuseError("sdpa_backward: dtype bfloat16 runs on the CUDA backend only (device = %r)"
                         % (device,), "QF_ERR_UNSUPPORTED")
    return sdpa_backward_bf16(q, k, v, grad_out, attn_mask, is_causal, scale, enable_gqa,
                              dropout_p, check_finite)


def raw(name):
    """The ctypes function of a C op by name (tests use it to pass NULLs and bad sizes)."""
    f = _fn.get(name)
    if f is None:
        raise QfuseError("%s: not exported" % name, "QF_ERR_UNSUPPORTED")
    return f

