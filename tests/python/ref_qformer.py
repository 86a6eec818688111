"""ref_qformer.py - a float64 PyTorch reference of the Q-Former core that include/qfuse_models.h
specifies (transformers' Blip2QFormerModel / InstructBlipQFormerModel, plus qfuse's KV prefix),
written from transformers' modeling_blip_2.py / modeling_instructblip.py, independent of libqfuse.
Validated against the transformers fixtures tests/fixtures/qformer_* (test_qformer.py).

Interface (other tests import it; keep it stable):

    import ref_qformer as R
    cfg = R.config_from_json(path_or_dict, prefix="")   # plain dict of the keys used below
    sd  = R.random_state_dict(cfg, rng, has_text=False, scale=0.05)  # {transformers name: f64 array}
    out, grads, probs = R.reference(sd, cfg, query_embeds, encoder_hidden_states,
                                    encoder_attention_mask=None, text_ids=None,
                                    text_attention_mask=None, prefix_k=None, prefix_v=None,
                                    grad_out=None)
      out   : last_hidden_state [B, Lq+Lt, hidden] float64 numpy
      grads : None without grad_out; else {param name: grad} for every tensor of sd, plus
              "query_embeds", "encoder_hidden_states" and "prefix_k"/"prefix_v" when given
              (gradients of loss = sum(out * grad_out), float64 numpy)
      probs : per cross-attention layer (in layer order), the attention probabilities
              [B, heads, Lq, P+S] (prefix keys first), float64 numpy
    R.forward(tsd, cfg, ...) is the same on torch tensors (tsd: {name: float64 tensor}) and
    returns (out tensor, [probs tensors]) for callers that build their own autograd graph
    (e.g. AffectGPT / KV-prefix references that compute prefix_k/prefix_v or query_embeds).

Semantics (eval mode, dropout off):
  - Tokens: Lq queries, then Lt text tokens: word_embeddings(ids) + position_embeddings(0..Lt-1).
    The concatenation goes through "layernorm.*" (BLIP-2 name) or "embeddings.layernorm.*"
    (InstructBLIP name); whichever sd holds.
  - Layer i: self-attention over all Lq+Lt tokens; key j masked by text_attention_mask for text
    keys (query keys always attended), as transformers' additive mask (1-m)*finfo.min.
    attention.output: LN(x + dense(ctx)). Query rows only: cross-attention on layers with
    i % cross_attention_frequency == 0 (keys/values [prefix ; key/value(encoder)], encoder mask
    additive finfo.min on padded encoder keys, prefix keys always attended), then
    intermediate_query/output_query FFN. Text rows: intermediate/output FFN.
  - An item whose encoder keys are all padding (and no prefix): finfo.min swamps every score, so
    its weights are uniform over the S keys, exactly as transformers behaves.
  - word_embeddings has padding_idx = pad_token_id (transformers' nn.Embedding): that row gets
    no gradient.
  - hidden_act "gelu" = erf GELU; "gelu_new" / "gelu_pytorch_tanh" = tanh approximation.
"""
import json
import math

import numpy as np

_torch = None


def _t():
    global _torch
    if _torch is None:
        import torch
        torch.set_num_threads(1)
        _torch = torch
    return _torch


_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
         "cross_attention_frequency", "encoder_hidden_size", "layer_norm_eps", "hidden_act",
         "vocab_size", "max_position_embeddings", "pad_token_id")


def config_from_json(src, prefix=""):
    """dict of the Q-Former keys from a config.json path or a dict; prefix e.g. "qformer_config"."""
    if isinstance(src, str):
        with open(src) as f:
            src = json.load(f)
    if prefix:
        for p in prefix.strip(".").split("."):
            src = src[p]
    out = {k: src[k] for k in _KEYS if k in src}
    out.setdefault("pad_token_id", 0)
    return out


