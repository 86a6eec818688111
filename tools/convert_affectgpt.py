#!/usr/bin/env python3
"""convert_affectgpt.py - AffectGPT checkpoint (.pth, torch) -> a qfuse model folder (config.json +
model.safetensors) holding one fusion part of it, picked by --kind:

  prefusion  "affectgpt_prefusion" (encode_multi_qformer, the default): multi_audio_embs.*,
             multi_video_embs.*, multi_position_embedding.weight, multi_query_tokens,
             multi_llama_proj.*, multi_Qformer.*
  video      "affectgpt_video_qformer" (encode_video_qformer): video_frame_position_embedding.weight,
             video_query_tokens, video_Qformer.*, affectgpt_proj.* (Video-LLaMA's video_llama_proj.*
             when affectgpt_proj is absent)
  audio      "affectgpt_audio_qformer" (encode_audio_qformer): audio_position_embedding.weight,
             audio_query_tokens, audio_Qformer.*, audio_llama_proj.*
  attention  "affectgpt_attention_fusion" (encode_multi_attention): multi_video_embs.*,
             multi_audio_embs.*, attention_mlp.*, fc_att.*, multi_llama_proj.* (no Q-Former)

    convert_affectgpt.py CKPT.pth OUT [--kind prefusion|video|audio|attention] [--heads 12]
                         [--layer-norm-eps 1e-12] [--hidden-act gelu] [--cross-attention-frequency 1]
                         [--fusion-order face,audio] [--num-multi-query-token N]
                         [--transformers-names] [--dtype keep|F32|F16|BF16] [--trust-pickle]

CKPT is a state dict, or a dict holding one under "model" / "state_dict" (AffectGPT saves
{"model": ...}); a "module." prefix on every key (DataParallel) is stripped. It is read with
torch's weights_only unpickler unless --trust-pickle. Only the chosen part's tensors are kept;
a Q-Former (multi_/video_/audio_Qformer.*) is kept in LAVIS BertModel names as saved, or in
transformers' Blip2QFormerModel names with --transformers-names. Dropped from a Q-Former:
bert.embeddings.position_ids (a buffer) and anything AffectGPT set to None but an older
checkpoint may still hold (cls.*, word/position embeddings, the text FFN "intermediate."/"output."
of each layer): the fusion paths never read them.

Config values come from the tensors where they are determined (feature widths, query counts,
position table sizes, llm_hidden_size, the Q-Former's hidden_size, num_hidden_layers,
intermediate_size); the rest from the flags, whose defaults are AffectGPT's (bert-base-uncased:
12 heads, eps 1e-12, "gelu"; cross-attention every layer; face then audio). qformer_config also
gets encoder_hidden_size = the width the Q-Former reads (LAVIS's encoder_width: max_hidden_size
for the pre-fusion, input_dim for the video/audio Q-Formers). The attention fusion's
num_multi_query_token (how many times its one token is repeated) is not in its tensors:
--num-multi-query-token gives it (else a multi_query_tokens tensor in the checkpoint, else error).
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


def lavis_to_transformers(n, prefix=QP):
    """LAVIS BertModel name (without the Q-Former's prefix) -> transformers name."""
    if not n.startswith("bert."):
        raise ValueError("%s%s: expected a LAVIS name starting with \"bert.\"" % (prefix, n))
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


def _qformer_tensors(sd, qp, transformers_names):
    """The Q-Former's tensors under prefix qp, leftovers dropped, optionally renamed."""
    q = {}
    for k, v in sd.items():
        if not k.startswith(qp):
            continue
        n = k[len(qp):]
        if _DROP.match(n):
            continue
        if transformers_names and n.startswith("bert."):
            n = lavis_to_transformers(n, qp)
        q[n] = v
    if not q:
        raise KeyError("checkpoint has no %s* tensors" % qp)
    return q


def _qformer_config(q, H, heads, eps, act, freq, enc_width):
    layers = 1 + max(int(m.group(1)) for m in (re.search(r"encoder\.layer\.(\d+)\.", k) for k in q) if m)
    inter = [v.shape[0] for k, v in q.items() if k.endswith("layer.0.intermediate_query.dense.weight")]
    if not inter:
        raise KeyError("Q-Former has no encoder.layer.0.intermediate_query.dense.weight")
    if H % heads:
        raise ValueError("hidden size %d is not a multiple of --heads %d" % (H, heads))
    return {"hidden_size": int(H), "num_attention_heads": heads, "num_hidden_layers": layers,
            "intermediate_size": int(inter[0]), "cross_attention_frequency": freq, "layer_norm_eps": eps,
            "hidden_act": act, "encoder_hidden_size": int(enc_width)}


def _require(sd, names, what):
    missing = [k for k in names if k not in sd]
    if missing:
        raise KeyError("checkpoint lacks %s (is this an AffectGPT checkpoint with %s?)" % (", ".join(missing), what))


# per-modality Q-Formers: (model_type, position table, query tokens, Q-Former prefix, projections)
MODALITY = {
    "video": ("affectgpt_video_qformer", "video_frame_position_embedding.weight", "video_query_tokens",
              "video_Qformer.", ("affectgpt_proj", "video_llama_proj")),
    "audio": ("affectgpt_audio_qformer", "audio_position_embedding.weight", "audio_query_tokens",
              "audio_Qformer.", ("audio_llama_proj",)),
}
ATTENTION = ("multi_video_embs", "multi_audio_embs", "attention_mlp", "fc_att", "multi_llama_proj")


def convert_modality(sd, kind, heads=12, eps=1e-12, act="gelu", freq=1, transformers_names=False):
    model_type, pos, qtok, qp, projs = MODALITY[kind]
    proj = next((p for p in projs if p + ".weight" in sd), projs[0])
    own = (pos, qtok, proj + ".weight", proj + ".bias")
    _require(sd, own, "the %s Q-Former branch" % kind)
    out = {k: sd[k] for k in own}
    q = _qformer_tensors(sd, qp, transformers_names)
    out.update({qp + k: v for k, v in q.items()})
    P, D = out[pos].shape
    _, nq, H = out[qtok].shape
    L, H2 = out[proj + ".weight"].shape
    if H2 != H:
        raise ValueError("%s.weight %s does not read the Q-Former width %d of %s %s" % (
            proj, tuple(out[proj + ".weight"].shape), H, qtok, tuple(out[qtok].shape)))
    cfg = {"model_type": model_type, "input_dim": int(D), "num_query_token": int(nq),
           "frame_position_size": int(P), "llm_hidden_size": int(L),
           "qformer_config": _qformer_config(q, H, heads, eps, act, freq, D)}
    return cfg, out


def convert_attention(sd, num_multi_query_token=None):
    own = [m + s for m in ATTENTION for s in (".weight", ".bias")]
    _require(sd, own, "multi_fusion_type 'attention'")
    out = {k: sd[k] for k in own}
    nq = num_multi_query_token
    if nq is None and "multi_query_tokens" in sd:
        nq = int(sd["multi_query_tokens"].shape[1])
    if nq is None:
        raise ValueError("--kind attention needs --num-multi-query-token N (AffectGPT's "
                         "num_multi_query_token: its tensors do not determine it)")
    M, Dv = out["multi_video_embs.weight"].shape
    M2, Da = out["multi_audio_embs.weight"].shape
    if M != M2 or M != max(Da, Dv):
        raise ValueError("multi_audio_embs.weight %s / multi_video_embs.weight %s: both must map to "
                         "max(audio_dim, video_dim)" % (tuple(out["multi_audio_embs.weight"].shape),
                                                        tuple(out["multi_video_embs.weight"].shape)))
    cfg = {"model_type": "affectgpt_attention_fusion", "audio_dim": int(Da), "video_dim": int(Dv),
           "max_hidden_size": int(M), "num_multi_query_token": int(nq),
           "llm_hidden_size": int(out["multi_llama_proj.weight"].shape[0])}
    return cfg, out


def convert(sd, heads=12, eps=1e-12, act="gelu", freq=1, fusion_order=("face", "audio"),
            transformers_names=False, kind="prefusion", num_multi_query_token=None):
    """state dict (torch tensors) -> (config dict, {name: torch tensor}) for one --kind."""
    if kind in MODALITY:
        return convert_modality(sd, kind, heads, eps, act, freq, transformers_names)
    if kind == "attention":
        return convert_attention(sd, num_multi_query_token)
    if kind != "prefusion":
        raise ValueError("kind %r is not prefusion, video, audio or attention" % kind)
    _require(sd, OWN, "multi_fusion_type 'qformer'")
    out = {k: sd[k] for k in OWN}
    q = _qformer_tensors(sd, QP, transformers_names)
    out.update({QP + k: v for k, v in q.items()})

    M, Da = out["multi_audio_embs.weight"].shape
    M2, Dv = out["multi_video_embs.weight"].shape
    if M != M2 or M != max(Da, Dv):
        raise ValueError("multi_audio_embs.weight %s / multi_video_embs.weight %s: both must map to "
                         "max(audio_dim, video_dim)" % (tuple(out["multi_audio_embs.weight"].shape),
                                                        tuple(out["multi_video_embs.weight"].shape)))
    _, nq, H = out["multi_query_tokens"].shape
    cfg = {"model_type": "affectgpt_prefusion", "audio_dim": int(Da), "video_dim": int(Dv),
           "max_hidden_size": int(M), "num_multi_query_token": int(nq),
           "position_embedding_size": int(out["multi_position_embedding.weight"].shape[0]),
           "llm_hidden_size": int(out["multi_llama_proj.weight"].shape[0]),
           "fusion_order": list(fusion_order),
           "qformer_config": _qformer_config(q, H, heads, eps, act, freq, M)}
    return cfg, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt")
    ap.add_argument("out")
    ap.add_argument("--kind", default="prefusion", choices=["prefusion", "video", "audio", "attention"],
                    help="which fusion part to extract (default: prefusion)")
    ap.add_argument("--num-multi-query-token", type=int, default=None,
                    help="--kind attention: how many (equal) tokens the fusion emits")
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
    if a.num_multi_query_token is not None and a.num_multi_query_token < 1:
        ap.error("--num-multi-query-token must be >= 1")
    try:
        cfg, tensors = convert(sd, a.heads, a.layer_norm_eps, a.hidden_act, a.cross_attention_frequency,
                               a.fusion_order.split(","), a.transformers_names, a.kind, a.num_multi_query_token)
    except (KeyError, ValueError) as e:
        raise SystemExit("%s: --kind %s: %s" % (a.ckpt, a.kind, e.args[0] if e.args else e))
    dtype = a.dtype
    if dtype == "keep":
        kinds = {v.dtype for v in tensors.values()}
        dtype = {torch.float16: "F16", torch.bfloat16: "BF16"}.get(kinds.pop(), "F32") if len(kinds) == 1 else "F32"
    arrays = {k: v.detach().to(torch.float32).numpy() for k, v in tensors.items()}
    write_config(a.out, cfg)
    write_safetensors(os.path.join(a.out, "model.safetensors"), arrays, dtype)
    print("%s: %s, %d tensors (%s), config %s" % (
        a.out, cfg["model_type"], len(arrays), dtype, json.dumps({k: v for k, v in cfg.items() if k != "qformer_config"})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
