"""test_cuda_qformer.py - the Q-Former on the CUDA backend (qf_qformer_to_device, src/models/qformer.c
running on the ops of src/backend/cuda) against the same references as the CPU: the transformers
fixtures tests/fixtures/qformer_{0,1} and the float64 PyTorch reference ref_qformer.py on fresh
random models and inputs (InstructBLIP text with padded text, KV prefix, an all-padding encoder
item, no masks), and against the CPU forward of the same model.

Bounds: float32 on the GPU (TF32 off) max|out-ref|/max|ref| < 1e-4, as on the CPU. bf16 weights
(the GEMMs read bfloat16 copies of the weight matrices and accumulate in float32; activations
stay float32): < BF16_TOL = 3e-2 of max|ref| through a whole Q-Former (bf16 has an 8-bit
mantissa, relative rounding 2^-9 per weight; over 3-12 layers with LayerNorm in between the
fixtures measure ~1e-2).
Also: the graph path (two forwards of one shape with new data, a different shape, back again),
the eager path (QFUSE_CUDA_GRAPHS=0), GPU-resident inputs and output, NaN screening naming the
input and index, refusals (maps on a GPU model, backward with bf16 weights, bf16 on the CPU). Every GPU test
skips with the library's reason where libqfuse has no CUDA backend or no GPU is usable;
test_device_argument_* run everywhere (the clean refusal in a CPU-only build)."""
import ctypes
import os

import numpy as np
import pytest

import qfuse
import qfuse.cuda
import ref_qformer as R
import util
from qfuse import QfuseError
from qfuse._native import check, lib
from qfuse.qformer import QFormer, qf_qformer_args

REASON = qfuse.cuda.unavailable_reason()
TOL = 1e-4
BF16_TOL = 3e-2


@pytest.fixture(autouse=True)
def _needs_gpu(request):
    if REASON is not None and not request.function.__name__.startswith("test_device_argument_"):
        pytest.skip("CUDA backend not usable: %s" % REASON)


def _rng():
    seed = int(os.environ.get("QFUSE_TEST_SEED", "0")) or int.from_bytes(os.urandom(4), "little")
    return np.random.default_rng(seed), seed


def test_device_argument_refusals():
    case, io, folder = util.load_fixture("qformer_0")
    qf = QFormer.load(folder)
    with pytest.raises(QfuseError) as e:
        qf.to("tpu")
    assert "tpu" in str(e.value)
    with pytest.raises(QfuseError) as e:
        qf.to("cpu", "bfloat16")
    assert e.value.status == "QF_ERR_UNSUPPORTED" and "cuda" in str(e.value)
    if REASON is not None:
        with pytest.raises(QfuseError) as e:
            qf.to("cuda")
        assert e.value.status == "QF_ERR_UNSUPPORTED"
        with pytest.raises(QfuseError):
            qfuse.load(folder, device="cuda")
    # the model still works on the CPU after a refused placement
    out = qf.forward(io["query_embeds"], io["encoder_hidden_states"], io["encoder_attention_mask"])
    assert util.rel_err(out, io["last_hidden_state"]) < TOL


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", util.fixture_names("qformer_"))
def test_fixture(name, dtype):
    case, io, folder = util.load_fixture(name)
    qf = QFormer.load(folder, device="cuda", dtype=dtype)
    args = (io["query_embeds"], io["encoder_hidden_states"], io["encoder_attention_mask"])
    tol = TOL if dtype == "float32" else BF16_TOL
    for _ in range(3):  # eager + capture, then two graph replays
        out = qf.forward(*args)
        err = util.rel_err(out, io["last_hidden_state"])
        assert err < tol, (name, dtype, err)
    print("%s %s: rel err %.2e" % (name, dtype, err))
    # the maps need the CPU, and backward float32 weights (test_cuda_qformer_backward.py);
    # moving back gives the CPU results again
    if dtype == "bfloat16":
        with pytest.raises(QfuseError) as e:
            qf.backward(io["grad_out"])
        assert e.value.status == "QF_ERR_UNSUPPORTED"
    with pytest.raises(QfuseError):
        qf.cross_attention_maps()
    qf.to("cpu")
    assert util.rel_err(qf.forward(*args), io["last_hidden_state"]) < TOL
    qf.backward(io["grad_out"])


