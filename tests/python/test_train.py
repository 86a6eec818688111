"""test_train.py - qfuse.train.AdamW (src/train/adamw.c) against torch.optim.AdamW (torch 1.13,
single-tensor path).

- Random parameters (shapes with SIMD tails, a scalar, one large enough for parallel chunks) and
  fresh random gradients, 5 steps, weight decay 0 / 1e-2, amsgrad off / on, every ISA path:
  within 1e-6 relative of torch (the engine follows torch's float32 order; on the 1.13 wheel it
  matches bit for bit, which is printed, not required) and the ISA paths agree bit for bit.
- Resume: 3 steps, save, load into a fresh optimizer, 2 more == 5 uninterrupted, bit for bit; the
  file read back by the independent reader in util (step tensors, metadata).
- A real model: a random Q-Former trained on a fixed regression target with frozen parts through
  qfuse, and the same steps through ref_qformer (float64 torch) + torch.optim.AdamW: loss falls,
  frozen parameters stay bit-identical, parameters and losses agree within 1e-4.
- Errors: NaN gradient (names the parameter, nothing updated), shape mismatch after load,
  duplicate names, corrupt / foreign / incomplete / inconsistent optimizer files, bad
  hyperparameters.
"""
import os

import numpy as np
import pytest

import qfuse
import ref_qformer as R
import util
from qfuse import QfuseError
from qfuse.train import AdamW

SHAPES = {"w": (64, 33), "b": (37,), "s": (), "t": (5, 7, 3), "big": (40001,)}


def _isas():
    out = []
    for name in ("scalar", "avx2", "avx512"):
        try:
            qfuse.set_isa(name)
            out.append(name)
        except QfuseError:
            pass
    return out


def _random_params(rng):
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


def _grads(rng, steps):
    return [{k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
            for _ in range(steps)]


def _torch_run(p0, grads, **kw):
    torch = util.torch()
    T = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in p0.items()}
    opt = torch.optim.AdamW(list(T.values()), foreach=False, **kw)
    for g in grads:
        for k in T:
            T[k].grad = torch.tensor(g[k])
        opt.step()
    return {k: v.detach().numpy() for k, v in T.items()}


def _qfuse_run(p0, grads, isa=None, **kw):
    if isa:
        qfuse.set_isa(isa)
    P = {k: v.copy() for k, v in p0.items()}
    opt = AdamW(P, **kw)
    for g in grads:
        opt.step(g)
    return P, opt


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("wd", [0.0, 1e-2])
def test_matches_torch(amsgrad, wd):
    rng = np.random.default_rng(1234)
    p0 = _random_params(rng)
    grads = _grads(rng, 5)
    kw = dict(lr=3e-2, betas=(0.8, 0.99), eps=1e-8, weight_decay=wd, amsgrad=amsgrad)
    ref = _torch_run(p0, grads, **kw)
    first = None
    for isa in _isas():
        got, opt = _qfuse_run(p0, grads, isa, **kw)
        same = sum(int(np.sum(got[k] == ref[k])) for k in ref) / sum(ref[k].size for k in ref)
        print("isa %s wd %g amsgrad %d: worst rel %.3g, bit-identical to torch %.4f"
              % (isa, wd, amsgrad, max(util.rel_err(got[k], ref[k]) for k in ref), same))
        for k in ref:
            assert util.rel_err(got[k], ref[k]) < 1e-6, (isa, k)
            assert not np.array_equal(got[k], p0[k]), k  # it moved
            assert opt.state_step(k) == 5
        if first is None:
            first = got
        else:
            for k in ref:
                assert np.array_equal(got[k], first[k]), (isa, k)


def test_defaults_and_frozen_and_missing_grads():
    """torch's defaults; a frozen name and a name without a gradient are left untouched."""
    rng = np.random.default_rng(7)
    p0 = _random_params(rng)
    grads = _grads(rng, 3)
    torch = util.torch()
    T = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in p0.items()}
    topt = torch.optim.AdamW([T["w"], T["t"], T["big"]], foreach=False)  # defaults
    P = {k: v.copy() for k, v in p0.items()}
    opt = AdamW(P, frozen={"b"})
    assert opt.config() == {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2,
                            "amsgrad": False}
    for g in grads:
        for k in ("w", "t", "big"):
            T[k].grad = torch.tensor(g[k])
        topt.step()
        opt.step({k: g[k] for k in ("w", "b", "t", "big")})  # "s" has no gradient
    for k in ("w", "t", "big"):
        assert util.rel_err(P[k], T[k].detach().numpy()) < 1e-6, k
    for k in ("b", "s"):
        assert np.array_equal(P[k], p0[k]), k
        assert opt.state_step(k) == 0
    assert opt.num_states() == 3


