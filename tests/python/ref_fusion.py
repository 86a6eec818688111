"""ref_fusion.py - float64 PyTorch references of qfuse's two fusion models, built on ref_qformer.py
(the Q-Former core) and written from the model descriptions, independent of libqfuse:

  AffectGPT pre-fusion (AffectGPT encode_multi_qformer, model_type "affectgpt_prefusion"):
    X = concat_time(multi_video_embs(face), multi_audio_embs(audio))   (fusion_order face, audio)
    X = X + multi_position_embedding[0 .. tf+ta-1]
    out = multi_llama_proj(Q-Former(multi_query_tokens, X, mask = [face_mask ; audio_mask]))
  KV prefix (model_type "blip2_kv_prefix"):
    p = prefix_tokens + feature_proj.2(gelu(feature_proj.0(g)))[:, None]
    out = Q-Former(query_tokens or query_embeds, enc, prefix_k = k_proj(p), prefix_v = v_proj(p))

Interface:
    cfg = prefusion_config(...); sd = random_prefusion(cfg, rng, lavis=False)
    out, grads, probs = prefusion_reference(sd, cfg, audio, face, audio_mask, face_mask, grad_out)
    cfg = kvprefix_config(...);  sd = random_kvprefix(cfg, rng, projection_dim=0)
    out, grads, probs = kvprefix_reference(sd, cfg, enc, g, query_embeds=None, enc_mask=None, grad_out=None)
  sd: {checkpoint name: float64 array (float32-representable)}; the Q-Former part is under
  "multi_Qformer." / "qformer." in transformers names (to_lavis() renames to LAVIS's).
  grads: {checkpoint name: grad} for every tensor of sd, plus "audio"/"face" or
  "encoder_hidden_states"/"global_feature"/"query_embeds" (loss = sum(out * grad_out)).
  probs: per cross-attention layer [B, heads, nq, P+S].
"""
import numpy as np

import ref_qformer as R

QPRE_AFFECT = "multi_Qformer."
QPRE_KV = "qformer."


def qformer_config(hidden=768, heads=12, layers=2, inter=3072, freq=1, eps=1e-12, act="gelu"):
    return {"hidden_size": hidden, "num_attention_heads": heads, "num_hidden_layers": layers,
            "intermediate_size": inter, "cross_attention_frequency": freq, "layer_norm_eps": eps,
            "hidden_act": act}


def prefusion_config(audio_dim, video_dim, nq, llm, qcfg, pos_size=264, fusion_order=None):
    cfg = {"model_type": "affectgpt_prefusion", "audio_dim": audio_dim, "video_dim": video_dim,
           "max_hidden_size": max(audio_dim, video_dim), "num_multi_query_token": nq,
           "position_embedding_size": pos_size, "llm_hidden_size": llm,
           "qformer_config": dict(qcfg)}
    if fusion_order is not None:
        cfg["fusion_order"] = list(fusion_order)
    return cfg


def kvprefix_config(nq, P, feat, qcfg, encoder_hidden_size):
    q = dict(qcfg)
    q["encoder_hidden_size"] = encoder_hidden_size
    q.setdefault("model_type", "blip_2_qformer")
    return {"model_type": "blip2_kv_prefix", "qformer_config": q, "num_query_tokens": nq,
            "num_prefix_tokens": P, "prefix_feature_dim": feat}


def _core_cfg(qcfg, enc):
    c = {k: qcfg[k] for k in qcfg if k != "model_type"}
    c["encoder_hidden_size"] = enc
    c.setdefault("pad_token_id", 0)
    return c


def _f32(a):
    return np.asarray(a).astype(np.float32).astype(np.float64)


def _rand(rng, shape, scale):
    return _f32(scale * rng.standard_normal(shape))


