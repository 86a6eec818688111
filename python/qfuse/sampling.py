"""qfuse.sampling - next-token selection and streaming detokenization (include/qfuse_llm.h's
sampling section, include/qfuse_text.h's streaming detokenizer).

    from qfuse.sampling import sample_token, TextStream
    tok_id, processed = sample_token(logits, do_sample=True, temperature=0.7, top_k=50,
                                     top_p=0.9, repetition_penalty=1.1, seed=1, counter=0,
                                     history=prompt_ids)
    ts = TextStream(tokenizer, stop=["\\nUser:"], skip_special_tokens=True)
    text, stopped = ts.push(tok_id)          # newly final text (whole characters)
    rest = ts.flush()                        # what was held back, at the end

sample_token follows transformers' generate: repetition penalty, then (do_sample only)
temperature, top-k, top-p, softmax and one draw that is a function of (seed, counter) alone.
do_sample=False is greedy (argmax of the penalized logits, lowest id on ties). It returns the id
and the processed logits (float32, filtered entries -inf). Off values: temperature 1, top_k 0,
top_p 1, repetition_penalty 1.

Invariants: the caller's logits array is never modified (a float32 copy is processed); every
failure raises QfuseError with the library's message (which names the field or index).
"""
import ctypes
from ctypes import POINTER, byref, c_char_p, c_float, c_int, c_int32, c_int64, c_size_t, c_uint64, c_void_p

import numpy as np

from . import _native
from ._native import QfuseError, check, lib

__all__ = ["sample_token", "TextStream", "qf_sampling"]


class qf_sampling(ctypes.Structure):
    """Mirror of include/qfuse_llm.h's qf_sampling."""
    _fields_ = [("do_sample", c_int),
                ("temperature", c_float),
                ("top_k", c_int64),
                ("top_p", c_float),
                ("repetition_penalty", c_float),
                ("seed", c_uint64)]


_native.declare({
    "qf_sampling_defaults": (qf_sampling, []),
    "qf_sample_token": (c_int, [POINTER(qf_sampling), c_void_p, c_int64, c_void_p, c_int64, c_uint64,
                                POINTER(c_int32)]),
    "qf_text_stream_new": (c_int, [c_void_p, POINTER(c_char_p), c_size_t, c_int, POINTER(c_void_p)]),
    "qf_text_stream_free": (None, [c_void_p]),
    "qf_text_stream_reset": (None, [c_void_p]),
    "qf_text_stream_push": (c_int, [c_void_p, c_int32, POINTER(ctypes.POINTER(ctypes.c_char)),
                                    POINTER(c_size_t), POINTER(c_int)]),
    "qf_text_stream_flush": (c_int, [c_void_p, POINTER(ctypes.POINTER(ctypes.c_char)), POINTER(c_size_t)]),
})


def sample_token(logits, do_sample=False, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
                 seed=0, counter=0, history=None):
    """(id, processed_logits) for one row of logits [V]."""
    x = np.array(logits, dtype=np.float32, copy=True)
    if x.ndim != 1:
        raise QfuseError("sample_token: logits must be 1-D [V], got shape %s" % (x.shape,))
    x = np.ascontiguousarray(x)
    if history is None:
        h = np.zeros(0, np.int32)
    else:
        h = np.asarray(history)
        if h.ndim != 1 or (h.size and h.dtype.kind not in "iu"):
            raise QfuseError("sample_token: history must be a 1-D sequence of integer ids")
        if h.size and (h.min() < -2**31 or h.max() >= 2**31):
            raise QfuseError("sample_token: history holds an id outside int32")
        h = np.ascontiguousarray(h, dtype=np.int32)
    s = qf_sampling(do_sample=1 if do_sample else 0, temperature=float(temperature), top_k=int(top_k),
                    top_p=float(top_p), repetition_penalty=float(repetition_penalty),
                    seed=int(seed) & (2**64 - 1))
    out = c_int32(-1)
    check(lib.qf_sample_token(byref(s), x.ctypes.data, x.size, h.ctypes.data if h.size else None, h.size,
                              int(counter) & (2**64 - 1), byref(out)))
    return int(out.value), x


class TextStream:
    """Streaming detokenizer over a qfuse.tokenizer.Tokenizer: push(id) -> (text, stopped) gives
    the newly final text (whole UTF-8 characters; text that may begin a stop string is held);
    flush() returns what was held and starts a new sequence. All pieces joined equal
    tokenizer.decode(ids, skip_special_tokens) cut before the first stop string."""

    def __init__(self, tokenizer, stop=(), skip_special_tokens=True):
        if isinstance(stop, (str, bytes)):
            stop = [stop]
        enc = []
        for i, st in enumerate(stop):
            if isinstance(st, str):
                try:
                    enc.append(st.encode("utf-8"))
                except UnicodeEncodeError:
                    raise QfuseError("TextStream: stop[%d] is not encodable as UTF-8" % i) from None
            else:
                raise QfuseError("TextStream: stop[%d] must be str, got %s" % (i, type(st).__name__))
            if b"\0" in enc[-1]:
                raise QfuseError("TextStream: stop[%d] contains a NUL character" % i)
        self._tok = tokenizer  # keeps the tokenizer handle alive
        arr = (c_char_p * max(len(enc), 1))(*enc)
        h = c_void_p()
        check(lib.qf_text_stream_new(tokenizer._handle(), arr, len(enc), 1 if skip_special_tokens else 0,
                                     byref(h)))
        self._h = h.value
        self.stopped = False

    def _handle(self):
        if not self._h:
            raise QfuseError("TextStream: used after close()")
        return self._h

    def push(self, id):
        try:
            i = int(id)
        except (TypeError, ValueError):
            raise QfuseError("TextStream.push: id must be an integer, got %r" % (id,)) from None
        if not -2**31 <= i < 2**31:
            raise QfuseError("TextStream.push: id %d names no token" % i)
        p = ctypes.POINTER(ctypes.c_char)()
        n = c_size_t()
        st = c_int()
        check(lib.qf_text_stream_push(self._handle(), i, byref(p), byref(n), byref(st)))
        self.stopped = bool(st.value)
        return ctypes.string_at(p, n.value).decode("utf-8"), self.stopped

    def flush(self):
        p = ctypes.POINTER(ctypes.c_char)()
        n = c_size_t()
        check(lib.qf_text_stream_flush(self._handle(), byref(p), byref(n)))
        self.stopped = False
        return ctypes.string_at(p, n.value).decode("utf-8")

    def reset(self):
        lib.qf_text_stream_reset(self._handle())
        self.stopped = False

    def close(self):
        if getattr(self, "_h", None):
            lib.qf_text_stream_free(self._h)
            self._h = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
