"""test_lora.py - PEFT LoRA adapters: the reader and the two products of src/models/lora.c (through
ctypes on the library's internal qf_lora_* functions), and adapters on a whole decoder
(src/models/llm_adapter.c through qfuse.llm_adapter.AdapterMixin).

References, never qfuse's own numbers:
- the fixture adapters tests/fixtures/llm_{llama,qwen2}/lora were written by PEFT 0.21 and
  logits_lora in io.safetensors is transformers + PEFT's output with them (PyTorch 2.11);
- A/B are read back with util.read_safetensors (independent of libqfuse), the update is
  torch.nn.functional.linear in float64: y + scaling * linear(linear(x, A), B) (PEFT's
  LoraLayer.forward), the merge w + scaling * B @ A (PEFT's get_delta_weight);
- scaling follows PEFT's rules, written out here: alpha / r, alpha / sqrt(r) with use_rslora,
  r / alpha overridden by the first rank_pattern / alpha_pattern key K (file order) with
  re.match(rf"(.*\\.)?({K})$", module) (peft.utils.other.get_pattern_key).

Bars: products rel err <= 1e-5 (float32 GEMMs vs float64); whole model <= case.json's rtol_fp32
(1e-3), the issue's bar.
"""
import ctypes
import json
import math
import os
import re
import shutil
from ctypes import POINTER, c_char, c_char_p, c_float, c_int, c_int64, c_void_p

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qfuse import _native
from qfuse._native import QfuseError, check, lib
from qfuse.llm import CausalLM
from qfuse.llm_adapter import AdapterMixin

from util import FIXTURES, load_fixture, read_safetensors, rel_err, write_safetensors

CASES = ["llm_llama", "llm_qwen2"]
PREFIX = "base_model.model."


class qf_lora_pair(ctypes.Structure):
    _fields_ = [("module", c_char * 128), ("r", c_int64), ("in_", c_int64), ("out", c_int64),
                ("scaling", c_float), ("A", POINTER(c_float)), ("B", POINTER(c_float))]


_native.declare({
    "qf_lora_load": (c_int, [c_char_p, POINTER(c_void_p)]),
    "qf_lora_free": (None, [c_void_p]),
    "qf_lora_num_pairs": (c_int, [c_void_p]),
    "qf_lora_pair_at": (POINTER(qf_lora_pair), [c_void_p, c_int]),
    "qf_lora_find": (POINTER(qf_lora_pair), [c_void_p, c_char_p]),
    "qf_lora_base_class": (c_char_p, [c_void_p]),
    "qf_lora_apply": (c_int, [POINTER(qf_lora_pair), c_void_p, c_int64, c_void_p]),
    "qf_lora_merge": (c_int, [POINTER(qf_lora_pair), c_void_p, c_float]),
})


class Lora:
    """A qf_lora loaded through ctypes; pairs as {module: (pair pointer, A, B)} copies."""

    def __init__(self, folder):
        self.h = c_void_p()
        check(lib.qf_lora_load(os.fsencode(str(folder)), ctypes.byref(self.h)))
        self.pairs = {}
        for i in range(lib.qf_lora_num_pairs(self.h)):
            p = lib.qf_lora_pair_at(self.h, i)
            c = p.contents
            A = np.ctypeslib.as_array(c.A, (c.r, c.in_)).copy()
            B = np.ctypeslib.as_array(c.B, (c.out, c.r)).copy()
            self.pairs[c.module.decode()] = (p, A, B)
        self.base_class = lib.qf_lora_base_class(self.h).decode()

    def close(self):
        if self.h:
            lib.qf_lora_free(self.h)
            self.h = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---- PEFT's rules, written independently of qfuse ----------------------------------------------

def get_pattern_key(keys, module):
    for k in keys:
        if re.match(r"(.*\.)?(%s)$" % k, module):
            return k
    return module


