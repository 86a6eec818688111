"""qfuse.vlm - BLIP-2 / InstructBLIP end to end (transformers' Blip2ForConditionalGeneration and
InstructBlipForConditionalGeneration; src/models/blip2_lm.c, contract in include/qfuse_models.h's
"BLIP-2 / InstructBLIP with their language model" section): pixels + prompt ids -> logits or
generated ids, and the pieces in between (fused image tokens, spliced embeddings).

    from qfuse.vlm import VisionLM
    m = VisionLM.load("blip2-folder")                  # config.json model_type "blip-2"/"instructblip"
    ids = [m.image_token_id] * m.num_query_tokens + [m.bos_token_id] + prompt_ids
    logits = m.logits([ids], pixel_values)             # [B, T, vocab]
    out = m.generate([ids], pixel_values, max_new_tokens=20)   # [B, T + new]: prompt first
    tok = m.fused_tokens(pixel_values)                 # [B, num_query_tokens, embed_dim]
    emb = m.embed([ids], pixel_values)                 # inputs_embeds with the image spliced in
    emb, mask = VisionLM.splice(prompt_embeds, fused, pos=3)   # general splice (AffectGPT tokens)

Invariants of this module:
- Inputs are converted to C-contiguous float32 / int32 / uint8 and their shapes checked here
  (messages name the argument, its shape and the expected one); token-level rules (the image
  token count per row, ids out of the vocabulary, the context length) are checked in C, whose
  message comes back in QfuseError.
- generate returns what transformers' generate returns for these models: the prompt ids followed
  by the new tokens (fewer columns when every row stopped early; stopped rows padded).
- The C handle is freed exactly once (close() or garbage collection).
"""
import ctypes
import os
from ctypes import c_char, c_char_p, c_int, c_int32, c_int64, c_void_p

import numpy as np

from . import _native
from ._native import QfuseError, check, lib
from .llm import WEIGHT_FORMATS, generation_options, qf_generate_options, qf_llm_options

__all__ = ["VisionLM"]

P = ctypes.POINTER
QF_VLM_MAX_EOS = 8


class qf_vlm_info(ctypes.Structure):
    _fields_ = [("instruct", c_int), ("text_model_type", c_char * 16),
                ("num_query_tokens", c_int64), ("embed_dim", c_int64), ("vocab_size", c_int64),
                ("max_positions", c_int64), ("image_size", c_int64),
                ("image_token_id", c_int32), ("bos_token_id", c_int32), ("pad_token_id", c_int32),
                ("eos_ids", c_int32 * QF_VLM_MAX_EOS), ("n_eos", c_int)]


class qf_vlm_inputs(ctypes.Structure):
    _fields_ = [("B", c_int64), ("T", c_int64), ("pixel_values", c_void_p), ("input_ids", c_void_p),
                ("attention_mask", c_void_p), ("qformer_len", c_int64), ("qformer_ids", c_void_p),
                ("qformer_mask", c_void_p)]


_native.declare({
    "qf_vlm_load": (c_int, [c_char_p, P(qf_llm_options), P(c_void_p)]),
    "qf_vlm_free": (None, [c_void_p]),
    "qf_vlm_get_info": (c_int, [c_void_p, P(qf_vlm_info)]),
    "qf_vlm_fused_tokens": (c_int, [c_void_p, P(qf_vlm_inputs), c_void_p]),
    "qf_vlm_splice_image_tokens": (c_int, [c_void_p, c_void_p, c_int64, c_int64, c_void_p, c_void_p]),
    "qf_vlm_embed": (c_int, [c_void_p, P(qf_vlm_inputs), c_void_p]),
    "qf_vlm_logits": (c_int, [c_void_p, P(qf_vlm_inputs), c_void_p]),
    "qf_vlm_generate": (c_int, [c_void_p, P(qf_vlm_inputs), P(qf_generate_options), c_void_p, P(c_int64)]),
    "qf_splice_embeds": (c_int, [c_void_p, c_void_p, c_int64, c_int64, c_int64, c_void_p, c_int64, c_int64,
                                 c_void_p, c_void_p]),
})


def _shape(a):
    return "[" + ",".join(str(d) for d in np.shape(a)) + "]"


