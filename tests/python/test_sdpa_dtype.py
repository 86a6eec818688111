"""test_sdpa_dtype.py - the dtype argument of the top-level qfuse.sdpa / qfuse.sdpa_backward
(python/qfuse/__init__.py), routed to qfuse.ops.sdpa_bf16 / sdpa_backward_bf16 for
dtype="bfloat16" on device="cuda", and qfuse.cuda reachable after `import qfuse` alone.

Everywhere: dtype="float32" (the default, and its spellings "f32") gives the float32 engine's
result (vs the float64 torch reference util.sdpa_ref, < 1e-5 of max|ref|); dtype="bfloat16" on
the CPU is refused (QF_ERR_UNSUPPORTED, the message says the CUDA backend), an unknown dtype is
QF_ERR_DTYPE, return_weights / a dropout seed with bf16 are refused before any GPU work;
qfuse.cuda.set_tf32 / synchronize / available exist after a bare `import qfuse` (checked in a
fresh interpreter, where no test module has imported qfuse.cuda).
With a GPU: the bf16 forward and backward through qfuse.sdpa(..., dtype="bfloat16") equal
qfuse.ops.sdpa_bf16 / sdpa_backward_bf16 bit for bit (the same kernels), and are within the bf16
bounds of test_cuda_bf16.py of the float64 reference on the bf16-rounded inputs (output 1e-2,
gradients 2e-2 of the largest reference value)."""
import os
import subprocess
import sys

import numpy as np
import pytest

import qfuse
import util
from qfuse import QfuseError

REASON = qfuse.cuda.unavailable_reason()
needs_gpu = pytest.mark.skipif(REASON is not None, reason="CUDA backend not usable: %s" % REASON)


def _qkv(seed=0, B=2, H=4, L=33, S=70, D=64):
    r = np.random.default_rng(seed)
    f = lambda *s: r.standard_normal(s).astype(np.float32)  # noqa: E731
    return f(B, H, L, D), f(B, H, S, D), f(B, H, S, D), f(B, H, L, D)


def test_float32_dtype_is_the_float32_engine():
    q, k, v, g = _qkv()
    ref, dq, dk, dv = util.sdpa_ref(q, k, v, is_causal=True, grad_out=g)
    for dt in ("float32", "f32", np.float32):
        assert util.rel_err(qfuse.sdpa(q, k, v, is_causal=True, dtype=dt), ref) < 1e-5
    got = qfuse.sdpa_backward(q, k, v, g, is_causal=True, dtype="float32")
    for a, b in zip(got, (dq, dk, dv)):
        assert util.rel_err(a, b) < 1e-5


def test_bfloat16_refusals():
    q, k, v, g = _qkv(L=5, S=7, D=16)
    for fn, args in ((qfuse.sdpa, (q, k, v)), (qfuse.sdpa_backward, (q, k, v, g))):
        with pytest.raises(QfuseError) as e:
            fn(*args, dtype="bfloat16")
        assert e.value.status == "QF_ERR_UNSUPPORTED" and "CUDA" in str(e.value), str(e.value)
        with pytest.raises(QfuseError) as e:
            fn(*args, dtype="int8", device="cuda")
        assert e.value.status == "QF_ERR_DTYPE" and "int8" in str(e.value)
    with pytest.raises(QfuseError) as e:
        qfuse.sdpa(q, k, v, dtype="bfloat16", device="cuda", return_weights=True)
    assert e.value.status == "QF_ERR_UNSUPPORTED" and "return_weights" in str(e.value)
    with pytest.raises(QfuseError) as e:
        qfuse.sdpa_backward(q, k, v, g, dtype="bf16", device="cuda", seed=3)
    assert e.value.status == "QF_ERR_UNSUPPORTED" and "seed" in str(e.value)


def test_cuda_namespace_after_bare_import():
    env = dict(os.environ)   # LD_PRELOAD kept: under `make sanitize` the library needs the ASan runtime first
    code = ("import qfuse; c = qfuse.cuda; "
            "assert callable(c.set_tf32) and callable(c.synchronize) and callable(c.available); "
            "print(c.available())")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == str(REASON is None)


@needs_gpu
@pytest.mark.parametrize("causal", [False, True])
def test_bfloat16_on_cuda(causal):
    from qfuse import ops
    q, k, v, g = _qkv(seed=1 + causal)
    mask = None if causal else (np.random.default_rng(7).random((2, 1, 33, 70)) > 0.2)
    out = qfuse.sdpa(q, k, v, attn_mask=mask, is_causal=causal, device="cuda", dtype="bfloat16")
    assert out.dtype == np.float32
    assert np.array_equal(out, ops.sdpa_bf16(q, k, v, attn_mask=mask, is_causal=causal))
    # the reference on the inputs as the kernel saw them (rounded to bf16)
    rq, rk, rv, rg = (ops.from_bf16(ops.to_bf16(x)) for x in (q, k, v, g))
    ref, dq, dk, dv = util.sdpa_ref(rq, rk, rv, attn_mask=mask, is_causal=causal, grad_out=rg)
    e = util.rel_err(out, ref)
    assert e < 1e-2, e
    got = qfuse.sdpa_backward(q, k, v, g, attn_mask=mask, is_causal=causal, device="cuda", dtype="bfloat16")
    same = ops.sdpa_backward_bf16(q, k, v, g, attn_mask=mask, is_causal=causal)
    for a, b, r in zip(got, same, (dq, dk, dv)):
        assert np.array_equal(a, b)
        assert util.rel_err(a, r) < 2e-2, util.rel_err(a, r)
    qfuse.cuda.set_tf32(False)
    qfuse.cuda.synchronize()
    print("bf16 sdpa causal=%s: out rel err %.2e" % (causal, e))