def param_shapes(cfg, has_text=False):
    """{transformers name: shape} of a Q-Former with cfg (layernorm under "layernorm." without
    text, "embeddings.layernorm." with text, as transformers names them)."""
    H, E, I = cfg["hidden_size"], cfg["encoder_hidden_size"], cfg["intermediate_size"]
    ln = "embeddings.layernorm." if has_text else "layernorm."
    shapes = {ln + "weight": (H,), ln + "bias": (H,)}
    if has_text:
        shapes["embeddings.word_embeddings.weight"] = (cfg["vocab_size"], H)
        shapes["embeddings.position_embeddings.weight"] = (cfg["max_position_embeddings"], H)
    for i in range(cfg["num_hidden_layers"]):
        p = "encoder.layer.%d." % i
        blocks = [("attention", H)]
        if i % cfg["cross_attention_frequency"] == 0:
            blocks.append(("crossattention", E))
        for blk, kin in blocks:
            for w, din in (("query", H), ("key", kin), ("value", kin)):
                shapes[p + blk + ".attention." + w + ".weight"] = (H, din)
                shapes[p + blk + ".attention." + w + ".bias"] = (H,)
            shapes[p + blk + ".output.dense.weight"] = (H, H)
            shapes[p + blk + ".output.dense.bias"] = (H,)
            shapes[p + blk + ".output.LayerNorm.weight"] = (H,)
            shapes[p + blk + ".output.LayerNorm.bias"] = (H,)
        ffns = [("intermediate_query", "output_query")]
        if has_text:
            ffns.append(("intermediate", "output"))
        for a, b in ffns:
            shapes[p + a + ".dense.weight"] = (I, H)
            shapes[p + a + ".dense.bias"] = (I,)
            shapes[p + b + ".dense.weight"] = (H, I)
            shapes[p + b + ".dense.bias"] = (H,)
            shapes[p + b + ".LayerNorm.weight"] = (H,)
            shapes[p + b + ".LayerNorm.bias"] = (H,)
    return shapes


def random_state_dict(cfg, rng, has_text=False, scale=0.05):
    """Random float64 weights (float32-representable, so a float32 engine holds them exactly).
    LayerNorm weights near 1, biases small and nonzero."""
    sd = {}
    for name, shape in param_shapes(cfg, has_text).items():
        if name.endswith("LayerNorm.weight") or name.endswith("layernorm.weight"):
            a = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name.endswith("embeddings.weight"):
            a = 0.5 * rng.standard_normal(shape)
        else:
            a = scale * rng.standard_normal(shape) * (1.0 if name.endswith("weight") else 0.5)
        sd[name] = a.astype(np.float32).astype(np.float64)
    return sd


def _gelu(x, act):
    F = _t().nn.functional
    if act == "gelu":
        return F.gelu(x)
    if act in ("gelu_new", "gelu_pytorch_tanh"):
        return F.gelu(x, approximate="tanh")
    raise ValueError("unsupported hidden_act %r" % act)


def _lin(sd, name, x):
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def _ln(sd, name, x, eps):
    F = _t().nn.functional
    return F.layer_norm(x, (x.shape[-1],), sd[name + ".weight"], sd[name + ".bias"], eps)


