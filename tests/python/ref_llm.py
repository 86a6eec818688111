"""ref_llm.py - a PyTorch (1.13, float64) transcription of transformers 5.17's LlamaForCausalLM /
Qwen2ForCausalLM and OPTForCausalLM forward (modeling_llama.py, modeling_qwen2.py,
modeling_opt.py), for configurations the transformers-made fixtures do not cover (head counts,
GQA ratios, RoPE theta, tied/untied heads, biases, OPT post-LN and project_in/out).

It is itself checked against those fixtures (test_llm_configs.py: test_reference_matches_fixtures)
before it is used as the reference for new configurations, so it cannot drift from transformers
unnoticed. Positions are 0..T-1 (no padding here: padding is tested against the fixtures).
"""
import numpy as np
import torch



def _t(x):
    return torch.from_numpy(np.asarray(x, np.float64))


def _linear(W, name, x, bias):
    y = x @ _t(W[name + ".weight"]).T
    if bias:
        y = y + _t(W[name + ".bias"])
    return y


def _attn(q, k, v, causal=True):
    # q [T, Hq, d], k/v [T, Hkv, d]: grouped-query causal softmax attention, scale 1/sqrt(d)
    T, Hq, d = q.shape
    group = Hq // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    s = torch.einsum("ihd,jhd->hij", q, k) / np.sqrt(d)
    if causal:
        s = s.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    return torch.einsum("hij,jhd->ihd", torch.softmax(s, -1), v).reshape(T, Hq * d)


def llama_logits(W, cfg, ids):
    """Logits [B, T, V] of LlamaForCausalLM / Qwen2ForCausalLM (model_type in cfg)."""
    qwen = cfg["model_type"] == "qwen2"
    H, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads", nh)
    hd = cfg.get("head_dim", H // nh)
    eps = cfg.get("rms_norm_eps", 1e-6)
    theta = cfg.get("rope_parameters", {}).get("rope_theta", cfg.get("rope_theta", 10000.0))
    ab = True if qwen else cfg.get("attention_bias", False)
    mb = False if qwen else cfg.get("mlp_bias", False)

    def rms(x, w):
        return _t(w) * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))

    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    out = []
    for row in np.asarray(ids):
        T = len(row)
        ang = _t(np.arange(T)[:, None] * inv[None, :])
        cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]

        def rope(x):
            x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
            return x * cos + torch.cat([-x2, x1], -1) * sin

        x = _t(W["model.embed_tokens.weight"])[torch.from_numpy(row.astype(np.int64))]
        for l in range(cfg["num_hidden_layers"]):
            p = "model.layers.%d." % l
            h = rms(x, W[p + "input_layernorm.weight"])
            q = rope(_linear(W, p + "self_attn.q_proj", h, ab).reshape(T, nh, hd))
            k = rope(_linear(W, p + "self_attn.k_proj", h, ab).reshape(T, nkv, hd))
            v = _linear(W, p + "self_attn.v_proj", h, ab).reshape(T, nkv, hd)
            x = x + _linear(W, p + "self_attn.o_proj", _attn(q, k, v), ab and not qwen)
            h = rms(x, W[p + "post_attention_layernorm.weight"])
            g = _linear(W, p + "mlp.gate_proj", h, mb)
            x = x + _linear(W, p + "mlp.down_proj", torch.nn.functional.silu(g) * _linear(W, p + "mlp.up_proj", h, mb), mb)
        x = rms(x, W["model.norm.weight"])
        head = W["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings", False) else W["lm_head.weight"]
        out.append((x @ _t(head).T).numpy())
    return np.stack(out)


