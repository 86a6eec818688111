"""qfuse.fusion - the two fusion models over a model folder (config.json + model.safetensors):
AffectGPT's audio+face pre-fusion (src/models/prefusion.c) and the BLIP-2 Q-Former with KV-prefix
modulation (src/models/kvprefix.c).

    from qfuse.fusion import Prefusion, KVPrefix
    m = Prefusion.load("affectgpt-folder")
    tok = m.fuse(audio=a, face=f, audio_mask=am, face_mask=fm)   # [B, nq, llm_hidden_size]
    g = m.backward(grad_tok)          # {"audio", "face", checkpoint name: grad, ...}
    maps = m.cross_attention_maps()   # per cross layer [B, heads, nq, tf+ta] (face keys first)

    k = KVPrefix.load("kvprefix-folder")
    q = k.fuse(encoder_hidden_states=enc, global_feature=g)    # [B, nq, hidden]
    g = k.backward(grad_q)            # {"encoder_hidden_states", "global_feature", "query_embeds", ...}
    maps = k.cross_attention_maps()   # per cross layer [B, heads, nq, P+S] (prefix keys first)
    llm = k.project(q)                # language_projection, when the checkpoint has one

Masks: audio_mask [B,ta] / face_mask [B,tf], True (nonzero) = a real frame. Padded frames are
masked out of the cross-attention keys only; position ids run over the padded layout
0..tf+ta-1 (see src/models/prefusion.c). encoder_attention_mask [B,S] likewise (1 = attend).

Invariants of this module:
- Inputs are converted to C-contiguous float32 (masks to uint8) and checked against the loaded
  config here, with messages naming the argument, its shape and the expected one; the rest is
  checked in C (its message comes back in QfuseError).
- backward differentiates the last fuse(); a later qformer() call (which overwrites the
  Q-Former's state) makes it raise instead of returning gradients of something else.
- Gradients returned are this call's alone (zeroed before each backward; the C side
  accumulates), copies keyed by checkpoint name. The Q-Former's parameters are named
  "multi_Qformer." / "qformer." + transformers' Blip2QFormerModel names, whichever names the
  file used (LAVIS "bert.encoder.layer.N.attention.self.query" is reported as
  "encoder.layer.N.attention.attention.query").
"""
import ctypes
import json
import os
from ctypes import c_char_p, c_int, c_int64, c_void_p

import numpy as np

from . import _native
from ._native import QfuseError, check, lib
from .blip2 import qf_qformer_args, qf_qformer_config

__all__ = ["Prefusion", "KVPrefix"]

P = ctypes.POINTER


class qf_prefusion_config(ctypes.Structure):
    _fields_ = [("audio_dim", c_int64), ("video_dim", c_int64), ("max_hidden_size", c_int64),
                ("num_multi_query_token", c_int64), ("position_embedding_size", c_int64),
                ("llm_hidden_size", c_int64), ("face_first", c_int)]


class qf_prefusion_args(ctypes.Structure):
    _fields_ = [("B", c_int64), ("audio_len", c_int64), ("face_len", c_int64),
                ("audio_mask", c_void_p), ("face_mask", c_void_p)]


class qf_kvprefix_shape(ctypes.Structure):
    _fields_ = [("hidden_size", c_int64), ("num_query_tokens", c_int64),
                ("num_prefix_tokens", c_int64), ("prefix_feature_dim", c_int64),
                ("projection_dim", c_int64)]


