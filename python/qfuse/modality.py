"""qfuse.modality - AffectGPT's per-modality Q-Formers and its "attention" multi-fusion
(src/models/modality_qformer.c), over a model folder (config.json + model.safetensors).

    from qfuse.modality import ModalityQFormer, AttentionFusion
    m = ModalityQFormer.load("video-folder")      # model_type affectgpt_video_qformer / _audio_
    tok = m.fuse(frames, frame_mask=fm)           # frames [B,T,D] or [B,T,K,D] -> [B,nq,llm]
    g = m.backward(grad_tok)                      # {"frames", checkpoint name: grad, ...}
    maps = m.cross_attention_maps()               # per cross layer [B, heads, nq, T*K]

    f = AttentionFusion.load("attn-folder")       # model_type affectgpt_attention_fusion
    tok = f.fuse(audio=a, face=v, audio_mask=am, face_mask=fm)   # [B, nq, llm] (nq equal rows)
    w = f.modality_weights()                      # [B,2] (face, audio) of the last fuse
    g = f.backward(grad_tok)                      # {"audio", "face", checkpoint name: grad}

Invariants of this module:
- Inputs are converted to C-contiguous float32 (masks to uint8) and checked against the loaded
  config here, with messages naming the argument, its shape and the expected one.
- backward differentiates the last fuse(); gradients returned are this call's alone (zeroed
  before each backward), copies keyed by checkpoint name (the Q-Former's under
  "video_Qformer." / "audio_Qformer." + the file's own names).
"""
import ctypes
import os
from ctypes import c_char_p, c_int, c_int64, c_void_p

import numpy as np

from . import _native
from ._native import QfuseError, check, lib
from .fusion import _Model, _f32, _mask, _ptr, _seq, _shape, qf_prefusion_args
from .qformer import _DTYPES

__all__ = ["ModalityQFormer", "AttentionFusion"]

P = ctypes.POINTER


class qf_modality_qformer_config(ctypes.Structure):
    _fields_ = [("modality", c_int), ("input_dim", c_int64), ("num_query_token", c_int64),
                ("frame_position_size", c_int64), ("llm_hidden_size", c_int64)]


class qf_modality_qformer_args(ctypes.Structure):
    _fields_ = [("B", c_int64), ("frames", c_int64), ("tokens_per_frame", c_int64),
                ("frame_mask", c_void_p)]


class qf_attn_fusion_config(ctypes.Structure):
    _fields_ = [("audio_dim", c_int64), ("video_dim", c_int64), ("max_hidden_size", c_int64),
                ("num_multi_query_token", c_int64), ("llm_hidden_size", c_int64)]


_native.declare({
    "qf_modality_qformer_load": (c_int, [c_char_p, P(c_void_p)]),
    "qf_modality_qformer_free": (None, [c_void_p]),
    "qf_modality_qformer_get_config": (c_int, [c_void_p, P(qf_modality_qformer_config)]),
    "qf_modality_qformer_forward": (c_int, [c_void_p, P(qf_modality_qformer_args), c_void_p, c_void_p]),
    "qf_modality_qformer_backward": (c_int, [c_void_p, c_void_p, c_void_p]),
    "qf_modality_qformer_num_params": (c_int, [c_void_p]),
    "qf_modality_qformer_param": (c_int, [c_void_p, c_int, P(_native.qf_param)]),
    "qf_modality_qformer_zero_grad": (None, [c_void_p]),
    "qf_modality_qformer_qformer": (c_void_p, [c_void_p]),
    "qf_modality_qformer_to_device": (c_int, [c_void_p, c_char_p, c_int]),
    "qf_attn_fusion_load": (c_int, [c_char_p, P(c_void_p)]),
    "qf_attn_fusion_free": (None, [c_void_p]),
    "qf_attn_fusion_get_config": (c_int, [c_void_p, P(qf_attn_fusion_config)]),
    "qf_attn_fusion_forward": (c_int, [c_void_p, P(qf_prefusion_args), c_void_p, c_void_p, c_void_p]),
    "qf_attn_fusion_backward": (c_int, [c_void_p, c_void_p, c_void_p, c_void_p]),
    "qf_attn_fusion_weights": (c_int, [c_void_p, c_void_p]),
    "qf_attn_fusion_num_params": (c_int, [c_void_p]),
    "qf_attn_fusion_param": (c_int, [c_void_p, c_int, P(_native.qf_param)]),
    "qf_attn_fusion_zero_grad": (None, [c_void_p]),
    "qf_attn_fusion_to_device": (c_int, [c_void_p, c_char_p, c_int]),
})


