"""qfuse.cuda - the CUDA backend from Python: whether it is usable, device buffers, and the
host-copy wrappers behind qfuse.sdpa(..., device="cuda") and qfuse.sdpa_backward(..., device="cuda").

    import qfuse, qfuse.cuda
    if qfuse.cuda.available():
        out = qfuse.sdpa(q, k, v, is_causal=True, device="cuda")     # numpy in, numpy out

Invariants:
- available() never raises: False when libqfuse was built without CUDA (make CUDA=1) or no GPU
  is usable; unavailable_reason() then says which (the library's message). A device="cuda" call
  in that case raises QfuseError(QF_ERR_UNSUPPORTED) with the same message.
- numpy in, numpy out: each call uploads its (already converted, C-contiguous float32) inputs and
  the mask to fresh device buffers, runs the C entry point on device pointers (the tensors'
  location selects the CUDA backend), downloads the results and frees every buffer, also when
  the call fails. No device pointer outlives a call.
- set_tf32(on) switches cuBLAS's float32 products to TF32 tensor cores (off by default).
- backend_entry / GemmNtArgs reach the backend tables (src/backend/backend.h) for the
  cross-backend tests (tests/python/test_cuda_ops.py); they are not a user API.
"""
import ctypes
from ctypes import POINTER, c_char_p, c_int, c_int64, c_size_t, c_void_p

import numpy as np

from . import _native
from ._native import QfuseError, check, lib

__all__ = ["available", "unavailable_reason", "DeviceBuffers"]

_native.declare({
    "qf_cuda_init": (c_int, []),
    "qf_cuda_malloc": (c_int, [POINTER(c_void_p), c_size_t]),
    "qf_cuda_free": (c_int, [c_void_p]),
    "qf_cuda_upload": (c_int, [c_void_p, c_void_p, c_size_t]),
    "qf_cuda_download": (c_int, [c_void_p, c_void_p, c_size_t]),
    "qf_cuda_synchronize": (c_int, []),
    "qf_cuda_set_tf32": (c_int, [c_int]),
    "qf_cuda_backend_entry": (c_void_p, [c_int, c_char_p]),
})


def unavailable_reason():
    """None if the CUDA backend is usable, else why not (a sentence)."""
    try:
        check(lib.qf_cuda_init())
    except QfuseError as e:
        return e.message
    return None


def available():
    return unavailable_reason() is None


def init():
    """qf_cuda_init, raising QfuseError(QF_ERR_UNSUPPORTED) with the reason when unusable."""
    check(lib.qf_cuda_init())


def set_tf32(on):
    """TF32 tensor cores for the GPU's float32 products (qf_cuda_set_tf32); raises if unusable."""
    check(lib.qf_cuda_set_tf32(1 if on else 0))


def synchronize():
    check(lib.qf_cuda_synchronize())


class GemmNtArgs(ctypes.Structure):
    """qf_gemm_nt_args of src/ops/gemm_small.h, field for field."""
    _fields_ = [("x", c_void_p), ("ldx", c_int64), ("w", c_void_p), ("bias", c_void_p),
                ("res", c_void_p), ("ldr", c_int64), ("out", c_void_p), ("ldo", c_int64),
                ("M", c_int64), ("N", c_int64), ("K", c_int64), ("accumulate", c_int),
                ("w_bf16", c_void_p), ("x_bf16", c_void_p), ("out_bf16", c_void_p),
                ("bias_bf16", c_void_p)]


def backend_entry(which, op, restype, argtypes):
    """The function `op` of the CPU (which="cpu") or CUDA (which="cuda") backend table as a ctypes
    function with the given signature (qf_cuda_backend_entry, a test hook of CUDA builds)."""
    addr = lib.qf_cuda_backend_entry(1 if which == "cuda" else 0, op.encode())
    if not addr:
        raise QfuseError("backend %s has no entry %s" % (which, op), "QF_ERR_UNSUPPORTED")
    return ctypes.CFUNCTYPE(restype, *argtypes)(addr)


class DeviceBuffers:
    """Device allocations of one call, freed together by close() (a context manager)."""

    def __init__(self):
        self._ptrs = []

    def alloc(self, nbytes):
        p = c_void_p()
        check(lib.qf_cuda_malloc(ctypes.byref(p), int(nbytes)))
        self._ptrs.append(p.value)
        return p.value

    def upload(self, a):
        """A device copy of the C-contiguous array a (None stays None)."""
        if a is None:
            return None
        a = np.ascontiguousarray(a)
        p = self.alloc(a.nbytes)
        check(lib.qf_cuda_upload(p, a.ctypes.data, a.nbytes))
        return p

    def empty(self, shape):
        """A device float32 buffer for an array of `shape` (for outputs)."""
        return self.alloc(4 * int(np.prod(shape, dtype=np.int64)))

    @staticmethod
    def download(ptr, shape):
        out = np.empty(shape, np.float32)
        check(lib.qf_cuda_download(out.ctypes.data, ptr, out.nbytes))
        return out

    def close(self):
        first = None
        while self._ptrs:
            try:
                check(lib.qf_cuda_free(self._ptrs.pop()))
            except QfuseError as e:  # keep freeing the rest; report the first failure
                first = first or e
        if first is not None:
            raise first

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _device_params(call, bufs):
    """A copy of call.p whose mask data points at a device copy of the mask."""
    p = _native.qf_sdpa_params.from_buffer_copy(call.p)
    if call.mask_buf is not None:
        p.mask.data = bufs.upload(call.mask_buf)
    return p


def sdpa_forward(call, want_lse, want_weights):
    """(out, lse or None, weights or None) of qf_sdpa_forward on the GPU; call is qfuse's _SdpaCall."""
    init()
    B, Hq, L, S, D, Dv = call.shape
    with DeviceBuffers() as bufs:
        p = _device_params(call, bufs)
        q, k, v = bufs.upload(call.q), bufs.upload(call.k), bufs.upload(call.v)
        out = bufs.empty((B, Hq, L, Dv))
        lse = bufs.empty((B, Hq, L)) if want_lse else None
        w = bufs.empty((B, Hq, L, S)) if want_weights else None
        check(lib.qf_sdpa_forward(ctypes.byref(p), q, k, v, out, lse, w))
        return (bufs.download(out, (B, Hq, L, Dv)),
                bufs.download(lse, (B, Hq, L)) if want_lse else None,
                bufs.download(w, (B, Hq, L, S)) if want_weights else None)


def sdpa_backward(call, grad_out):
    """(dq, dk, dv): qf_sdpa_forward then qf_sdpa_backward on the GPU (out and lse stay there)."""
    init()
    B, Hq, L, S, D, Dv = call.shape
    with DeviceBuffers() as bufs:
        p = _device_params(call, bufs)
        q, k, v = bufs.upload(call.q), bufs.upload(call.k), bufs.upload(call.v)
        g = bufs.upload(np.ascontiguousarray(grad_out, np.float32))
        out, lse = bufs.empty((B, Hq, L, Dv)), bufs.empty((B, Hq, L))
        check(lib.qf_sdpa_forward(ctypes.byref(p), q, k, v, out, lse, None))
        dq, dk, dv = bufs.empty(call.q.shape), bufs.empty(call.k.shape), bufs.empty(call.v.shape)
        check(lib.qf_sdpa_backward(ctypes.byref(p), q, k, v, out, lse, g, dq, dk, dv))
        return (bufs.download(dq, call.q.shape), bufs.download(dk, call.k.shape),
                bufs.download(dv, call.v.shape))
