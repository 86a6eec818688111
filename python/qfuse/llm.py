"""qfuse.llm - decoder-only LLMs (transformers LlamaForCausalLM, Qwen2ForCausalLM and
OPTForCausalLM; src/models/llm.c and llm_forward.c, contract in include/qfuse_llm.h) over a
Hugging Face folder (config.json + model.safetensors or a sharded index), in float32 or with
bf16 / int8 / 4-bit weights, with a KV cache for generation and PEFT LoRA adapters.

    from qfuse.llm import CausalLM
    m = CausalLM.load("my-qwen2")
    logits = m.logits(input_ids=ids)                     # [B, T, vocab]
    emb = m.embed(ids)                                   # [B, T, hidden]
    emb = np.concatenate([emb[:, :2], fused, emb[:, 2:]], 1)
    logits = m.logits(inputs_embeds=emb)                 # how fused modality tokens enter the LLM
    out = m.generate(ids, max_new_tokens=10)             # greedy: [B, T + 10]
    out = m.generate(ids, 10, do_sample=True, temperature=0.7, top_p=0.9, seed=1)

Invariants of this module:
- Inputs are converted to C-contiguous int32 ids / float32 embeddings and their shapes checked
  here (messages name the argument, its shape and the expected one); ids out of range are
  rejected by the C side, whose message names input_ids[b,t].
- The C handle is freed exactly once (close() or garbage collection).
"""
import ctypes
import os
from ctypes import c_char, c_char_p, c_double, c_int, c_int64, c_void_p

import numpy as np

from . import _native
from ._native import QfuseError, check, lib
from .llm_adapter import AdapterMixin

__all__ = ["CausalLM"]


class qf_llm_config(ctypes.Structure):
    _fields_ = [("model_type", c_char * 16),
                ("vocab_size", c_int64), ("hidden_size", c_int64), ("intermediate_size", c_int64),
                ("num_hidden_layers", c_int64), ("num_attention_heads", c_int64),
                ("num_key_value_heads", c_int64), ("head_dim", c_int64),
                ("max_position_embeddings", c_int64), ("word_embed_proj_dim", c_int64),
                ("norm_eps", c_double), ("rope_theta", c_double),
                ("attention_bias", c_int), ("mlp_bias", c_int), ("tie_word_embeddings", c_int),
                ("do_layer_norm_before", c_int), ("has_final_norm", c_int),
                ("bos_token_id", c_int64), ("eos_token_id", c_int64), ("pad_token_id", c_int64)]


class qf_llm_options(ctypes.Structure):
    _fields_ = [("weights", c_int), ("block", c_int64)]


class qf_sampling(ctypes.Structure):
    _fields_ = [("do_sample", c_int), ("temperature", ctypes.c_float), ("top_k", c_int64),
                ("top_p", ctypes.c_float), ("repetition_penalty", ctypes.c_float),
                ("seed", ctypes.c_uint64)]


ON_TOKEN = ctypes.CFUNCTYPE(c_int, c_void_p, c_int64, ctypes.c_int32)


class qf_generate_options(ctypes.Structure):
    _fields_ = [("max_new_tokens", c_int64), ("sampling", qf_sampling),
                ("eos_ids", c_void_p), ("n_eos", c_int), ("pad_id", ctypes.c_int32),
                ("on_token", ON_TOKEN), ("user", c_void_p)]


WEIGHT_FORMATS = {"f32": 0, "float32": 0, "bf16": 1, "bfloat16": 1, "int8": 2, "q4": 3, "int4": 3}

_native.declare({
    "qf_llm_load_ex": (c_int, [c_char_p, ctypes.POINTER(qf_llm_options), ctypes.POINTER(c_void_p)]),
    "qf_llm_free": (None, [c_void_p]),
    "qf_llm_get_config": (c_int, [c_void_p, ctypes.POINTER(qf_llm_config)]),
    "qf_llm_weight_bytes": (ctypes.c_size_t, [c_void_p]),
    "qf_llm_embed": (c_int, [c_void_p, c_void_p, c_int64, c_int64, c_void_p]),
    "qf_llm_forward": (c_int, [c_void_p, c_void_p, c_int64, c_int64, c_void_p, c_void_p]),
    "qf_llm_generate_defaults": (qf_generate_options, [c_void_p]),
    "qf_llm_generate": (c_int, [c_void_p, c_void_p, c_void_p, c_int64, c_int64, c_void_p,
                                ctypes.POINTER(qf_generate_options), c_void_p,
                                ctypes.POINTER(c_int64)]),
})


