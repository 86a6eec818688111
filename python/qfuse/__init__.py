"""qfuse - Python interface to libqfuse (ctypes; needs only numpy).

    import numpy as np, qfuse
    out = qfuse.sdpa(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False)
    dq, dk, dv = qfuse.sdpa_backward(q, k, v, grad_out, is_causal=True)
    out = qfuse.sdpa(q, k, v, is_causal=True, device="cuda", dtype="bfloat16")   # bf16 on the GPU
    qfuse.cuda.set_tf32(False); qfuse.cuda.synchronize()   # the CUDA backend (qfuse.cuda)
    mha = qfuse.MultiheadAttention.load("mha.safetensors", embed_dim=32, num_heads=4)
    out, weights = mha(query, key, value, key_padding_mask=pad)
    grads = mha.backward(grad_out)          # {"query":..., "key":..., "value":..., "in_proj_weight":...}
    m = qfuse.load("blip2-folder")          # Q-Former family: BLIP-2, InstructBLIP, AffectGPT, KV-prefix
    tokens = m.fuse(pixel_values=px)        # see qfuse.models for the whole model API

Semantics follow torch.nn.functional.scaled_dot_product_attention and torch.nn.MultiheadAttention.

Conventions (invariants of this module):
- Inputs may be any floating numpy dtype; float64/float16 are converted to float32 (the engine
  computes in float32) and every array is made C-contiguous before it reaches C. Outputs are new
  float32 numpy arrays.
- sdpa masks: bool = True attends; float = added to the scaled scores. Any numpy-broadcastable
  shape of rank <= 4 is passed to C unchanged; C checks the broadcast and names the problem.
- MultiheadAttention masks use torch's nn.MultiheadAttention convention: key_padding_mask bool
  [B,S] True = ignore that key; attn_mask bool True = NOT allowed, or float (added), [L,S] or
  [B*H,L,S]. uint8 masks are taken as bool there (nonzero = True), as torch does.
- Every failure raises QfuseError: a library status carries qf_last_error()'s message; argument
  problems the C side cannot see (it receives raw pointers, not shapes, for q/k/v) are checked
  here with messages in the same style. `.status` is the qf_status name.
- A fully masked query row gives zeros (output, weights, gradients), not torch's NaN.
"""
import ctypes
import operator
import os

import numpy as np

from . import _native
from ._native import QfuseError, check, lib

__version__ = "0.1.0"  # == QFUSE_VERSION in include/qfuse.h (test_api checks)

__all__ = ["sdpa", "sdpa_backward", "MultiheadAttention", "QfuseError", "set_num_threads",
           "get_num_threads", "set_isa", "get_isa", "__version__"]


# ---- threads and ISA ---------------------------------------------------------------------------

def _int(x, what):
    try:
        v = operator.index(x)
    except TypeError:
        raise QfuseError("%s must be an integer, got %r" % (what, x)) from None
    return v


def set_num_threads(n):
    """Threads used by every parallel region (and the BLAS). n >= 1."""
    v = _int(n, "set_num_threads: n")
    if not -2**31 <= v < 2**31:
        raise QfuseError("set_num_threads: n = %d does not fit a C int" % v)
    check(lib.qf_set_num_threads(v))


def get_num_threads():
    return int(lib.qf_get_num_threads())


def set_isa(name):
    """Force a kernel path: "scalar", "avx2" or "avx512" (QfuseError if the CPU lacks it)."""
    if not isinstance(name, str) or name not in _native.ISA_BY_NAME:
        raise QfuseError("set_isa: unknown isa %r; expected one of %s"
                         % (name, ", ".join(_native.ISA_BY_NAME)))
    check(lib.qf_set_isa(_native.ISA_BY_NAME[name]))


def get_isa():
    """The kernel path in use now: "scalar", "avx2" or "avx512"."""
    return lib.qf_isa_name(lib.qf_get_isa()).decode()