def opt_logits(W, cfg, ids):
    """Logits [B, T, V] of OPTForCausalLM."""
    H, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    hd = H // nh
    pre = cfg.get("do_layer_norm_before", True)
    bias = cfg.get("enable_bias", True)
    E = cfg.get("word_embed_proj_dim", H)
    final = pre and not cfg.get("_remove_final_layer_norm", False)

    def ln(x, name):
        return torch.nn.functional.layer_norm(x, (H,), _t(W[name + ".weight"]), _t(W[name + ".bias"]), 1e-5)

    out = []
    for row in np.asarray(ids):
        T = len(row)
        x = _t(W["model.decoder.embed_tokens.weight"])[torch.from_numpy(row.astype(np.int64))]
        if E != H:
            x = _linear(W, "model.decoder.project_in", x, False)
        x = x + _t(W["model.decoder.embed_positions.weight"])[2:2 + T]
        for l in range(cfg["num_hidden_layers"]):
            p = "model.decoder.layers.%d." % l
            h = ln(x, p + "self_attn_layer_norm") if pre else x
            q = _linear(W, p + "self_attn.q_proj", h, bias).reshape(T, nh, hd)
            k = _linear(W, p + "self_attn.k_proj", h, bias).reshape(T, nh, hd)
            v = _linear(W, p + "self_attn.v_proj", h, bias).reshape(T, nh, hd)
            x = x + _linear(W, p + "self_attn.out_proj", _attn(q, k, v), bias)
            if not pre:
                x = ln(x, p + "self_attn_layer_norm")
            h = ln(x, p + "final_layer_norm") if pre else x
            x = x + _linear(W, p + "fc2", torch.relu(_linear(W, p + "fc1", h, bias)), bias)
            if not pre:
                x = ln(x, p + "final_layer_norm")
        if final:
            x = ln(x, "model.decoder.final_layer_norm")
        if E != H:
            x = _linear(W, "model.decoder.project_out", x, False)
        head = W["model.decoder.embed_tokens.weight"] if cfg.get("tie_word_embeddings", True) else W["lm_head.weight"]
        out.append((x @ _t(head).T).numpy())
    return np.stack(out)


def random_llama(cfg, rng):
    """Random weights (std 0.1, norms around 1) with every tensor the config implies."""
    qwen = cfg["model_type"] == "qwen2"
    H, I, V, nh = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads", nh)
    hd = cfg.get("head_dim", H // nh)
    ab = True if qwen else cfg.get("attention_bias", False)
    mb = False if qwen else cfg.get("mlp_bias", False)
    f = lambda *s: (rng.standard_normal(s) * 0.1).astype(np.float32)  # noqa: E731
    W = {"model.embed_tokens.weight": f(V, H), "model.norm.weight": 1 + f(H)}
    for l in range(cfg["num_hidden_layers"]):
        p = "model.layers.%d." % l
        W[p + "input_layernorm.weight"] = 1 + f(H)
        W[p + "post_attention_layernorm.weight"] = 1 + f(H)
        for n, o, i in [("self_attn.q_proj", nh * hd, H), ("self_attn.k_proj", nkv * hd, H),
                        ("self_attn.v_proj", nkv * hd, H), ("self_attn.o_proj", H, nh * hd),
                        ("mlp.gate_proj", I, H), ("mlp.up_proj", I, H), ("mlp.down_proj", H, I)]:
            W[p + n + ".weight"] = f(o, i)
            has_b = (mb if n.startswith("mlp") else (ab and not (qwen and n.endswith("o_proj"))))
            if has_b:
                W[p + n + ".bias"] = f(o)
    if not cfg.get("tie_word_embeddings", False):
        W["lm_head.weight"] = f(V, H)
    return W


def random_opt(cfg, rng):
    H, I, V = cfg["hidden_size"], cfg["ffn_dim"], cfg["vocab_size"]
    E = cfg.get("word_embed_proj_dim", H)
    f = lambda *s: (rng.standard_normal(s) * 0.1).astype(np.float32)  # noqa: E731
    W = {"model.decoder.embed_tokens.weight": f(V, E),
         "model.decoder.embed_positions.weight": f(cfg["max_position_embeddings"] + 2, H)}
    if E != H:
        W["model.decoder.project_in.weight"] = f(H, E)
        W["model.decoder.project_out.weight"] = f(E, H)
    if cfg.get("do_layer_norm_before", True) and not cfg.get("_remove_final_layer_norm", False):
        W["model.decoder.final_layer_norm.weight"] = 1 + f(H)
        W["model.decoder.final_layer_norm.bias"] = f(H)
    for l in range(cfg["num_hidden_layers"]):
        p = "model.decoder.layers.%d." % l
        for n in ["self_attn_layer_norm", "final_layer_norm"]:
            W[p + n + ".weight"] = 1 + f(H)
            W[p + n + ".bias"] = f(H)
        for n, o, i in [("self_attn.q_proj", H, H), ("self_attn.k_proj", H, H), ("self_attn.v_proj", H, H),
                        ("self_attn.out_proj", H, H), ("fc1", I, H), ("fc2", H, I)]:
            W[p + n + ".weight"] = f(o, i)
            if cfg.get("enable_bias", True):
                W[p + n + ".bias"] = f(o)
    if not cfg.get("tie_word_embeddings", True):
        W["lm_head.weight"] = f(V, E)
    return W
