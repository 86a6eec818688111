"""util.py - shared helpers of the Python tests: error measure, a pure-numpy safetensors reader
and writer (torch 1.13 has no safetensors package), the fixture loader, QUICK mode, and the
float64 PyTorch reference of scaled dot-product attention.

Invariants:
- rel_err(a, ref) = max|a - ref| / max|ref| (max|ref| floored at tiny so all-zero refs work).
- The safetensors reader/writer implement the format independently of libqfuse (8-byte LE header
  length, JSON header, data offsets relative to the data section), so fixture reads and files
  written for qfuse are not checked by the code under test.
- QUICK (QFUSE_TEST_QUICK=1, the sanitizer run) shrinks case counts and big shapes.
"""
import json
import os
import struct

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.normpath(os.path.join(HERE, "..", ".."))
FIXTURES = os.path.join(REPO, "tests", "fixtures")
QUICK = os.environ.get("QFUSE_TEST_QUICK", "") not in ("", "0")


def rel_err(a, ref):
    a = np.asarray(a, np.float64)
    ref = np.asarray(ref, np.float64)
    assert a.shape == ref.shape, "shape %s vs reference %s" % (a.shape, ref.shape)
    if a.size == 0:
        return 0.0
    scale = max(float(np.max(np.abs(ref))), 1e-30)
    return float(np.max(np.abs(a - ref))) / scale


# ---- safetensors -------------------------------------------------------------------------------

_ST_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4",
              "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}
_NP_TO_ST = {np.dtype(v).str: k for k, v in _ST_DTYPES.items()}
_NP_TO_ST[np.dtype("?").str] = "BOOL"


def read_safetensors(path, with_metadata=False):
    """{name: numpy array} (BF16 widened to float32). Checks offsets against the data section."""
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        raise ValueError("%s: shorter than the 8-byte header length" % path)
    (n,) = struct.unpack("<Q", blob[:8])
    if 8 + n > len(blob):
        raise ValueError("%s: header length %d exceeds the file" % (path, n))
    header = json.loads(blob[8:8 + n].decode("utf-8"))
    data = blob[8 + n:]
    meta = header.pop("__metadata__", {})
    out = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        if not 0 <= begin <= end <= len(data):
            raise ValueError("%s: tensor %s offsets out of range" % (path, name))
        raw = data[begin:end]
        shape = tuple(info["shape"])
        if info["dtype"] == "BF16":
            u = np.frombuffer(raw, "<u2").astype(np.uint32) << 16
            arr = u.view(np.float32)
        else:
            arr = np.frombuffer(raw, _ST_DTYPES[info["dtype"]])
        out[name] = arr.reshape(shape).copy()
    return (out, meta) if with_metadata else out


def safetensors_bytes(tensors, metadata=None, dtypes=None):
    """Serialised safetensors file for {name: array}. Torch tensors are accepted (detached to
    numpy). dtypes may force a safetensors dtype per name (e.g. {"w": "I32"})."""
    arrays = {}
    for name, t in tensors.items():
        if hasattr(t, "detach"):
            t = t.detach().cpu().numpy()
        a = np.asarray(t)
        if dtypes and name in dtypes:
            a = a.astype(_ST_DTYPES[dtypes[name]])
        key = a.dtype.newbyteorder("<").str if a.dtype.byteorder not in ("|",) else a.dtype.str
        if key not in _NP_TO_ST:
            raise ValueError("tensor %s: dtype %s has no safetensors spelling" % (name, a.dtype))
        arrays[name] = (np.ascontiguousarray(a.astype(key)), _NP_TO_ST[key])
    header = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    chunks, off = [], 0
    for name in sorted(arrays):
        a, st = arrays[name]
        raw = a.tobytes()
        header[name] = {"dtype": st, "shape": list(a.shape), "data_offsets": [off, off + len(raw)]}
        chunks.append(raw)
        off += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * (-len(h) % 8)  # the format allows space padding; 8-aligns the data section
    return struct.pack("<Q", len(h)) + h + b"".join(chunks)


def write_safetensors(path, tensors, metadata=None, dtypes=None):
    """Writes {name: numpy array or torch tensor} to path in safetensors format."""
    blob = safetensors_bytes(tensors, metadata, dtypes)
    with open(path, "wb") as f:
        f.write(blob)
    return path


# ---- fixtures ----------------------------------------------------------------------------------