_native.declare({
    "qf_prefusion_load": (c_int, [c_char_p, P(c_void_p)]),
    "qf_prefusion_free": (None, [c_void_p]),
    "qf_prefusion_get_config": (c_int, [c_void_p, P(qf_prefusion_config)]),
    "qf_prefusion_forward": (c_int, [c_void_p, P(qf_prefusion_args), c_void_p, c_void_p, c_void_p]),
    "qf_prefusion_backward": (c_int, [c_void_p, c_void_p, c_void_p, c_void_p]),
    "qf_prefusion_num_params": (c_int, [c_void_p]),
    "qf_prefusion_param": (c_int, [c_void_p, c_int, P(_native.qf_param)]),
    "qf_prefusion_zero_grad": (None, [c_void_p]),
    "qf_prefusion_qformer": (c_void_p, [c_void_p]),
    "qf_prefusion_to_device": (c_int, [c_void_p, c_char_p, c_int]),
    "qf_kvprefix_load": (c_int, [c_char_p, P(c_void_p)]),
    "qf_kvprefix_free": (None, [c_void_p]),
    "qf_kvprefix_get_shape": (c_int, [c_void_p, P(qf_kvprefix_shape)]),
    "qf_kvprefix_forward": (c_int, [c_void_p, P(qf_qformer_args), c_void_p, c_void_p, c_void_p,
                                    c_void_p]),
    "qf_kvprefix_project": (c_int, [c_void_p, c_int64, c_void_p, c_void_p]),
    "qf_kvprefix_project_backward": (c_int, [c_void_p, c_int64, c_void_p, c_void_p, c_void_p]),
    "qf_kvprefix_backward": (c_int, [c_void_p, c_void_p, c_void_p, c_void_p, c_void_p]),
    "qf_kvprefix_num_params": (c_int, [c_void_p]),
    "qf_kvprefix_param": (c_int, [c_void_p, c_int, P(_native.qf_param)]),
    "qf_kvprefix_zero_grad": (None, [c_void_p]),
    "qf_kvprefix_qformer": (c_void_p, [c_void_p]),
    "qf_kvprefix_to_device": (c_int, [c_void_p, c_char_p, c_int]),
    "qf_qformer_get_config": (c_int, [c_void_p, P(qf_qformer_config)]),
    "qf_qformer_forward": (c_int, [c_void_p, P(qf_qformer_args), c_void_p, c_void_p, c_void_p]),
    "qf_qformer_num_cross_layers": (c_int, [c_void_p]),
    "qf_qformer_cross_attention": (c_int, [c_void_p, c_int, c_int, c_void_p]),
})


def _ptr(a):
    return None if a is None else a.ctypes.data


def _shape(a):
    return "[" + ",".join(str(d) for d in np.shape(a)) + "]"


def _f32(x, what):
    a = np.asarray(x)
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise QfuseError("%s has dtype %s; expected a float array" % (what, a.dtype), "QF_ERR_DTYPE")
    return np.ascontiguousarray(a, dtype=np.float32)


def _mask(x, what, shape, meaning):
    a = np.asarray(x)
    if a.shape != tuple(shape):
        raise QfuseError("%s has shape %s; expected [%s] (%s)" % (
            what, _shape(a), ",".join(map(str, shape)), meaning), "QF_ERR_SHAPE")
    if not (a.dtype == np.bool_ or np.issubdtype(a.dtype, np.integer)
            or np.issubdtype(a.dtype, np.floating)):
        raise QfuseError("%s has dtype %s; expected bool or 0/1 numbers (1 = real / attend)"
                         % (what, a.dtype), "QF_ERR_DTYPE")
    return np.ascontiguousarray(a != 0, dtype=np.uint8)


def _seq(x, what, width, width_key):
    """A [B,T,width] float32 array (T may be 0), or QfuseError naming the width's config key."""
    a = _f32(x, what)
    if a.ndim != 3 or a.shape[0] < 1:
        raise QfuseError("%s has shape %s; expected [B,T,%d]" % (what, _shape(a), width), "QF_ERR_SHAPE")
    if a.shape[2] != width:
        raise QfuseError("%s has shape %s: feature width %d differs from the checkpoint's %s = %d"
                         % (what, _shape(a), a.shape[2], width_key, width), "QF_ERR_SHAPE")
    return a


