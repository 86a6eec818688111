"""_native.py - the ctypes binding of libqfuse: finds and loads the shared library, mirrors the
structs of include/qfuse.h, declares every function's argtypes/restype, and turns a failing
qf_status into qfuse.QfuseError.

Invariants:
- Struct field order and types follow qfuse.h exactly (ctypes applies the same C alignment rules);
  tests/python/test_api.py checks sizes against values derived from the C layout rules.
- Buffer arguments (float*, const void*, uint8_t*) are declared c_void_p: pass `arr.ctypes.data`
  (the caller keeps `arr` alive for the call) or None for an optional output.
- A function the loaded library does not export (a part not built yet) is bound to a stub that
  raises QfuseError(status="QF_ERR_UNSUPPORTED") when called, so importing qfuse never fails
  because one op is missing.
- `check(status)` reads qf_last_error() on the calling thread right after the call, so the
  message belongs to that call.

Where the library comes from, first match wins:
  $QFUSE_LIBRARY; <repo>/build/libqfuse.so (this file is <repo>/python/qfuse/_native.py);
  libqfuse.so next to this file; ctypes.util.find_library("qfuse").
"""
import ctypes
import ctypes.util
import os

c_int, c_int64, c_uint64, c_float, c_void_p, c_char_p, c_size_t, c_uint32 = (
    ctypes.c_int, ctypes.c_int64, ctypes.c_uint64, ctypes.c_float, ctypes.c_void_p,
    ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint32)

# qf_status values, in the header's order.
STATUS_NAMES = ("QF_OK", "QF_ERR_ARG", "QF_ERR_SHAPE", "QF_ERR_DTYPE", "QF_ERR_NONFINITE",
                "QF_ERR_IO", "QF_ERR_FORMAT", "QF_ERR_NOT_FOUND", "QF_ERR_NOMEM",
                "QF_ERR_UNSUPPORTED", "QF_ERR_INTERNAL")
QF_OK = 0

QF_MASK_NONE, QF_MASK_BOOL, QF_MASK_FLOAT = 0, 1, 2
QF_ISA_SCALAR, QF_ISA_AVX2, QF_ISA_AVX512 = 0, 1, 2
ISA_BY_NAME = {"scalar": QF_ISA_SCALAR, "avx2": QF_ISA_AVX2, "avx512": QF_ISA_AVX512}

QF_MAX_DIMS = 8


class QfuseError(Exception):
    """Raised for every failure: a non-OK status from libqfuse (message = qf_last_error()) or an
    argument problem found on the Python side. `.status` is the qf_status name, e.g.
    "QF_ERR_SHAPE"."""

    def __init__(self, message, status="QF_ERR_ARG"):
        super().__init__(message)
        self.message = message
        self.status = status


# ---- structs (mirror include/qfuse.h) ---------------------------------------------------------

class qf_mask(ctypes.Structure):
    _fields_ = [("kind", c_int),            # qf_mask_kind
                ("data", c_void_p),
                ("ndim", c_int),
                ("shape", c_int64 * 4)]


class qf_sdpa_params(ctypes.Structure):
    _fields_ = [("B", c_int64), ("Hq", c_int64), ("Hkv", c_int64), ("L", c_int64),
                ("S", c_int64), ("D", c_int64), ("Dv", c_int64),
                ("scale", c_float),
                ("is_causal", c_int),
                ("enable_gqa", c_int),
                ("dropout_p", c_float),
                ("seed", c_uint64), ("offset", c_uint64),
                ("check_finite", c_int),
                ("mask", qf_mask)]


class qf_mha_config(ctypes.Structure):
    _fields_ = [("embed_dim", c_int64), ("num_heads", c_int64), ("kdim", c_int64),
                ("vdim", c_int64),
                ("bias", c_int),
                ("batch_first", c_int),
                ("dropout", c_float)]


class qf_mha_args(ctypes.Structure):
    _fields_ = [("B", c_int64), ("L", c_int64), ("S", c_int64),
                ("key_padding_mask", c_void_p),   # const uint8_t *
                ("attn_mask", qf_mask),
                ("is_causal", c_int),
                ("need_weights", c_int),
                ("average_attn_weights", c_int),
                ("training", c_int),
                ("seed", c_uint64), ("offset", c_uint64)]


class qf_param(ctypes.Structure):
    _fields_ = [("name", c_char_p),
                ("data", ctypes.POINTER(c_float)),
                ("grad", ctypes.POINTER(c_float)),
                ("ndim", c_int),
                ("shape", c_int64 * 4)]


class qf_tensor_view(ctypes.Structure):
    _fields_ = [("name", c_char_p), ("dtype", c_int), ("ndim", c_int),
                ("shape", c_int64 * QF_MAX_DIMS), ("data", c_void_p), ("nbytes", c_size_t)]


# ---- loading -----------------------------------------------------------------------------------