def _ids(x, what):
    a = np.asarray(x)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
        raise QfuseError("%s has shape %s; expected [B,T] with B, T >= 1" % (what, _shape(x)), "QF_ERR_SHAPE")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise QfuseError("%s has dtype %s; expected integer token ids" % (what, a.dtype), "QF_ERR_DTYPE")
    if a.size and (a.min() < -2**31 or a.max() >= 2**31):
        raise QfuseError("%s holds values outside int32" % what)
    return np.ascontiguousarray(a, dtype=np.int32)


def _mask(x, what, shape):
    if x is None:
        return None
    a = np.asarray(x)
    if a.ndim == 1 and len(shape) == 2 and shape[0] == 1:
        a = a[None]
    if a.shape != tuple(shape):
        raise QfuseError("%s has shape %s; expected [%s]" % (what, _shape(a), ",".join(map(str, shape))),
                         "QF_ERR_SHAPE")
    if not (a.dtype == np.bool_ or np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise QfuseError("%s has dtype %s; expected bool or 0/1 numbers (1 = real token)" % (what, a.dtype),
                         "QF_ERR_DTYPE")
    return np.ascontiguousarray(a != 0, dtype=np.uint8)


def _f32(x, what):
    a = np.asarray(x)
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise QfuseError("%s has dtype %s; expected a float array" % (what, a.dtype), "QF_ERR_DTYPE")
    return np.ascontiguousarray(a, dtype=np.float32)


def _ptr(a):
    return None if a is None else a.ctypes.data


class VisionLM:
    """A loaded BLIP-2 / InstructBLIP with its language model (OPT or LLaMA)."""

    def __init__(self, handle, folder=None):
        self._h = handle
        self.folder = folder
        i = qf_vlm_info()
        check(lib.qf_vlm_get_info(handle, ctypes.byref(i)))
        self.instruct = bool(i.instruct)
        self.text_model_type = i.text_model_type.decode()
        self.num_query_tokens = i.num_query_tokens
        self.embed_dim = i.embed_dim
        self.vocab_size = i.vocab_size
        self.max_positions = i.max_positions
        self.image_size = i.image_size
        self.image_token_id = i.image_token_id
        self.bos_token_id = i.bos_token_id if i.bos_token_id >= 0 else None
        self.pad_token_id = i.pad_token_id
        self.eos_token_ids = [i.eos_ids[k] for k in range(i.n_eos)]

    @classmethod
    def load(cls, folder, weights="f32", block=0):
        """FOLDER/config.json (model_type "blip-2" or "instructblip"), the weights (one file or a
        sharded index) and generation_config.json (eos / pad). weights: the language model's
        linear layers as "f32", "bf16", "int8" or "q4" (see qfuse.llm.CausalLM.load)."""
        if weights not in WEIGHT_FORMATS:
            raise QfuseError("VisionLM.load: weights = %r is not one of %s" % (weights, sorted(WEIGHT_FORMATS)))
        opt = qf_llm_options(WEIGHT_FORMATS[weights], int(block))
        h = c_void_p()
        check(lib.qf_vlm_load(os.fsencode(os.fspath(folder)), ctypes.byref(opt), ctypes.byref(h)))
        return cls(h.value, os.fspath(folder))

    def close(self):
        h, self._h = getattr(self, "_h", None), None
        if h:
            lib.qf_vlm_free(h)

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
            raise QfuseError("VisionLM.%s: used after close()" % fn)
        return self._h

    # ---- inputs ----
    def _pixels(self, pixel_values, fn):
        px = _f32(pixel_values, "VisionLM.%s: pixel_values" % fn)
        if px.ndim == 3:
            px = px[None]
        S = self.image_size
        if px.ndim != 4 or px.shape[0] < 1 or px.shape[1:] != (3, S, S):
            raise QfuseError("VisionLM.%s: pixel_values has shape %s; expected [B,3,%d,%d] "
                             "(vision_config.image_size = %d)" % (fn, _shape(pixel_values), S, S, S), "QF_ERR_SHAPE")
        return px

    def _inputs(self, fn, pixel_values, input_ids=None, attention_mask=None, qformer_input_ids=None,
                qformer_attention_mask=None):
        """A qf_vlm_inputs plus the arrays it points into (kept alive by the caller)."""
        px = self._pixels(pixel_values, fn)
        B = px.shape[0]
        keep = [px]
        a = qf_vlm_inputs(B=B, T=0, pixel_values=px.ctypes.data)
        if input_ids is not None:
            ids = _ids(input_ids, "VisionLM.%s: input_ids" % fn)
            if ids.shape[0] != B:
                raise QfuseError("VisionLM.%s: input_ids has %d rows but pixel_values %d images"
                                 % (fn, ids.shape[0], B), "QF_ERR_SHAPE")
            mask = _mask(attention_mask, "VisionLM.%s: attention_mask" % fn, ids.shape)
            keep += [ids, mask]
            a.T, a.input_ids, a.attention_mask = ids.shape[1], ids.ctypes.data, _ptr(mask)
        elif attention_mask is not None:
            raise QfuseError("VisionLM.%s: attention_mask given without input_ids" % fn)
        if qformer_input_ids is not None:
            if not self.instruct:
                raise QfuseError("VisionLM.%s: qformer_input_ids given but this BLIP-2 model's Q-Former reads no "
                                 "instruction (only InstructBLIP's does)" % fn)
            q = _ids(qformer_input_ids, "VisionLM.%s: qformer_input_ids" % fn)
            if q.shape[0] != B:
                raise QfuseError("VisionLM.%s: qformer_input_ids has %d rows but pixel_values %d images"
                                 % (fn, q.shape[0], B), "QF_ERR_SHAPE")
            qm = _mask(qformer_attention_mask, "VisionLM.%s: qformer_attention_mask" % fn, q.shape)
            keep += [q, qm]
            a.qformer_len, a.qformer_ids, a.qformer_mask = q.shape[1], q.ctypes.data, _ptr(qm)
        elif qformer_attention_mask is not None:
            raise QfuseError("VisionLM.%s: qformer_attention_mask given without qformer_input_ids" % fn)
        return a, keep

    def default_input_ids(self, batch=1):
        """What generate uses without input_ids (transformers does the same): the image tokens
        followed by BOS, [batch, num_query_tokens + 1]."""
        row = [self.image_token_id] * self.num_query_tokens
        if self.bos_token_id is not None:
            row.append(self.bos_token_id)
        return np.tile(np.asarray(row, np.int32), (batch, 1))

    # ---- model ----
    def fused_tokens(self, pixel_values, qformer_input_ids=None, qformer_attention_mask=None):
        """The projected Q-Former outputs [B, num_query_tokens, embed_dim] (what replaces the
        image tokens)."""
        a, keep = self._inputs("fused_tokens", pixel_values, None, None, qformer_input_ids, qformer_attention_mask)
        out = np.empty((a.B, self.num_query_tokens, self.embed_dim), np.float32)
        check(lib.qf_vlm_fused_tokens(self._handle("fused_tokens"), ctypes.byref(a), out.ctypes.data))
        return out

    def splice_image_tokens(self, input_ids, fused):
        """embed_tokens(input_ids) with each row's image tokens replaced in order by fused
        [B, num_query_tokens, embed_dim]."""
        ids = _ids(input_ids, "VisionLM.splice_image_tokens: input_ids")
        B, T = ids.shape
        f = _f32(fused, "VisionLM.splice_image_tokens: fused")
        if f.shape != (B, self.num_query_tokens, self.embed_dim):
            raise QfuseError("VisionLM.splice_image_tokens: fused has shape %s; expected [%d,%d,%d]"
                             % (_shape(f), B, self.num_query_tokens, self.embed_dim), "QF_ERR_SHAPE")
        out = np.empty((B, T, self.embed_dim), np.float32)
        check(lib.qf_vlm_splice_image_tokens(self._handle("splice_image_tokens"), ids.ctypes.data, B, T,
                                             f.ctypes.data, out.ctypes.data))
        return out

    def embed(self, input_ids, pixel_values, qformer_input_ids=None, qformer_attention_mask=None):
        """The language model's inputs_embeds [B, T, embed_dim]: the prompt's embeddings with the
        image spliced in at its image tokens."""
        a, keep = self._inputs("embed", pixel_values, input_ids, None, qformer_input_ids, qformer_attention_mask)
        out = np.empty((a.B, a.T, self.embed_dim), np.float32)
        check(lib.qf_vlm_embed(self._handle("embed"), ctypes.byref(a), out.ctypes.data))
        return out

    def logits(self, input_ids, pixel_values, attention_mask=None, qformer_input_ids=None,
               qformer_attention_mask=None):
        """Logits [B, T, vocab] (the reference forward's `logits`). Each row of input_ids must
        hold num_query_tokens image tokens (image_token_id)."""
        a, keep = self._inputs("logits", pixel_values, input_ids, attention_mask, qformer_input_ids,
                               qformer_attention_mask)
        out = np.empty((a.B, a.T, self.vocab_size), np.float32)
        check(lib.qf_vlm_logits(self._handle("logits"), ctypes.byref(a), out.ctypes.data))
        return out

    def generate(self, input_ids=None, pixel_values=None, attention_mask=None, qformer_input_ids=None,
                 qformer_attention_mask=None, max_new_tokens=20, do_sample=False, temperature=1.0, top_k=0,
                 top_p=1.0, repetition_penalty=1.0, seed=0, eos_token_id=None, pad_token_id=None,
                 on_token=None):
        """transformers' generate for these models: [B, T + new] int32, the prompt ids first.
        input_ids None = the image tokens and BOS. A row stops at an eos id (default:
        generation_config.json, else text_config) or when on_token(row, id) returns True."""
        if pixel_values is None:
            raise QfuseError("VisionLM.generate: pixel_values is required")
        if input_ids is None:
            if attention_mask is not None:
                raise QfuseError("VisionLM.generate: attention_mask given without input_ids")
            input_ids = self.default_input_ids(self._pixels(pixel_values, "generate").shape[0])
        a, keep = self._inputs("generate", pixel_values, input_ids, attention_mask, qformer_input_ids,
                               qformer_attention_mask)
        M = int(max_new_tokens)
        if M < 1:
            raise QfuseError("VisionLM.generate: max_new_tokens = %d must be >= 1" % M)
        o, _alive, errors = generation_options(
            M, do_sample, temperature, top_k, top_p, repetition_penalty, seed,
            self.eos_token_ids if eos_token_id is None else eos_token_id,
            self.pad_token_id if pad_token_id is None else pad_token_id, on_token)
        out = np.empty((a.B, M), np.int32)
        steps = c_int64(0)
        check(lib.qf_vlm_generate(self._handle("generate"), ctypes.byref(a), ctypes.byref(o), out.ctypes.data,
                                  ctypes.byref(steps)))
        if errors:
            raise errors[0]
        ids = keep[1]
        return np.concatenate([ids, out[:, :steps.value]], axis=1)

    @staticmethod
    def splice(prompt_embeds, fused, pos, prompt_mask=None):
        """General splice: (out [B, T+n, D], mask [B, T+n] uint8) with out = prompt[:, :pos] ;
        fused [B, n, D] ; prompt[:, pos:] and mask 1 at the fused tokens, prompt_mask (default
        all 1) elsewhere. For tokens that have no placeholder id (AffectGPT's pre-fusion output)."""
        p = _f32(prompt_embeds, "VisionLM.splice: prompt_embeds")
        f = _f32(fused, "VisionLM.splice: fused")
        if p.ndim != 3 or f.ndim != 3 or f.shape[0] != p.shape[0] or f.shape[2] != p.shape[2]:
            raise QfuseError("VisionLM.splice: prompt_embeds %s and fused %s must be [B,T,D] and [B,n,D]"
                             % (_shape(p), _shape(f)), "QF_ERR_SHAPE")
        B, T, D = p.shape
        n = f.shape[1]
        m = _mask(prompt_mask, "VisionLM.splice: prompt_mask", (B, T))
        out = np.empty((B, T + n, D), np.float32)
        mask = np.empty((B, T + n), np.uint8)
        check(lib.qf_splice_embeds(p.ctypes.data, _ptr(m), B, T, D, f.ctypes.data, n, int(pos), out.ctypes.data,
                                   mask.ctypes.data))
        return out, mask
