"""qfuse.blip2 - BLIP-2 / InstructBLIP image -> LLM-space tokens (src/models/blip2.c, vision.c,
qformer.c) over a Hugging Face folder (config.json + model.safetensors, or a sharded checkpoint).

    from qfuse.blip2 import Blip2
    m = Blip2.load("Salesforce-blip2-folder")            # .to("cuda"[, "bfloat16"]): the fuse on the GPU
    vis = m.vision(pixel_values)                       # [B, 1 + patches, vision hidden]
    q = m.qformer(encoder_hidden_states=vis)           # model's query tokens -> [B, nq(+Lt), H]
    tok = m.fuse(pixel_values)                         # [B, num_query_tokens, text hidden]
    grads = m.fuse_backward(grad_tok)                  # {"pixel_values": ..., checkpoint name: ...}
    maps = m.cross_attention_maps(average=True)        # per cross-attention layer [B, nq, S]
    m.set_frozen(["vision"], True)

Invariants of this module:
- Inputs are converted to C-contiguous float32 (ids to int32, masks to uint8) and checked against
  the loaded config here, with messages naming the argument, its shape and the expected one;
  everything else is checked in C (its message comes back in QfuseError).
- The C model keeps one forward's state per part. fuse_backward differentiates the last fuse and
  vision_backward the last vision(); a later vision()/qformer()/fuse() call that overwrote that
  state makes them raise instead of returning gradients of something else.
- Gradients returned are this call's alone: parameter gradients are zeroed before each backward
  (the C side accumulates), and returned as copies keyed by checkpoint name.
"""
import ctypes
import os
from ctypes import c_char_p, c_double, c_int, c_int64, c_uint, c_void_p

import numpy as np

from . import _native
from ._native import QfuseError, check, lib
# One ctypes class per C struct across the package (argtypes name the class): the Q-Former's
# structs are qfuse.qformer's.
from .qformer import qf_qformer_args, qf_qformer_config

__all__ = ["Blip2"]

P = ctypes.POINTER


class qf_vision_config(ctypes.Structure):
    _fields_ = [("hidden_size", c_int64), ("intermediate_size", c_int64),
                ("num_hidden_layers", c_int64), ("num_attention_heads", c_int64),
                ("image_size", c_int64), ("patch_size", c_int64), ("num_channels", c_int64),
                ("layer_norm_eps", c_double), ("hidden_act", c_int)]


_native.declare({
    "qf_blip2_load": (c_int, [c_char_p, P(c_void_p)]),
    "qf_blip2_free": (None, [c_void_p]),
    "qf_blip2_vision": (c_void_p, [c_void_p]),
    "qf_blip2_qformer": (c_void_p, [c_void_p]),
    "qf_blip2_num_query_tokens": (c_int64, [c_void_p]),
    "qf_blip2_projection_dim": (c_int64, [c_void_p]),
    "qf_blip2_fuse": (c_int, [c_void_p, c_int64, c_void_p, c_int64, c_void_p, c_void_p, c_void_p]),
    "qf_blip2_backward": (c_int, [c_void_p, c_void_p, c_void_p]),
    "qf_blip2_num_params": (c_int, [c_void_p]),
    "qf_blip2_param": (c_int, [c_void_p, c_int, P(_native.qf_param)]),
    "qf_blip2_zero_grad": (None, [c_void_p]),
    "qf_blip2_set_frozen": (None, [c_void_p, c_uint, c_int]),
    "qf_vision_get_config": (c_int, [c_void_p, P(qf_vision_config)]),
    "qf_vision_num_tokens": (c_int64, [c_void_p]),
    "qf_vision_forward": (c_int, [c_void_p, c_int64, c_void_p, c_void_p]),
    "qf_vision_backward": (c_int, [c_void_p, c_void_p, c_void_p]),
    "qf_vision_num_params": (c_int, [c_void_p]),
    "qf_vision_param": (c_int, [c_void_p, c_int, P(_native.qf_param)]),
    "qf_vision_zero_grad": (None, [c_void_p]),
    "qf_qformer_get_config": (c_int, [c_void_p, P(qf_qformer_config)]),
    "qf_qformer_forward": (c_int, [c_void_p, P(qf_qformer_args), c_void_p, c_void_p, c_void_p]),
    "qf_qformer_num_cross_layers": (c_int, [c_void_p]),
    "qf_qformer_cross_attention": (c_int, [c_void_p, c_int, c_int, c_void_p]),
    "qf_blip2_to_device": (c_int, [c_void_p, c_char_p, c_int]),
})

