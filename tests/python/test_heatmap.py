"""test_heatmap.py - qf_heatmap_png (attention picture) and the image input path (qf_image_load,
qf_image_preprocess) against independent references:
- the PNG is decoded here with zlib + struct (all five PNG row filters), not by qfuse or stb;
  expected colors are matplotlib's viridis stops, written out below;
- preprocessing is compared with transformers' BlipImageProcessor recipe done with Pillow + numpy:
  Image.resize((w, h), BICUBIC, reducing_gap=None) on uint8, * rescale_factor (float64 -> float32),
  (x - mean) / std in float32, HWC -> CHW. qfuse implements Pillow's fixed-point resampler, so the
  bound is float rounding only (1e-6), not the 4-10 levels stb's own resizer was measured off by.
- decoding: PNG must equal Pillow's decode exactly; baseline JPEG within 3 levels max / 0.5 mean
  (stb's IDCT and chroma upsampling differ from libjpeg's by rounding).
"""
import ctypes
import json
import os
import struct
import zlib

import numpy as np
import pytest

from qfuse import _native
from util import QUICK

PIL = pytest.importorskip("PIL.Image")

c_int, c_int64, c_double, c_void_p, c_char_p = (ctypes.c_int, ctypes.c_int64, ctypes.c_double,
                                               ctypes.c_void_p, ctypes.c_char_p)


class qf_image_preproc(ctypes.Structure):
    _fields_ = [("size_h", c_int64), ("size_w", c_int64),
                ("do_resize", c_int), ("do_rescale", c_int), ("do_normalize", c_int),
                ("resample", c_int), ("rescale_factor", c_double),
                ("mean", c_double * 3), ("std", c_double * 3)]


P = ctypes.POINTER
_native.declare({
    "qf_heatmap_png": (c_int, [c_char_p, c_void_p, c_int64, c_int64, c_int, c_void_p, c_int]),
    "qf_image_load": (c_int, [c_char_p, P(c_int64), P(c_int64), P(c_void_p)]),
    "qf_image_preproc_defaults": (qf_image_preproc, [c_int64]),
    "qf_image_preproc_load": (c_int, [c_char_p, c_int64, P(qf_image_preproc)]),
    "qf_image_preprocess": (c_int, [P(qf_image_preproc), c_void_p, c_int64, c_int64, c_void_p]),
})
lib = _native.lib
libc = ctypes.CDLL(None)
libc.free.argtypes = [c_void_p]

VIRIDIS = np.array([[68, 1, 84], [72, 36, 117], [65, 68, 135], [53, 95, 141], [42, 120, 142],
                    [33, 145, 140], [34, 168, 132], [68, 191, 112], [122, 209, 81],
                    [189, 223, 38], [253, 231, 37]], np.float64)
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])


def status(code):
    return _native.STATUS_NAMES[code]


