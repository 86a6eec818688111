"""qfuse.tokenizer - Hugging Face tokenizer.json tokenizers: byte-level BPE (LLaMA, Qwen2, OPT) and
BERT WordPiece (the Q-Former's; include/qfuse_text.h lists the supported parts).

    from qfuse.tokenizer import Tokenizer
    tok = Tokenizer("tokenizer.json")
    ids = tok.encode("<image> describe the emotion")      # list[int]
    text = tok.decode(ids, skip_special_tokens=True)     # str
    tok.token_to_id("<image>"), tok.id_to_token(1), tok.vocab_size, len(tok)

Semantics follow the `tokenizers` library: encode(text, add_special_tokens=True) is
Tokenizer.encode(text).ids; decode(ids, skip_special_tokens) is Tokenizer.decode (this module's
default skip_special_tokens=False is transformers' default). vocab_size is the model's vocab
without added tokens (transformers' tokenizer.vocab_size); len(tok) counts added tokens too
(get_vocab_size(with_added_tokens=True)).

Invariants: text crosses to C as UTF-8 bytes (a str with lone surrogates raises QfuseError, as
tokenizers raises on it); results come back as new Python objects; the C handle is freed by
close() or when the object dies. decode raises QfuseError for an id that names no token, where
tokenizers would drop it silently.
"""
import ctypes
import os
from ctypes import POINTER, byref, c_char_p, c_int, c_int32, c_size_t, c_void_p

from . import _native
from ._native import QfuseError, check, lib

__all__ = ["Tokenizer"]

_native.declare({
    "qf_tokenizer_load": (c_int, [c_char_p, POINTER(c_void_p)]),
    "qf_tokenizer_free": (None, [c_void_p]),
    "qf_tokenizer_encode": (c_int, [c_void_p, c_char_p, c_size_t, c_int, POINTER(c_int32), c_size_t,
                                    POINTER(c_size_t)]),
    "qf_tokenizer_decode": (c_int, [c_void_p, POINTER(c_int32), c_size_t, c_int, c_char_p, c_size_t,
                                    POINTER(c_size_t)]),
    "qf_tokenizer_token_to_id": (c_int, [c_void_p, c_char_p, c_size_t, POINTER(c_int32)]),
    "qf_tokenizer_id_to_token": (c_int, [c_void_p, c_int32, POINTER(c_char_p)]),
    "qf_tokenizer_vocab_size": (c_size_t, [c_void_p, c_int]),
    "qf_tokenizer_id_limit": (c_size_t, [c_void_p]),
    "qf_tokenizer_is_special": (c_int, [c_void_p, c_int32]),
})

_NOT_FOUND = _native.STATUS_NAMES.index("QF_ERR_NOT_FOUND")


class Tokenizer:
    """A loaded tokenizer.json (BPE model, byte-level pre-tokenizer/decoder)."""

    def __init__(self, path):
        h = c_void_p()
        check(lib.qf_tokenizer_load(os.fsencode(os.fspath(path)), byref(h)))
        self._h = h.value
        self.path = os.fspath(path)

    def _handle(self):
        if not self._h:
            raise QfuseError("Tokenizer: used after close()")
        return self._h

    def encode(self, text, add_special_tokens=True):
        """Token ids of `text` (str, or UTF-8 bytes)."""
        if isinstance(text, str):
            try:
                data = text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise QfuseError("Tokenizer.encode: text is not encodable as UTF-8: %s" % e) from None
        elif isinstance(text, (bytes, bytearray)):
            data = bytes(text)
        else:
            raise QfuseError("Tokenizer.encode: text must be str or bytes, got %s" % type(text).__name__)
        h = self._handle()
        n = c_size_t()
        cap = len(data) + 16  # enough unless prefix spaces or templates add many ids
        for _ in range(2):
            buf = (c_int32 * max(cap, 1))()
            s = lib.qf_tokenizer_encode(h, data, len(data), 1 if add_special_tokens else 0, buf, cap,
                                        byref(n))
            if s == _native.QF_OK:
                return list(buf[:n.value])
            if n.value <= cap:  # a real error, not a short buffer
                check(s)
            cap = n.value
        check(s)

    def decode(self, ids, skip_special_tokens=False):
        """The text the ids spell (invalid UTF-8 byte runs become U+FFFD)."""
        h = self._handle()
        try:
            vals = [int(i) for i in ids]
        except (TypeError, ValueError):
            raise QfuseError("Tokenizer.decode: ids must be a sequence of integers") from None
        for k, v in enumerate(vals):
            if not -2**31 <= v < 2**31:
                raise QfuseError("Tokenizer.decode: ids[%d] = %d is not a token id" % (k, v))
        arr = (c_int32 * max(len(vals), 1))(*vals)
        n = c_size_t()
        cap = 4 * len(vals) + 64
        for _ in range(2):
            out = ctypes.create_string_buffer(cap)
            s = lib.qf_tokenizer_decode(h, arr, len(vals), 1 if skip_special_tokens else 0, out, cap,
                                        byref(n))
            if s == _native.QF_OK:
                return out.raw[:n.value].decode("utf-8")
            if n.value < cap:
                check(s)
            cap = n.value + 1
        check(s)

    def token_to_id(self, token):
        """Id of a token string (added tokens first), or None."""
        data = token.encode("utf-8")
        v = c_int32()
        s = lib.qf_tokenizer_token_to_id(self._handle(), data, len(data), byref(v))
        if s == _NOT_FOUND:
            return None
        check(s)
        return v.value

    def id_to_token(self, id):
        """Token string of an id, or None."""
        p = c_char_p()
        try:
            i = int(id)
        except (TypeError, ValueError):
            raise QfuseError("Tokenizer.id_to_token: id must be an integer, got %r" % (id,)) from None
        if not -2**31 <= i < 2**31:
            return None
        s = lib.qf_tokenizer_id_to_token(self._handle(), i, byref(p))
        if s == _NOT_FOUND:
            return None
        check(s)
        return p.value.decode("utf-8")

    @property
    def vocab_size(self):
        """The model's vocab size, without added tokens (transformers' vocab_size)."""
        return int(lib.qf_tokenizer_vocab_size(self._handle(), 0))

    def get_vocab_size(self, with_added_tokens=True):
        """tokenizers' get_vocab_size."""
        return int(lib.qf_tokenizer_vocab_size(self._handle(), 1 if with_added_tokens else 0))

    def __len__(self):
        return self.get_vocab_size(True)

    @property
    def id_limit(self):
        """1 + the largest id of any token (rows an embedding table needs)."""
        return int(lib.qf_tokenizer_id_limit(self._handle()))

    def is_special(self, id):
        return bool(lib.qf_tokenizer_is_special(self._handle(), int(id)))

    def close(self):
        h, self._h = getattr(self, "_h", None), None
        if h:
            lib.qf_tokenizer_free(h)

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown may have torn down ctypes
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