# ---- helpers -----------------------------------------------------------------------------------

def _shape(a):
    return "[" + ",".join(str(d) for d in a.shape) + "]"


def _f32(x, what):
    """x as a C-contiguous float32 array; floating dtypes only."""
    a = np.asarray(x)
    if not np.issubdtype(a.dtype, np.floating):
        raise QfuseError("%s has dtype %s; expected a floating dtype (float32, float64, float16)"
                         % (what, a.dtype), "QF_ERR_DTYPE")
    return np.ascontiguousarray(a, dtype=np.float32)


def _ptr(a):
    return None if a is None else a.ctypes.data


def _make_mask(m, what, max_ndim=4):
    """(qf_mask, keepalive array). bool -> QF_MASK_BOOL (uint8), floating -> QF_MASK_FLOAT."""
    mask = _native.qf_mask()
    if m is None:
        mask.kind = _native.QF_MASK_NONE
        return mask, None
    a = np.asarray(m)
    if a.ndim > max_ndim:
        raise QfuseError("%s has shape %s (rank %d); at most rank %d is accepted"
                         % (what, _shape(a), a.ndim, max_ndim), "QF_ERR_SHAPE")
    if a.dtype == np.bool_:
        buf = np.ascontiguousarray(a, dtype=np.uint8)
        mask.kind = _native.QF_MASK_BOOL
    elif np.issubdtype(a.dtype, np.floating):
        buf = np.ascontiguousarray(a, dtype=np.float32)
        mask.kind = _native.QF_MASK_FLOAT
    else:
        raise QfuseError("%s has dtype %s; expected bool or a floating dtype"
                         % (what, a.dtype), "QF_ERR_DTYPE")
    mask.data = buf.ctypes.data
    mask.ndim = buf.ndim
    for i, d in enumerate(buf.shape):
        mask.shape[i] = d
    return mask, buf


# ---- scaled dot-product attention --------------------------------------------------------------

class _SdpaCall:
    """Converted inputs and filled qf_sdpa_params for one sdpa call (keeps buffers alive)."""

    def __init__(self, fn, q, k, v, attn_mask, is_causal, scale, enable_gqa, dropout_p, seed,
                 check_finite, device="cpu"):
        if device not in ("cpu", "cuda"):
            raise QfuseError("%s: device = %r; expected 'cpu' or 'cuda'" % (fn, device))
        self.device = device
        q, k, v = _f32(q, fn + ": q"), _f32(k, fn + ": k"), _f32(v, fn + ": v")
        if q.ndim not in (3, 4):
            raise QfuseError("%s: q has shape %s (rank %d); expected [B,H,L,D] or [H,L,D]"
                             % (fn, _shape(q), q.ndim), "QF_ERR_SHAPE")
        for name, t in (("k", k), ("v", v)):
            if t.ndim != q.ndim:
                raise QfuseError("%s: %s has shape %s (rank %d) but q %s (rank %d): q, k and v "
                                 "must have the same rank" % (fn, name, _shape(t), t.ndim,
                                                              _shape(q), q.ndim), "QF_ERR_SHAPE")
        self.unbatched = q.ndim == 3
        if self.unbatched:
            q, k, v = q[None], k[None], v[None]
        B, Hq, L, D = q.shape
        Bk, Hkv, S, Dk = k.shape
        Bv, Hv, Sv, Dv = v.shape

        def bad(name, t, rule):
            return QfuseError("%s: %s has shape %s but q %s: %s"
                              % (fn, name, _shape(t), _shape(q), rule), "QF_ERR_SHAPE")
        if Bk != B:
            raise bad("k", k, "batch B differs (%d vs %d)" % (Bk, B))
        if Dk != D:
            raise bad("k", k, "head dim D differs (%d vs %d)" % (Dk, D))
        if Bv != B:
            raise bad("v", v, "batch B differs (%d vs %d)" % (Bv, B))
        if Hv != Hkv:
            raise QfuseError("%s: v has shape %s but k %s: head count differs (%d vs %d)"
                             % (fn, _shape(v), _shape(k), Hv, Hkv), "QF_ERR_SHAPE")
        if Sv != S:
            raise QfuseError("%s: v has shape %s but k %s: key length S differs (%d vs %d)"
                             % (fn, _shape(v), _shape(k), Sv, S), "QF_ERR_SHAPE")
        self.q, self.k, self.v = q, k, v
        p = lib.qf_sdpa_defaults(B, Hq, Hkv, L, S, D)
        p.Dv = Dv
        p.scale = float("nan") if scale is None else float(scale)
        p.is_causal = 1 if is_causal else 0
        p.enable_gqa = 1 if enable_gqa else 0
        p.dropout_p = float(dropout_p)
        p.seed = _int(seed, fn + ": seed") & 0xFFFFFFFFFFFFFFFF
        p.offset = 0
        p.check_finite = 1 if check_finite else 0
        p.mask, self.mask_buf = _make_mask(attn_mask, fn + ": attn_mask")
        self.p = p
        self.shape = (B, Hq, L, S, D, Dv)

    def forward(self, want_lse, want_weights):
        if self.device == "cuda":  # host copies around the GPU kernels (qfuse.cuda)
            from . import cuda
            return cuda.sdpa_forward(self, want_lse, want_weights)
        B, Hq, L, S, D, Dv = self.shape
        out = np.empty((B, Hq, L, Dv), np.float32)
        lse = np.empty((B, Hq, L), np.float32) if want_lse else None
        w = np.empty((B, Hq, L, S), np.float32) if want_weights else None
        check(lib.qf_sdpa_forward(ctypes.byref(self.p), _ptr(self.q), _ptr(self.k), _ptr(self.v),
                                  _ptr(out), _ptr(lse), _ptr(w)))
        return out, lse, w

    def back(self, a):
        return a[0] if self.unbatched else a


