"""qfuse.llm - decoder-only LLMs of the LLaMA family (transformers LlamaForCausalLM and
Qwen2ForCausalLM, float32 inference; src/models/llama.c, contract in include/qfuse_llm.h) over a
Hugging Face folder (config.json + model.safetensors).

    from qfuse.llm import CausalLM
    m = CausalLM.load("my-qwen2")
    logits = m.logits(input_ids=ids)                     # [B, T, vocab]
    emb = m.embed(ids)                                   # [B, T, hidden]
    emb = np.concatenate([emb[:, :2], fused, emb[:, 2:]], 1)
    logits = m.logits(inputs_embeds=emb)                 # how fused modality tokens enter the LLM
    out = m.generate(ids, max_new_tokens=10)             # greedy: [B, T + 10]

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

__all__ = ["CausalLM"]


class qf_llm_config(ctypes.Structure):
    _fields_ = [("model_type", c_char * 16),
                ("vocab_size", c_int64), ("hidden_size", c_int64), ("intermediate_size", c_int64),
                ("num_hidden_layers", c_int64), ("num_attention_heads", c_int64),
                ("num_key_value_heads", c_int64), ("head_dim", c_int64),
                ("rms_norm_eps", c_double), ("rope_theta", c_double),
                ("attention_bias", c_int), ("mlp_bias", c_int), ("tie_word_embeddings", c_int)]


_native.declare({
    "qf_llm_load": (c_int, [c_char_p, ctypes.POINTER(c_void_p)]),
    "qf_llm_free": (None, [c_void_p]),
    "qf_llm_get_config": (c_int, [c_void_p, ctypes.POINTER(qf_llm_config)]),
    "qf_llm_embed": (c_int, [c_void_p, c_void_p, c_int64, c_int64, c_void_p]),
    "qf_llm_forward": (c_int, [c_void_p, c_void_p, c_int64, c_int64, c_void_p]),
})


class CausalLM:
    """A loaded LlamaForCausalLM / Qwen2ForCausalLM. `config` is a dict of the resolved
    configuration (model_type, vocab_size, hidden_size, head_dim, rope_theta, ...)."""

    def __init__(self, handle):
        self._h = handle
        c = qf_llm_config()
        check(lib.qf_llm_get_config(self._h, ctypes.byref(c)))
        self.config = {name: getattr(c, name) for name, _ in qf_llm_config._fields_}
        self.config["model_type"] = c.model_type.decode()
        self.vocab_size = c.vocab_size
        self.hidden_size = c.hidden_size

    @classmethod
    def load(cls, folder):
        h = c_void_p()
        check(lib.qf_llm_load(os.fsencode(os.fspath(folder)), ctypes.byref(h)))
        return cls(h)

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
        """embed_tokens(input_ids): [B, T] ints -> [B, T, hidden] float32."""
        ids = self._ids(input_ids)
        B, T = ids.shape
        out = np.empty((B, T, self.hidden_size), np.float32)
        check(lib.qf_llm_embed(self._handle(), ids.ctypes.data, B, T, out.ctypes.data))
        return out

    def logits(self, input_ids=None, inputs_embeds=None):
        """Logits [B, T, vocab] float32 of exactly one of input_ids [B, T] or inputs_embeds
        [B, T, hidden] (causal attention, positions 0..T-1, no padding mask)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise QfuseError("CausalLM.logits: pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            x = self.embed(input_ids)
        else:
            x = np.ascontiguousarray(inputs_embeds, np.float32)
            if x.ndim != 3 or x.shape[0] < 1 or x.shape[1] < 1 or x.shape[2] != self.hidden_size:
                raise QfuseError("CausalLM.logits: inputs_embeds has shape %s, expected [B, T, %d]"
                                 % (tuple(x.shape), self.hidden_size))
        B, T = x.shape[0], x.shape[1]
        out = np.empty((B, T, self.vocab_size), np.float32)
        check(lib.qf_llm_forward(self._handle(), x.ctypes.data, B, T, out.ctypes.data))
        return out

    def generate(self, input_ids, max_new_tokens=20):
        """Greedy decoding: appends argmax(logits[:, -1]) max_new_tokens times and returns
        [B, T + max_new_tokens] int32 (the prompt included, as transformers' generate does for
        decoder-only models). No KV cache yet: every step recomputes the whole prefix (cost grows
        with the square of the length). No stopping at eos_token_id and no padding: every row
        gets exactly max_new_tokens tokens. Ties pick the lowest id (numpy/torch argmax)."""
        ids = self._ids(input_ids)
        if int(max_new_tokens) < 0:
            raise QfuseError("CausalLM.generate: max_new_tokens = %d must be >= 0" % max_new_tokens)
        for _ in range(int(max_new_tokens)):
            nxt = np.argmax(self.logits(input_ids=ids)[:, -1, :], axis=-1).astype(np.int32)
            ids = np.concatenate([ids, nxt[:, None]], axis=1)
        return ids