@pytest.mark.parametrize("amsgrad", [False, True])
def test_resume_bit_exact(tmp_path, amsgrad):
    rng = np.random.default_rng(99)
    p0 = _random_params(rng)
    grads = _grads(rng, 5)
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-7, weight_decay=0.1, amsgrad=amsgrad)
    full, _ = _qfuse_run(p0, grads, **kw)

    P = {k: v.copy() for k, v in p0.items()}
    opt = AdamW(P, **kw)
    for g in grads[:3]:
        opt.step(g)
    path = str(tmp_path / "opt.safetensors")
    opt.save(path)
    opt.close()
    # Independent reader: every parameter's state, steps, hyperparameters.
    tensors, meta = util.read_safetensors(path, with_metadata=True)
    want = {".exp_avg", ".exp_avg_sq", ".step"} | ({".max_exp_avg_sq"} if amsgrad else set())
    assert set(tensors) == {k + s for k in SHAPES for s in want}
    for k, s in SHAPES.items():
        assert int(tensors[k + ".step"]) == 3
        assert tensors[k + ".exp_avg"].shape == s and tensors[k + ".exp_avg"].dtype == np.float32
        assert np.all(tensors[k + ".exp_avg_sq"] >= 0)
    assert meta["format"] == "qfuse.adamw" and float(meta["lr"]) == 1e-2
    assert float(meta["beta2"]) == 0.95 and meta["amsgrad"] == str(int(amsgrad))

    opt2 = AdamW(P, lr=0.5, weight_decay=0.0)  # hyperparameters come from the file
    opt2.load(path)
    assert opt2.config()["lr"] == 1e-2 and opt2.config()["amsgrad"] == amsgrad
    for g in grads[3:]:
        opt2.step(g)
    for k in SHAPES:
        assert np.array_equal(P[k], full[k]), k
        assert opt2.state_step(k) == 5


# ---- a real model -------------------------------------------------------------------------------

def _write_qformer(folder, cfg, sd):
    os.makedirs(folder, exist_ok=True)
    import json
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(dict(cfg, model_type="blip_2_qformer", position_embedding_type="absolute"), f)
    util.write_safetensors(os.path.join(folder, "model.safetensors"),
                           {k: np.asarray(v, np.float32) for k, v in sd.items()})
    return folder


def test_qformer_training_vs_torch(tmp_path):
    torch = util.torch()
    rng = np.random.default_rng(5)
    cfg = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=48,
               cross_attention_frequency=1, encoder_hidden_size=24, layer_norm_eps=1e-12,
               hidden_act="gelu", pad_token_id=0)
    sd = R.random_state_dict(cfg, rng)
    B, Lq, S = 2, 6, 9
    q = rng.standard_normal((B, Lq, 32)).astype(np.float32)
    enc = rng.standard_normal((B, S, 24)).astype(np.float32)
    target = rng.standard_normal((B, Lq, 32)).astype(np.float32)
    # Frozen: layer 0's self-attention and the embedding LayerNorm, and every attention key bias:
    # softmax is shift-invariant, so its exact gradient is 0 and both engines' gradients are
    # rounding noise (1e-18 in float64, 1e-9 in float32) that AdamW would scale up to ~lr*g/eps.
    frozen = {n for n in sd if n.startswith("encoder.layer.0.attention.") or n.startswith("layernorm.")
              or n.endswith("attention.key.bias")}
    # eps 1e-5: elements whose gradient is ~0 would otherwise turn float32-vs-float64 rounding
    # noise into ~lr-sized updates (Adam divides by |g|); measured worst 1.7e-5 on every ISA.
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-5, weight_decay=1e-2)
    steps = 4

    qf = qfuse.QFormer.load(_write_qformer(str(tmp_path / "m"), cfg, sd))
    opt = AdamW(qf, frozen=frozen, **kw)
    losses = []
    for _ in range(steps):
        out = qf.forward(q, enc)
        diff = out.astype(np.float64) - target
        losses.append(0.5 * float(np.sum(diff * diff)) / B)
        qf.backward((diff / B).astype(np.float32))
        opt.step()
    got = qf.params()

    tsd = {k: torch.tensor(v, requires_grad=k not in frozen) for k, v in sd.items()}
    topt = torch.optim.AdamW([v for k, v in tsd.items() if k not in frozen], foreach=False, **kw)
    tq, tenc, tt = (torch.tensor(x, dtype=torch.float64) for x in (q, enc, target))
    tlosses = []
    for _ in range(steps):
        topt.zero_grad()
        out, _ = R.forward(tsd, cfg, tq, tenc)
        loss = 0.5 * ((out - tt) ** 2).sum() / B
        tlosses.append(float(loss))
        loss.backward()
        topt.step()

    print("losses qfuse", losses, "torch", tlosses)
    assert losses[-1] < 0.9 * losses[0]
    assert all(b < a for a, b in zip(losses, losses[1:]))
    assert np.allclose(losses, tlosses, rtol=1e-4, atol=0)
    worst = 0.0
    for k, v in sd.items():
        if k in frozen:
            assert np.array_equal(got[k], np.asarray(v, np.float32)), k
            assert opt.state_step(k) == 0, k
        else:
            e = util.rel_err(got[k], tsd[k].detach().numpy())
            worst = max(worst, e)
            assert e < 1e-4, k
            assert not np.array_equal(got[k], np.asarray(v, np.float32)), k
            assert opt.state_step(k) == steps
    print("worst parameter rel err vs torch after %d steps: %.3g" % (steps, worst))