def decode_png(path):
    """8-bit RGB PNG -> uint8 [h, w, 3], by the PNG specification (independent of stb)."""
    with open(path, "rb") as f:
        blob = f.read()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    pos, idat, ihdr = 8, b"", None
    while pos < len(blob):
        (n,) = struct.unpack(">I", blob[pos:pos + 4])
        kind, data = blob[pos + 4:pos + 8], blob[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", blob[pos + 8 + n:pos + 12 + n])
        assert zlib.crc32(kind + data) == crc, "bad CRC in chunk %r" % kind
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", data)
        elif kind == b"IDAT":
            idat += data
        pos += 12 + n
    w, h, depth, ctype, _, _, interlace = ihdr
    assert (depth, ctype, interlace) == (8, 2, 0), "expected 8-bit RGB, not interlaced: %r" % (ihdr,)
    raw = zlib.decompress(idat)
    stride, bpp = w * 3, 3
    out = np.zeros((h, stride), np.int64)
    prev = np.zeros(stride, np.int64)
    for y in range(h):
        ftype = raw[y * (stride + 1)]
        line = np.frombuffer(raw, np.uint8, stride, y * (stride + 1) + 1).astype(np.int64)
        cur = np.zeros(stride, np.int64)
        for x in range(stride):
            a = cur[x - bpp] if x >= bpp else 0
            b = prev[x]
            c = prev[x - bpp] if x >= bpp else 0
            if ftype == 0:
                p = 0
            elif ftype == 1:
                p = a
            elif ftype == 2:
                p = b
            elif ftype == 3:
                p = (a + b) // 2
            else:
                pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                p = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
            cur[x] = (line[x] + p) & 255
        out[y] = cur
        prev = cur
    return out.reshape(h, w, 3).astype(np.uint8)


def viridis(t):
    x = min(max(t, 0.0), 1.0) * 10
    i = min(int(x), 9)
    return VIRIDIS[i] + (x - i) * (VIRIDIS[i + 1] - VIRIDIS[i])


def heatmap(path, w, cell, bounds):
    w = np.ascontiguousarray(w, np.float32)
    b = np.asarray(bounds, np.int64)
    return lib.qf_heatmap_png(path.encode(), w.ctypes.data, w.shape[0], w.shape[1], cell,
                              b.ctypes.data if len(b) else None, len(b))


def test_heatmap_colors_cells_and_separators(tmp_path):
    rows, cols, cell = 3, 7, 4
    w = np.linspace(0.0, 1.0, rows * cols).reshape(rows, cols).astype(np.float32) * 0.37 + 0.05
    w[1, 4] = 0.05          # the minimum (twice: also [0,0])
    w[2, 6] = 0.42          # the maximum
    bounds = [2, 5]
    path = str(tmp_path / "map.png")
    assert status(heatmap(path, w, cell, bounds)) == "QF_OK"
    img = decode_png(path)
    assert img.shape == (rows * cell, cols * cell + len(bounds), 3)
    lo, hi = float(w.min()), float(w.max())
    for r in range(rows):
        for c in range(cols):
            x0 = c * cell + sum(1 for b in bounds if b <= c)
            block = img[r * cell:(r + 1) * cell, x0:x0 + cell].reshape(-1, 3).astype(int)
            want = viridis((float(w[r, c]) - lo) / (hi - lo))
            assert np.all(block == block[0]), "cell (%d,%d) is not uniform" % (r, c)
            assert np.max(np.abs(block[0] - want)) <= 1.0, "cell (%d,%d): %s, want %s" % (r, c, block[0], want)
    assert tuple(img[cell, 4 * cell + 1]) == (68, 1, 84)       # minimum: first viridis stop
    assert tuple(img[2 * cell, 6 * cell + 2]) == (253, 231, 37)  # maximum: last stop
    for i, b in enumerate(bounds):
        sep = img[:, b * cell + i]
        assert np.all(sep == 255), "separator before column %d is not white" % b
    # no other pixel column is white
    white_cols = [x for x in range(img.shape[1]) if np.all(img[:, x] == 255)]
    assert white_cols == [b * cell + i for i, b in enumerate(bounds)]


def test_heatmap_constant_and_one_pixel_cells(tmp_path):
    path = str(tmp_path / "flat.png")
    w = np.full((2, 3), 0.25, np.float32)
    assert status(heatmap(path, w, 1, [])) == "QF_OK"
    img = decode_png(path)
    assert img.shape == (2, 3, 3) and np.all(img.reshape(-1, 3) == VIRIDIS[0])


def test_heatmap_errors_and_atomic_write(tmp_path):
    path = str(tmp_path / "bad.png")
    w = np.ones((2, 4), np.float32)
    w[1, 2] = np.nan
    assert status(heatmap(path, w, 2, [])) == "QF_ERR_NONFINITE"
    assert "weights[1,2]" in lib.qf_last_error().decode()
    w[1, 2] = 0
    for bounds in ([0], [4], [3, 2], [2, 2]):
        assert status(heatmap(path, w, 2, bounds)) == "QF_ERR_ARG", bounds
        assert "boundaries" in lib.qf_last_error().decode()
    assert status(heatmap(path, w, 0, [])) == "QF_ERR_ARG"
    assert not os.path.exists(path)
    missing = str(tmp_path / "no_such_dir" / "m.png")
    assert status(heatmap(missing, w, 2, [1])) == "QF_ERR_IO"
    assert "m.png" in lib.qf_last_error().decode()
    # an existing file is replaced whole; no temporary is left behind
    with open(path, "wb") as f:
        f.write(b"old")
    assert status(heatmap(path, w, 2, [1])) == "QF_OK"
    assert decode_png(path).shape == (4, 9, 3)
    assert os.listdir(tmp_path) == ["bad.png"]


# ---- image input ------------------------------------------------------------------------------

def load_image(path):
    w, h, px = c_int64(), c_int64(), c_void_p()
    s = lib.qf_image_load(path.encode(), ctypes.byref(w), ctypes.byref(h), ctypes.byref(px))
    if status(s) != "QF_OK":
        return status(s), None
    n = w.value * h.value * 3
    arr = np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(px.value)).copy()
    libc.free(px)
    return "QF_OK", arr.reshape(h.value, w.value, 3)


def preprocess(p, rgb):
    rgb = np.ascontiguousarray(rgb, np.uint8)
    out = np.empty((3, p.size_h, p.size_w), np.float32)
    s = lib.qf_image_preprocess(ctypes.byref(p), rgb.ctypes.data, rgb.shape[1], rgb.shape[0], out.ctypes.data)
    assert status(s) == "QF_OK", lib.qf_last_error()
    return out


def reference(rgb, h, w, resample=3, mean=CLIP_MEAN, std=CLIP_STD, factor=1 / 255):
    """transformers' BlipImageProcessor (slow path) spelled out with Pillow + numpy."""
    img = PIL.fromarray(rgb).resize((w, h), resample=resample, reducing_gap=None)
    x = (np.asarray(img).astype(np.float64) * factor).astype(np.float32)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return x.transpose(2, 0, 1)