def fixture_names(prefix):
    """Sorted fixture case folders whose name starts with prefix ("sdpa_", "mha_")."""
    if not os.path.isdir(FIXTURES):
        return []
    return sorted(d for d in os.listdir(FIXTURES)
                  if d.startswith(prefix) and os.path.isfile(os.path.join(FIXTURES, d, "io.safetensors")))


def load_fixture(name):
    """(case dict from case.json, {tensor name: array} from io.safetensors, folder path)."""
    folder = os.path.join(FIXTURES, name)
    with open(os.path.join(folder, "case.json")) as f:
        case = json.load(f)
    return case, read_safetensors(os.path.join(folder, "io.safetensors")), folder


# ---- the PyTorch reference of SDPA -------------------------------------------------------------

_torch = None


def torch():
    """torch, imported once, limited to one thread (the machine is shared)."""
    global _torch
    if _torch is None:
        import torch as t
        t.set_num_threads(1)
        _torch = t
    return _torch


def sdpa_ref(q, k, v, attn_mask=None, is_causal=False, scale=None, grad_out=None,
             keep=None, dropout_p=0.0):
    """torch.nn.functional.scaled_dot_product_attention's math in float64 (torch 1.13 has no
    F.scaled_dot_product_attention): softmax(q k^T * scale + mask) v, causal top-left
    (ones(L,S).tril()), Hkv < Hq by repeat_interleave, bool mask True = attend, float added.
    keep (bool [B,Hq,L,S]) applies dropout as torch does: p * keep / (1 - dropout_p).
    Fully masked rows give zeros (qfuse's documented choice; torch gives NaN).
    Returns out, or (out, dq, dk, dv) when grad_out is given, as float64 numpy arrays."""
    t = torch()
    tq = t.tensor(np.asarray(q, np.float64), requires_grad=grad_out is not None)
    tk = t.tensor(np.asarray(k, np.float64), requires_grad=grad_out is not None)
    tv = t.tensor(np.asarray(v, np.float64), requires_grad=grad_out is not None)
    Hq, Hkv = tq.shape[-3], tk.shape[-3]
    kk, vv = tk, tv
    if Hq != Hkv:
        kk = tk.repeat_interleave(Hq // Hkv, dim=-3)
        vv = tv.repeat_interleave(Hq // Hkv, dim=-3)
    L, S, D = tq.shape[-2], tk.shape[-2], tq.shape[-1]
    s = 1.0 / np.sqrt(D) if scale is None else float(scale)
    scores = (tq @ kk.transpose(-2, -1)) * s
    if is_causal:
        scores = scores.masked_fill(~t.ones(L, S, dtype=t.bool).tril(), float("-inf"))
    if attn_mask is not None:
        m = np.asarray(attn_mask)
        if m.dtype == np.bool_:
            scores = scores.masked_fill(~t.from_numpy(m.copy()), float("-inf"))
        else:
            scores = scores + t.from_numpy(np.asarray(m, np.float64))
    dead = (scores == float("-inf")).all(dim=-1, keepdim=True)
    p = t.softmax(scores.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    if keep is not None:
        p = p * t.from_numpy(np.asarray(keep, np.float64)) / (1.0 - dropout_p)
    out = p @ vv
    if grad_out is None:
        return out.detach().numpy()
    out.backward(t.tensor(np.asarray(grad_out, np.float64)))
    return out.detach().numpy(), tq.grad.numpy(), tk.grad.numpy(), tv.grad.numpy()


# ---- Philox4x32-10 (Salmon et al., SC'11), written from the paper for an independent check ------

def philox_uniform(seed, offset, index):
    """qfuse's documented dropout stream in numpy: element `index` (array) of stream
    (seed, offset) takes word index % 4 of Philox4x32-10 at key = seed, counter =
    (lo 64 bits: index // 4, hi 64 bits: offset), mapped to [0,1) as (word >> 8) / 2^24."""
    index = np.asarray(index, np.uint64)
    m32 = np.uint64(0xFFFFFFFF)
    ctr = index >> np.uint64(2)
    c = [ctr & m32, ctr >> np.uint64(32),
         np.full_like(ctr, np.uint64(offset) & m32), np.full_like(ctr, np.uint64(offset) >> np.uint64(32))]
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    M0, M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    W0, W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
    for _ in range(10):
        p0, p1 = M0 * c[0], M1 * c[2]
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & m32, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & m32]
        k0, k1 = (k0 + W0) & m32, (k1 + W1) & m32
    words = np.stack(c)  # [4, n]
    w = np.take_along_axis(words, (index & np.uint64(3)).astype(np.int64)[None], 0)[0]
    return (w >> np.uint64(8)).astype(np.float64) / 16777216.0
