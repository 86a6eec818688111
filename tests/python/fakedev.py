"""fakedev.py - pytest plugin for `make fakedev`: the GPU tests of the models' device code paths
run against a libqfuse built with -DQF_FAKE_DEVICE (src/backend/fake_device.c: "cuda" placement
is host memory), under ASan/UBSan. It tells the tests a GPU is there and hands them host buffers
as "device" memory; the few tests that need a real GPU (CUDA runtime calls from Python, device vs
host pointer refusals, refusals that live in the CUDA kernels) are skipped by name below.

    QFUSE_LIBRARY=build-fakedev/libqfuse.so PYTHONPATH=python:tests/python \\
        python3 -m pytest -p fakedev tests/python/test_cuda_qformer_backward.py ..."""
import ctypes

import numpy as np
import pytest

import qfuse.cuda as C

C.unavailable_reason = lambda: None

# test ids (substrings) that need the real device, and why
NEEDS_GPU = {
    "test_cuda_qformer_backward.py::test_device_pointers_and_back_to_cpu": "calls qf_cuda_download",
    "test_cuda_qformer.py::test_device_pointers_in_and_out": "calls qf_cuda_download",
    "test_cuda_kvprefix.py::test_device_pointers_in_and_out": "calls qf_cuda_download",
    "test_cuda_vision.py::test_device_memory_out_and_pixels_refused": "device vs host pointers (all host here)",
    "test_cuda_act16.py::test_gemm": "calls the CUDA backend table directly (qf_cuda_backend_entry)",
    "test_cuda_act16.py::test_layernorm_x16": "calls the CUDA backend table directly (qf_cuda_backend_entry)",
    "test_cuda_act16.py::test_gelu_x16": "calls the CUDA backend table directly (qf_cuda_backend_entry)",
    "test_cuda_act16.py::test_stage_x16": "calls the CUDA backend table directly (qf_cuda_backend_entry)",
    "test_cuda_act16.py::test_qformer_bf16_encoder_staging[True]": "calls qf_cuda_download",
    "test_cuda_mha.py::test_device_pointers": "device vs host pointers (all host here)",
    "test_cuda_mha.py::test_refusals_and_bf16": "the dropout refusal lives in the CUDA kernels",
}


class HostBuffers:
    """qfuse.cuda.DeviceBuffers on host memory (the fake device's memory)."""

    def __init__(self):
        self._keep = []

    def upload(self, a):
        if a is None:
            return None
        a = np.ascontiguousarray(a).copy()
        self._keep.append(a)
        return a.ctypes.data

    def alloc(self, nbytes):
        a = np.full(max(int(nbytes), 1), 0xFF, np.uint8)
        self._keep.append(a)
        return a.ctypes.data

    def empty(self, shape):
        a = np.full(shape, np.nan, np.float32)
        self._keep.append(a)
        return a.ctypes.data

    @staticmethod
    def download(ptr, shape):
        out = np.empty(shape, np.float32)
        ctypes.memmove(out.ctypes.data, ptr, out.nbytes)
        return out

    def close(self):
        self._keep = []

    def __enter__(self):
        return self

    def __exit__(self, *e):
        self.close()


C.DeviceBuffers = HostBuffers


def pytest_collection_modifyitems(config, items):
    for item in items:
        for key, why in NEEDS_GPU.items():
            if key in item.nodeid:
                item.add_marker(pytest.mark.skip(reason="fake device: " + why))