GROUPS = {"vision": 1, "qformer": 2, "query_tokens": 4, "projection": 8}


def _ptr(a):
    return None if a is None else a.ctypes.data


def _shape(a):
    return "[" + ",".join(str(d) for d in np.shape(a)) + "]"


def _f32(x, what):
    a = np.asarray(x)
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise QfuseError("%s has dtype %s; expected a float array" % (what, a.dtype), "QF_ERR_DTYPE")
    return np.ascontiguousarray(a, dtype=np.float32)


def _ids(x, what):
    a = np.asarray(x)
    if not np.issubdtype(a.dtype, np.integer):
        raise QfuseError("%s has dtype %s; expected integer token ids" % (what, a.dtype), "QF_ERR_DTYPE")
    return np.ascontiguousarray(a, dtype=np.int32)


def _mask(x, what, shape):
    a = np.asarray(x)
    if a.shape != shape:
        raise QfuseError("%s has shape %s; expected [%s]" % (what, _shape(a), ",".join(map(str, shape))),
                         "QF_ERR_SHAPE")
    if not (a.dtype == np.bool_ or np.issubdtype(a.dtype, np.integer)
            or np.issubdtype(a.dtype, np.floating)):
        raise QfuseError("%s has dtype %s; expected bool or 0/1 numbers (1 = attend)" % (what, a.dtype),
                         "QF_ERR_DTYPE")
    return np.ascontiguousarray(a != 0, dtype=np.uint8)


