"""qfuse.qformer - the Q-Former core (src/models/qformer.c): transformers' Blip2QFormerModel /
InstructBlipQFormerModel and LAVIS Q-Former checkpoints, forward, backward, cross-attention maps.

    from qfuse.qformer import QFormer
    qf = QFormer.load("path/to/folder")          # config.json + model.safetensors
    out = qf.forward(query_embeds, encoder_hidden_states, encoder_attention_mask=mask,
                     qformer_input_ids=ids, qformer_attention_mask=tmask,
                     prefix_k=pk, prefix_v=pv)   # last_hidden_state [B, Lq+Lt, hidden]
    grads = qf.backward(grad_out)                # {param name: grad, "query_embeds": ..., ...}
    maps = qf.cross_attention_maps(average=True) # per cross layer [B, Lq, P+S]
    qf.set_frozen(True); qf.params(); qf.close()
    qf = QFormer.load(folder, device="cuda", dtype="bfloat16")   # forward on the GPU (numpy in/out)

On device="cuda" the parameters are uploaded once and each forward replays a CUDA graph for its
shape (include/qfuse_models.h, qf_qformer_to_device); backward and the attention maps need the
CPU (qf.to("cpu")). dtype="bfloat16" (cuda only) runs the GEMMs on bf16 weights with float32
accumulation.

Conventions (invariants of this module):
- Float inputs are converted to C-contiguous float32; masks may be bool, integer or float
  (nonzero = attend, as transformers' 1/0 masks); ids any integer dtype (range-checked, then
  int32).
- Shapes are checked here against the model's config before C sees a pointer (C receives raw
  pointers); every problem raises QfuseError naming the argument, its shape and the rule.
- backward() returns the gradients of loss = sum(out * grad_out) for the last forward. Parameter
  gradients are those accumulated by the C side since the last zero_grad(): backward() zeroes
  them first, so each call returns that call's gradients (accumulate yourself if needed).
- Not thread-safe: the C model keeps per-call state.
"""
import ctypes
from ctypes import c_double, c_int, c_int64, c_void_p, c_char_p

import numpy as np

from . import _native
from ._native import QfuseError, check, lib

__all__ = ["QFormer"]


class qf_qformer_config(ctypes.Structure):
    _fields_ = [("num_hidden_layers", c_int64), ("hidden_size", c_int64),
                ("num_attention_heads", c_int64), ("intermediate_size", c_int64),
                ("cross_attention_frequency", c_int64), ("encoder_hidden_size", c_int64),
                ("layer_norm_eps", c_double),
                ("hidden_act", c_int),
                ("has_text", c_int),
                ("vocab_size", c_int64), ("max_position_embeddings", c_int64)]


class qf_qformer_args(ctypes.Structure):
    _fields_ = [("B", c_int64), ("num_queries", c_int64), ("encoder_len", c_int64),
                ("encoder_attention_mask", c_void_p),
                ("text_len", c_int64),
                ("text_ids", c_void_p),
                ("text_attention_mask", c_void_p),
                ("prefix_len", c_int64),
                ("prefix_k", c_void_p), ("prefix_v", c_void_p)]


P = ctypes.POINTER
_native.declare({
    "qf_qformer_load": (c_int, [c_char_p, P(c_void_p)]),
    "qf_qformer_free": (None, [c_void_p]),
    "qf_qformer_get_config": (c_int, [c_void_p, P(qf_qformer_config)]),
    "qf_qformer_forward": (c_int, [c_void_p, P(qf_qformer_args), c_void_p, c_void_p, c_void_p]),
    "qf_qformer_backward": (c_int, [c_void_p, c_void_p, c_void_p, c_void_p, c_void_p, c_void_p]),
    "qf_qformer_num_params": (c_int, [c_void_p]),
    "qf_qformer_param": (c_int, [c_void_p, c_int, P(_native.qf_param)]),
    "qf_qformer_find_param": (c_int, [c_void_p, c_char_p, P(_native.qf_param)]),
    "qf_qformer_zero_grad": (None, [c_void_p]),
    "qf_qformer_set_frozen": (None, [c_void_p, c_int]),
    "qf_qformer_num_cross_layers": (c_int, [c_void_p]),
    "qf_qformer_cross_attention": (c_int, [c_void_p, c_int, c_int, c_void_p]),
    "qf_qformer_to_device": (c_int, [c_void_p, c_char_p, c_int]),
})

