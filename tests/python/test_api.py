"""test_api.py - the package's small surface: threads, ISA selection, version, the error type,
and that the ctypes structs have the sizes/offsets the x86-64 C ABI gives the structs of
include/qfuse.h (computed by hand from the header's field lists, not read from qfuse)."""
import ctypes
import os
import re

import numpy as np
import pytest

import qfuse
from qfuse import _native
import util


def test_threads_round_trip():
    for n in (1, 2, 3):
        qfuse.set_num_threads(n)
        assert qfuse.get_num_threads() == n


@pytest.mark.parametrize("bad", [0, -1, 5000])
def test_bad_thread_count(bad):
    before = qfuse.get_num_threads()
    with pytest.raises(qfuse.QfuseError) as e:
        qfuse.set_num_threads(bad)
    assert e.value.status == "QF_ERR_ARG" and str(bad) in str(e.value)
    assert qfuse.get_num_threads() == before


@pytest.mark.parametrize("bad", [2.5, "2", None, 2**40])
def test_thread_count_wrong_type(bad):
    with pytest.raises(qfuse.QfuseError):
        qfuse.set_num_threads(bad)


def test_set_isa_each_path():
    seen = []
    for name in ("scalar", "avx2", "avx512"):
        try:
            qfuse.set_isa(name)
        except qfuse.QfuseError as e:
            assert e.status == "QF_ERR_UNSUPPORTED" and name in str(e)
            continue
        assert qfuse.get_isa() == name
        seen.append(name)
    assert "scalar" in seen


def test_set_isa_unknown():
    with pytest.raises(qfuse.QfuseError) as e:
        qfuse.set_isa("sse9")
    assert "sse9" in str(e.value)


def test_forced_isa_is_used_and_correct():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, 9, 24)).astype(np.float32) for _ in range(3))
    ref = util.sdpa_ref(q, k, v)
    for name in ("scalar", "avx2", "avx512"):
        try:
            qfuse.set_isa(name)
        except qfuse.QfuseError:
            continue
        for n in (1, 2):
            qfuse.set_num_threads(n)
            assert qfuse.get_isa() == name
            assert util.rel_err(qfuse.sdpa(q, k, v), ref) < 1e-5, (name, n)


def test_version_matches_header():
    with open(os.path.join(util.REPO, "include", "qfuse.h")) as f:
        m = re.search(r'#define QFUSE_VERSION "([^"]+)"', f.read())
    assert m and qfuse.__version__ == m.group(1)


def test_error_type_carries_status():
    e = qfuse.QfuseError("x", "QF_ERR_SHAPE")
    assert isinstance(e, Exception) and e.status == "QF_ERR_SHAPE" and str(e) == "x"
    with pytest.raises(qfuse.QfuseError) as info:
        _native.check(_native.lib.qf_set_num_threads(0))
    assert info.value.status == "QF_ERR_ARG" and "qf_set_num_threads" in str(info.value)


def test_public_names():
    for name in ("sdpa", "sdpa_backward", "MultiheadAttention", "QfuseError", "set_num_threads",
                 "get_num_threads", "set_isa", "get_isa", "__version__"):
        assert hasattr(qfuse, name), name


def test_struct_layouts_match_c_abi():
    # x86-64 System V: int64/pointers 8-aligned, int/float/enum 4 bytes.
    assert ctypes.sizeof(_native.qf_mask) == 56          # kind 0, data 8, ndim 16, shape 24
    assert _native.qf_mask.shape.offset == 24
    P = _native.qf_sdpa_params                           # 7 x int64 = 56, then
    assert (P.scale.offset, P.is_causal.offset, P.enable_gqa.offset, P.dropout_p.offset) == (56, 60, 64, 68)
    assert (P.seed.offset, P.offset.offset, P.check_finite.offset, P.mask.offset) == (72, 80, 88, 96)
    assert ctypes.sizeof(P) == 152
    assert ctypes.sizeof(_native.qf_mha_config) == 48 and _native.qf_mha_config.dropout.offset == 40
    A = _native.qf_mha_args
    assert (A.key_padding_mask.offset, A.attn_mask.offset, A.is_causal.offset, A.seed.offset) == (24, 32, 88, 104)
    assert ctypes.sizeof(A) == 120
    assert ctypes.sizeof(_native.qf_param) == 64 and _native.qf_param.shape.offset == 32


def test_sdpa_defaults_round_trip():
    p = _native.lib.qf_sdpa_defaults(2, 4, 2, 5, 6, 8)
    assert (p.B, p.Hq, p.Hkv, p.L, p.S, p.D, p.Dv) == (2, 4, 2, 5, 6, 8, 8)
    assert np.isnan(p.scale) and p.check_finite == 1 and p.mask.kind == _native.QF_MASK_NONE
    assert p.dropout_p == 0.0