class _Model:
    """What both models share: handle lifetime, parameters, attention maps, the raw Q-Former."""
    _prefix = ""
    _free = None
    _num_params = _param = _zero_grad = None

    def __init__(self, handle, folder, qhandle):
        self._h = handle
        self.folder = folder
        self._qh = qhandle
        qc = qf_qformer_config()
        check(lib.qf_qformer_get_config(qhandle, ctypes.byref(qc)))
        self.qformer_config = {f: getattr(qc, f) for f, _ in qf_qformer_config._fields_}
        self.hidden_size = qc.hidden_size
        self.encoder_hidden_size = qc.encoder_hidden_size
        with open(os.path.join(folder, "config.json")) as f:
            self.config = json.load(f)
        self._state = None      # shape info of the last fuse(), None once overwritten
        self._maps_shape = None  # (B, Lq, keys) of the last Q-Former forward

    def close(self):
        h, self._h = getattr(self, "_h", None), None
        if h:
            type(self)._free(h)

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
            raise QfuseError("%s.%s: used after close()" % (type(self).__name__, fn))
        return self._h

    # ---- parameters ----
    def _params(self):
        h = self._handle("parameters")
        cls = type(self)
        for i in range(cls._num_params(h)):
            p = _native.qf_param()
            check(cls._param(h, i, ctypes.byref(p)))
            yield p.name.decode(), p

    def parameter_names(self):
        return [n for n, _ in self._params()]

    def parameter(self, name):
        """A copy of one parameter by checkpoint name."""
        for n, p in self._params():
            if n == name:
                return np.ctypeslib.as_array(p.data, tuple(p.shape[:p.ndim])).copy()
        raise QfuseError("%s.parameter: no parameter named %r" % (type(self).__name__, name),
                         "QF_ERR_NOT_FOUND")

    def state_dict(self):
        return {n: np.ctypeslib.as_array(p.data, tuple(p.shape[:p.ndim])).copy()
                for n, p in self._params()}

    def _grads(self):
        return {n: np.ctypeslib.as_array(p.grad, tuple(p.shape[:p.ndim])).copy()
                for n, p in self._params() if p.grad}

    # ---- the raw Q-Former and its maps ----
    def qformer(self, query_embeds=None, encoder_hidden_states=None, encoder_attention_mask=None):
        """The inner Q-Former alone (no fusion inputs, no prefix): last_hidden_state
        [B, Lq, hidden]. query_embeds None = the model's query tokens. Replaces the state that
        backward() needs."""
        self._handle("qformer")
        fn = type(self).__name__ + ".qformer"
        if encoder_hidden_states is None:
            raise QfuseError("%s: encoder_hidden_states is required" % fn)
        enc = _seq(encoder_hidden_states, fn + ": encoder_hidden_states", self.encoder_hidden_size,
                   "encoder width")
        B, S = enc.shape[0], enc.shape[1]
        q = self._queries(query_embeds, B, fn)
        emask = None if encoder_attention_mask is None else _mask(
            encoder_attention_mask, fn + ": encoder_attention_mask", (B, S), "B, S of encoder_hidden_states")
        a = qf_qformer_args()
        a.B, a.num_queries, a.encoder_len = B, q.shape[1], S
        a.encoder_attention_mask = _ptr(emask)
        out = np.empty((B, q.shape[1], self.hidden_size), np.float32)
        self._state = self._maps_shape = None
        check(lib.qf_qformer_forward(self._qh, ctypes.byref(a), _ptr(q), _ptr(enc), _ptr(out)))
        self._maps_shape = (B, q.shape[1], S)
        return out

    def _queries(self, query_embeds, B, fn):
        if query_embeds is None:
            qt = self.parameter(self._query_name)
            return np.ascontiguousarray(np.broadcast_to(qt, (B,) + qt.shape[1:]), np.float32)
        q = _f32(query_embeds, fn + ": query_embeds")
        if q.ndim != 3 or q.shape[0] != B or q.shape[2] != self.hidden_size or q.shape[1] < 1:
            raise QfuseError("%s: query_embeds has shape %s; expected [B,Lq,%d] with B = %d"
                             % (fn, _shape(q), self.hidden_size, B), "QF_ERR_SHAPE")
        return q

    def cross_attention_maps(self, average=False):
        """Cross-attention probabilities of the last forward, one array per cross-attention
        layer: [B, heads, Lq, keys], or [B, Lq, keys] when average."""
        self._handle("cross_attention_maps")
        if self._maps_shape is None:
            raise QfuseError("%s.cross_attention_maps: no forward yet" % type(self).__name__)
        B, Lq, K = self._maps_shape
        nh = self.qformer_config["num_attention_heads"]
        maps = []
        for layer in range(lib.qf_qformer_num_cross_layers(self._qh)):
            w = np.empty((B, Lq, K) if average else (B, nh, Lq, K), np.float32)
            check(lib.qf_qformer_cross_attention(self._qh, layer, 1 if average else 0, _ptr(w)))
            maps.append(w)
        return maps


