"""qfuse.train - AdamW (torch.optim.AdamW's semantics) over qfuse models or numpy arrays, with
optimizer checkpoints that resume bit for bit (src/train/adamw.c, include/qfuse_train.h).

    from qfuse.train import AdamW
    qf = qfuse.QFormer.load(folder)
    opt = AdamW(qf, lr=1e-4, weight_decay=1e-2, frozen=lambda n: n.startswith("layernorm."))
    for ...:
        out = qf.forward(q, enc); qf.backward(grad_out)   # leaves this call's grads in C
        opt.step()                                        # updates the C-side weights in place
    opt.save("opt.safetensors"); opt.load("opt.safetensors")

    # plain arrays: {name: float32 C-contiguous writeable array}, updated in place
    opt = AdamW({"w": w, "b": b}); opt.step({"w": gw, "b": gb})

Conventions (invariants of this module):
- The update runs in C on the parameters themselves: for a model, the qf_param views that the
  model's *_param functions return (the model's own weight and gradient buffers, no copies); for
  a dict, the arrays given (kept referenced by the optimizer).
- A parameter without a gradient is skipped (value and state untouched), as torch skips
  .grad None: a frozen model group (grad view NULL), a name matched by `frozen`, or for a dict a
  name absent from step()'s grads.
- Optimizer state is per parameter name, in C; save() writes it atomically, load() replaces this
  optimizer's state and hyperparameters with the file's (torch's load_state_dict). Parameter
  shapes are checked against the loaded state at the next step().
- Every failure raises QfuseError naming the parameter / file and the rule; a failing step()
  changes nothing (NaN gradients included).
"""
import ctypes
import os
from ctypes import c_char_p, c_double, c_int, c_int64, c_void_p

import numpy as np

from . import _native
from ._native import QfuseError, check, lib

__all__ = ["AdamW"]

P = ctypes.POINTER


class qf_adamw_config(ctypes.Structure):
    _fields_ = [("lr", c_double), ("beta1", c_double), ("beta2", c_double), ("eps", c_double),
                ("weight_decay", c_double), ("amsgrad", c_int)]


_native.declare({
    "qf_adamw_defaults": (qf_adamw_config, []),
    "qf_adamw_new": (c_int, [P(qf_adamw_config), P(c_void_p)]),
    "qf_adamw_free": (None, [c_void_p]),
    "qf_adamw_get_config": (c_int, [c_void_p, P(qf_adamw_config)]),
    "qf_adamw_set_lr": (c_int, [c_void_p, c_double]),
    "qf_adamw_step": (c_int, [c_void_p, P(_native.qf_param), c_int]),
    "qf_adamw_param_step": (c_int64, [c_void_p, c_char_p]),
    "qf_adamw_num_states": (c_int, [c_void_p]),
    "qf_adamw_save": (c_int, [c_void_p, c_char_p]),
    "qf_adamw_load": (c_int, [c_char_p, P(c_void_p)]),
})


def _model_params(m):
    """(name, qf_param) of a qfuse model: QFormer (_iter_params), the fusion models, Blip2,
    MultiheadAttention (_params), FusionModel (its .impl)."""
    if hasattr(m, "impl") and not hasattr(m, "_params") and not hasattr(m, "_iter_params"):
        m = m.impl
    if hasattr(m, "_iter_params"):
        return m._iter_params()
    if hasattr(m, "_params"):
        return m._params()
    raise QfuseError("AdamW: %r is not a qfuse model (no parameter views)" % (m,))


def _zero_model(m):
    if hasattr(m, "impl") and not hasattr(m, "_params") and not hasattr(m, "_iter_params"):
        m = m.impl
    if hasattr(m, "zero_grad"):
        m.zero_grad()
        return
    z = getattr(type(m), "_zero_grad", None)
    if z is not None:
        z(m._handle("zero_grad"))
        return
    for _, p in _model_params(m):  # no zero_grad of its own: clear the views
        if p.grad:
            n = int(np.prod([p.shape[i] for i in range(p.ndim)], dtype=np.int64))
            ctypes.memset(p.grad, 0, 4 * n)