def test_qformer_frozen_model_and_zero_grad(tmp_path):
    """A frozen model gives no gradient views: step() updates nothing, keeps no state."""
    rng = np.random.default_rng(6)
    cfg = dict(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=20,
               cross_attention_frequency=1, encoder_hidden_size=8, layer_norm_eps=1e-12,
               hidden_act="gelu", pad_token_id=0)
    sd = R.random_state_dict(cfg, rng)
    qf = qfuse.QFormer.load(_write_qformer(str(tmp_path / "m"), cfg, sd))
    opt = AdamW(qf)
    qf.set_frozen(True)
    out = qf.forward(rng.standard_normal((1, 3, 16)), rng.standard_normal((1, 4, 8)))
    qf.backward(np.ones_like(out))
    before = qf.params()
    opt.step()
    opt.zero_grad()
    after = qf.params()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert opt.num_states() == 0


# ---- errors ---------------------------------------------------------------------------------------

def test_nan_gradient_names_parameter_updates_nothing():
    rng = np.random.default_rng(3)
    p0 = _random_params(rng)
    g = _grads(rng, 2)
    P = {k: v.copy() for k, v in p0.items()}
    opt = AdamW(P)
    opt.step(g[0])
    snap = {k: v.copy() for k, v in P.items()}
    bad = dict(g[1])
    bad["t"] = bad["t"].copy()
    bad["t"][2, 3, 1] = np.nan
    with pytest.raises(QfuseError) as e:
        opt.step(bad)
    assert e.value.status == "QF_ERR_NONFINITE"
    assert "'t'" in e.value.message and "element %d" % (2 * 21 + 3 * 3 + 1) in e.value.message
    for k in P:  # "w" and "b" come before "t" in the list: untouched too
        assert np.array_equal(P[k], snap[k]), k
        assert opt.state_step(k) == 1
    bad["t"][2, 3, 1] = np.inf
    with pytest.raises(QfuseError, match="'t'"):
        opt.step(bad)
    opt.step(g[1])  # still usable, and equal to an uninterrupted run
    ref = _torch_run(p0, g)
    for k in P:
        assert util.rel_err(P[k], ref[k]) < 1e-6, k


def test_shape_mismatch_after_load_and_duplicates(tmp_path):
    rng = np.random.default_rng(4)
    P = _random_params(rng)
    opt = AdamW(P)
    opt.step(_grads(rng, 1)[0])
    path = str(tmp_path / "o.safetensors")
    opt.save(path)
    Q = dict(P)
    Q["w"] = np.zeros((33, 64), np.float32)
    opt2 = AdamW(Q).load(path)
    snap = {k: v.copy() for k, v in Q.items()}
    g = {k: np.ones(v.shape, np.float32) for k, v in Q.items()}
    with pytest.raises(QfuseError) as e:
        opt2.step(g)
    assert e.value.status == "QF_ERR_SHAPE"
    assert "'w'" in e.value.message and "[33,64]" in e.value.message and "[64,33]" in e.value.message
    assert all(np.array_equal(Q[k], snap[k]) for k in Q)
    assert all(opt2.state_step(k) == 1 for k in SHAPES)
    # The same name from two models (here: two dict optimizers cannot clash; use the C list).
    with pytest.raises(QfuseError, match="not a parameter"):
        opt2.step({"nope": np.ones(3, np.float32)})
    with pytest.raises(QfuseError, match="float32"):
        AdamW({"x": np.ones(3)})