def _bf16_route(fn, dtype, device, **unsupported):
    """True when dtype asks for bfloat16 attention (then device must be "cuda" and none of the
    float32-only options set); False for float32. QfuseError for anything else."""
    from .ops import _dtype_name
    if _dtype_name(dtype, fn) == "float32":
        return False
    if device != "cuda":
        raise QfuseError("%s: dtype bfloat16 runs on the CUDA backend only (device = %r; the CPU engine "
                         "computes in float32)" % (fn, device), "QF_ERR_UNSUPPORTED")
    for name, (value, default) in unsupported.items():
        if value != default:
            raise QfuseError("%s: %s = %r is not supported with dtype bfloat16" % (fn, name, value),
                             "QF_ERR_UNSUPPORTED")
    return True


def sdpa(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False,
         dropout_p=0.0, seed=0, return_weights=False, check_finite=True, device="cpu",
         dtype="float32"):
    """torch.nn.functional.scaled_dot_product_attention on the CPU engine (device="cuda": on the
    GPU through the CUDA backend, numpy in and out; see qfuse.cuda). dtype="bfloat16" (device
    "cuda" only): q, k, v rounded to bf16 (or uint16 bf16 bit patterns), bf16 tensor-core
    kernels, the output float32 holding bf16 values (qfuse.ops.sdpa_bf16); no dropout or
    return_weights there.

    q [B,Hq,L,D] (or [Hq,L,D]), k [B,Hkv,S,D], v [B,Hkv,S,Dv] -> out [B,Hq,L,Dv] float32.
    attn_mask: bool (True = attend) or float (added), broadcastable to [B,Hq,L,S].
    scale None = 1/sqrt(D). enable_gqa lets Hq be a multiple of Hkv.
    Extras: dropout_p with a counter-based stream `seed` (reproducible); return_weights=True
    returns (out, weights [B,Hq,L,S]) with dropout applied to weights as torch does;
    check_finite=False skips the NaN/Inf scan of q, k, v.
    """
    if _bf16_route("sdpa", dtype, device, return_weights=(return_weights, False), seed=(seed, 0)):
        from .ops import sdpa_bf16
        return sdpa_bf16(q, k, v, attn_mask, is_causal, scale, enable_gqa, dropout_p, check_finite)
    c = _SdpaCall("sdpa", q, k, v, attn_mask, is_causal, scale, enable_gqa, dropout_p, seed,
                  check_finite, device)
    out, _, w = c.forward(False, return_weights)
    if return_weights:
        return c.back(out), c.back(w)
    return c.back(out)