def _mha(sd, p, x, kv, nh, add_mask, prefix_k=None, prefix_v=None):
    """Multi-head attention of block p ("encoder.layer.i.attention" / ".crossattention"):
    returns (context [B,L,H], probs [B,nh,L,keys])."""
    t = _t()
    B, L, H = x.shape
    hd = H // nh

    def heads(y):
        return y.reshape(B, -1, nh, hd).permute(0, 2, 1, 3)
    q = heads(_lin(sd, p + ".attention.query", x))
    k = heads(_lin(sd, p + ".attention.key", kv))
    v = heads(_lin(sd, p + ".attention.value", kv))
    if prefix_k is not None:
        k = t.cat([heads(prefix_k), k], dim=2)
        v = t.cat([heads(prefix_v), v], dim=2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    if add_mask is not None:
        scores = scores + add_mask
    probs = t.softmax(scores, dim=-1)
    ctx = (probs @ v).permute(0, 2, 1, 3).reshape(B, L, H)
    return ctx, probs


def forward(sd, cfg, query_embeds, encoder_hidden_states, encoder_attention_mask=None,
            text_ids=None, text_attention_mask=None, prefix_k=None, prefix_v=None):
    """Torch-level forward: sd {name: float64 tensor}, inputs float64 tensors (masks/ids any
    integer or bool array). Returns (last_hidden_state, [cross probs per cross layer])."""
    t = _t()
    eps = cfg["layer_norm_eps"]
    nh = cfg["num_attention_heads"]
    act = cfg["hidden_act"]
    B, Lq, H = query_embeds.shape
    S = encoder_hidden_states.shape[1]
    dt = query_embeds.dtype
    fmin = t.finfo(dt).min
    x = query_embeds
    Lt = 0
    if text_ids is not None:
        ids = t.as_tensor(np.asarray(text_ids), dtype=t.long)
        Lt = ids.shape[1]
        emb = sd["embeddings.word_embeddings.weight"]
        wemb = t.nn.functional.embedding(ids, emb, padding_idx=cfg.get("pad_token_id", 0))
        pos = sd["embeddings.position_embeddings.weight"][:Lt]
        x = t.cat([x, wemb + pos[None]], dim=1)
    ln = "embeddings.layernorm" if "embeddings.layernorm.weight" in sd else "layernorm"
    x = _ln(sd, ln, x, eps)

    self_mask = None
    if Lt and text_attention_mask is not None:
        m = t.cat([t.ones(B, Lq, dtype=dt), t.as_tensor(np.asarray(text_attention_mask), dtype=dt)], 1)
        self_mask = ((1.0 - m) * fmin)[:, None, None, :]
    P = 0 if prefix_k is None else prefix_k.shape[1]
    cross_mask = None
    if encoder_attention_mask is not None:
        em = t.as_tensor(np.asarray(encoder_attention_mask), dtype=dt)
        if P:
            em = t.cat([t.ones(B, P, dtype=dt), em], 1)
        cross_mask = ((1.0 - em) * fmin)[:, None, None, :]

    probs_all = []
    for i in range(cfg["num_hidden_layers"]):
        p = "encoder.layer.%d." % i
        ctx, _ = _mha(sd, p + "attention", x, x, nh, self_mask)
        a = _ln(sd, p + "attention.output.LayerNorm", _lin(sd, p + "attention.output.dense", ctx) + x, eps)
        q = a[:, :Lq]
        if i % cfg["cross_attention_frequency"] == 0:
            ctx, probs = _mha(sd, p + "crossattention", q, encoder_hidden_states, nh, cross_mask,
                              prefix_k, prefix_v)
            probs_all.append(probs)
            q = _ln(sd, p + "crossattention.output.LayerNorm",
                    _lin(sd, p + "crossattention.output.dense", ctx) + q, eps)
        h = _gelu(_lin(sd, p + "intermediate_query.dense", q), act)
        q = _ln(sd, p + "output_query.LayerNorm", _lin(sd, p + "output_query.dense", h) + q, eps)
        if Lt:
            tt = a[:, Lq:]
            h = _gelu(_lin(sd, p + "intermediate.dense", tt), act)
            tt = _ln(sd, p + "output.LayerNorm", _lin(sd, p + "output.dense", h) + tt, eps)
            x = t.cat([q, tt], dim=1)
        else:
            x = q
    return x, probs_all


def reference(sd, cfg, query_embeds, encoder_hidden_states, encoder_attention_mask=None,
              text_ids=None, text_attention_mask=None, prefix_k=None, prefix_v=None, grad_out=None):
    """numpy in, numpy out (float64); see the module docstring."""
    t = _t()
    need = grad_out is not None
    tsd = {k: t.tensor(np.asarray(v, np.float64), requires_grad=need) for k, v in sd.items()}
    ins = {"query_embeds": query_embeds, "encoder_hidden_states": encoder_hidden_states}
    if prefix_k is not None:
        ins["prefix_k"] = prefix_k
        ins["prefix_v"] = prefix_v
    tin = {k: t.tensor(np.asarray(v, np.float64), requires_grad=need) for k, v in ins.items()}
    out, probs = forward(tsd, cfg, tin["query_embeds"], tin["encoder_hidden_states"],
                         encoder_attention_mask, text_ids, text_attention_mask,
                         tin.get("prefix_k"), tin.get("prefix_v"))
    probs = [p.detach().numpy() for p in probs]
    if not need:
        return out.detach().numpy(), None, probs
    out.backward(t.tensor(np.asarray(grad_out, np.float64)))
    grads = {}
    for k, v in list(tsd.items()) + list(tin.items()):
        grads[k] = v.grad.numpy() if v.grad is not None else np.zeros(v.shape)
    return out.detach().numpy(), grads, probs