def test_duplicate_names_in_one_step(tmp_path):
    cfg = dict(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=20,
               cross_attention_frequency=1, encoder_hidden_size=8, layer_norm_eps=1e-12,
               hidden_act="gelu", pad_token_id=0)
    rng = np.random.default_rng(8)
    sd = R.random_state_dict(cfg, rng)
    qf = qfuse.QFormer.load(_write_qformer(str(tmp_path / "m"), cfg, sd))
    out = qf.forward(rng.standard_normal((1, 3, 16)), rng.standard_normal((1, 4, 8)))
    qf.backward(np.ones_like(out))
    before = qf.params()
    opt = AdamW([qf, qf])  # every name twice
    with pytest.raises(QfuseError, match="listed twice") as e:
        opt.step()
    assert e.value.status == "QF_ERR_ARG"
    assert all(np.array_equal(before[k], v) for k, v in qf.params().items())


@pytest.mark.parametrize("kw,field", [(dict(lr=-1.0), "lr"), (dict(betas=(1.0, 0.9)), "beta1"),
                                      (dict(betas=(0.9, float("nan"))), "beta2"),
                                      (dict(eps=-1e-8), "eps"), (dict(weight_decay=float("inf")), "weight_decay")])
def test_bad_hyperparameters(kw, field):
    with pytest.raises(QfuseError, match=field) as e:
        AdamW({"x": np.ones(3, np.float32)}, **kw)
    assert e.value.status == "QF_ERR_ARG"


def _saved(tmp_path, amsgrad=False):
    rng = np.random.default_rng(11)
    P = {"a.w": rng.standard_normal((4, 3)).astype(np.float32), "a.b": rng.standard_normal(3).astype(np.float32)}
    opt = AdamW(P, amsgrad=amsgrad)
    for g in [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in P.items()} for _ in range(2)]:
        opt.step(g)
    path = str(tmp_path / "good.safetensors")
    opt.save(path)
    tensors, meta = util.read_safetensors(path, with_metadata=True)
    return P, path, tensors, meta


def _load_error(tmp_path, tensors, meta, dtypes=None):
    path = str(tmp_path / "bad.safetensors")
    util.write_safetensors(path, tensors, meta, dtypes)
    opt = AdamW({"x": np.ones(2, np.float32)}, lr=0.123)
    with pytest.raises(QfuseError) as e:
        opt.load(path)
    assert opt.config()["lr"] == 0.123  # left as it was
    assert "bad.safetensors" in e.value.message, e.value.message
    return e.value