def test_image_image_structs_and_defaults():
    p = lib.qf_image_preproc_defaults(224)
    assert (p.size_h, p.size_w, p.do_resize, p.do_rescale, p.do_normalize, p.resample) == (224, 224, 1, 1, 1, 3)
    assert list(p.mean) == list(CLIP_MEAN) and list(p.std) == list(CLIP_STD)
    assert abs(p.rescale_factor - 1 / 255) < 1e-15


def make_image(h, w, seed):
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, w)[None, :, None]
    y = np.linspace(0, 1, h)[:, None, None]
    smooth = 255 * (0.5 + 0.4 * np.sin(9 * x + 5 * y + np.arange(3)))
    return (smooth + rng.normal(0, 30, (h, w, 3))).clip(0, 255).astype(np.uint8)


CASES = [(480, 640, 224, 224, 3), (80, 100, 224, 224, 3), (53, 37, 32, 32, 3), (375, 500, 364, 364, 3),
         (64, 64, 64, 64, 3), (90, 120, 48, 40, 2), (30, 20, 30, 50, 3)]


@pytest.mark.parametrize("case", CASES[:3] if QUICK else CASES)
def test_preprocess_matches_pillow_blip_processor(case):
    h, w, oh, ow, resample = case
    rgb = make_image(h, w, seed=h * 1000 + w)
    p = lib.qf_image_preproc_defaults(oh)
    p.size_w, p.resample = ow, resample
    got = preprocess(p, rgb)
    ref = reference(rgb, oh, ow, resample)
    assert got.shape == ref.shape
    err = float(np.max(np.abs(got - ref)))
    assert err <= 1e-6, "max |qfuse - Pillow/numpy| = %g for %s" % (err, case)


def test_preprocess_flags_off():
    rgb = make_image(20, 30, seed=3)
    p = lib.qf_image_preproc_defaults(20)
    p.do_resize, p.do_normalize = 0, 0
    out = np.empty((3, 20, 30), np.float32)
    s = lib.qf_image_preprocess(ctypes.byref(p), rgb.ctypes.data, 30, 20, out.ctypes.data)
    assert status(s) == "QF_OK"
    ref = (rgb.astype(np.float64) / 255).astype(np.float32).transpose(2, 0, 1)
    assert np.max(np.abs(out - ref)) <= 1e-7


def test_preproc_config_file(tmp_path):
    cfg = tmp_path / "preprocessor_config.json"
    cfg.write_text(json.dumps({"image_processor_type": "BlipImageProcessor", "size": {"height": 48, "width": 40},
                               "resample": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.25, 0.5],
                               "rescale_factor": 0.00392156862745098, "do_convert_rgb": True}))
    p = qf_image_preproc()
    assert status(lib.qf_image_preproc_load(str(cfg).encode(), 224, ctypes.byref(p))) == "QF_OK"
    assert (p.size_h, p.size_w, p.resample) == (48, 40, 2)
    rgb = make_image(61, 77, seed=5)
    err = np.max(np.abs(preprocess(p, rgb) - reference(rgb, 48, 40, 2, [0.5] * 3, [0.5, 0.25, 0.5])))
    assert err <= 1e-6
    cfg.write_text(json.dumps({"size": {"shortest_edge": 224}}))
    assert status(lib.qf_image_preproc_load(str(cfg).encode(), 224, ctypes.byref(p))) == "QF_ERR_UNSUPPORTED"
    cfg.write_text(json.dumps({"image_mean": [0.5, 0.5]}))
    assert status(lib.qf_image_preproc_load(str(cfg).encode(), 224, ctypes.byref(p))) == "QF_ERR_FORMAT"
    assert "image_mean" in lib.qf_last_error().decode()


def test_image_load_png_modes_exact(tmp_path):
    rgb = make_image(33, 47, seed=9)
    for mode in ("RGB", "RGBA", "L", "P"):
        img = PIL.fromarray(rgb)
        img = img.convert(mode) if mode != "P" else img.quantize(64)
        path = str(tmp_path / ("x_%s.png" % mode))
        img.save(path)
        st, got = load_image(path)
        assert st == "QF_OK", lib.qf_last_error()
        want = np.asarray(PIL.open(path).convert("RGB"))
        assert got.shape == want.shape and np.array_equal(got, want), mode


def test_image_load_jpeg_close(tmp_path):
    rgb = make_image(64, 80, seed=11)
    path = str(tmp_path / "x.jpg")
    PIL.fromarray(rgb).save(path, quality=90)
    st, got = load_image(path)
    assert st == "QF_OK", lib.qf_last_error()
    want = np.asarray(PIL.open(path).convert("RGB")).astype(int)
    d = np.abs(got.astype(int) - want)
    assert d.max() <= 3 and d.mean() <= 0.5, "stb vs libjpeg: max %d mean %.3f" % (d.max(), d.mean())


def test_image_load_errors(tmp_path):
    st, _ = load_image(str(tmp_path / "absent.png"))
    assert st == "QF_ERR_IO" and "absent.png" in lib.qf_last_error().decode()
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    st, _ = load_image(str(bad))
    assert st == "QF_ERR_FORMAT" and "bad.png" in lib.qf_last_error().decode()