def _check_placement(fn, device, dtype):
    if device not in ("cpu", "cuda") or dtype not in _DTYPES:
        raise QfuseError('%s: device = %r, dtype = %r; expected "cpu"/"cuda" and "float32"/"bfloat16"'
                         % (fn, device, dtype), "QF_ERR_ARG")


def _placed(m, device, dtype):
    """m.to(device, dtype) unless it is the CPU default; m is closed when placing fails."""
    if device != "cpu" or dtype != "float32":
        try:
            m.to(device, dtype)
        except Exception:
            m.close()
            raise
    return m


class ModalityQFormer(_Model):
    """AffectGPT video / audio Q-Former: frames [B,T,input_dim] (or [B,T,K,input_dim]) ->
    [B, num_query_token, llm_hidden_size]."""
    _free = staticmethod(lambda h: lib.qf_modality_qformer_free(h))
    _num_params = staticmethod(lambda h: lib.qf_modality_qformer_num_params(h))
    _param = staticmethod(lambda h, i, p: lib.qf_modality_qformer_param(h, i, p))

    def __init__(self, handle, folder):
        super().__init__(handle, folder, lib.qf_modality_qformer_qformer(handle))
        c = qf_modality_qformer_config()
        check(lib.qf_modality_qformer_get_config(handle, ctypes.byref(c)))
        self.modality = "video" if c.modality == 0 else "audio"
        self.input_dim = c.input_dim
        self.num_query_tokens = c.num_query_token
        self.frame_position_size = c.frame_position_size
        self.llm_hidden_size = c.llm_hidden_size
        self._query_name = self.modality + "_query_tokens"

    @classmethod
    def load(cls, folder, device="cpu", dtype="float32"):
        """Loads FOLDER/config.json (model_type "affectgpt_video_qformer" or
        "affectgpt_audio_qformer") and its weights, then places it (see to())."""
        h = c_void_p()
        check(lib.qf_modality_qformer_load(os.fsencode(os.fspath(folder)), ctypes.byref(h)))
        return _placed(cls(h.value, os.fspath(folder)), device, dtype)

    def to(self, device="cpu", dtype="float32"):
        """The whole forward on device "cpu" or "cuda" (dtype "bfloat16": bf16 GEMM weights,
        cuda only); backward runs where the model is (float32 weights only). Returns self."""
        _check_placement("ModalityQFormer.to", device, dtype)
        check(lib.qf_modality_qformer_to_device(self._handle("to"), device.encode(), _DTYPES[dtype]))
        return self

    def fuse(self, frames, frame_mask=None):
        """-> LLM-space tokens [B, num_query_token, llm_hidden_size]. frames [B,T,input_dim]
        or [B,T,K,input_dim] (K tokens per frame share the frame's position row);
        frame_mask [B,T], True = a real frame."""
        h = self._handle("fuse")
        fn = "ModalityQFormer.fuse"
        x = _f32(frames, fn + ": frames")
        if x.ndim == 4:
            K = x.shape[2]
            if K < 1:
                raise QfuseError("%s: frames has shape %s; K must be >= 1" % (fn, _shape(x)), "QF_ERR_SHAPE")
            _seq(x.reshape(x.shape[0], -1, x.shape[3]), fn + ": frames " + _shape(x), self.input_dim,
                 "input_dim")
        else:
            K = 1
            x = _seq(x, fn + ": frames", self.input_dim, "input_dim")
        B, T = x.shape[0], x.shape[1]
        if T < 1:
            raise QfuseError("%s: frames has shape %s; T must be >= 1" % (fn, _shape(x)), "QF_ERR_SHAPE")
        if T > self.frame_position_size:
            raise QfuseError("%s: frames has %d frames; the %s position table has frame_position_size "
                             "= %d rows" % (fn, T, self.modality, self.frame_position_size), "QF_ERR_SHAPE")
        fm = None if frame_mask is None else _mask(frame_mask, fn + ": frame_mask", (B, T), "B, T of frames")
        a = qf_modality_qformer_args()
        a.B, a.frames, a.tokens_per_frame, a.frame_mask = B, T, K, _ptr(fm)
        out = np.empty((B, self.num_query_tokens, self.llm_hidden_size), np.float32)
        self._state = self._maps_shape = None
        check(lib.qf_modality_qformer_forward(h, ctypes.byref(a), _ptr(x), _ptr(out)))
        self._state = x.shape
        self._maps_shape = (B, self.num_query_tokens, T * K)
        return out

    __call__ = fuse

    def backward(self, grad_out):
        """Gradients of sum(fuse(...) * grad_out) for the last fuse(): {"frames": [like the
        frames given], checkpoint name: gradient}."""
        h = self._handle("backward")
        fn = "ModalityQFormer.backward"
        if self._state is None:
            raise QfuseError("%s: no fuse() to differentiate (or a later qformer() call replaced "
                             "its state)" % fn)
        g = _f32(grad_out, fn + ": grad_out")
        want = (self._state[0], self.num_query_tokens, self.llm_hidden_size)
        if g.shape != want:
            raise QfuseError("%s: grad_out has shape %s; expected [%s] (the last fuse's output)"
                             % (fn, _shape(g), ",".join(map(str, want))), "QF_ERR_SHAPE")
        gx = np.empty(self._state, np.float32)
        lib.qf_modality_qformer_zero_grad(h)
        check(lib.qf_modality_qformer_backward(h, _ptr(g), _ptr(gx)))
        out = self._grads()
        out["frames"] = gx
        return out