class Blip2:
    """A loaded BLIP-2 or InstructBLIP (vision tower, Q-Former, query tokens, projection)."""

    def __init__(self, handle, folder):
        self._h = handle
        self.folder = folder
        self._vh = lib.qf_blip2_vision(handle)
        self._qh = lib.qf_blip2_qformer(handle)
        vc = qf_vision_config()
        check(lib.qf_vision_get_config(self._vh, ctypes.byref(vc)))
        qc = qf_qformer_config()
        check(lib.qf_qformer_get_config(self._qh, ctypes.byref(qc)))
        self.vision_config = {f: getattr(vc, f) for f, _ in qf_vision_config._fields_}
        self.qformer_config = {f: getattr(qc, f) for f, _ in qf_qformer_config._fields_}
        self.image_size = vc.image_size
        self.num_channels = vc.num_channels
        self.vision_hidden_size = vc.hidden_size
        self.num_image_tokens = lib.qf_vision_num_tokens(self._vh)
        self.qformer_hidden_size = qc.hidden_size
        self.num_query_tokens = lib.qf_blip2_num_query_tokens(handle)
        self.projection_dim = lib.qf_blip2_projection_dim(handle)
        self._fuse_state = None     # (B, text_len) of the last fuse, None once overwritten
        self._vision_state = None   # B of the last vision() call
        self._qformer_shape = None  # (B, Lq, S) of the last Q-Former forward (for maps)
        self.device, self.dtype = "cpu", "float32"

    @classmethod
    def load(cls, folder):
        """Loads FOLDER/config.json (model_type "blip-2" or "instructblip") and its weights."""
        h = c_void_p()
        check(lib.qf_blip2_load(os.fsencode(os.fspath(folder)), ctypes.byref(h)))
        return cls(h.value, os.fspath(folder))

    def to(self, device="cpu", dtype="float32"):
        """The whole fuse (vision tower, Q-Former, query tokens, language_projection) on device
        "cpu" or "cuda" (dtype "bfloat16": bf16 GEMM weights, cuda only); vision() and qformer()
        run there too, backward and vision_backward as well with float32 weights (bf16 weights are
        forward only); the attention maps need the CPU. Returns self."""
        from .qformer import _DTYPES
        if device not in ("cpu", "cuda") or dtype not in _DTYPES:
            raise QfuseError('Blip2.to: device = %r, dtype = %r; expected "cpu"/"cuda" and '
                             '"float32"/"bfloat16"' % (device, dtype), "QF_ERR_ARG")
        h = self._handle("to")
        self._fuse_state = self._vision_state = self._qformer_shape = None
        check(lib.qf_blip2_to_device(h, device.encode(), _DTYPES[dtype]))
        self.device, self.dtype = device, dtype
        return self

    # ---- lifetime ----
    def close(self):
        h, self._h = getattr(self, "_h", None), None
        if h:
            lib.qf_blip2_free(h)

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
            raise QfuseError("Blip2.%s: used after close()" % fn)
        return self._h

    # ---- checks ----
    def _pixels(self, pixel_values, fn):
        px = _f32(pixel_values, "%s: pixel_values" % fn)
        C, S = self.num_channels, self.image_size
        if px.ndim != 4:
            raise QfuseError("%s: pixel_values has shape %s (rank %d); expected [B,%d,%d,%d]"
                             % (fn, _shape(px), px.ndim, C, S, S), "QF_ERR_SHAPE")
        if px.shape[0] < 1:
            raise QfuseError("%s: pixel_values has shape %s; the batch is empty" % (fn, _shape(px)),
                             "QF_ERR_SHAPE")
        if px.shape[1] != C:
            raise QfuseError("%s: pixel_values has shape %s; the model takes %d channels (dim 1), "
                             "not %d" % (fn, _shape(px), C, px.shape[1]), "QF_ERR_SHAPE")
        if px.shape[2] != S or px.shape[3] != S:
            raise QfuseError("%s: pixel_values has shape %s; the model takes %dx%d images "
                             "(vision_config.image_size = %d), not %dx%d"
                             % (fn, _shape(px), S, S, S, px.shape[2], px.shape[3]), "QF_ERR_SHAPE")
        return px

    def _text(self, ids, mask, B, fn):
        if ids is None:
            if mask is not None:
                raise QfuseError("%s: qformer_attention_mask given without qformer_input_ids" % fn)
            return None, None, 0
        t = _ids(ids, "%s: qformer_input_ids" % fn)
        if t.ndim == 1:
            t = t[None]
        if t.ndim != 2 or t.shape[0] != B:
            raise QfuseError("%s: qformer_input_ids has shape %s; expected [B,Lt] with B = %d"
                             % (fn, _shape(ids), B), "QF_ERR_SHAPE")
        m = None
        if mask is not None:
            mk = np.asarray(mask)
            if np.ndim(ids) == 1 and mk.ndim == 1:
                mk = mk[None]
            m = _mask(mk, "%s: qformer_attention_mask" % fn, t.shape)
        return t, m, t.shape[1]

    # ---- forward ----
    def vision(self, pixel_values):
        """pixel_values [B,C,S,S] -> vision last_hidden_state [B, 1 + patches, vision hidden]."""
        self._handle("vision")
        px = self._pixels(pixel_values, "Blip2.vision")
        B = px.shape[0]
        out = np.empty((B, self.num_image_tokens, self.vision_hidden_size), np.float32)
        self._fuse_state = None
        self._vision_state = None
        check(lib.qf_vision_forward(self._vh, B, _ptr(px), _ptr(out)))
        self._vision_state = B
        return out

    def qformer(self, query_embeds=None, encoder_hidden_states=None, encoder_attention_mask=None,
                qformer_input_ids=None, qformer_attention_mask=None):
        """Q-Former last_hidden_state [B, nq + Lt, qformer hidden] (query rows first).
        query_embeds None = the model's query tokens expanded over the batch."""
        self._handle("qformer")
        fn = "Blip2.qformer"
        if encoder_hidden_states is None:
            raise QfuseError("%s: encoder_hidden_states is required" % fn)
        enc = _f32(encoder_hidden_states, fn + ": encoder_hidden_states")
        if enc.ndim != 3 or enc.shape[2] != self.vision_hidden_size or enc.shape[0] < 1 or enc.shape[1] < 1:
            raise QfuseError("%s: encoder_hidden_states has shape %s; expected [B,S,%d] "
                             "(qformer_config.encoder_hidden_size)"
                             % (fn, _shape(enc), self.vision_hidden_size), "QF_ERR_SHAPE")
        B, S = enc.shape[0], enc.shape[1]
        H = self.qformer_hidden_size
        if query_embeds is None:
            qt = self.parameter("query_tokens")
            q = np.ascontiguousarray(np.broadcast_to(qt, (B,) + qt.shape[1:]), np.float32)
        else:
            q = _f32(query_embeds, fn + ": query_embeds")
            if q.ndim != 3 or q.shape[0] != B or q.shape[2] != H or q.shape[1] < 1:
                raise QfuseError("%s: query_embeds has shape %s; expected [B,Lq,%d] with B = %d "
                                 "(encoder_hidden_states %s)" % (fn, _shape(q), H, B, _shape(enc)),
                                 "QF_ERR_SHAPE")
        emask = None
        if encoder_attention_mask is not None:
            emask = _mask(encoder_attention_mask, fn + ": encoder_attention_mask", (B, S))
        ids, tmask, Lt = self._text(qformer_input_ids, qformer_attention_mask, B, fn)
        Lq = q.shape[1]
        a = qf_qformer_args()
        a.B, a.num_queries, a.encoder_len = B, Lq, S
        a.encoder_attention_mask = _ptr(emask)
        a.text_len, a.text_ids, a.text_attention_mask = Lt, _ptr(ids), _ptr(tmask)
        out = np.empty((B, Lq + Lt, H), np.float32)
        self._fuse_state = None
        self._qformer_shape = None
        check(lib.qf_qformer_forward(self._qh, ctypes.byref(a), _ptr(q), _ptr(enc), _ptr(out)))
        self._qformer_shape = (B, Lq, S)
        return out

    def fuse(self, pixel_values, qformer_input_ids=None, qformer_attention_mask=None):
        """Image (+ InstructBLIP instruction ids [B,Lt]) -> LLM-space tokens [B, nq, text hidden]."""
        h = self._handle("fuse")
        fn = "Blip2.fuse"
        px = self._pixels(pixel_values, fn)
        B = px.shape[0]
        ids, tmask, Lt = self._text(qformer_input_ids, qformer_attention_mask, B, fn)
        out = np.empty((B, self.num_query_tokens, self.projection_dim), np.float32)
        self._fuse_state = self._vision_state = self._qformer_shape = None
        check(lib.qf_blip2_fuse(h, B, _ptr(px), Lt, _ptr(ids), _ptr(tmask), _ptr(out)))
        self._fuse_state = (B, Lt)
        self._qformer_shape = (B, self.num_query_tokens, self.num_image_tokens)
        return out

    __call__ = fuse

    # ---- backward ----
    def _grads(self, names=None, prefix=None):
        out = {}
        for name, p in self._params():
            if p.grad and (prefix is None or name.startswith(prefix)):
                out[name] = np.ctypeslib.as_array(p.grad, tuple(p.shape[:p.ndim])).copy()
        return out

    def fuse_backward(self, grad_out, pixel_grad=True):
        """Gradients of sum(fuse(...) * grad_out) for the last fuse: {"pixel_values": [B,C,S,S]
        (when pixel_grad), checkpoint name: gradient} for every parameter not frozen."""
        h = self._handle("fuse_backward")
        fn = "Blip2.fuse_backward"
        if self._fuse_state is None:
            raise QfuseError("%s: no fuse() to differentiate (or a later vision()/qformer() call "
                             "replaced its state)" % fn)
        B, _ = self._fuse_state
        g = _f32(grad_out, fn + ": grad_out")
        want = (B, self.num_query_tokens, self.projection_dim)
        if g.shape != want:
            raise QfuseError("%s: grad_out has shape %s; expected [%s] (the last fuse's output)"
                             % (fn, _shape(g), ",".join(map(str, want))), "QF_ERR_SHAPE")
        gpx = np.empty((B, self.num_channels, self.image_size, self.image_size), np.float32) \
            if pixel_grad else None
        lib.qf_blip2_zero_grad(h)
        check(lib.qf_blip2_backward(h, _ptr(g), _ptr(gpx)))
        out = self._grads()
        if pixel_grad:
            out["pixel_values"] = gpx
        return out

    def vision_backward(self, grad_out, pixel_grad=True):
        """Gradients of sum(vision(...) * grad_out) for the last vision() call: {"pixel_values",
        "vision_model.<name>": ...} (parameter gradients only while the vision group is not
        frozen)."""
        self._handle("vision_backward")
        fn = "Blip2.vision_backward"
        if self._vision_state is None:
            raise QfuseError("%s: no vision() call to differentiate (or a later fuse()/vision() "
                             "replaced its state)" % fn)
        B = self._vision_state
        g = _f32(grad_out, fn + ": grad_out")
        want = (B, self.num_image_tokens, self.vision_hidden_size)
        if g.shape != want:
            raise QfuseError("%s: grad_out has shape %s; expected [%s] (the last vision() output)"
                             % (fn, _shape(g), ",".join(map(str, want))), "QF_ERR_SHAPE")
        gpx = np.empty((B, self.num_channels, self.image_size, self.image_size), np.float32) \
            if pixel_grad else None
        lib.qf_vision_zero_grad(self._vh)
        check(lib.qf_vision_backward(self._vh, _ptr(g), _ptr(gpx)))
        out = self._grads(prefix="vision_model.")
        if pixel_grad:
            out["pixel_values"] = gpx
        return out

    # ---- attention maps ----
    def cross_attention_maps(self, average=False):
        """Cross-attention probabilities of the last Q-Former forward (fuse or qformer), one
        array per cross-attention layer: [B, heads, Lq, S], or [B, Lq, S] when average."""
        self._handle("cross_attention_maps")
        if self._qformer_shape is None:
            raise QfuseError("Blip2.cross_attention_maps: no Q-Former forward yet (call fuse() or "
                             "qformer() first)")
        B, Lq, S = self._qformer_shape
        nh = self.qformer_config["num_attention_heads"]
        maps = []
        for layer in range(lib.qf_qformer_num_cross_layers(self._qh)):
            shape = (B, Lq, S) if average else (B, nh, Lq, S)
            w = np.empty(shape, np.float32)
            check(lib.qf_qformer_cross_attention(self._qh, layer, 1 if average else 0, _ptr(w)))
            maps.append(w)
        return maps

    # ---- parameters ----
    def _params(self):
        h = self._handle("parameters")
        for i in range(lib.qf_blip2_num_params(h)):
            p = _native.qf_param()
            check(lib.qf_blip2_param(h, i, ctypes.byref(p)))
            yield p.name.decode(), p

    def parameter_names(self):
        return [name for name, _ in self._params()]

    def parameter(self, name):
        """A copy of one parameter by checkpoint name ("query_tokens", "vision_model....")."""
        for n, p in self._params():
            if n == name:
                return np.ctypeslib.as_array(p.data, tuple(p.shape[:p.ndim])).copy()
        raise QfuseError("Blip2.parameter: no parameter named %r" % name, "QF_ERR_NOT_FOUND")

    def state_dict(self):
        return {n: np.ctypeslib.as_array(p.data, tuple(p.shape[:p.ndim])).copy()
                for n, p in self._params()}

    def set_frozen(self, groups, frozen=True):
        """Freezes (no parameter gradients) or unfreezes groups: "vision", "qformer",
        "query_tokens", "projection" (a name, a list of names, or "all")."""
        h = self._handle("set_frozen")
        if isinstance(groups, str):
            groups = list(GROUPS) if groups == "all" else [groups]
        bits = 0
        for gname in groups:
            if gname not in GROUPS:
                raise QfuseError("Blip2.set_frozen: unknown group %r; expected one of %s or \"all\""
                                 % (gname, ", ".join('"%s"' % k for k in GROUPS)))
            bits |= GROUPS[gname]
        lib.qf_blip2_set_frozen(h, bits, 1 if frozen else 0)