class AdamW:
    """torch.optim.AdamW(params, lr, betas, eps, weight_decay, amsgrad) over a qfuse model, a list
    of models, or a dict {name: float32 array}; see the module docstring. `frozen`: names (any
    iterable) or a predicate name -> bool of parameters never updated."""

    def __init__(self, model_or_params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=1e-2, amsgrad=False, frozen=None):
        self._h = None
        try:
            b1, b2 = betas
        except (TypeError, ValueError):
            raise QfuseError("AdamW: betas = %r; expected a pair (beta1, beta2)" % (betas,)) from None
        cfg = qf_adamw_config(float(lr), float(b1), float(b2), float(eps), float(weight_decay),
                              1 if amsgrad else 0)
        h = c_void_p()
        check(lib.qf_adamw_new(ctypes.byref(cfg), ctypes.byref(h)))
        self._h = h.value
        if frozen is None:
            self._frozen = lambda n: False
        elif callable(frozen):
            self._frozen = frozen
        else:
            names = set(frozen)
            self._frozen = names.__contains__
        self._arrays = None
        self._models = None
        if isinstance(model_or_params, dict):
            self._arrays = {}
            for name, a in model_or_params.items():
                if not isinstance(name, str):
                    raise QfuseError("AdamW: parameter names must be str, got %r" % (name,))
                if (not isinstance(a, np.ndarray) or a.dtype != np.float32 or not a.flags.c_contiguous
                        or not a.flags.writeable):
                    raise QfuseError("AdamW: parameter '%s' must be a writeable C-contiguous float32 "
                                     "numpy array (it is updated in place)" % name, "QF_ERR_DTYPE")
                if a.ndim > 4:
                    raise QfuseError("AdamW: parameter '%s' has %d dims; at most 4" % (name, a.ndim),
                                     "QF_ERR_SHAPE")
                self._arrays[name] = a
        else:
            models = list(model_or_params) if isinstance(model_or_params, (list, tuple)) else [model_or_params]
            for m in models:
                _model_params(m)  # raises for a non-model
            self._models = models

    # ---- lifetime ----
    def close(self):
        h, self._h = getattr(self, "_h", None), None
        if h:
            lib.qf_adamw_free(h)

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def _handle(self, fn):
        if not self._h:
            raise QfuseError("AdamW.%s: used after close()" % fn)
        return self._h

    # ---- hyperparameters ----
    def config(self):
        c = qf_adamw_config()
        check(lib.qf_adamw_get_config(self._handle("config"), ctypes.byref(c)))
        return {"lr": c.lr, "betas": (c.beta1, c.beta2), "eps": c.eps,
                "weight_decay": c.weight_decay, "amsgrad": bool(c.amsgrad)}

    @property
    def lr(self):
        return self.config()["lr"]

    @lr.setter
    def lr(self, value):
        check(lib.qf_adamw_set_lr(self._handle("lr"), float(value)))

    def state_step(self, name):
        """The step count of a parameter's state (0: none yet)."""
        return int(lib.qf_adamw_param_step(self._handle("state_step"), name.encode()))

    def num_states(self):
        return int(lib.qf_adamw_num_states(self._handle("num_states")))

    # ---- step ----
    def _views(self, grads):
        """ctypes array of qf_param for this step, plus what must stay alive during the call."""
        views, keep = [], []
        if self._arrays is not None:
            grads = {} if grads is None else grads
            for name in grads:
                if name not in self._arrays:
                    raise QfuseError("AdamW.step: gradient for '%s', which is not a parameter of this "
                                     "optimizer" % name, "QF_ERR_NOT_FOUND")
            for name, a in self._arrays.items():
                p = _native.qf_param()
                p.name = name.encode()
                keep.append(p.name)
                p.data = a.ctypes.data_as(P(ctypes.c_float))
                p.ndim = a.ndim
                for i, d in enumerate(a.shape):
                    p.shape[i] = d
                g = grads.get(name)
                if g is not None and not self._frozen(name):
                    g = np.asarray(g)
                    if g.shape != a.shape:
                        raise QfuseError("AdamW.step: the gradient of '%s' has shape %s but the "
                                         "parameter %s" % (name, list(g.shape), list(a.shape)),
                                         "QF_ERR_SHAPE")
                    if not np.issubdtype(g.dtype, np.floating):
                        raise QfuseError("AdamW.step: the gradient of '%s' has dtype %s; expected "
                                         "floating" % (name, g.dtype), "QF_ERR_DTYPE")
                    g = np.ascontiguousarray(g, dtype=np.float32)
                    if np.shares_memory(g, a):
                        g = g.copy()
                    keep.append(g)
                    p.grad = g.ctypes.data_as(P(ctypes.c_float))
                views.append(p)
        else:
            if grads is not None:
                raise QfuseError("AdamW.step: grads are taken from the model's backward; pass none")
            for m in self._models:
                for name, p in _model_params(m):
                    if self._frozen(name):
                        p.grad = None
                    views.append(p)
        arr = (_native.qf_param * max(len(views), 1))(*views)
        return arr, len(views), keep

    def step(self, grads=None):
        """One AdamW step. Models: the gradients their last backward left in C. Dict: grads
        {name: array} (a name left out is not updated)."""
        h = self._handle("step")
        arr, n, keep = self._views(grads)
        check(lib.qf_adamw_step(h, arr, n))
        del keep

    def zero_grad(self):
        """Zeroes the models' gradients (a no-op for a dict: grads are passed to step())."""
        if self._models is not None:
            for m in self._models:
                _zero_model(m)

    # ---- checkpoints ----
    def save(self, path):
        """Writes the optimizer state atomically (safetensors; see include/qfuse_train.h)."""
        check(lib.qf_adamw_save(self._handle("save"), os.fsencode(os.fspath(path))))

    def load(self, path):
        """Replaces this optimizer's state and hyperparameters with the file's. On an error the
        optimizer is left as it was."""
        self._handle("load")
        h = c_void_p()
        check(lib.qf_adamw_load(os.fsencode(os.fspath(path)), ctypes.byref(h)))
        old, self._h = self._h, h.value
        lib.qf_adamw_free(old)
        return self