def random_prefusion(cfg, rng, scale=0.05):
    M, H = cfg["max_hidden_size"], cfg["qformer_config"]["hidden_size"]
    sd = {"multi_audio_embs.weight": _rand(rng, (M, cfg["audio_dim"]), scale),
          "multi_audio_embs.bias": _rand(rng, (M,), scale),
          "multi_video_embs.weight": _rand(rng, (M, cfg["video_dim"]), scale),
          "multi_video_embs.bias": _rand(rng, (M,), scale),
          "multi_position_embedding.weight": _rand(rng, (cfg["position_embedding_size"], M), 0.5),
          "multi_query_tokens": _rand(rng, (1, cfg["num_multi_query_token"], H), 0.5),
          "multi_llama_proj.weight": _rand(rng, (cfg["llm_hidden_size"], H), scale),
          "multi_llama_proj.bias": _rand(rng, (cfg["llm_hidden_size"],), scale)}
    qsd = R.random_state_dict(_core_cfg(cfg["qformer_config"], M), rng, scale=scale)
    sd.update({QPRE_AFFECT + k: v for k, v in qsd.items()})
    return sd


def random_kvprefix(cfg, rng, projection_dim=0, scale=0.05):
    q = cfg["qformer_config"]
    H, F, P = q["hidden_size"], cfg["prefix_feature_dim"], cfg["num_prefix_tokens"]
    sd = {"query_tokens": _rand(rng, (1, cfg["num_query_tokens"], H), 0.5),
          "kv_prefix.feature_proj.0.weight": _rand(rng, (F, F), 0.2),
          "kv_prefix.feature_proj.0.bias": _rand(rng, (F,), 0.1),
          "kv_prefix.feature_proj.2.weight": _rand(rng, (H, F), 0.2),
          "kv_prefix.feature_proj.2.bias": _rand(rng, (H,), 0.1),
          "kv_prefix.prefix_tokens": _rand(rng, (1, P, H), 0.5),
          "kv_prefix.k_proj.weight": _rand(rng, (H, H), 0.1),
          "kv_prefix.k_proj.bias": _rand(rng, (H,), 0.05),
          "kv_prefix.v_proj.weight": _rand(rng, (H, H), 0.1),
          "kv_prefix.v_proj.bias": _rand(rng, (H,), 0.05)}
    if projection_dim:
        sd["language_projection.weight"] = _rand(rng, (projection_dim, H), scale)
        sd["language_projection.bias"] = _rand(rng, (projection_dim,), scale)
    qsd = R.random_state_dict(_core_cfg(q, q["encoder_hidden_size"]), rng, scale=scale)
    sd.update({QPRE_KV + k: v for k, v in qsd.items()})
    return sd


def to_lavis(name, prefix):
    """transformers Q-Former name under prefix -> LAVIS BertModel name (other names unchanged)."""
    if not name.startswith(prefix):
        return name
    n = name[len(prefix):]
    if n.startswith("layernorm."):
        n = "embeddings.LayerNorm." + n[len("layernorm."):]
    n = n.replace(".attention.attention.", ".attention.self.")
    n = n.replace(".crossattention.attention.", ".crossattention.self.")
    return prefix + "bert." + n


def from_lavis(name, prefix):
    """Inverse of to_lavis for a Q-Former without text (names the model reports for a LAVIS
    checkpoint -> the transformers names the references use)."""
    if not name.startswith(prefix + "bert."):
        return name
    n = name[len(prefix) + len("bert."):]
    if n.startswith("embeddings.LayerNorm."):
        n = "layernorm." + n[len("embeddings.LayerNorm."):]
    n = n.replace(".attention.self.", ".attention.attention.")
    n = n.replace(".crossattention.self.", ".crossattention.attention.")
    return prefix + n


def _tensors(d, need):
    t = R._t()
    return {k: t.tensor(np.asarray(v, np.float64), requires_grad=need) for k, v in d.items()}