class Prefusion(_Model):
    """AffectGPT pre-fusion: audio [B,ta,audio_dim] + face [B,tf,video_dim] -> [B,nq,llm]."""
    _free = staticmethod(lambda h: lib.qf_prefusion_free(h))
    _num_params = staticmethod(lambda h: lib.qf_prefusion_num_params(h))
    _param = staticmethod(lambda h, i, p: lib.qf_prefusion_param(h, i, p))
    _query_name = "multi_query_tokens"

    def __init__(self, handle, folder):
        super().__init__(handle, folder, lib.qf_prefusion_qformer(handle))
        c = qf_prefusion_config()
        check(lib.qf_prefusion_get_config(handle, ctypes.byref(c)))
        self.audio_dim, self.video_dim = c.audio_dim, c.video_dim
        self.max_hidden_size = c.max_hidden_size
        self.num_query_tokens = c.num_multi_query_token
        self.position_embedding_size = c.position_embedding_size
        self.llm_hidden_size = c.llm_hidden_size
        self.fusion_order = ["face", "audio"] if c.face_first else ["audio", "face"]

    @classmethod
    def load(cls, folder):
        """Loads FOLDER/config.json (model_type "affectgpt_prefusion") and its weights."""
        h = c_void_p()
        check(lib.qf_prefusion_load(os.fsencode(os.fspath(folder)), ctypes.byref(h)))
        return cls(h.value, os.fspath(folder))

    def to(self, device="cpu", dtype="float32"):
        """The whole pre-fusion forward on device "cpu" or "cuda" (dtype "bfloat16": bf16 GEMM
        weights, cuda only); backward runs where the model is (float32 weights only). Returns
        self."""
        from .qformer import _DTYPES
        if device not in ("cpu", "cuda") or dtype not in _DTYPES:
            raise QfuseError('Prefusion.to: device = %r, dtype = %r; expected "cpu"/"cuda" and '
                             '"float32"/"bfloat16"' % (device, dtype), "QF_ERR_ARG")
        check(lib.qf_prefusion_to_device(self._h, device.encode(), _DTYPES[dtype]))
        return self

    def fuse(self, audio=None, face=None, audio_mask=None, face_mask=None):
        """-> LLM-space tokens [B, num_multi_query_token, llm_hidden_size]. Either modality may
        be None (or have 0 frames), not both."""
        h = self._handle("fuse")
        fn = "Prefusion.fuse"
        a = None if audio is None else _seq(audio, fn + ": audio", self.audio_dim, "audio_dim")
        f = None if face is None else _seq(face, fn + ": face", self.video_dim, "video_dim")
        if a is None and f is None:
            raise QfuseError("%s: give audio, face or both" % fn)
        if a is not None and f is not None and a.shape[0] != f.shape[0]:
            raise QfuseError("%s: audio has shape %s but face %s: batch sizes differ"
                             % (fn, _shape(a), _shape(f)), "QF_ERR_SHAPE")
        B = (a if a is not None else f).shape[0]
        ta = 0 if a is None else a.shape[1]
        tf = 0 if f is None else f.shape[1]
        if ta + tf < 1:
            raise QfuseError("%s: no frames (audio and face both have length 0)" % fn, "QF_ERR_SHAPE")
        if ta + tf > self.position_embedding_size:
            raise QfuseError("%s: %d face + %d audio frames exceed position_embedding_size = %d"
                             % (fn, tf, ta, self.position_embedding_size), "QF_ERR_SHAPE")
        am = fm = None
        if audio_mask is not None:
            if a is None:
                raise QfuseError("%s: audio_mask given without audio" % fn)
            am = _mask(audio_mask, fn + ": audio_mask", (B, ta), "B, ta of audio")
        if face_mask is not None:
            if f is None:
                raise QfuseError("%s: face_mask given without face" % fn)
            fm = _mask(face_mask, fn + ": face_mask", (B, tf), "B, tf of face")
        args = qf_prefusion_args()
        args.B, args.audio_len, args.face_len = B, ta, tf
        args.audio_mask, args.face_mask = _ptr(am), _ptr(fm)
        out = np.empty((B, self.num_query_tokens, self.llm_hidden_size), np.float32)
        self._state = self._maps_shape = None
        check(lib.qf_prefusion_forward(h, ctypes.byref(args), _ptr(a), _ptr(f), _ptr(out)))
        self._state = (B, ta, tf)
        self._maps_shape = (B, self.num_query_tokens, ta + tf)
        return out

    __call__ = fuse

    def backward(self, grad_out):
        """Gradients of sum(fuse(...) * grad_out) for the last fuse(): {"audio": [B,ta,audio_dim],
        "face": [B,tf,video_dim] (for the modalities given), checkpoint name: gradient}."""
        h = self._handle("backward")
        fn = "Prefusion.backward"
        if self._state is None:
            raise QfuseError("%s: no fuse() to differentiate (or a later qformer() call replaced "
                             "its state)" % fn)
        B, ta, tf = self._state
        g = _f32(grad_out, fn + ": grad_out")
        want = (B, self.num_query_tokens, self.llm_hidden_size)
        if g.shape != want:
            raise QfuseError("%s: grad_out has shape %s; expected [%s] (the last fuse's output)"
                             % (fn, _shape(g), ",".join(map(str, want))), "QF_ERR_SHAPE")
        ga = np.empty((B, ta, self.audio_dim), np.float32) if ta else None
        gf = np.empty((B, tf, self.video_dim), np.float32) if tf else None
        lib.qf_prefusion_zero_grad(h)
        check(lib.qf_prefusion_backward(h, _ptr(g), _ptr(ga), _ptr(gf)))
        out = self._grads()
        if ga is not None:
            out["audio"] = ga
        if gf is not None:
            out["face"] = gf
        return out