def sdpa_backward(q, k, v, grad_out, attn_mask=None, is_causal=False, scale=None,
                  enable_gqa=False, dropout_p=0.0, seed=0, check_finite=True, device="cpu",
                  dtype="float32"):
    """Gradients (dq, dk, dv) of loss = sum(sdpa(q, k, v, ...) * grad_out), same arguments as
    sdpa (the same dropout_p/seed reproduce the forward's dropout mask; dtype="bfloat16" on
    "cuda": qfuse.ops.sdpa_backward_bf16, gradients float32 holding bf16 values)."""
    if _bf16_route("sdpa_backward", dtype, device, seed=(seed, 0)):
        from .ops import sdpa_backward_bf16
        return sdpa_backward_bf16(q, k, v, grad_out, attn_mask, is_causal, scale, enable_gqa, dropout_p,
                                  check_finite)
    c = _SdpaCall("sdpa_backward", q, k, v, attn_mask, is_causal, scale, enable_gqa, dropout_p,
                  seed, check_finite, device)
    B, Hq, L, S, D, Dv = c.shape
    g = _f32(grad_out, "sdpa_backward: grad_out")
    if c.unbatched and g.ndim == 3:
        g = g[None]
    if g.shape != (B, Hq, L, Dv):
        want = (Hq, L, Dv) if c.unbatched else (B, Hq, L, Dv)
        raise QfuseError("sdpa_backward: grad_out has shape %s but the output is [%s]"
                         % (_shape(np.asarray(grad_out)), ",".join(map(str, want))),
                         "QF_ERR_SHAPE")
    if c.device == "cuda":
        from . import cuda
        return tuple(c.back(x) for x in cuda.sdpa_backward(c, g))
    out, lse, _ = c.forward(True, False)
    dq = np.empty(c.q.shape, np.float32)
    dk = np.empty(c.k.shape, np.float32)
    dv = np.empty(c.v.shape, np.float32)
    check(lib.qf_sdpa_backward(ctypes.byref(c.p), _ptr(c.q), _ptr(c.k), _ptr(c.v), _ptr(out),
                               _ptr(lse), _ptr(g), _ptr(dq), _ptr(dk), _ptr(dv)))
    return c.back(dq), c.back(dk), c.back(dv)


# ---- multi-head attention ----------------------------------------------------------------------

_native.declare({"qf_mha_to_device": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int])})
_MHA_DTYPES = {"float32": 0, "f32": 0, "bfloat16": 3, "bf16": 3}   # qf_dtype: QF_F32, QF_BF16


