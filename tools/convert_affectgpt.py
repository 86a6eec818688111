#!/usr/bin/env python3
"""convert_affectgpt.py - AffectGPT checkpoint (.pth, torch) -> qfuse "affectgpt_prefusion" folder
(config.json + model.safetensors) holding only the pre-fusion part (encode_multi_qformer).

    convert_affectgpt.py CKPT.pth OUT [--heads 12] [--layer-norm-eps 1e-12] [--hidden-act gelu]
                         [--cross-attention-frequency 1] [--fusion-order face,audio]
                         [--transformers-names] [--dtype keep|F32|F16|BF16] [--trust-pickle]

CKPT is a state dict, or a dict holding one under "model" / "state_dict" (AffectGPT saves
{"model": ...}); a "module." prefix on every key (DataParallel) is stripped. It is read with
torch's weights_only unpickler unless --trust-pickle. Kept: multi_audio_embs.*,
multi_video_embs.*, multi_position_embedding.weight, multi_query_tokens, multi_llama_proj.*,
multi_Qformer.* (LAVIS BertModel names as saved, or transformers' Blip2QFormerModel names with
--transformers-names). Dropped from multi_Qformer:
bert.embeddings.position_ids (a buffer) and anything AffectGPT set to None but an older
checkpoint may still hold (cls.*, word/position embeddings, the text FFN "intermediate."/"output."
of each layer): the pre-fusion path never reads them.

Config values come from the tensors where they are determined (audio_dim, video_dim,
max_hidden_size, num_multi_query_token, position_embedding_size, llm_hidden_size, hidden_size,
num_hidden_layers, intermediate_size); the rest from the flags, whose defaults are AffectGPT's
(bert-base-uncased: 12 heads, eps 1e-12, "gelu"; cross-attention every layer; face then audio).
qformer_config also gets encoder_hidden_size = max_hidden_size (LAVIS's encoder_width).
"""
import argparse
import json
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fusion_model import write_config, write_safetensors  # noqa: E402

OWN = ("multi_audio_embs.weight", "multi_audio_embs.bias", "multi_video_embs.weight",
       "multi_video_embs.bias", "multi_position_embedding.weight", "multi_query_tokens",
       "multi_llama_proj.weight", "multi_llama_proj.bias")
QP = "multi_Qformer."
_DROP = re.compile(r"^bert\.embeddings\.(position_ids|word_embeddings\..*|position_embeddings\..*)$"
                   r"|^cls\..*|^bert\.encoder\.layer\.\d+\.(intermediate|output)\..*")


def lavis_to_transformers(n):
    """LAVIS BertModel name (without the multi_Qformer. prefix) -> transformers name."""
    if not n.startswith("bert."):
        raise ValueError("multi_Qformer.%s: expected a LAVIS name starting with \"bert.\"" % n)
    n = n[len("bert."):]
    if n.startswith("embeddings.LayerNorm."):
        return "layernorm." + n[len("embeddings.LayerNorm."):]
    n = n.replace(".attention.self.", ".attention.attention.")
    return n.replace(".crossattention.self.", ".crossattention.attention.")