class AttentionFusion:
    """AffectGPT multi-fusion "attention": audio [B,ta,audio_dim] + face [B,tf,video_dim] ->
    [B, num_multi_query_token, llm_hidden_size] (equal rows)."""

    def __init__(self, handle, folder):
        self._h = handle
        self.folder = folder
        c = qf_attn_fusion_config()
        check(lib.qf_attn_fusion_get_config(handle, ctypes.byref(c)))
        self.audio_dim, self.video_dim = c.audio_dim, c.video_dim
        self.max_hidden_size = c.max_hidden_size
        self.num_query_tokens = c.num_multi_query_token
        self.llm_hidden_size = c.llm_hidden_size
        self._state = None

    @classmethod
    def load(cls, folder, device="cpu", dtype="float32"):
        """Loads FOLDER/config.json (model_type "affectgpt_attention_fusion") and its weights,
        then places it (see to())."""
        h = c_void_p()
        check(lib.qf_attn_fusion_load(os.fsencode(os.fspath(folder)), ctypes.byref(h)))
        return _placed(cls(h.value, os.fspath(folder)), device, dtype)

    def to(self, device="cpu", dtype="float32"):
        """The whole fusion on device "cpu" or "cuda" (dtype "bfloat16": bf16 GEMM weights, cuda
        only); backward runs where the model is (float32 weights only). Returns self."""
        _check_placement("AttentionFusion.to", device, dtype)
        check(lib.qf_attn_fusion_to_device(self._handle("to"), device.encode(), _DTYPES[dtype]))
        self._state = None
        return self

    def close(self):
        h, self._h = getattr(self, "_h", None), None
        if h:
            lib.qf_attn_fusion_free(h)

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
            raise QfuseError("AttentionFusion.%s: used after close()" % fn)
        return self._h

    def _params(self):
        h = self._handle("parameters")
        for i in range(lib.qf_attn_fusion_num_params(h)):
            p = _native.qf_param()
            check(lib.qf_attn_fusion_param(h, i, ctypes.byref(p)))
            yield p.name.decode(), p

    def parameter_names(self):
        return [n for n, _ in self._params()]

    def state_dict(self):
        return {n: np.ctypeslib.as_array(p.data, tuple(p.shape[:p.ndim])).copy() for n, p in self._params()}

    def fuse(self, audio, face, audio_mask=None, face_mask=None):
        """-> [B, num_multi_query_token, llm_hidden_size]; both modalities are required."""
        h = self._handle("fuse")
        fn = "AttentionFusion.fuse"
        if audio is None or face is None:
            raise QfuseError("%s: the attention fusion needs both audio and face" % fn)
        a = _seq(audio, fn + ": audio", self.audio_dim, "audio_dim")
        f = _seq(face, fn + ": face", self.video_dim, "video_dim")
        if a.shape[0] != f.shape[0]:
            raise QfuseError("%s: audio has shape %s but face %s: batch sizes differ"
                             % (fn, _shape(a), _shape(f)), "QF_ERR_SHAPE")
        B, ta, tf = a.shape[0], a.shape[1], f.shape[1]
        if ta < 1 or tf < 1:
            raise QfuseError("%s: audio %s / face %s: each needs at least one frame"
                             % (fn, _shape(a), _shape(f)), "QF_ERR_SHAPE")
        am = None if audio_mask is None else _mask(audio_mask, fn + ": audio_mask", (B, ta), "B, ta of audio")
        fm = None if face_mask is None else _mask(face_mask, fn + ": face_mask", (B, tf), "B, tf of face")
        args = qf_prefusion_args()
        args.B, args.audio_len, args.face_len = B, ta, tf
        args.audio_mask, args.face_mask = _ptr(am), _ptr(fm)
        out = np.empty((B, self.num_query_tokens, self.llm_hidden_size), np.float32)
        self._state = None
        check(lib.qf_attn_fusion_forward(h, ctypes.byref(args), _ptr(a), _ptr(f), _ptr(out)))
        self._state = (B, ta, tf)
        return out

    __call__ = fuse

    def modality_weights(self):
        """[B,2]: the (face, audio) weights fc_att produced in the last fuse()."""
        h = self._handle("modality_weights")
        if self._state is None:
            raise QfuseError("AttentionFusion.modality_weights: no fuse() yet")
        w = np.empty((self._state[0], 2), np.float32)
        check(lib.qf_attn_fusion_weights(h, _ptr(w)))
        return w

    def backward(self, grad_out):
        """Gradients of sum(fuse(...) * grad_out) for the last fuse(): {"audio", "face",
        checkpoint name: gradient}."""
        h = self._handle("backward")
        fn = "AttentionFusion.backward"
        if self._state is None:
            raise QfuseError("%s: no fuse() to differentiate" % fn)
        B, ta, tf = self._state
        g = _f32(grad_out, fn + ": grad_out")
        want = (B, self.num_query_tokens, self.llm_hidden_size)
        if g.shape != want:
            raise QfuseError("%s: grad_out has shape %s; expected [%s] (the last fuse's output)"
                             % (fn, _shape(g), ",".join(map(str, want))), "QF_ERR_SHAPE")
        ga = np.empty((B, ta, self.audio_dim), np.float32)
        gf = np.empty((B, tf, self.video_dim), np.float32)
        lib.qf_attn_fusion_zero_grad(h)
        check(lib.qf_attn_fusion_backward(h, _ptr(g), _ptr(ga), _ptr(gf)))
        out = {n: np.ctypeslib.as_array(p.grad, tuple(p.shape[:p.ndim])).copy() for n, p in self._params()}
        out["audio"] = ga
        out["face"] = gf
        return out