class MultiheadAttention:
    """torch.nn.MultiheadAttention (inference and backward) over a state dict in safetensors.

    Build with MultiheadAttention.load(...); the C handle is self._h (freed by close() or when
    the object is collected). Not thread-safe: forward/backward keep per-call state in C.
    .to("cuda") runs forward and backward on the GPU (qf_mha_to_device), numpy in and out.
    """

    def __init__(self, handle, embed_dim, num_heads, kdim, vdim, bias, batch_first, dropout):
        self._h = handle
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.kdim, self.vdim = kdim, vdim
        self.bias, self.batch_first, self.dropout = bias, batch_first, dropout
        self._last = None  # (keepalive inputs, input shapes, out shape) of the last forward
        self.device, self.dtype = "cpu", "float32"

    @classmethod
    def load(cls, path, embed_dim, num_heads, kdim=None, vdim=None, bias=True,
             batch_first=False, dropout=0.0, device="cpu", dtype="float32"):
        """Loads in_proj_weight (or q/k/v_proj_weight), in_proj_bias, out_proj.weight,
        out_proj.bias from a safetensors state dict; kdim/vdim None = embed_dim; then places
        it (see to())."""
        E = _int(embed_dim, "MultiheadAttention.load: embed_dim")
        H = _int(num_heads, "MultiheadAttention.load: num_heads")
        kd = E if kdim is None else _int(kdim, "MultiheadAttention.load: kdim")
        vd = E if vdim is None else _int(vdim, "MultiheadAttention.load: vdim")
        cfg = _native.qf_mha_config(E, H, 0 if kdim is None else kd, 0 if vdim is None else vd,
                                    1 if bias else 0, 1 if batch_first else 0, float(dropout))
        h = ctypes.c_void_p()
        check(lib.qf_mha_load(os.fsencode(os.fspath(path)), ctypes.byref(cfg), ctypes.byref(h)))
        m = cls(h.value, E, H, kd, vd, bool(bias), bool(batch_first), float(dropout))
        if device != "cpu" or dtype != "float32":
            try:
                m.to(device, dtype)
            except Exception:
                m.close()
                raise
        return m

    def to(self, device="cpu", dtype="float32"):
        """Runs forward and backward on device "cpu" or "cuda" from now on (parameters uploaded
        once; gradients accumulated so far move along); dtype "bfloat16" (cuda only) makes the
        projections read bf16 weight copies (forward only: backward needs float32). Returns self."""
        h = self._handle("to")
        fn = "MultiheadAttention.to"
        if device not in ("cpu", "cuda"):
            raise QfuseError('%s: device = %r; expected "cpu" or "cuda"' % (fn, device), "QF_ERR_ARG")
        if dtype not in _MHA_DTYPES:
            raise QfuseError('%s: dtype = %r; expected "float32" or "bfloat16"' % (fn, dtype), "QF_ERR_ARG")
        check(lib.qf_mha_to_device(h, device.encode(), _MHA_DTYPES[dtype]))
        self.device, self.dtype = device, dtype
        self._last = None
        return self

    def close(self):
        h, self._h = getattr(self, "_h", None), None
        self._last = None
        if h:
            lib.qf_mha_free(h)

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown may have torn down ctypes
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _handle(self, fn):
        if not self._h:
            raise QfuseError("MultiheadAttention.%s: used after close()" % fn)
        return self._h

    def __call__(self, query, key, value, key_padding_mask=None, attn_mask=None,
                 need_weights=True, average_attn_weights=True, is_causal=False, training=False,
                 seed=0):
        """Returns (out, weights). out has query's layout ([L,B,E], [B,L,E] if batch_first, or
        [L,E] unbatched); weights [B,L,S] averaged over heads, [B,H,L,S] otherwise, None when
        need_weights is False. training=True applies the loaded dropout with stream `seed`."""
        h = self._handle("forward")
        fn = "MultiheadAttention"
        q = _f32(query, fn + ": query")
        k = _f32(key, fn + ": key")
        v = _f32(value, fn + ": value")
        if q.ndim not in (2, 3):
            raise QfuseError("%s: query has shape %s (rank %d); expected rank 3 (batched) or 2 "
                             "(unbatched)" % (fn, _shape(q), q.ndim), "QF_ERR_SHAPE")
        for name, t in (("key", k), ("value", v)):
            if t.ndim != q.ndim:
                raise QfuseError("%s: %s has shape %s but query %s: ranks differ"
                                 % (fn, name, _shape(t), _shape(q)), "QF_ERR_SHAPE")
        unbatched = q.ndim == 2
        bax = 0 if self.batch_first else 1  # batch axis
        if unbatched:
            q, k, v = (np.ascontiguousarray(np.expand_dims(t, bax)) for t in (q, k, v))
            if key_padding_mask is not None:
                key_padding_mask = np.asarray(key_padding_mask)[None]
        sax = 1 - bax
        B, L, S = q.shape[bax], q.shape[sax], k.shape[sax]
        for name, t, want in (("query", q, self.embed_dim), ("key", k, self.kdim),
                              ("value", v, self.vdim)):
            if t.shape[2] != want:
                raise QfuseError("%s: %s has shape %s; its last dim must be %d" % (
                    fn, name, _shape(t), want), "QF_ERR_SHAPE")
            if t.shape[bax] != B:
                raise QfuseError("%s: %s has shape %s but query %s: batch sizes differ" % (
                    fn, name, _shape(t), _shape(q)), "QF_ERR_SHAPE")
        if v.shape[sax] != S:
            raise QfuseError("%s: value has shape %s but key %s: key lengths differ" % (
                fn, _shape(v), _shape(k)), "QF_ERR_SHAPE")

        # torch's nn.MultiheadAttention also takes uint8 masks as bool (nonzero = True).
        if attn_mask is not None and np.asarray(attn_mask).dtype == np.uint8:
            attn_mask = np.asarray(attn_mask) != 0
        kpm_buf = None
        if key_padding_mask is not None:
            kpm = np.asarray(key_padding_mask)
            if kpm.shape != (B, S):
                raise QfuseError("%s: key_padding_mask has shape %s; expected [B,S] = [%d,%d]"
                                 % (fn, _shape(kpm), B, S), "QF_ERR_SHAPE")
            if kpm.dtype in (np.bool_, np.uint8):
                kpm_buf = np.ascontiguousarray(kpm != 0, dtype=np.uint8)
            elif np.issubdtype(kpm.dtype, np.floating):
                # A float padding mask is added to the scores: fold it into a float attn_mask
                # of shape [B*H,L,S] (the C API takes a bool padding mask only).
                attn_mask = self._fold_float_padding(attn_mask, kpm, B, L, S)
            else:
                raise QfuseError("%s: key_padding_mask has dtype %s; expected bool (True = "
                                 "ignore; uint8 nonzero = ignore) or float (added)" % (fn, kpm.dtype), "QF_ERR_DTYPE")
        args = _native.qf_mha_args()
        args.B, args.L, args.S = B, L, S
        args.key_padding_mask = _ptr(kpm_buf)
        args.attn_mask, mask_buf = _make_mask(attn_mask, fn + ": attn_mask", max_ndim=3)
        args.is_causal = 1 if is_causal else 0
        args.need_weights = 1 if need_weights else 0
        args.average_attn_weights = 1 if average_attn_weights else 0
        args.training = 1 if training else 0
        args.seed = _int(seed, fn + ": seed") & 0xFFFFFFFFFFFFFFFF
        args.offset = 0

        out_shape = list(q.shape)
        out_shape[2] = self.embed_dim
        out = np.empty(out_shape, np.float32)
        w = None
        if need_weights:
            w = np.empty((B, L, S) if average_attn_weights else (B, self.num_heads, L, S),
                         np.float32)
        # The C object may refer to the inputs until backward: keep them alive with the handle.
        self._last = None
        check(lib.qf_mha_forward(h, ctypes.byref(args), _ptr(q), _ptr(k), _ptr(v), _ptr(out),
                                 _ptr(w)))
        self._last = ((q, k, v, kpm_buf, mask_buf), unbatched, bax)
        if unbatched:
            out = out[0] if bax == 0 else out[:, 0]
            if w is not None:
                w = w[0]
        return out, w

    forward = __call__

    def _fold_float_padding(self, attn_mask, kpm, B, L, S):
        H = self.num_heads
        if attn_mask is None:
            am = np.zeros((1, 1, L, S), np.float64)
        else:
            am = np.asarray(attn_mask)
            if am.dtype == np.bool_:
                am = np.where(am, -np.inf, 0.0)
            if am.ndim == 3:
                if am.shape[0] != B * H:
                    raise QfuseError("MultiheadAttention: attn_mask has shape %s; a 3-D mask "
                                     "must be [B*H,L,S] = [%d,%d,%d]" % (_shape(am), B * H, L, S),
                                     "QF_ERR_SHAPE")
                am = am.reshape(B, H, L, S)
        total = am + np.asarray(kpm, np.float64)[:, None, None, :]
        return np.broadcast_to(total, (B, H, L, S)).reshape(B * H, L, S).astype(np.float32)

    def backward(self, grad_out):
        """Gradients of sum(out * grad_out) for the last forward: a dict with "query", "key",
        "value" (input layouts) and every parameter's gradient by state-dict name. Parameter
        gradients are zeroed first, so they are this call's alone."""
        h = self._handle("backward")
        if self._last is None:
            raise QfuseError("MultiheadAttention.backward: no forward to differentiate")
        (q, k, v, _, _), unbatched, bax = self._last
        g = _f32(grad_out, "MultiheadAttention.backward: grad_out")
        if unbatched:
            g = np.ascontiguousarray(np.expand_dims(g, bax))
        want = q.shape[:2] + (self.embed_dim,)
        if g.shape != want:
            raise QfuseError("MultiheadAttention.backward: grad_out has shape %s; expected %s"
                             % (_shape(g), "[" + ",".join(map(str, want)) + "]"),
                             "QF_ERR_SHAPE")
        gq = np.empty(q.shape, np.float32)
        gk = np.empty(k.shape, np.float32)
        gv = np.empty(v.shape, np.float32)
        lib.qf_mha_zero_grad(h)
        check(lib.qf_mha_backward(h, _ptr(g), _ptr(gq), _ptr(gk), _ptr(gv)))
        if unbatched:
            gq, gk, gv = ((t[0] if bax == 0 else t[:, 0]) for t in (gq, gk, gv))
        grads = {"query": gq, "key": gk, "value": gv}
        for name, p in self._params():
            if p.grad:
                grads[name] = np.ctypeslib.as_array(p.grad, tuple(p.shape[:p.ndim])).copy()
        return grads

    def _params(self):
        h = self._handle("parameters")
        for i in range(lib.qf_mha_num_params(h)):
            p = _native.qf_param()
            check(lib.qf_mha_param(h, i, ctypes.byref(p)))
            yield p.name.decode(), p

    def state_dict(self):
        """Copies of the parameters (float32), by state-dict name."""
        return {name: np.ctypeslib.as_array(p.data, tuple(p.shape[:p.ndim])).copy()
                for name, p in self._params()}


# ---- models (each family in its own module; qfuse.load picks one by config.json) -------------
from .qformer import QFormer  # noqa: E402
from .blip2 import Blip2  # noqa: E402
from .fusion import KVPrefix, Prefusion  # noqa: E402
from .modality import AttentionFusion, ModalityQFormer  # noqa: E402
from .heatmap import save_heatmap  # noqa: E402
from .llm import CausalLM  # noqa: E402
from .vlm import VisionLM  # noqa: E402
from .sampling import sample_token, TextStream  # noqa: E402
from .train import AdamW  # noqa: E402
from .models import FusionModel, load, model_kind  # noqa: E402
from .tokenizer import Tokenizer  # noqa: E402
from . import cuda  # noqa: E402,F401  (qfuse.cuda.available / set_tf32 / synchronize / DeviceBuffers)

__all__ += ["QFormer", "Blip2", "Prefusion", "KVPrefix", "ModalityQFormer", "AttentionFusion",
            "FusionModel", "load", "model_kind", "save_heatmap", "Tokenizer", "CausalLM",
           "VisionLM", "sample_token", "TextStream", "AdamW"]