def load_state_dict(path, trust_pickle=False):
    """The state dict inside a .pth. Loaded with torch's weights_only unpickler (tensors and
    plain containers only) unless trust_pickle: a checkpoint that also pickles config objects
    needs it, and unpickling runs code from the file."""
    import inspect
    import torch
    kw = {}
    if "weights_only" in inspect.signature(torch.load).parameters:
        kw["weights_only"] = not trust_pickle
    try:
        obj = torch.load(path, map_location="cpu", **kw)
    except Exception as e:  # noqa: BLE001 - re-raised with the way out
        if trust_pickle:
            raise
        raise SystemExit("%s: torch.load(weights_only=True) failed (%s); if you trust the file, "
                         "rerun with --trust-pickle" % (path, e))
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError("%s: not a state dict (got %s)" % (path, type(obj).__name__))
    if obj and all(k.startswith("module.") for k in obj):   # saved from DataParallel / DDP
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def convert(sd, heads=12, eps=1e-12, act="gelu", freq=1, fusion_order=("face", "audio"),
            transformers_names=False):
    """state dict (torch tensors) -> (config dict, {name: torch tensor})."""
    missing = [k for k in OWN if k not in sd]
    if missing:
        raise KeyError("checkpoint lacks %s (is this an AffectGPT checkpoint with "
                       "multi_fusion_type 'qformer'?)" % ", ".join(missing))
    out = {k: sd[k] for k in OWN}
    q = {}
    for k, v in sd.items():
        if not k.startswith(QP):
            continue
        n = k[len(QP):]
        if _DROP.match(n):
            continue
        if transformers_names and n.startswith("bert."):
            n = lavis_to_transformers(n)
        q[n] = v
    if not q:
        raise KeyError("checkpoint has no multi_Qformer.* tensors")
    out.update({QP + k: v for k, v in q.items()})

    M, Da = out["multi_audio_embs.weight"].shape
    M2, Dv = out["multi_video_embs.weight"].shape
    if M != M2 or M != max(Da, Dv):
        raise ValueError("multi_audio_embs.weight %s / multi_video_embs.weight %s: both must map to "
                         "max(audio_dim, video_dim)" % (tuple(out["multi_audio_embs.weight"].shape),
                                                        tuple(out["multi_video_embs.weight"].shape)))
    _, nq, H = out["multi_query_tokens"].shape
    layers = 1 + max(int(m.group(1)) for m in (re.search(r"encoder\.layer\.(\d+)\.", k) for k in q) if m)
    inter = next(v.shape[0] for k, v in q.items() if k.endswith("layer.0.intermediate_query.dense.weight"))
    if H % heads:
        raise ValueError("hidden size %d is not a multiple of --heads %d" % (H, heads))
    cfg = {"model_type": "affectgpt_prefusion", "audio_dim": int(Da), "video_dim": int(Dv),
           "max_hidden_size": int(M), "num_multi_query_token": int(nq),
           "position_embedding_size": int(out["multi_position_embedding.weight"].shape[0]),
           "llm_hidden_size": int(out["multi_llama_proj.weight"].shape[0]),
           "fusion_order": list(fusion_order),
           "qformer_config": {"hidden_size": int(H), "num_attention_heads": heads,
                              "num_hidden_layers": layers, "intermediate_size": int(inter),
                              "cross_attention_frequency": freq, "layer_norm_eps": eps,
                              "hidden_act": act, "encoder_hidden_size": int(M)}}
    return cfg, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt")
    ap.add_argument("out")
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--layer-norm-eps", type=float, default=1e-12)
    ap.add_argument("--hidden-act", default="gelu")
    ap.add_argument("--cross-attention-frequency", type=int, default=1)
    ap.add_argument("--fusion-order", default="face,audio", choices=["face,audio", "audio,face"])
    ap.add_argument("--transformers-names", action="store_true")
    ap.add_argument("--dtype", default="keep", choices=["keep", "F32", "F16", "BF16"])
    ap.add_argument("--trust-pickle", action="store_true",
                    help="load with the full unpickler (runs code from the file)")
    a = ap.parse_args(argv)
    import torch
    sd = load_state_dict(a.ckpt, a.trust_pickle)
    cfg, tensors = convert(sd, a.heads, a.layer_norm_eps, a.hidden_act, a.cross_attention_frequency,
                           a.fusion_order.split(","), a.transformers_names)
    dtype = a.dtype
    if dtype == "keep":
        kinds = {v.dtype for v in tensors.values()}
        dtype = {torch.float16: "F16", torch.bfloat16: "BF16"}.get(kinds.pop(), "F32") if len(kinds) == 1 else "F32"
    arrays = {k: v.detach().to(torch.float32).numpy() for k, v in tensors.items()}
    write_config(a.out, cfg)
    write_safetensors(os.path.join(a.out, "model.safetensors"), arrays, dtype)
    print("%s: affectgpt_prefusion, %d tensors (%s), config %s" % (
        a.out, len(arrays), dtype, json.dumps({k: v for k, v in cfg.items() if k != "qformer_config"})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