CASES = {
    # name: (has_text, Lt, P, freq, act, enc_mask kind)
    "text": (True, 5, 0, 2, "gelu", "pad"),
    "prefix": (False, 0, 3, 2, "gelu", "pad_allpad"),
    "text_prefix": (True, 4, 2, 1, "gelu_new", "pad"),
    "dead_item": (False, 0, 0, 1, "gelu", "pad_allpad"),
    "dead_item_text": (True, 3, 0, 2, "gelu_pytorch_tanh", "pad_allpad"),
    "no_masks": (True, 3, 0, 2, "gelu", None),
}


def _random_case(rng, has_text, Lt, P, freq, act, mask_kind, B=3, Lq=4, S=7, H=64, nh=4, E=40):
    cfg = dict(num_hidden_layers=3, hidden_size=H, num_attention_heads=nh, intermediate_size=96,
               cross_attention_frequency=freq, encoder_hidden_size=E, layer_norm_eps=1e-12,
               hidden_act=act, vocab_size=50, max_position_embeddings=16, pad_token_id=0)
    sd = R.random_state_dict(cfg, rng, has_text=has_text, scale=0.15)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    inp = dict(query_embeds=f32(B, Lq, H), encoder_hidden_states=f32(B, S, E))
    if mask_kind:
        m = np.ones((B, S), np.int32)
        m[B - 1, S - 3:] = 0
        if mask_kind == "pad_allpad":
            m[B - 1, :] = 0
        inp["encoder_attention_mask"] = m
    if Lt:
        inp["text_ids"] = rng.integers(0, 50, (B, Lt)).astype(np.int32)
        if mask_kind:
            tm = np.ones((B, Lt), np.int32)
            tm[0, -1] = 0
            tm[B - 1, -2:] = 0
            inp["text_attention_mask"] = tm
    if P:
        inp["prefix_k"] = f32(B, P, H)
        inp["prefix_v"] = f32(B, P, H)
    return cfg, sd, inp


def _write(folder, cfg, sd, has_text):
    import json
    os.makedirs(folder, exist_ok=True)
    c = dict(cfg, model_type="instructblip_qformer" if has_text else "blip_2_qformer",
             position_embedding_type="absolute")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(c, f)
    util.write_safetensors(os.path.join(folder, "model.safetensors"),
                           {k: np.asarray(v, np.float32) for k, v in sd.items()})
    return folder


def _fwd(qf, inp):
    return qf.forward(inp["query_embeds"], inp["encoder_hidden_states"], inp.get("encoder_attention_mask"),
                      qformer_input_ids=inp.get("text_ids"), qformer_attention_mask=inp.get("text_attention_mask"),
                      prefix_k=inp.get("prefix_k"), prefix_v=inp.get("prefix_v"))


@pytest.mark.parametrize("case", sorted(CASES))
def test_random_vs_reference_and_cpu(tmp_path, case):
    rng, seed = _rng()
    has_text, Lt, P, freq, act, mk = CASES[case]
    cfg, sd, inp = _random_case(rng, has_text, Lt, P, freq, act, mk)
    folder = _write(str(tmp_path / "m"), cfg, sd, has_text)
    cpu = QFormer.load(folder)
    gpu = QFormer.load(folder, device="cuda")
    bf = QFormer.load(folder, device="cuda", dtype="bfloat16")
    rout = R.reference(sd, cfg, **inp)[0]
    out_cpu = _fwd(cpu, inp)
    for rep in range(2):
        out = _fwd(gpu, inp)
        assert util.rel_err(out, rout) < TOL, (case, seed, rep)
        assert util.rel_err(out, out_cpu) < TOL, (case, seed, rep)
        assert util.rel_err(_fwd(bf, inp), rout) < BF16_TOL, (case, seed, rep)