def peft_scaling(cfg, module):
    r = cfg.get("rank_pattern", {}).get(get_pattern_key(cfg.get("rank_pattern", {}), module), cfg["r"])
    alpha = cfg.get("alpha_pattern", {}).get(get_pattern_key(cfg.get("alpha_pattern", {}), module),
                                             cfg["lora_alpha"])
    return r, (alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r)


def file_pairs(folder):
    """{module: (A, B)} from adapter_model.safetensors, read without libqfuse."""
    t = read_safetensors(os.path.join(folder, "adapter_model.safetensors"))
    out = {}
    for k, v in t.items():
        m = re.fullmatch(re.escape(PREFIX) + r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", k)
        assert m, k
        out.setdefault(m.group(1), {})[m.group(2)] = v.astype(np.float32)
    return {k: (v["A"], v["B"]) for k, v in out.items()}


def lora_ref(x, y0, A, B, s):
    t = torch.from_numpy
    return (t(y0).double() + s * F.linear(F.linear(t(x).double(), t(A).double()),
                                          t(B).double())).numpy()


def fixture_lora(case):
    return os.path.join(FIXTURES, case, "lora")


def base_config(case="llm_qwen2"):
    with open(os.path.join(fixture_lora(case), "adapter_config.json")) as f:
        return json.load(f)


def write_adapter(folder, cfg, tensors, dtypes=None):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    write_safetensors(os.path.join(folder, "adapter_model.safetensors"), tensors, dtypes=dtypes)
    return folder


def fixture_tensors(case="llm_qwen2"):
    return read_safetensors(os.path.join(fixture_lora(case), "adapter_model.safetensors"))


# ---- reader and products -----------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_fixture_pairs_match_file(case):
    cfg = base_config(case)
    ref = file_pairs(fixture_lora(case))
    with Lora(fixture_lora(case)) as a:
        assert sorted(a.pairs) == sorted(ref) and len(ref) == 8
        assert a.base_class == cfg["auto_mapping"]["base_model_class"]
        for mod, (p, A, B) in a.pairs.items():
            np.testing.assert_array_equal(A, ref[mod][0])
            np.testing.assert_array_equal(B, ref[mod][1])
            r, s = peft_scaling(cfg, mod)
            assert p.contents.r == r and p.contents.scaling == np.float32(s)
            assert lib.qf_lora_find(a.h, mod.encode()).contents.module.decode() == mod
        assert not lib.qf_lora_find(a.h, b"model.layers.0.self_attn.k_proj")


@pytest.mark.parametrize("case", CASES)
def test_apply_and_merge_vs_torch(case):
    cfg = base_config(case)
    ref = file_pairs(fixture_lora(case))
    rng = np.random.default_rng(1)
    worst_apply = worst_merge = worst_round = 0.0
    with Lora(fixture_lora(case)) as a:
        for mod, (p, _, _) in a.pairs.items():
            A, B = ref[mod]
            _, s = peft_scaling(cfg, mod)
            for N in (1, 7):
                x = rng.standard_normal((N, A.shape[1])).astype(np.float32)
                y = rng.standard_normal((N, B.shape[0])).astype(np.float32)
                want = lora_ref(x, y, A, B, s)
                check(lib.qf_lora_apply(p, x.ctypes.data, N, y.ctypes.data))
                worst_apply = max(worst_apply, rel_err(y, want))
            w0 = rng.standard_normal((B.shape[0], A.shape[1])).astype(np.float32) * 0.05
            w = w0.copy()
            check(lib.qf_lora_merge(p, w.ctypes.data, 1.0))
            want = w0.astype(np.float64) + s * (B.astype(np.float64) @ A.astype(np.float64))
            worst_merge = max(worst_merge, rel_err(w, want))
            check(lib.qf_lora_merge(p, w.ctypes.data, -1.0))
            worst_round = max(worst_round, rel_err(w, w0))
    print("%s: apply rel err %.3g, merge %.3g, merge+unmerge vs base %.3g"
          % (case, worst_apply, worst_merge, worst_round))
    assert worst_apply <= 1e-5 and worst_merge <= 1e-5 and worst_round <= 1e-5


def test_apply_argument_errors():
    with Lora(fixture_lora("llm_qwen2")) as a:
        p = next(iter(a.pairs.values()))[0]
        y = np.zeros((2, p.contents.out), np.float32)
        with pytest.raises(QfuseError, match="x is NULL"):
            check(lib.qf_lora_apply(p, None, 2, y.ctypes.data))
        with pytest.raises(QfuseError, match="N = -1"):
            check(lib.qf_lora_apply(p, y.ctypes.data, -1, y.ctypes.data))
        with pytest.raises(QfuseError, match="sign is 2"):
            check(lib.qf_lora_merge(p, y.ctypes.data, 2.0))


def test_rslora_rank_alpha_patterns_and_dtypes(tmp_path):
    """rsLoRA, rank_pattern / alpha_pattern (regex keys, first match in file order, a key that
    matches a suffix only at a dot), the adapter-name infix, F16 and F64 tensors."""
    torch.manual_seed(0)
    cfg = base_config()
    cfg.update(r=4, lora_alpha=16, use_rslora=True,
               # q_proj of layer 1 hits the first key, every other q_proj the second; "_proj" names no
               # module (a suffix counts only after a dot)
               rank_pattern={r"layers\.1\.self_attn\.q_proj": 3, "q_proj": 2, "_proj": 7},
               alpha_pattern={"model.layers.0.mlp.down_proj": 5.5, r"v_pro.": 9})
    dims = {"self_attn.q_proj": (64, 64), "self_attn.v_proj": (64, 32), "mlp.down_proj": (160, 64),
            "self_attn.o_proj": (64, 64)}
    tensors, dtypes, refs = {}, {}, {}
    for layer in range(2):
        for sub, (n_in, n_out) in dims.items():
            mod = "model.layers.%d.%s" % (layer, sub)
            r, _ = peft_scaling(cfg, mod)
            A = torch.randn(r, n_in)
            B = torch.randn(n_out, r)
            infix = ".default" if sub == "self_attn.o_proj" else ""
            ka, kb = PREFIX + mod + ".lora_A%s.weight" % infix, PREFIX + mod + ".lora_B%s.weight" % infix
            tensors[ka], tensors[kb] = A.numpy(), B.numpy()
            if sub == "mlp.down_proj":
                dtypes[ka], dtypes[kb] = "F16", "F64"
            refs[mod] = (A.numpy(), B.numpy())
    folder = write_adapter(str(tmp_path / "a"), cfg, tensors, dtypes)
    stored = file_pairs(folder)
    rng = np.random.default_rng(2)
    expect = {"model.layers.0.self_attn.q_proj": (2, 16 / math.sqrt(2)),
              "model.layers.1.self_attn.q_proj": (3, 16 / math.sqrt(3)),
              "model.layers.0.mlp.down_proj": (4, 5.5 / 2.0),
              "model.layers.1.mlp.down_proj": (4, 16 / 2.0),
              "model.layers.0.self_attn.v_proj": (4, 9 / 2.0)}
    with Lora(folder) as a:
        assert len(a.pairs) == 8
        for mod, (p, A, B) in a.pairs.items():
            r, s = peft_scaling(cfg, mod)
            if mod in expect:  # the rule above, checked by hand for the interesting modules
                assert (r, s) == pytest.approx(expect[mod])
            assert p.contents.r == r and p.contents.scaling == np.float32(s), mod
            np.testing.assert_array_equal(A, stored[mod][0])  # F16 widened exactly
            np.testing.assert_array_equal(B, stored[mod][1])
            x = rng.standard_normal((5, A.shape[1])).astype(np.float32)
            y = np.zeros((5, B.shape[0]), np.float32)
            check(lib.qf_lora_apply(p, x.ctypes.data, 5, y.ctypes.data))
            assert rel_err(y, lora_ref(x, y * 0, stored[mod][0], stored[mod][1], s)) <= 1e-5, mod


def test_fan_in_fan_out_and_init_gaussian_accepted(tmp_path):
    # PEFT resets fan_in_fan_out to False for nn.Linear targets; "gaussian" only changes init.
    cfg = base_config()
    cfg.update(fan_in_fan_out=True, init_lora_weights="gaussian", lora_dropout=0.1)
    folder = write_adapter(str(tmp_path / "a"), cfg, fixture_tensors())
    with Lora(folder) as a:
        assert len(a.pairs) == 8


# ---- refused adapters --------------------------------------------------------------------------

def expect_error(folder, status, *needles):
    with pytest.raises(QfuseError) as e:
        Lora(folder)
    assert e.value.status == status, e.value.message
    for n in needles:
        assert n in e.value.message, (n, e.value.message)
    return e.value.message


def test_corrupt_config(tmp_path):
    folder = write_adapter(str(tmp_path / "a"), base_config(), fixture_tensors())
    path = os.path.join(folder, "adapter_config.json")
    text = open(path).read()
    with open(path, "w") as f:
        f.write(text[: len(text) // 2])
    expect_error(folder, "QF_ERR_FORMAT", "adapter_config.json", "not valid JSON")
    with open(path, "w") as f:
        f.write("[1, 2]")
    expect_error(folder, "QF_ERR_FORMAT", "not a JSON object")
    os.remove(path)
    expect_error(folder, "QF_ERR_IO", "adapter_config.json")


def test_missing_weights_file(tmp_path):
    folder = write_adapter(str(tmp_path / "a"), base_config(), fixture_tensors())
    os.remove(os.path.join(folder, "adapter_model.safetensors"))
    with pytest.raises(QfuseError) as e:
        Lora(folder)
    assert "adapter_model.safetensors" in e.value.message


@pytest.mark.parametrize("key,value,needle", [
    ("peft_type", "PREFIX_TUNING", "peft_type"),
    ("use_dora", True, "use_dora"),
    ("lora_bias", True, "lora_bias"),
    ("bias", "all", "bias"),
    ("bias", "lora_only", "bias"),
    ("modules_to_save", ["lm_head"], "modules_to_save"),
    ("target_parameters", ["mlp.experts.gate_up_proj"], "target_parameters"),
    ("trainable_token_indices", [1, 2], "trainable_token_indices"),
    ("layer_replication", [[0, 2], [1, 2]], "layer_replication"),
    ("use_qalora", True, "use_qalora"),
    ("alora_invocation_tokens", [5, 6], "alora_invocation_tokens"),
    ("init_lora_weights", "pissa_niter_4", "init_lora_weights"),
    ("init_lora_weights", "olora", "init_lora_weights"),
])
def test_unsupported_config(tmp_path, key, value, needle):
    cfg = base_config()
    cfg[key] = value
    folder = write_adapter(str(tmp_path / "a"), cfg, fixture_tensors())
    expect_error(folder, "QF_ERR_UNSUPPORTED", needle, "adapter_config.json")


@pytest.mark.parametrize("key,value,needle", [
    ("r", 0, "r must be a positive integer"),
    ("r", 2.5, "r must be a positive integer"),
    ("lora_alpha", "8", "lora_alpha"),
    ("rank_pattern", {"q_proj": -1}, "rank_pattern[\"q_proj\"]"),
    ("rank_pattern", {"q_proj(": 2}, "not a valid regular expression"),
    ("alpha_pattern", [1], "alpha_pattern must be an object"),
])
def test_bad_config_values(tmp_path, key, value, needle):
    cfg = base_config()
    cfg[key] = value
    folder = write_adapter(str(tmp_path / "a"), cfg, fixture_tensors())
    expect_error(folder, "QF_ERR_FORMAT", needle)


def test_missing_b(tmp_path):
    t = fixture_tensors()
    gone = PREFIX + "model.layers.1.self_attn.v_proj.lora_B.weight"
    del t[gone]
    folder = write_adapter(str(tmp_path / "a"), base_config(), t)
    expect_error(folder, "QF_ERR_NOT_FOUND", PREFIX + "model.layers.1.self_attn.v_proj.lora_A.weight",
                 "no lora_B partner")


def test_rank_mismatch_between_a_and_b(tmp_path):
    t = fixture_tensors()
    k = PREFIX + "model.layers.0.self_attn.q_proj.lora_B.weight"
    t[k] = np.zeros((64, 3), np.float32)
    folder = write_adapter(str(tmp_path / "a"), base_config(), t)
    expect_error(folder, "QF_ERR_SHAPE", "rank mismatch", "model.layers.0.self_attn.q_proj", k)


def test_rank_mismatch_with_config(tmp_path):
    cfg = base_config()
    cfg["rank_pattern"] = {"o_proj": 8}
    folder = write_adapter(str(tmp_path / "a"), cfg, fixture_tensors())
    expect_error(folder, "QF_ERR_SHAPE", "rank_pattern[\"o_proj\"] is 8", "o_proj.lora_A.weight")
    cfg["rank_pattern"] = {}
    cfg["r"] = 6
    write_adapter(folder, cfg, fixture_tensors())
    expect_error(folder, "QF_ERR_SHAPE", "config's r is 6")


@pytest.mark.parametrize("name,status,needle", [
    (PREFIX + "model.layers.0.self_attn.q_proj.lora_magnitude_vector.weight", "QF_ERR_UNSUPPORTED", "DoRA"),
    (PREFIX + "model.embed_tokens.lora_embedding_A", "QF_ERR_UNSUPPORTED", "embedding"),
    (PREFIX + "model.layers.0.self_attn.q_proj.lora_B.bias", "QF_ERR_UNSUPPORTED", "lora_bias"),
    (PREFIX + "lm_head.modules_to_save.default.weight", "QF_ERR_UNSUPPORTED", "modules_to_save"),
    (PREFIX + "model.layers.0.self_attn.q_proj.weight", "QF_ERR_FORMAT", "not a LoRA weight"),
    ("model.layers.0.self_attn.q_proj.lora_A.weight", "QF_ERR_FORMAT", "not a LoRA weight"),
])
def test_unknown_tensor(tmp_path, name, status, needle):
    t = fixture_tensors()
    t[name] = np.zeros((4, 4), np.float32)
    folder = write_adapter(str(tmp_path / "a"), base_config(), t)
    expect_error(folder, status, name, needle)


def test_two_adapter_names_in_one_file(tmp_path):
    t = fixture_tensors()
    k = PREFIX + "model.layers.0.self_attn.q_proj.lora_A.weight"
    t[k.replace(".lora_A.", ".lora_A.other.")] = t[k]
    folder = write_adapter(str(tmp_path / "a"), base_config(), t)
    expect_error(folder, "QF_ERR_FORMAT", "both lora_A", "model.layers.0.self_attn.q_proj")


def test_integer_tensor_refused(tmp_path):
    t = fixture_tensors()
    k = PREFIX + "model.layers.0.self_attn.q_proj.lora_A.weight"
    folder = write_adapter(str(tmp_path / "a"), base_config(), t, dtypes={k: "I32"})
    expect_error(folder, "QF_ERR_DTYPE", k)


# ---- whole model -------------------------------------------------------------------------------

needs_llm_adapter = pytest.mark.skipif(
    "qf_llm_load_adapter" in _native.missing,
    reason="qf_llm_load_adapter is not exported by this library (src/models/llm_adapter.c not built)")


class Model:
    """CausalLM plus the mixin's calls, whether or not CausalLM inherits AdapterMixin yet."""

    def __init__(self, case):
        self.meta, self.io, folder = load_fixture(case)
        self.m = CausalLM.load(folder)
        self.case = case

    def __getattr__(self, name):
        if hasattr(AdapterMixin, name):
            return getattr(AdapterMixin, name).__get__(self.m)
        return getattr(self.m, name)

    def err(self, ref="logits_lora"):
        return rel_err(self.m.logits(input_ids=self.io["input_ids"]), self.io[ref])


@needs_llm_adapter
@pytest.mark.parametrize("case", CASES)
def test_model_on_the_fly_merge_unmerge(case):
    m = Model(case)
    bar = m.meta["rtol_fp32"]
    m.load_adapter(fixture_lora(case))          # the first adapter becomes active
    e_fly = m.err()
    m.merge_adapter()
    e_merged = m.err()
    m.merge_adapter()                           # already merged: no-op
    e_merged2 = m.err()
    m.unmerge_adapter()
    e_unmerged = m.err()                        # still active, on the fly again
    m.set_adapter(None)
    e_base = m.err("logits")
    m.unmerge_adapter()                         # nothing merged: no-op
    # the base gap proves the adapter matters at this bar
    gap = rel_err(m.io["logits"], m.io["logits_lora"])
    print("%s: on the fly %.3g, merged %.3g, unmerged (active) %.3g, none vs base %.3g; "
          "base vs lora logits %.3g" % (case, e_fly, e_merged, e_unmerged, e_base, gap))
    assert gap > 100 * bar
    assert max(e_fly, e_merged, e_merged2, e_unmerged, e_base) <= bar


def _variant(tmp_path, case, name, cfg_update, pad_q=0):
    """The fixture adapter rewritten so that PEFT computes the same function: rsLoRA with alpha
    chosen for the same scaling; or q_proj pairs zero-padded to a higher rank given by
    rank_pattern (zero rows of A / columns of B add nothing) with alpha_pattern keeping scaling."""
    cfg = base_config(case)
    cfg.update(cfg_update)
    t = fixture_tensors(case)
    if pad_q:
        for k in list(t):
            if ".q_proj.lora_A" in k:
                t[k] = np.concatenate([t[k], np.zeros((pad_q, t[k].shape[1]), np.float32)], 0)
            elif ".q_proj.lora_B" in k:
                t[k] = np.concatenate([t[k], np.zeros((t[k].shape[0], pad_q), np.float32)], 1)
    return write_adapter(str(tmp_path / name), cfg, t)


@needs_llm_adapter
@pytest.mark.parametrize("case", CASES)
def test_model_several_adapters(tmp_path, case):
    m = Model(case)
    bar = m.meta["rtol_fp32"]
    cfg = base_config(case)
    r, alpha = cfg["r"], cfg["lora_alpha"]
    rs = _variant(tmp_path, case, "rs", {"use_rslora": True, "lora_alpha": alpha / r * math.sqrt(r)})
    padded = _variant(tmp_path, case, "pad", {"rank_pattern": {"q_proj": r + 2},
                                              "alpha_pattern": {"q_proj": alpha / r * (r + 2)}}, pad_q=2)
    zero_t = {k: (v * 0 if ".lora_B" in k else v) for k, v in fixture_tensors(case).items()}
    zero = write_adapter(str(tmp_path / "zero"), cfg, zero_t)
    m.load_adapter(zero, name="zero")           # becomes active: base logits
    m.load_adapter(rs, name="rs")
    m.load_adapter(padded, name="pad")
    m.load_adapter(fixture_lora(case), name="peft")
    errs = {"zero": m.err("logits")}
    for name in ("rs", "pad", "peft"):
        m.set_adapter(name)
        errs[name] = m.err()
    m.set_adapter("zero")
    errs["zero again"] = m.err("logits")
    m.set_adapter("pad")
    m.merge_adapter()
    errs["pad merged"] = m.err()
    m.set_adapter("zero")                       # unmerges "pad" first (as PEFT does)
    errs["zero after merged pad"] = m.err("logits")
    m.set_adapter("pad")
    errs["pad after unmerge by switch"] = m.err()
    print(case, ", ".join("%s %.3g" % kv for kv in errs.items()))
    assert max(errs.values()) <= bar, errs
    with pytest.raises(QfuseError) as e:
        m.set_adapter("nope")
    assert e.value.status == "QF_ERR_NOT_FOUND" and "\"pad\"" in e.value.message
    with pytest.raises(QfuseError, match="already loaded"):
        m.load_adapter(rs, name="rs")
    assert m.err() <= bar                       # failures left the active adapter alone


@needs_llm_adapter
def test_model_adapter_limit(tmp_path):
    m = Model("llm_qwen2")
    for i in range(16):
        m.load_adapter(fixture_lora("llm_qwen2"), name="a%d" % i)
    with pytest.raises(QfuseError, match="16 adapters"):
        m.load_adapter(fixture_lora("llm_qwen2"), name="a16")
    assert m.err() <= m.meta["rtol_fp32"]       # a0 is active


@needs_llm_adapter
def test_model_adapter_for_another_architecture(tmp_path):
    m = Model("llm_qwen2")
    # a LLaMA adapter: refused by its recorded base class ...
    with pytest.raises(QfuseError) as e:
        m.load_adapter(fixture_lora("llm_llama"), name="llama")
    assert e.value.status == "QF_ERR_ARG" and "LlamaForCausalLM" in e.value.message
    # ... and without it by its shapes (LLaMA's down_proj reads 128 features, Qwen2's 160)
    cfg = base_config("llm_llama")
    del cfg["auto_mapping"]
    folder = write_adapter(str(tmp_path / "llama"), cfg, fixture_tensors("llm_llama"))
    with pytest.raises(QfuseError) as e:
        m.load_adapter(folder, name="llama")
    assert e.value.status == "QF_ERR_SHAPE" and "down_proj" in e.value.message
    # a module this model does not have (Qwen2 fixture has 2 layers)
    t = fixture_tensors()
    for k in list(t):
        if "layers.1." in k:
            t[k.replace("layers.1.", "layers.9.")] = t.pop(k)
    folder = write_adapter(str(tmp_path / "deep"), base_config(), t)
    with pytest.raises(QfuseError) as e:
        m.load_adapter(folder, name="deep")
    assert e.value.status == "QF_ERR_NOT_FOUND"
    assert "targets model.layers.9." in e.value.message and "which this model does not have" in e.value.message
    # nothing was loaded by the failures: merging has no active adapter
    with pytest.raises(QfuseError, match="no adapter is active"):
        m.merge_adapter()
    assert m.err("logits") <= m.meta["rtol_fp32"]


@needs_llm_adapter
def test_model_merge_refused_for_quantized_and_tied(tmp_path):
    meta, io, folder = load_fixture("llm_llama")
    q = CausalLM.load(folder, weights="int8")
    AdapterMixin.load_adapter(q, fixture_lora("llm_llama"))
    before = q.logits(input_ids=io["input_ids"])
    with pytest.raises(QfuseError) as e:
        AdapterMixin.merge_adapter(q)
    assert e.value.status == "QF_ERR_UNSUPPORTED" and "quantized" in e.value.message
    assert "model.layers.0." in e.value.message
    np.testing.assert_array_equal(q.logits(input_ids=io["input_ids"]), before)  # nothing changed
    # the adapter still applies on the fly on int8 weights: the lora effect (logits_lora - logits,
    # relative size ~1) is reproduced up to int8 rounding
    AdapterMixin.set_adapter(q, None)
    base = q.logits(input_ids=io["input_ids"])
    effect_err = rel_err(before - base, io["logits_lora"] - io["logits"])
    print("int8: lora effect rel err %.3g" % effect_err)
    assert effect_err < 0.05
    # Qwen2's lm_head is embed_tokens (tied): an adapter on lm_head applies, but cannot merge
    m = Model("llm_qwen2")
    cfg = base_config()
    cfg["target_modules"] = ["lm_head"]
    rng = np.random.default_rng(3)
    t = {PREFIX + "lm_head.lora_A.weight": rng.standard_normal((4, 64)).astype(np.float32),
         PREFIX + "lm_head.lora_B.weight": rng.standard_normal((200, 4)).astype(np.float32)}
    m.load_adapter(write_adapter(str(tmp_path / "head"), cfg, t))
    assert m.err("logits") > 10 * m.meta["rtol_fp32"]
    with pytest.raises(QfuseError) as e:
        m.merge_adapter()
    assert e.value.status == "QF_ERR_UNSUPPORTED" and "tie_word_embeddings" in e.value.message
    m.set_adapter(None)
    assert m.err("logits") <= m.meta["rtol_fp32"]


@needs_llm_adapter
def test_model_opt_adapter_vs_merged_checkpoint(tmp_path):
    """OPT's module names (model.decoder.layers.N.self_attn.out_proj, fc1, fc2) and biased
    linears. No PEFT fixture exists for OPT, so the reference is the base forward (checked
    against transformers in test_llm) of a checkpoint whose weights numpy merged:
    W + scaling * B @ A in float64."""
    src = os.path.join(FIXTURES, "llm_opt")
    if not os.path.isdir(src):
        pytest.skip("no llm_opt fixture")
    meta, io, _ = load_fixture("llm_opt")
    cfg = base_config()
    cfg["auto_mapping"] = {"base_model_class": "OPTForCausalLM"}
    cfg.update(r=3, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "out_proj", "fc1", "fc2"])
    weights = read_safetensors(os.path.join(src, "model.safetensors"))
    rng = np.random.default_rng(4)
    t, merged = {}, dict(weights)
    for layer in range(2):
        for sub in ("self_attn.q_proj", "self_attn.out_proj", "fc1", "fc2"):
            mod = "model.decoder.layers.%d.%s" % (layer, sub)
            W = weights[mod + ".weight"]
            A = (rng.standard_normal((3, W.shape[1])) * 0.3).astype(np.float32)
            B = (rng.standard_normal((W.shape[0], 3)) * 0.3).astype(np.float32)
            t[PREFIX + mod + ".lora_A.weight"], t[PREFIX + mod + ".lora_B.weight"] = A, B
            merged[mod + ".weight"] = (W.astype(np.float64) + 6 / math.sqrt(3) *
                                       (B.astype(np.float64) @ A.astype(np.float64))).astype(np.float32)
    adapter = write_adapter(str(tmp_path / "opt_lora"), cfg, t)
    ref_folder = tmp_path / "opt_merged"
    shutil.copytree(src, ref_folder)
    for p in ref_folder.iterdir():
        os.chmod(p, 0o644)
    write_safetensors(str(ref_folder / "model.safetensors"), merged)
    ref = CausalLM.load(ref_folder).logits(input_ids=io["input_ids"])
    m = CausalLM.load(src)
    AdapterMixin.load_adapter(m, adapter)
    e_fly = rel_err(m.logits(input_ids=io["input_ids"]), ref)
    AdapterMixin.merge_adapter(m)
    e_merged = rel_err(m.logits(input_ids=io["input_ids"]), ref)
    AdapterMixin.unmerge_adapter(m)
    AdapterMixin.set_adapter(m, None)
    e_base = rel_err(m.logits(input_ids=io["input_ids"]), io["logits"])
    gap = rel_err(io["logits"], ref)
    print("opt: on the fly %.3g, merged %.3g, base after unmerge %.3g; adapter effect %.3g"
          % (e_fly, e_merged, e_base, gap))
    assert gap > 100 * meta["rtol_fp32"]
    assert max(e_fly, e_merged, e_base) <= meta["rtol_fp32"]


def test_causal_lm_has_adapter_calls():
    assert issubclass(CausalLM, AdapterMixin)
    for name in ("load_adapter", "set_adapter", "merge_adapter", "unmerge_adapter"):
        assert getattr(CausalLM, name) is getattr(AdapterMixin, name)
