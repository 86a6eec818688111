"""qfuse.heatmap - attention maps as PNG pictures (qf_heatmap_png in src/models/heatmap.c).

    qfuse.save_heatmap("map.png", weights_2d, boundaries=[32])   # queries down, keys across

Invariants: weights is any 2-D float array (made float32, C-contiguous); boundaries are column
indices 0 < b < cols, strictly increasing, where a white separator column is inserted (modality
boundaries); the file is written atomically (temp file + rename) by the library.
"""
import ctypes
from ctypes import c_char_p, c_int, c_int64, c_void_p

import numpy as np

from . import _native
from ._native import QfuseError, check, lib

_native.declare({
    "qf_heatmap_png": (c_int, [c_char_p, c_void_p, c_int64, c_int64, c_int, c_void_p, c_int]),
})


def save_heatmap(path, weights, boundaries=None, cell_px=8):
    """Writes weights [rows, cols] as a viridis PNG, each cell cell_px square, min..max scaled."""
    w = np.ascontiguousarray(weights, np.float32)
    if w.ndim != 2 or w.shape[0] < 1 or w.shape[1] < 1:
        raise QfuseError("save_heatmap: weights has shape %s; expected [rows, cols] with both >= 1"
                         % (list(w.shape),), "QF_ERR_SHAPE")
    b = np.ascontiguousarray([] if boundaries is None else boundaries, np.int64)
    if b.ndim != 1:
        raise QfuseError("save_heatmap: boundaries must be a 1-D list of column indices", "QF_ERR_ARG")
    check(lib.qf_heatmap_png(str(path).encode(), w.ctypes.data, w.shape[0], w.shape[1], int(cell_px),
                             b.ctypes.data if b.size else None, int(b.size)))