def test_graph_replay_new_data_and_shapes(tmp_path):
    """One model, forwards of changing data and shapes: each must equal the CPU's."""
    rng, seed = _rng()
    cfg, sd, _ = _random_case(rng, True, 3, 0, 2, "gelu", "pad")
    folder = _write(str(tmp_path / "m"), cfg, sd, True)
    cpu, gpu = QFormer.load(folder), QFormer.load(folder, device="cuda")
    for (B, Lt, S, mk) in [(2, 3, 7, "pad"), (2, 3, 7, "pad"), (2, 3, 7, "pad"), (4, 5, 9, None),
                           (2, 3, 7, "pad"), (2, 3, 7, "pad_allpad"), (1, 0, 257, None), (2, 3, 7, "pad")]:
        _, _, inp = _random_case(rng, True, Lt, 0, 2, "gelu", mk, B=max(B, 3) if mk == "pad_allpad" else B, S=S)
        a, b = _fwd(gpu, inp), _fwd(cpu, inp)
        assert util.rel_err(a, b) < TOL, (B, Lt, S, mk, seed)


def test_eager_path_without_graphs(tmp_path, monkeypatch):
    rng, seed = _rng()
    cfg, sd, inp = _random_case(rng, False, 0, 2, 2, "gelu", "pad")
    folder = _write(str(tmp_path / "m"), cfg, sd, False)
    monkeypatch.setenv("QFUSE_CUDA_GRAPHS", "0")
    gpu = QFormer.load(folder, device="cuda")
    cpu = QFormer.load(folder)
    for _ in range(2):
        assert util.rel_err(_fwd(gpu, inp), _fwd(cpu, inp)) < TOL, seed


def test_device_pointers_in_and_out():
    """GPU-resident query_embeds / encoder states / output (what a GPU pipeline passes)."""
    case, io, folder = util.load_fixture("qformer_1")
    qf = QFormer.load(folder, device="cuda")
    q = np.ascontiguousarray(io["query_embeds"], np.float32)
    enc = np.ascontiguousarray(io["encoder_hidden_states"], np.float32)
    mask = np.ascontiguousarray(io["encoder_attention_mask"], np.uint8)
    B, Lq, H = q.shape
    with qfuse.cuda.DeviceBuffers() as bufs:
        dq, denc, dout = bufs.upload(q), bufs.upload(enc), bufs.empty((B, Lq, H))
        a = qf_qformer_args(B=B, num_queries=Lq, encoder_len=enc.shape[1])
        a.encoder_attention_mask = mask.ctypes.data
        for _ in range(3):
            check(lib.qf_qformer_forward(qf._h, ctypes.byref(a), dq, denc, dout))
        out = np.empty((B, Lq, H), np.float32)
        check(lib.qf_cuda_download(out.ctypes.data, dout, out.nbytes))
    assert util.rel_err(out, io["last_hidden_state"]) < TOL


def test_nonfinite_inputs_named(tmp_path):
    rng, seed = _rng()
    cfg, sd, inp = _random_case(rng, False, 0, 2, 2, "gelu", "pad")
    folder = _write(str(tmp_path / "m"), cfg, sd, False)
    gpu = QFormer.load(folder, device="cuda")
    good = _fwd(gpu, inp)
    for key, idx, val in [("encoder_hidden_states", (1, 2, 3), np.nan), ("query_embeds", (0, 1, 5), np.inf),
                          ("prefix_v", (2, 0, 7), -np.inf)]:
        bad = dict(inp)
        bad[key] = inp[key].copy()
        bad[key][idx] = val
        with pytest.raises(QfuseError) as e:
            _fwd(gpu, bad)
        flat = int(np.ravel_multi_index(idx, inp[key].shape))
        assert e.value.status == "QF_ERR_NONFINITE"
        assert "%s[%d]" % (key, flat) in str(e.value), str(e.value)
    # and the model is intact afterwards
    assert util.rel_err(_fwd(gpu, inp), good) < 1e-6


# ---- AffectGPT pre-fusion on the GPU (qf_prefusion_to_device): the whole forward, one graph ----

