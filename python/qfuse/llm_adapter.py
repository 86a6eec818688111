"""qfuse.llm_adapter - PEFT LoRA adapters on a loaded decoder LLM (src/models/llm_adapter.c,
contract in include/qfuse_llm.h). AdapterMixin adds the four adapter calls to a class that has
`_handle()` returning its qf_llm pointer (qfuse.llm.CausalLM).

    m = CausalLM.load("my-qwen2")
    m.load_adapter("my-qwen2-lora")              # PEFT folder; the first one loaded becomes active
    m.load_adapter("other-lora", name="other")   # only loaded
    m.set_adapter("other")                       # switch (None: the base model)
    m.merge_adapter()                            # fold the active one into the float32 weights
    m.unmerge_adapter()                          # and take it out again

Invariants of this module:
- Every call goes straight to C; a failure raises QfuseError with the C message, which names
  the adapter, folder, module or config key at fault. Nothing is cached on the Python side, so
  the C side's state is the only state.
- Adapter names are str (UTF-8 encoded for C); folders may be str or os.PathLike.
"""
import os
from ctypes import c_char_p, c_int, c_void_p

from . import _native
from ._native import QfuseError, check, lib

__all__ = ["AdapterMixin"]

_native.declare({
    "qf_llm_load_adapter": (c_int, [c_void_p, c_char_p, c_char_p]),
    "qf_llm_set_adapter": (c_int, [c_void_p, c_char_p]),
    "qf_llm_merge_adapter": (c_int, [c_void_p]),
    "qf_llm_unmerge_adapter": (c_int, [c_void_p]),
})


def _name(name, what):
    if not isinstance(name, str):
        raise QfuseError("%s: adapter name must be a str, got %s" % (what, type(name).__name__))
    return name.encode("utf-8")


class AdapterMixin:
    """LoRA adapter calls for a model class with `_handle()` (see the module docstring)."""

    def load_adapter(self, folder, name="default"):
        """Loads a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) under
        `name`. The first adapter loaded while none is active becomes active; others wait for
        set_adapter. Refused (QfuseError) for a duplicate name, more than 16 adapters, an
        adapter whose modules or shapes this model lacks, and PEFT features other than plain
        LoRA (the message names the config key or tensor)."""
        check(lib.qf_llm_load_adapter(self._handle(), os.fsencode(os.fspath(folder)),
                                      _name(name, "load_adapter")))
        return self

    def set_adapter(self, name):
        """Makes the adapter called `name` active (applied on the fly), or none with None. A
        merged adapter is unmerged first (as PEFT does)."""
        check(lib.qf_llm_set_adapter(self._handle(),
                                     None if name is None else _name(name, "set_adapter")))
        return self

    def merge_adapter(self):
        """Adds the active adapter into the float32 weights (faster forward; quantized weights
        are refused). A no-op if it is already merged."""
        check(lib.qf_llm_merge_adapter(self._handle()))
        return self

    def unmerge_adapter(self):
        """Subtracts the merged adapter again; it stays active, applied on the fly. A no-op when
        nothing is merged."""
        check(lib.qf_llm_unmerge_adapter(self._handle()))
        return self