def generation_options(max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty, seed, eos,
                       pad, on_token):
    """(qf_generate_options, objects to keep alive during the call, list that collects an exception
    raised by on_token). eos: an id or a list of ids; on_token(row, id) -> True stops the row
    (an exception stops it too and is re-raised by the caller from the list)."""
    eos = [int(eos)] if np.isscalar(eos) else [int(e) for e in eos]
    eos_arr = np.ascontiguousarray(eos, np.int32)
    o = qf_generate_options()
    o.max_new_tokens = int(max_new_tokens)
    o.sampling = qf_sampling(int(bool(do_sample)), float(temperature), int(top_k), float(top_p),
                             float(repetition_penalty), int(seed) & (2**64 - 1))
    o.eos_ids = eos_arr.ctypes.data if len(eos) else None
    o.n_eos = len(eos)
    o.pad_id = int(pad)
    errors = []
    cb = None
    if on_token is not None:
        def call(_user, row, tok):
            try:
                return 1 if on_token(int(row), int(tok)) else 0
            except BaseException as e:  # stops generation; the caller re-raises it
                errors.append(e)
                return 1
        cb = ON_TOKEN(call)
        o.on_token = cb
    return o, (eos_arr, cb), errors


class CausalLM(AdapterMixin):
    """A loaded LlamaForCausalLM / Qwen2ForCausalLM / OPTForCausalLM. `config` is a dict of the resolved
    configuration (model_type, vocab_size, hidden_size, head_dim, rope_theta, ...)."""

    def __init__(self, handle, folder=None):
        self._h = handle
        c = qf_llm_config()
        check(lib.qf_llm_get_config(self._h, ctypes.byref(c)))
        self.config = {name: getattr(c, name) for name, _ in qf_llm_config._fields_}
        self.config["model_type"] = c.model_type.decode()
        self.vocab_size = c.vocab_size
        self.hidden_size = c.hidden_size
        self.embed_dim = c.word_embed_proj_dim
        # eos ids and pad as transformers' generate takes them (generation_config.json, then
        # config.json; pad falls back to the first eos), resolved by the C loader
        d = lib.qf_llm_generate_defaults(self._h)
        eos = ctypes.cast(d.eos_ids, ctypes.POINTER(ctypes.c_int32)) if d.eos_ids else None
        self.eos_token_ids = [int(eos[i]) for i in range(d.n_eos)] if eos else []
        self.pad_token_id = int(d.pad_id)

    @classmethod
    def load(cls, folder, weights="f32", block=0):
        """weights: "f32", "bf16", "int8" (block 0 = one scale per output channel) or "q4"
        (block 0 = 32): the storage of every linear layer, quantized at load."""
        if weights not in WEIGHT_FORMATS:
            raise QfuseError("CausalLM.load: weights = %r is not one of %s" % (weights, sorted(WEIGHT_FORMATS)))
        opt = qf_llm_options(WEIGHT_FORMATS[weights], int(block))
        h = c_void_p()
        check(lib.qf_llm_load_ex(os.fsencode(os.fspath(folder)), ctypes.byref(opt), ctypes.byref(h)))
        return cls(h, folder)

    @property
    def weight_bytes(self):
        """Bytes of the linear layers' weights as stored (scales included)."""
        return int(lib.qf_llm_weight_bytes(self._handle()))

    def close(self):
        if getattr(self, "_h", None):
            lib.qf_llm_free(self._h)
            self._h = None

    def __del__(self):
        self.close()

    def _handle(self):
        if not self._h:
            raise QfuseError("CausalLM: the model was closed")
        return self._h

    @staticmethod
    def _ids(input_ids):
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
            raise QfuseError("CausalLM: input_ids has shape %s, expected [B, T] with B, T >= 1"
                             % (tuple(ids.shape),))
        if not np.issubdtype(ids.dtype, np.integer):
            raise QfuseError("CausalLM: input_ids has dtype %s, expected integers" % ids.dtype)
        if ids.size and (ids.min() < np.iinfo(np.int32).min or ids.max() > np.iinfo(np.int32).max):
            raise QfuseError("CausalLM: input_ids holds values outside int32")
        return np.ascontiguousarray(ids, np.int32)

    def embed(self, input_ids):
        """embed_tokens(input_ids): [B, T] ints -> [B, T, embed_dim] float32 (embed_dim = hidden_size
        except OPT models with word_embed_proj_dim)."""
        ids = self._ids(input_ids)
        B, T = ids.shape
        out = np.empty((B, T, self.embed_dim), np.float32)
        check(lib.qf_llm_embed(self._handle(), ids.ctypes.data, B, T, out.ctypes.data))
        return out

    def _mask(self, attention_mask, B, T):
        if attention_mask is None:
            return None
        a = np.asarray(attention_mask)
        if a.shape != (B, T):
            raise QfuseError("CausalLM: attention_mask has shape %s, expected [%d, %d]" % (tuple(a.shape), B, T))
        return np.ascontiguousarray(a != 0, np.uint8)

    def _embeds(self, fn, input_ids, inputs_embeds):
        if (input_ids is None) == (inputs_embeds is None):
            raise QfuseError("CausalLM.%s: pass exactly one of input_ids and inputs_embeds" % fn)
        if input_ids is not None:
            return self.embed(input_ids)
        x = np.ascontiguousarray(inputs_embeds, np.float32)
        if x.ndim != 3 or x.shape[0] < 1 or x.shape[1] < 1 or x.shape[2] != self.embed_dim:
            raise QfuseError("CausalLM.%s: inputs_embeds has shape %s, expected [B, T, %d]"
                             % (fn, tuple(x.shape), self.embed_dim))
        return x

    def logits(self, input_ids=None, inputs_embeds=None, attention_mask=None):
        """Logits [B, T, vocab] float32 of exactly one of input_ids [B, T] or inputs_embeds
        [B, T, embed_dim]; attention_mask [B, T] (1 = token, 0 = padding) lets rows of
        different lengths share a batch: positions count real tokens only, as transformers'
        generate computes them, so a left-padded row gives the logits it gives alone (the
        logits at padding positions are meaningless)."""
        x = self._embeds("logits", input_ids, inputs_embeds)
        B, T = x.shape[0], x.shape[1]
        mask = self._mask(attention_mask, B, T)
        out = np.empty((B, T, self.vocab_size), np.float32)
        check(lib.qf_llm_forward(self._handle(), x.ctypes.data, B, T,
                                 None if mask is None else mask.ctypes.data, out.ctypes.data))
        return out

    def generate(self, input_ids=None, max_new_tokens=20, do_sample=False, temperature=1.0, top_k=0,
                 top_p=1.0, repetition_penalty=1.0, seed=0, attention_mask=None, inputs_embeds=None,
                 eos_token_id=None, pad_token_id=None, on_token=None):
        """Generation with a KV cache (prefill once, then one position per step), as
        transformers' generate: greedy unless do_sample; temperature, top_k, top_p and
        repetition_penalty as its logits processors; seed makes sampling reproducible. A row
        stops at an eos id (default: generation_config.json / config.json) or when
        on_token(row, id) returns True; stopped rows are filled with pad_token_id. Returns
        [B, T + max_new_tokens] int32 with the prompt when input_ids is given, else
        [B, max_new_tokens] (transformers' convention for inputs_embeds); fewer columns when
        every row stopped early."""
        x = self._embeds("generate", input_ids, inputs_embeds)
        B, T = x.shape[0], x.shape[1]
        M = int(max_new_tokens)
        if M < 1:
            raise QfuseError("CausalLM.generate: max_new_tokens = %d must be >= 1" % M)
        mask = self._mask(attention_mask, B, T)
        ids = None if input_ids is None else self._ids(input_ids)
        o, _alive, errors = generation_options(M, do_sample, temperature, top_k, top_p, repetition_penalty, seed,
                                             self.eos_token_ids if eos_token_id is None else eos_token_id,
                                             self.pad_token_id if pad_token_id is None else pad_token_id,
                                             on_token)
        out = np.empty((B, M), np.int32)
        steps = c_int64(0)
        check(lib.qf_llm_generate(self._handle(), x.ctypes.data,
                                  None if mask is None else mask.ctypes.data, B, T,
                                  None if ids is None else ids.ctypes.data, ctypes.byref(o),
                                  out.ctypes.data, ctypes.byref(steps)))
        if errors:
            raise errors[0]
        out = out[:, :steps.value]
        return out if ids is None else np.concatenate([ids, out], axis=1)