def test_load_errors(tmp_path):
    P, path, tensors, meta = _saved(tmp_path)
    # Round trip through the independent writer loads fine (the reader is not self-referential).
    util.write_safetensors(str(tmp_path / "copy.safetensors"), tensors, meta)
    assert AdamW(P).load(str(tmp_path / "copy.safetensors")).state_step("a.w") == 2

    t = dict(tensors)
    del t["a.w.exp_avg_sq"]
    e = _load_error(tmp_path, t, meta)
    assert e.status == "QF_ERR_NOT_FOUND" and "'a.w'" in e.message and "a.w.exp_avg_sq" in e.message

    t = dict(tensors)
    t["a.b.exp_avg_sq"] = np.ones(4, np.float32)
    e = _load_error(tmp_path, t, meta)
    assert e.status == "QF_ERR_SHAPE" and "a.b.exp_avg_sq" in e.message

    t = dict(tensors)
    t["a.b.exp_avg_sq"] = -t["a.b.exp_avg_sq"] - 1
    e = _load_error(tmp_path, t, meta)
    assert e.status == "QF_ERR_FORMAT" and "a.b.exp_avg_sq" in e.message and ">= 0" in e.message

    t = dict(tensors)
    t["a.w.exp_avg"] = t["a.w.exp_avg"].copy()
    t["a.w.exp_avg"][1, 1] = np.nan
    e = _load_error(tmp_path, t, meta)
    assert e.status == "QF_ERR_FORMAT" and "a.w.exp_avg" in e.message and "finite" in e.message

    t = dict(tensors, stray=np.ones(2, np.float32))
    e = _load_error(tmp_path, t, meta)
    assert e.status == "QF_ERR_FORMAT" and "'stray'" in e.message

    t = dict(tensors)
    t["a.b.step"] = np.array(0, np.int64)
    e = _load_error(tmp_path, t, meta)
    assert e.status == "QF_ERR_FORMAT" and "'a.b'" in e.message and "step" in e.message

    t = dict(tensors)
    t["a.b.exp_avg"] = t["a.b.exp_avg"].astype(np.float64)
    e = _load_error(tmp_path, t, meta)
    assert e.status == "QF_ERR_FORMAT" and "F32" in e.message

    e = _load_error(tmp_path, tensors, dict(meta, beta1="1.5"))
    assert e.status == "QF_ERR_ARG" and "beta1" in e.message
    e = _load_error(tmp_path, tensors, dict(meta, lr="fast"))
    assert e.status == "QF_ERR_FORMAT" and "'lr'" in e.message
    m = dict(meta)
    del m["eps"]
    e = _load_error(tmp_path, tensors, m)
    assert e.status == "QF_ERR_FORMAT" and "'eps'" in e.message
    e = _load_error(tmp_path, tensors, dict(meta, amsgrad="1"))  # no max_exp_avg_sq tensors
    assert e.status == "QF_ERR_NOT_FOUND" and "max_exp_avg_sq" in e.message
    e = _load_error(tmp_path, tensors, {})  # a model file, not an optimizer state
    assert e.status == "QF_ERR_FORMAT" and "qfuse.adamw" in e.message
    e = _load_error(tmp_path, tensors, dict(meta, version="2"))
    assert e.status == "QF_ERR_FORMAT" and "version" in e.message

    # Truncated file: the safetensors reader's error, naming the file.
    raw = open(path, "rb").read()
    bad = str(tmp_path / "bad.safetensors")
    with open(bad, "wb") as f:
        f.write(raw[:len(raw) - 5])
    with pytest.raises(QfuseError) as ei:
        AdamW(P).load(bad)
    assert ei.value.status == "QF_ERR_FORMAT" and "bad.safetensors" in ei.value.message
    with pytest.raises(QfuseError) as ei:
        AdamW(P).load(str(tmp_path / "absent.safetensors"))
    assert ei.value.status == "QF_ERR_IO"


def test_save_is_atomic_and_lr_schedule(tmp_path):
    rng = np.random.default_rng(12)
    p0 = _random_params(rng)
    grads = _grads(rng, 4)
    P = {k: v.copy() for k, v in p0.items()}
    opt = AdamW(P, lr=1e-2)
    torch = util.torch()
    T = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in p0.items()}
    topt = torch.optim.AdamW(list(T.values()), lr=1e-2, foreach=False)
    for i, g in enumerate(grads):
        lr = 1e-2 * (0.5 ** i)
        opt.lr = lr
        for pg in topt.param_groups:
            pg["lr"] = lr
        for k in T:
            T[k].grad = torch.tensor(g[k])
        topt.step()
        opt.step(g)
    for k in P:
        assert util.rel_err(P[k], T[k].detach().numpy()) < 1e-6, k
    path = str(tmp_path / "o.safetensors")
    opt.save(path)
    opt.save(path)  # overwrite in place, atomically
    assert sorted(os.listdir(tmp_path)) == ["o.safetensors"]
    with pytest.raises(QfuseError) as e:
        opt.save(str(tmp_path / "no_such_dir" / "o.safetensors"))
    assert e.value.status == "QF_ERR_IO"
    with pytest.raises(QfuseError, match="lr"):
        opt.lr = -1


def test_fusion_model_source(tmp_path):
    """FusionModel (through its .impl) is accepted; the same step on the same
    gradients gives the same weights as on the bare QFormer."""
    rng = np.random.default_rng(13)
    cfg = dict(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=20,
               cross_attention_frequency=1, encoder_hidden_size=8, layer_norm_eps=1e-12,
               hidden_act="gelu", pad_token_id=0)
    folder = _write_qformer(str(tmp_path / "m"), cfg, R.random_state_dict(cfg, rng))
    q = rng.standard_normal((1, 3, 16)).astype(np.float32)
    enc = rng.standard_normal((1, 4, 8)).astype(np.float32)
    results = []
    for make in (qfuse.QFormer.load, qfuse.FusionModel):
        m = make(folder)
        qf = m if isinstance(m, qfuse.QFormer) else m.impl
        out = qf.forward(q, enc)
        qf.backward(np.ones_like(out))
        opt = AdamW(m, lr=1e-2)
        opt.step()
        assert opt.num_states() == len(qf.params())
        results.append(qf.params())
    assert all(np.array_equal(results[0][k], results[1][k]) for k in results[0])
    with pytest.raises(QfuseError, match="not a qfuse model"):
        AdamW(object())