def _candidates():
    env = os.environ.get("QFUSE_LIBRARY")
    if env:
        return [env]  # an explicit choice is not second-guessed
    here = os.path.dirname(os.path.abspath(__file__))
    out = [os.path.join(here, "..", "..", "build", "libqfuse.so"),
           os.path.join(here, "libqfuse.so")]
    found = ctypes.util.find_library("qfuse")
    if found:
        out.append(found)
    return out


def _load():
    tried = []
    for path in _candidates():
        if os.path.sep in path and not os.path.exists(path):
            tried.append(path + " (absent)")
            continue
        try:
            return ctypes.CDLL(os.path.normpath(path) if os.path.sep in path else path), path
        except OSError as e:
            tried.append("%s (%s)" % (path, e))
    raise ImportError("qfuse: cannot load libqfuse.so; set QFUSE_LIBRARY or run `make`. Tried: "
                      + "; ".join(tried))


lib, library_path = _load()

P = ctypes.POINTER
# name: (restype, [argtypes])
_SIGNATURES = {
    "qf_last_error": (c_char_p, []),
    "qf_status_name": (c_char_p, [c_int]),
    "qf_clear_error": (None, []),
    "qf_dtype_size": (c_size_t, [c_int]),
    "qf_dtype_name": (c_char_p, [c_int]),
    "qf_set_num_threads": (c_int, [c_int]),
    "qf_get_num_threads": (c_int, []),
    "qf_set_isa": (c_int, [c_int]),
    "qf_get_isa": (c_int, []),
    "qf_isa_name": (c_char_p, [c_int]),
    "qf_philox4x32": (None, [c_uint64, c_uint64, c_uint64, P(c_uint32)]),
    "qf_philox_uniform": (c_float, [c_uint64, c_uint64, c_uint64]),
    "qf_st_open": (c_int, [c_char_p, P(c_void_p)]),
    "qf_st_close": (None, [c_void_p]),
    "qf_st_count": (c_int, [c_void_p]),
    "qf_st_get": (c_int, [c_void_p, c_int, P(qf_tensor_view)]),
    "qf_st_find": (c_int, [c_void_p, c_char_p, P(qf_tensor_view)]),
    "qf_sdpa_defaults": (qf_sdpa_params, [c_int64] * 6),
    "qf_sdpa_check": (c_int, [P(qf_sdpa_params)]),
    "qf_sdpa_forward": (c_int, [P(qf_sdpa_params), c_void_p, c_void_p, c_void_p,
                                c_void_p, c_void_p, c_void_p]),
    "qf_sdpa_backward": (c_int, [P(qf_sdpa_params), c_void_p, c_void_p, c_void_p,
                                 c_void_p, c_void_p, c_void_p,
                                 c_void_p, c_void_p, c_void_p]),
    "qf_mha_load": (c_int, [c_char_p, P(qf_mha_config), P(c_void_p)]),
    "qf_mha_free": (None, [c_void_p]),
    "qf_mha_forward": (c_int, [c_void_p, P(qf_mha_args), c_void_p, c_void_p, c_void_p,
                               c_void_p, c_void_p]),
    "qf_mha_backward": (c_int, [c_void_p, c_void_p, c_void_p, c_void_p, c_void_p]),
    "qf_mha_num_params": (c_int, [c_void_p]),
    "qf_mha_param": (c_int, [c_void_p, c_int, P(qf_param)]),
    "qf_mha_zero_grad": (None, [c_void_p]),
}


def _missing(name):
    def stub(*args, **kwargs):
        raise QfuseError("%s: not exported by %s (that part of qfuse is not built)"
                         % (name, library_path), "QF_ERR_UNSUPPORTED")
    stub.__name__ = name
    return stub


missing = []


def declare(signatures):
    """Sets restype/argtypes for {name: (restype, [argtypes])}; each module of the package
    declares the C functions it calls. A name the library lacks becomes a stub that raises."""
    for name, (res, args) in signatures.items():
        try:
            f = getattr(lib, name)
        except AttributeError:
            missing.append(name)
            # Stubs live on a plain attribute of the CDLL object: lib.<name>(...) raises QfuseError.
            setattr(lib, name, _missing(name))
            continue
        f.restype = res
        f.argtypes = args


declare(_SIGNATURES)


def has(name):
    """True if the loaded library exports `name` (e.g. "qf_sdpa_forward")."""
    return name not in missing and hasattr(lib, name)


def status_name(status):
    if 0 <= status < len(STATUS_NAMES):
        return STATUS_NAMES[status]
    try:
        return lib.qf_status_name(status).decode()
    except Exception:  # noqa: BLE001 - a name is only decoration here
        return "QF_ERR_UNKNOWN(%d)" % status


def last_error():
    msg = lib.qf_last_error()
    return msg.decode("utf-8", "replace") if msg else ""


def check(status):
    """Raise QfuseError(qf_last_error(), status=<name>) if status is not QF_OK."""
    if status != QF_OK:
        raise QfuseError(last_error() or "qfuse call failed without a message",
                         status_name(status))
