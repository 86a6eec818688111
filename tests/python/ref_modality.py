"""ref_modality.py - float64 PyTorch references of AffectGPT's per-modality Q-Formers and its
"attention" multi-fusion (src/models/modality_qformer.c), built on ref_qformer.py / ref_fusion.py
helpers and written from AffectGPT's my_affectgpt/models/affectgpt.py (encode_video_qformer,
encode_audio_qformer, encode_multi_attention), independent of libqfuse:

  video / audio Q-Former (model_type "affectgpt_video_qformer" / "affectgpt_audio_qformer"):
    X = frames + frame_position_embedding[0 .. T-1]   (4-D frames [B,T,K,D]: row t on all K
        tokens of frame t, then flattened to [B,T*K,D], as encode_video_qformer's case 1)
    out = proj(Q-Former(query_tokens, X, mask = frame_mask repeated K times))
  attention fusion (model_type "affectgpt_attention_fusion"):
    v = multi_video_embs(mean_t face); a = multi_audio_embs(mean_t audio)   (masked means)
    w = fc_att(attention_mlp(cat(v, a)));  fused = w[:,0:1] v + w[:,1:2] a
    out = multi_llama_proj(fused)[:, None].expand(B, nq, llm)

Interface:
    cfg = modality_config("video"|"audio", input_dim, nq, llm, qcfg, pos=None)
    sd = random_modality(cfg, rng, proj=None)   # proj: the projection's tensor name prefix
    out, grads, probs = modality_reference(sd, cfg, frames, frame_mask=None, grad_out=None)
    cfg = attention_config(audio_dim, video_dim, nq, llm); sd = random_attention(cfg, rng)
    out, grads, w = attention_reference(sd, cfg, audio, face, audio_mask, face_mask, grad_out)
  grads: {checkpoint name: grad} for every tensor of sd plus "frames" / "audio", "face".
"""
import numpy as np

import ref_fusion as RF
import ref_qformer as R

NAMES = {
    "video": {"pos": "video_frame_position_embedding.weight", "query": "video_query_tokens",
              "qformer": "video_Qformer.", "proj": "affectgpt_proj", "default_pos": 32,
              "model_type": "affectgpt_video_qformer"},
    "audio": {"pos": "audio_position_embedding.weight", "query": "audio_query_tokens",
              "qformer": "audio_Qformer.", "proj": "audio_llama_proj", "default_pos": 8,
              "model_type": "affectgpt_audio_qformer"},
}


def modality_config(modality, input_dim, nq, llm, qcfg, pos=None):
    n = NAMES[modality]
    cfg = {"model_type": n["model_type"], "input_dim": input_dim, "num_query_token": nq,
           "llm_hidden_size": llm, "qformer_config": dict(qcfg)}
    if pos is not None:
        cfg["frame_position_size"] = pos
    return cfg


def _modality(cfg):
    return "video" if cfg["model_type"] == "affectgpt_video_qformer" else "audio"


def random_modality(cfg, rng, proj=None, scale=0.05):
    n = NAMES[_modality(cfg)]
    proj = proj or n["proj"]
    D, H = cfg["input_dim"], cfg["qformer_config"]["hidden_size"]
    P = cfg.get("frame_position_size", n["default_pos"])
    sd = {n["pos"]: RF._rand(rng, (P, D), 0.5),
          n["query"]: RF._rand(rng, (1, cfg["num_query_token"], H), 0.5),
          proj + ".weight": RF._rand(rng, (cfg["llm_hidden_size"], H), scale),
          proj + ".bias": RF._rand(rng, (cfg["llm_hidden_size"],), scale)}
    qsd = R.random_state_dict(RF._core_cfg(cfg["qformer_config"], D), rng, scale=scale)
    sd.update({n["qformer"] + k: v for k, v in qsd.items()})
    return sd


def modality_reference(sd, cfg, frames, frame_mask=None, grad_out=None):
    n = NAMES[_modality(cfg)]
    need = grad_out is not None
    tsd = RF._tensors(sd, need)
    tin = RF._tensors({"frames": frames}, need)
    x = tin["frames"]
    pos = tsd[n["pos"]]
    B, T = x.shape[0], x.shape[1]
    if x.dim() == 4:
        K = x.shape[2]
        X = (x + pos[:T][None, :, None, :]).reshape(B, T * K, x.shape[3])
    else:
        K = 1
        X = x + pos[:T][None]
    mask = None
    if frame_mask is not None:
        mask = np.repeat(np.asarray(frame_mask, np.float64), K, axis=1)
    q = tsd[n["query"]].expand(B, -1, -1)
    proj = [k[:-len(".weight")] for k in sd if k.endswith(".weight") and "proj" in k][0]
    hq, probs = R.forward(RF._qsub(tsd, n["qformer"]), RF._core_cfg(cfg["qformer_config"], cfg["input_dim"]),
                          q, X, encoder_attention_mask=mask)
    out = hq @ tsd[proj + ".weight"].T + tsd[proj + ".bias"]
    return RF._finish(out, grad_out, tsd, tin, probs)


def attention_config(audio_dim, video_dim, nq, llm):
    return {"model_type": "affectgpt_attention_fusion", "audio_dim": audio_dim, "video_dim": video_dim,
            "max_hidden_size": max(audio_dim, video_dim), "num_multi_query_token": nq,
            "llm_hidden_size": llm}


def random_attention(cfg, rng, scale=0.2):
    M, L = cfg["max_hidden_size"], cfg["llm_hidden_size"]
    shapes = {"multi_video_embs": (M, cfg["video_dim"]), "multi_audio_embs": (M, cfg["audio_dim"]),
              "attention_mlp": (M, 2 * M), "fc_att": (2, M), "multi_llama_proj": (L, M)}
    sd = {}
    for k, s in shapes.items():
        sd[k + ".weight"] = RF._rand(rng, s, scale)
        sd[k + ".bias"] = RF._rand(rng, (s[0],), scale)
    return sd


def _masked_mean(t, x, m):
    if m is None:
        return x.mean(dim=1)
    w = t.as_tensor(np.asarray(m, np.float64))
    return (x * w[:, :, None]).sum(dim=1) / w.sum(dim=1, keepdim=True)


def attention_reference(sd, cfg, audio, face, audio_mask=None, face_mask=None, grad_out=None):
    t = R._t()
    need = grad_out is not None
    tsd = RF._tensors(sd, need)
    tin = RF._tensors({"audio": audio, "face": face}, need)

    def lin(name, x):
        return x @ tsd[name + ".weight"].T + tsd[name + ".bias"]

    v = lin("multi_video_embs", _masked_mean(t, tin["face"], face_mask))
    a = lin("multi_audio_embs", _masked_mean(t, tin["audio"], audio_mask))
    w = lin("fc_att", lin("attention_mlp", t.cat([v, a], dim=1)))        # [B,2]
    fused = t.matmul(t.stack([v, a], dim=2), w[:, :, None])[:, :, 0]     # [B,M]
    o = lin("multi_llama_proj", fused)
    out = o[:, None, :].expand(-1, cfg["num_multi_query_token"], -1)
    res, grads, _ = RF._finish(out, grad_out, tsd, tin, [])
    return res, grads, w.detach().numpy()