class KVPrefix(_Model):
    """BLIP-2 Q-Former with KV-prefix modulation by a global feature [B, prefix_feature_dim]."""
    _free = staticmethod(lambda h: lib.qf_kvprefix_free(h))
    _num_params = staticmethod(lambda h: lib.qf_kvprefix_num_params(h))
    _param = staticmethod(lambda h, i, p: lib.qf_kvprefix_param(h, i, p))
    _query_name = "query_tokens"

    def __init__(self, handle, folder):
        super().__init__(handle, folder, lib.qf_kvprefix_qformer(handle))
        s = qf_kvprefix_shape()
        check(lib.qf_kvprefix_get_shape(handle, ctypes.byref(s)))
        self.num_query_tokens = s.num_query_tokens
        self.num_prefix_tokens = s.num_prefix_tokens
        self.prefix_feature_dim = s.prefix_feature_dim
        self.projection_dim = s.projection_dim

    @classmethod
    def load(cls, folder):
        """Loads FOLDER/config.json (model_type "blip2_kv_prefix") and its weights."""
        h = c_void_p()
        check(lib.qf_kvprefix_load(os.fsencode(os.fspath(folder)), ctypes.byref(h)))
        return cls(h.value, os.fspath(folder))

    def to(self, device="cpu", dtype="float32"):
        """The whole KV-prefix forward (global-feature MLP, prefix K/V, Q-Former) and project()
        on device "cpu" or "cuda" (dtype "bfloat16": bf16 GEMM weights, cuda only); backward
        and project_backward run where the model is (float32 weights only). Returns self."""
        from .qformer import _DTYPES
        if device not in ("cpu", "cuda") or dtype not in _DTYPES:
            raise QfuseError('KVPrefix.to: device = %r, dtype = %r; expected "cpu"/"cuda" and '
                             '"float32"/"bfloat16"' % (device, dtype), "QF_ERR_ARG")
        check(lib.qf_kvprefix_to_device(self._handle("to"), device.encode(), _DTYPES[dtype]))
        return self

    def fuse(self, encoder_hidden_states=None, global_feature=None, query_embeds=None,
             encoder_attention_mask=None):
        """-> Q-Former last_hidden_state [B, Lq, hidden] (Lq = num_query_tokens unless
        query_embeds [B,Lq,hidden] is given)."""
        h = self._handle("fuse")
        fn = "KVPrefix.fuse"
        if encoder_hidden_states is None or global_feature is None:
            raise QfuseError("%s: encoder_hidden_states and global_feature are required" % fn)
        enc = _seq(encoder_hidden_states, fn + ": encoder_hidden_states", self.encoder_hidden_size,
                   "qformer_config.encoder_hidden_size")
        B, S = enc.shape[0], enc.shape[1]
        if S < 1:
            raise QfuseError("%s: encoder_hidden_states has shape %s; S must be >= 1" % (fn, _shape(enc)),
                             "QF_ERR_SHAPE")
        g = _f32(global_feature, fn + ": global_feature")
        if g.shape != (B, self.prefix_feature_dim):
            raise QfuseError("%s: global_feature has shape %s; expected [B,%d] = [%d,%d] "
                             "(prefix_feature_dim)" % (fn, _shape(g), self.prefix_feature_dim, B,
                                                       self.prefix_feature_dim), "QF_ERR_SHAPE")
        q = None if query_embeds is None else self._queries(query_embeds, B, fn)
        Lq = self.num_query_tokens if q is None else q.shape[1]
        emask = None if encoder_attention_mask is None else _mask(
            encoder_attention_mask, fn + ": encoder_attention_mask", (B, S), "B, S of encoder_hidden_states")
        a = qf_qformer_args()
        a.B, a.num_queries, a.encoder_len = B, Lq, S
        a.encoder_attention_mask = _ptr(emask)
        out = np.empty((B, Lq, self.hidden_size), np.float32)
        self._state = self._maps_shape = None
        check(lib.qf_kvprefix_forward(h, ctypes.byref(a), _ptr(g), _ptr(q), _ptr(enc), _ptr(out)))
        self._state = (B, Lq, S, q is not None)
        self._maps_shape = (B, Lq, self.num_prefix_tokens + S)
        return out

    __call__ = fuse

    def project(self, tokens):
        """language_projection: [..., hidden] -> [..., projection_dim]."""
        h = self._handle("project")
        if not self.projection_dim:
            raise QfuseError("KVPrefix.project: the checkpoint has no language_projection",
                             "QF_ERR_NOT_FOUND")
        x = _f32(tokens, "KVPrefix.project: tokens")
        if x.ndim < 1 or x.shape[-1] != self.hidden_size:
            raise QfuseError("KVPrefix.project: tokens has shape %s; the last dim must be %d"
                             % (_shape(x), self.hidden_size), "QF_ERR_SHAPE")
        rows = int(np.prod(x.shape[:-1]))
        out = np.empty(x.shape[:-1] + (self.projection_dim,), np.float32)
        check(lib.qf_kvprefix_project(h, rows, _ptr(x), _ptr(out)))
        return out

    def project_backward(self, tokens, grad_out):
        """Gradients of sum(project(tokens) * grad_out): (grad_tokens [..., hidden],
        {"language_projection.weight": ..., "language_projection.bias": ...}). Chain it in front
        of backward() to train through the projection. Like backward(), it starts from zeroed
        parameter gradients."""
        h = self._handle("project_backward")
        fn = "KVPrefix.project_backward"
        if not self.projection_dim:
            raise QfuseError("%s: the checkpoint has no language_projection" % fn, "QF_ERR_NOT_FOUND")
        x = _f32(tokens, fn + ": tokens")
        if x.ndim < 1 or x.shape[-1] != self.hidden_size:
            raise QfuseError("%s: tokens has shape %s; the last dim must be %d"
                             % (fn, _shape(x), self.hidden_size), "QF_ERR_SHAPE")
        g = _f32(grad_out, fn + ": grad_out")
        if g.shape != x.shape[:-1] + (self.projection_dim,):
            raise QfuseError("%s: grad_out has shape %s; expected %s" % (fn, _shape(g), _shape(
                np.empty(x.shape[:-1] + (self.projection_dim,)))), "QF_ERR_SHAPE")
        rows = int(np.prod(x.shape[:-1]))
        gx = np.empty(x.shape, np.float32)
        lib.qf_kvprefix_zero_grad(h)
        check(lib.qf_kvprefix_project_backward(h, rows, _ptr(x), _ptr(g), _ptr(gx)))
        grads = self._grads()
        return gx, {k: grads[k] for k in ("language_projection.weight", "language_projection.bias")}

    def backward(self, grad_out):
        """Gradients of sum(fuse(...) * grad_out) for the last fuse(): {"encoder_hidden_states",
        "global_feature", "query_embeds" ([B,Lq,hidden], also when the model's own query tokens
        were used), checkpoint name: gradient}."""
        h = self._handle("backward")
        fn = "KVPrefix.backward"
        if self._state is None:
            raise QfuseError("%s: no fuse() to differentiate (or a later qformer() call replaced "
                             "its state)" % fn)
        B, Lq, S, _ = self._state
        g = _f32(grad_out, fn + ": grad_out")
        want = (B, Lq, self.hidden_size)
        if g.shape != want:
            raise QfuseError("%s: grad_out has shape %s; expected [%s] (the last fuse's output)"
                             % (fn, _shape(g), ",".join(map(str, want))), "QF_ERR_SHAPE")
        genc = np.empty((B, S, self.encoder_hidden_size), np.float32)
        gg = np.empty((B, self.prefix_feature_dim), np.float32)
        gq = np.empty((B, Lq, self.hidden_size), np.float32)
        lib.qf_kvprefix_zero_grad(h)
        check(lib.qf_kvprefix_backward(h, _ptr(g), _ptr(gg), _ptr(gq), _ptr(genc)))
        out = self._grads()
        out.update({"encoder_hidden_states": genc, "global_feature": gg, "query_embeds": gq})
        return out