@pytest.mark.parametrize("case", ["masked", "unmasked", "audio_first", "audio_only", "face_only"])
def test_prefusion_vs_reference_and_cpu(tmp_path, case):
    import ref_fusion as RF
    import test_prefusion as TP
    rng, seed = _rng()
    cfg = TP._cfg(fusion_order=["audio", "face"] if case == "audio_first" else None)
    sd = RF.random_prefusion(cfg, rng)
    folder = TP._write(str(tmp_path / "m"), cfg, sd)
    cpu = qfuse.Prefusion.load(folder)
    gpu = qfuse.Prefusion.load(folder).to("cuda")
    bf = qfuse.Prefusion.load(folder).to("cuda", "bfloat16")
    ta, tf = (0 if case == "face_only" else 4), (0 if case == "audio_only" else 6)
    for B, masked in [(3, case != "unmasked"), (3, case != "unmasked"), (2, True), (3, case != "unmasked")]:
        a, f, am, fm = TP._inputs(rng, cfg, B, ta, tf, masked)
        ref = RF.prefusion_reference(sd, cfg, a, f, am, fm)[0]
        out = gpu.fuse(audio=a, face=f, audio_mask=am, face_mask=fm)
        assert util.rel_err(out, ref) < TOL, (case, seed, B)
        assert util.rel_err(out, cpu.fuse(audio=a, face=f, audio_mask=am, face_mask=fm)) < TOL, (case, seed)
        assert util.rel_err(bf.fuse(audio=a, face=f, audio_mask=am, face_mask=fm), ref) < BF16_TOL, (case, seed)
    with pytest.raises(QfuseError) as e:  # float32 GPU backward: test_cuda_prefusion_backward.py
        bf.backward(np.ones_like(out))
    assert e.value.status == "QF_ERR_UNSUPPORTED" and "bf16" in str(e.value)
    if ta:
        a = a.copy()
        a[1, 2, 3] = np.nan
        with pytest.raises(QfuseError) as e:
            gpu.fuse(audio=a, face=f, audio_mask=am, face_mask=fm)
        assert "audio[%d]" % np.ravel_multi_index((1, 2, 3), a.shape) in str(e.value)
    gpu.to("cpu")   # and back: the CPU path again, with backward
    out = gpu.fuse(audio=a if not ta else np.nan_to_num(a), face=f, audio_mask=am, face_mask=fm)
    gpu.backward(np.ones_like(out))


def test_prefusion_via_qfuse_load(tmp_path):
    import ref_fusion as RF
    import test_prefusion as TP
    rng, seed = _rng()
    cfg = TP._cfg()
    sd = RF.random_prefusion(cfg, rng)
    folder = TP._write(str(tmp_path / "m"), cfg, sd)
    m = qfuse.load(folder, device="cuda")
    a, f, am, fm = TP._inputs(rng, cfg, 2, 4, 6, True)
    ref = RF.prefusion_reference(sd, cfg, a, f, am, fm)[0]
    assert util.rel_err(m.impl.fuse(audio=a, face=f, audio_mask=am, face_mask=fm), ref) < TOL


# ---- BLIP-2 / InstructBLIP fixtures: their Q-Former on the GPU (vision tower on the CPU) ----

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fixture_blip2_and_instructblip_qformer(dtype):
    from qfuse.blip2 import Blip2
    from qfuse.qformer import _to_device
    tol = TOL if dtype == "float32" else BF16_TOL
    case, io, folder = util.load_fixture("blip2_opt_0")
    m = Blip2.load(folder)
    _to_device(m._qh, "cuda", dtype, "test")
    for _ in range(2):
        q = m.qformer(encoder_hidden_states=io["vision_last_hidden_state"])
        assert util.rel_err(q, io["qformer_last_hidden_state"]) < tol
        assert util.rel_err(m.fuse(io["pixel_values"]), io["language_projection"]) < tol
    _, io, folder = util.load_fixture("instructblip_llama_0")
    ref = util.read_safetensors(os.path.join(folder, "extra.safetensors"))
    m = Blip2.load(folder)
    _to_device(m._qh, "cuda", dtype, "test")
    ids, mask = io["qformer_input_ids"], io["qformer_attention_mask"]
    for _ in range(2):
        q = m.qformer(encoder_hidden_states=io["vision_last_hidden_state"], qformer_input_ids=ids,
                      qformer_attention_mask=mask)
        assert util.rel_err(q, ref["qformer_last_hidden_state"]) < tol
        tok = m.fuse(io["pixel_values"], qformer_input_ids=ids, qformer_attention_mask=mask)
        assert util.rel_err(tok, ref["language_projection"]) < tol