def _finish(out, grad_out, tsd, tin, probs):
    t = R._t()
    probs = [p.detach().numpy() for p in probs]
    if grad_out is None:
        return out.detach().numpy(), None, probs
    out.backward(t.tensor(np.asarray(grad_out, np.float64)))
    grads = {}
    for k, v in list(tsd.items()) + list(tin.items()):
        grads[k] = v.grad.numpy() if v.grad is not None else np.zeros(v.shape)
    return out.detach().numpy(), grads, probs


def _qsub(tsd, prefix):
    return {k[len(prefix):]: v for k, v in tsd.items() if k.startswith(prefix)}


def prefusion_reference(sd, cfg, audio=None, face=None, audio_mask=None, face_mask=None,
                        grad_out=None):
    t = R._t()
    need = grad_out is not None
    tsd = _tensors(sd, need)
    ins = {}
    if audio is not None:
        ins["audio"] = audio
    if face is not None:
        ins["face"] = face
    tin = _tensors(ins, need)
    face_first = cfg.get("fusion_order", ["face", "audio"])[0] == "face"
    parts, masks = [], []
    B = (audio if audio is not None else face).shape[0]
    for mod in (["face", "audio"] if face_first else ["audio", "face"]):
        if mod not in tin:
            continue
        x = tin[mod]
        w = "multi_video_embs" if mod == "face" else "multi_audio_embs"
        parts.append(x @ tsd[w + ".weight"].T + tsd[w + ".bias"])
        m = face_mask if mod == "face" else audio_mask
        masks.append(np.ones(x.shape[:2]) if m is None else np.asarray(m, np.float64))
    X = t.cat(parts, dim=1)
    S = X.shape[1]
    X = X + tsd["multi_position_embedding.weight"][:S][None]
    mask = None
    if audio_mask is not None or face_mask is not None:
        mask = np.concatenate(masks, axis=1)
    q = tsd["multi_query_tokens"].expand(B, -1, -1)
    qcfg = _core_cfg(cfg["qformer_config"], cfg["max_hidden_size"])
    hq, probs = R.forward(_qsub(tsd, QPRE_AFFECT), qcfg, q, X, encoder_attention_mask=mask)
    out = hq @ tsd["multi_llama_proj.weight"].T + tsd["multi_llama_proj.bias"]
    return _finish(out, grad_out, tsd, tin, probs)


def kvprefix_prefix(tsd, g):
    """(prefix_k, prefix_v) [B,P,hidden] from global feature g [B,F] (torch tensors)."""
    t = R._t()
    h = g @ tsd["kv_prefix.feature_proj.0.weight"].T + tsd["kv_prefix.feature_proj.0.bias"]
    h = t.nn.functional.gelu(h)
    h = h @ tsd["kv_prefix.feature_proj.2.weight"].T + tsd["kv_prefix.feature_proj.2.bias"]
    p = tsd["kv_prefix.prefix_tokens"] + h[:, None, :]
    pk = p @ tsd["kv_prefix.k_proj.weight"].T + tsd["kv_prefix.k_proj.bias"]
    pv = p @ tsd["kv_prefix.v_proj.weight"].T + tsd["kv_prefix.v_proj.bias"]
    return pk, pv


def kvprefix_reference(sd, cfg, enc, g, query_embeds=None, enc_mask=None, grad_out=None):
    need = grad_out is not None
    tsd = _tensors(sd, need)
    ins = {"encoder_hidden_states": enc, "global_feature": g}
    if query_embeds is not None:
        ins["query_embeds"] = query_embeds
    tin = _tensors(ins, need)
    B = enc.shape[0]
    q = tin["query_embeds"] if query_embeds is not None else tsd["query_tokens"].expand(B, -1, -1)
    pk, pv = kvprefix_prefix(tsd, tin["global_feature"])
    qc = cfg["qformer_config"]
    out, probs = R.forward(_qsub(tsd, QPRE_KV), _core_cfg(qc, qc["encoder_hidden_size"]), q,
                           tin["encoder_hidden_states"], encoder_attention_mask=enc_mask,
                           prefix_k=pk, prefix_v=pv)
    return _finish(out, grad_out, tsd, tin, probs)