_DTYPES = {"float32": 0, "f32": 0, "bfloat16": 3, "bf16": 3}   # qf_dtype: QF_F32, QF_BF16


def _to_device(handle, device, dtype, fn):
    """qf_qformer_to_device on a Q-Former handle; device "cpu"/"cuda", dtype "float32"/"bfloat16"."""
    if device not in ("cpu", "cuda"):
        raise QfuseError('%s: device = %r; expected "cpu" or "cuda"' % (fn, device), "QF_ERR_ARG")
    if dtype not in _DTYPES:
        raise QfuseError('%s: dtype = %r; expected "float32" or "bfloat16"' % (fn, dtype), "QF_ERR_ARG")
    check(lib.qf_qformer_to_device(handle, device.encode(), _DTYPES[dtype]))


def _shape(a):
    return "[" + ",".join(str(d) for d in a.shape) + "]"


def _f32(x, what):
    a = np.asarray(x)
    if not np.issubdtype(a.dtype, np.floating):
        raise QfuseError("%s has dtype %s; expected a floating dtype (float32, float64, float16)"
                         % (what, a.dtype), "QF_ERR_DTYPE")
    return np.ascontiguousarray(a, dtype=np.float32)


def _mask(x, what, shape):
    a = np.asarray(x)
    if not (a.dtype == np.bool_ or np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise QfuseError("%s has dtype %s; expected bool, integer or floating (nonzero = attend)"
                         % (what, a.dtype), "QF_ERR_DTYPE")
    if a.shape != shape:
        raise QfuseError("%s has shape %s; expected [%s]" % (what, _shape(a), ",".join(map(str, shape))),
                         "QF_ERR_SHAPE")
    return np.ascontiguousarray(a != 0, dtype=np.uint8)


def _ptr(a):
    return None if a is None else a.ctypes.data


class QFormer:
    """A loaded Q-Former; see the module docstring. Build with QFormer.load(folder)."""

    def __init__(self, handle):
        self._h = handle
        cfg = qf_qformer_config()
        check(lib.qf_qformer_get_config(self._h, ctypes.byref(cfg)))
        self.config = {f: getattr(cfg, f) for f, _ in qf_qformer_config._fields_}
        self.config["hidden_act"] = "gelu" if cfg.hidden_act == 0 else "gelu_tanh"
        self.hidden_size = cfg.hidden_size
        self.encoder_hidden_size = cfg.encoder_hidden_size
        self.num_heads = cfg.num_attention_heads
        self.has_text = bool(cfg.has_text)
        self.device, self.dtype = "cpu", "float32"
        self._last = None

    @classmethod
    def load(cls, folder, device="cpu", dtype="float32"):
        """Loads FOLDER/config.json + FOLDER/model.safetensors (a Q-Former config, or a whole
        BLIP-2 / InstructBLIP one whose Q-Former is taken), then places it (see to())."""
        if not isinstance(folder, str):
            raise QfuseError("QFormer.load: folder must be a str, got %r" % (folder,))
        h = c_void_p()
        check(lib.qf_qformer_load(folder.encode(), ctypes.byref(h)))
        m = cls(h)
        if device != "cpu" or dtype != "float32":
            try:
                m.to(device, dtype)
            except Exception:
                m.close()
                raise
        return m

    def to(self, device="cpu", dtype="float32"):
        """Runs the forward on device "cpu" or "cuda" from now on; dtype "bfloat16" (cuda only)
        keeps the GEMM weights in bf16. Returns self."""
        _to_device(self._handle("to"), device, dtype, "QFormer.to")
        self.device, self.dtype = device, dtype
        return self

    def close(self):
        if getattr(self, "_h", None):
            lib.qf_qformer_free(self._h)
            self._h = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def _handle(self, fn):
        if not self._h:
            raise QfuseError("QFormer.%s: the model is closed" % fn)
        return self._h

    # ---- forward / backward ----------------------------------------------------------------

    def forward(self, query_embeds, encoder_hidden_states, encoder_attention_mask=None,
                qformer_input_ids=None, qformer_attention_mask=None, prefix_k=None, prefix_v=None):
        """-> last_hidden_state [B, Lq+Lt, hidden] float32 (query rows first)."""
        fn = "QFormer.forward"
        h = self._handle("forward")
        H, E = self.hidden_size, self.encoder_hidden_size
        q = _f32(query_embeds, fn + ": query_embeds")
        enc = _f32(encoder_hidden_states, fn + ": encoder_hidden_states")
        if q.ndim != 3 or q.shape[2] != H:
            raise QfuseError("%s: query_embeds has shape %s; expected [B, num_queries, %d] (hidden_size)"
                             % (fn, _shape(q), H), "QF_ERR_SHAPE")
        B, Lq = q.shape[0], q.shape[1]
        if enc.ndim != 3 or enc.shape[0] != B or enc.shape[2] != E:
            raise QfuseError("%s: encoder_hidden_states has shape %s; expected [%d, S, %d] (batch of "
                             "query_embeds, encoder_hidden_size)" % (fn, _shape(enc), B, E), "QF_ERR_SHAPE")
        if B < 1 or Lq < 1 or enc.shape[1] < 1:
            raise QfuseError("%s: B = %d, num_queries = %d, S = %d; each must be >= 1"
                             % (fn, B, Lq, enc.shape[1]), "QF_ERR_SHAPE")
        S = enc.shape[1]
        a = qf_qformer_args(B=B, num_queries=Lq, encoder_len=S)
        keep = [q, enc]
        if encoder_attention_mask is not None:
            em = _mask(encoder_attention_mask, fn + ": encoder_attention_mask", (B, S))
            a.encoder_attention_mask = em.ctypes.data
            keep.append(em)
        Lt = 0
        if qformer_input_ids is not None:
            ids = np.asarray(qformer_input_ids)
            if not np.issubdtype(ids.dtype, np.integer):
                raise QfuseError("%s: qformer_input_ids has dtype %s; expected an integer dtype"
                                 % (fn, ids.dtype), "QF_ERR_DTYPE")
            if ids.ndim != 2 or ids.shape[0] != B:
                raise QfuseError("%s: qformer_input_ids has shape %s; expected [%d, text_len]"
                                 % (fn, _shape(ids), B), "QF_ERR_SHAPE")
            if not self.has_text:
                raise QfuseError("%s: qformer_input_ids given but this Q-Former has no word/position "
                                 "embeddings (it takes query tokens only)" % fn)
            Lt = ids.shape[1]
            if Lt:
                bad = np.argwhere((ids < 0) | (ids >= self.config["vocab_size"]))
                if len(bad):
                    b, j = bad[0]
                    raise QfuseError("%s: qformer_input_ids[%d][%d] = %d is out of range [0, %d) (vocab_size)"
                                     % (fn, b, j, ids[b, j], self.config["vocab_size"]))
                ids32 = np.ascontiguousarray(ids, dtype=np.int32)
                a.text_len = Lt
                a.text_ids = ids32.ctypes.data
                keep.append(ids32)
                if qformer_attention_mask is not None:
                    tm = _mask(qformer_attention_mask, fn + ": qformer_attention_mask", (B, Lt))
                    a.text_attention_mask = tm.ctypes.data
                    keep.append(tm)
        elif qformer_attention_mask is not None:
            raise QfuseError("%s: qformer_attention_mask given without qformer_input_ids" % fn)
        Pn = 0
        if (prefix_k is None) != (prefix_v is None):
            raise QfuseError("%s: prefix_k and prefix_v must be given together" % fn)
        if prefix_k is not None:
            pk = _f32(prefix_k, fn + ": prefix_k")
            pv = _f32(prefix_v, fn + ": prefix_v")
            if pk.ndim != 3 or pk.shape[0] != B or pk.shape[2] != H:
                raise QfuseError("%s: prefix_k has shape %s; expected [%d, P, %d] (batch, prefix length, "
                                 "hidden_size)" % (fn, _shape(pk), B, H), "QF_ERR_SHAPE")
            if pv.shape != pk.shape:
                raise QfuseError("%s: prefix_v has shape %s but prefix_k %s; they must match"
                                 % (fn, _shape(pv), _shape(pk)), "QF_ERR_SHAPE")
            Pn = pk.shape[1]
            if Pn:
                a.prefix_len = Pn
                a.prefix_k, a.prefix_v = pk.ctypes.data, pv.ctypes.data
                keep += [pk, pv]
        out = np.empty((B, Lq + Lt, H), np.float32)
        self._last = None
        check(lib.qf_qformer_forward(h, ctypes.byref(a), q.ctypes.data, enc.ctypes.data, out.ctypes.data))
        self._last = dict(B=B, Lq=Lq, Lt=Lt, S=S, P=Pn)
        return out

    __call__ = forward

    def backward(self, grad_out):
        """Gradients of loss = sum(out * grad_out) for the last forward: a dict of every
        parameter's gradient by transformers name (absent while frozen), plus "query_embeds",
        "encoder_hidden_states", and "prefix_k"/"prefix_v" when the forward had a prefix."""
        fn = "QFormer.backward"
        h = self._handle("backward")
        if self._last is None:
            raise QfuseError("%s: no successful forward to differentiate" % fn)
        d = self._last
        B, Lq, Lt, S, Pn = d["B"], d["Lq"], d["Lt"], d["S"], d["P"]
        H, E = self.hidden_size, self.encoder_hidden_size
        g = _f32(grad_out, fn + ": grad_out")
        if g.shape != (B, Lq + Lt, H):
            raise QfuseError("%s: grad_out has shape %s; the output is [%d,%d,%d]"
                             % (fn, _shape(g), B, Lq + Lt, H), "QF_ERR_SHAPE")
        gq = np.empty((B, Lq, H), np.float32)
        ge = np.empty((B, S, E), np.float32)
        gpk = np.empty((B, Pn, H), np.float32) if Pn else None
        gpv = np.empty((B, Pn, H), np.float32) if Pn else None
        lib.qf_qformer_zero_grad(h)
        check(lib.qf_qformer_backward(h, g.ctypes.data, gq.ctypes.data, ge.ctypes.data, _ptr(gpk), _ptr(gpv)))
        out = {}
        for name, p in self._iter_params():
            if p.grad:
                out[name] = np.ctypeslib.as_array(p.grad, shape=self._pshape(p)).copy()
        out["query_embeds"] = gq
        out["encoder_hidden_states"] = ge
        if Pn:
            out["prefix_k"], out["prefix_v"] = gpk, gpv
        return out

    def cross_attention_maps(self, average=False):
        """Per cross-attention layer, the last forward's weights [B, heads, Lq, P+S] (prefix keys
        first) or [B, Lq, P+S] averaged over heads."""
        h = self._handle("cross_attention_maps")
        if self._last is None:
            raise QfuseError("QFormer.cross_attention_maps: no successful forward")
        d = self._last
        K = d["P"] + d["S"]
        shape = (d["B"], d["Lq"], K) if average else (d["B"], self.num_heads, d["Lq"], K)
        maps = []
        for i in range(lib.qf_qformer_num_cross_layers(h)):
            w = np.empty(shape, np.float32)
            check(lib.qf_qformer_cross_attention(h, i, 1 if average else 0, w.ctypes.data))
            maps.append(w)
        return maps

    # ---- parameters -------------------------------------------------------------------------

    @staticmethod
    def _pshape(p):
        return tuple(p.shape[i] for i in range(p.ndim))

    def _iter_params(self):
        h = self._handle("params")
        for i in range(lib.qf_qformer_num_params(h)):
            p = _native.qf_param()
            check(lib.qf_qformer_param(h, i, ctypes.byref(p)))
            yield p.name.decode(), p

    def params(self):
        """{transformers name: float32 copy of the parameter}."""
        return {n: np.ctypeslib.as_array(p.data, shape=self._pshape(p)).copy() for n, p in self._iter_params()}

    def set_frozen(self, frozen):
        """frozen=True: backward computes input gradients only."""
        lib.qf_qformer_set_frozen(self._handle("set_frozen"), 1 if frozen else 0)

    def zero_grad(self):
        lib.qf_qformer_zero_grad(self._handle("zero_grad"))
