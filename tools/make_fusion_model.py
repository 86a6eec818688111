#!/usr/bin/env python3
"""make_fusion_model.py - writes a random-weight model folder (config.json + model.safetensors) of
either qfuse fusion kind, for benchmarks and smoke tests. numpy only (no torch).

    make_fusion_model.py affectgpt OUT [--bench] [--audio-dim 1024 --video-dim 1024 --queries 16
                                       --llm 4096 --layers 2 --hidden 768 --heads 12 --inter 3072]
                                       [--lavis] [--fusion-order face,audio] [--dtype F32|F16|BF16]
    make_fusion_model.py kvprefix OUT  [--queries 32 --prefix 4 --feature-dim 512 --encoder 1408
                                       --layers 12 --hidden 768 --heads 12 --inter 3072 --llm 0]

--bench (affectgpt) is the benchmark size: audio/video 1024 -> 1024, 16 queries, 2 layers of
768 hidden / 12 heads / 3072 FFN, 4096 out (feed it 8 audio + 32 face frames). --lavis writes the
Q-Former under LAVIS's BertModel names (AffectGPT's own checkpoints), else transformers' names.
Weights are N(0, 0.02) (LayerNorm weights 1, biases 0.01 N(0,1)), seeded by --seed.

The safetensors writer here (write_safetensors) is also used by convert_affectgpt.py.
"""
import argparse
import json
import os
import struct
import sys

import numpy as np

_DT = {"F32": np.float32, "F16": np.float16}


def write_safetensors(path, tensors, dtype="F32"):
    """{name: float array} -> path (dtype F32, F16 or BF16 for every tensor), via path.tmp."""
    header, blobs, off = {}, [], 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(np.asarray(tensors[name], np.float32))
        if dtype == "BF16":
            u = a.view(np.uint32)
            raw = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2").tobytes()
        else:
            raw = a.astype(np.dtype(_DT[dtype]).newbyteorder("<")).tobytes()
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)


def write_config(folder, cfg):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")


def to_lavis(name, prefix):
    """transformers Q-Former name under prefix -> LAVIS BertModel name."""
    if not name.startswith(prefix):
        return name
    n = name[len(prefix):]
    if n.startswith("layernorm."):
        n = "embeddings.LayerNorm." + n[len("layernorm."):]
    n = n.replace(".attention.attention.", ".attention.self.")
    n = n.replace(".crossattention.attention.", ".crossattention.self.")
    return prefix + "bert." + n


def qformer_shapes(H, E, I, layers, freq):
    s = {"layernorm.weight": (H,), "layernorm.bias": (H,)}
    for i in range(layers):
        p = "encoder.layer.%d." % i
        blocks = [("attention", H)] + ([("crossattention", E)] if i % freq == 0 else [])
        for blk, kin in blocks:
            for w, din in (("query", H), ("key", kin), ("value", kin)):
                s[p + blk + ".attention." + w + ".weight"] = (H, din)
                s[p + blk + ".attention." + w + ".bias"] = (H,)
            s[p + blk + ".output.dense.weight"] = (H, H)
            s[p + blk + ".output.dense.bias"] = (H,)
            s[p + blk + ".output.LayerNorm.weight"] = (H,)
            s[p + blk + ".output.LayerNorm.bias"] = (H,)
        s[p + "intermediate_query.dense.weight"] = (I, H)
        s[p + "intermediate_query.dense.bias"] = (I,)
        s[p + "output_query.dense.weight"] = (H, I)
        s[p + "output_query.dense.bias"] = (H,)
        s[p + "output_query.LayerNorm.weight"] = (H,)
        s[p + "output_query.LayerNorm.bias"] = (H,)
    return s


def _random(rng, shapes):
    out = {}
    for name, shape in shapes.items():
        if name.endswith("LayerNorm.weight") or name.endswith("layernorm.weight"):
            out[name] = np.ones(shape, np.float32)
        elif name.endswith("bias"):
            out[name] = (0.01 * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[name] = (0.02 * rng.standard_normal(shape)).astype(np.float32)
    return out


def qformer_config(a):
    return {"hidden_size": a.hidden, "num_attention_heads": a.heads, "num_hidden_layers": a.layers,
            "intermediate_size": a.inter, "cross_attention_frequency": a.freq,
            "layer_norm_eps": 1e-12, "hidden_act": "gelu"}


def make_affectgpt(a, rng):
    M = max(a.audio_dim, a.video_dim)
    shapes = {"multi_audio_embs.weight": (M, a.audio_dim), "multi_audio_embs.bias": (M,),
              "multi_video_embs.weight": (M, a.video_dim), "multi_video_embs.bias": (M,),
              "multi_position_embedding.weight": (a.pos_size, M),
              "multi_query_tokens": (1, a.queries, a.hidden),
              "multi_llama_proj.weight": (a.llm, a.hidden), "multi_llama_proj.bias": (a.llm,)}
    for k, v in qformer_shapes(a.hidden, M, a.inter, a.layers, a.freq).items():
        shapes["multi_Qformer." + k] = v
    t = _random(rng, shapes)
    if a.lavis:
        t = {to_lavis(k, "multi_Qformer."): v for k, v in t.items()}
    cfg = {"model_type": "affectgpt_prefusion", "audio_dim": a.audio_dim, "video_dim": a.video_dim,
           "max_hidden_size": M, "num_multi_query_token": a.queries,
           "position_embedding_size": a.pos_size, "llm_hidden_size": a.llm,
           "fusion_order": a.fusion_order.split(","), "qformer_config": qformer_config(a)}
    return cfg, t


def make_kvprefix(a, rng):
    H = a.hidden
    shapes = {"query_tokens": (1, a.queries, H),
              "kv_prefix.feature_proj.0.weight": (a.feature_dim, a.feature_dim),
              "kv_prefix.feature_proj.0.bias": (a.feature_dim,),
              "kv_prefix.feature_proj.2.weight": (H, a.feature_dim),
              "kv_prefix.feature_proj.2.bias": (H,),
              "kv_prefix.prefix_tokens": (1, a.prefix, H),
              "kv_prefix.k_proj.weight": (H, H), "kv_prefix.k_proj.bias": (H,),
              "kv_prefix.v_proj.weight": (H, H), "kv_prefix.v_proj.bias": (H,)}
    if a.llm:
        shapes["language_projection.weight"] = (a.llm, H)
        shapes["language_projection.bias"] = (a.llm,)
    for k, v in qformer_shapes(H, a.encoder, a.inter, a.layers, a.freq).items():
        shapes["qformer." + k] = v
    q = qformer_config(a)
    q.update({"model_type": "blip_2_qformer", "encoder_hidden_size": a.encoder,
              "position_embedding_type": "absolute"})
    cfg = {"model_type": "blip2_kv_prefix", "qformer_config": q, "num_query_tokens": a.queries,
           "num_prefix_tokens": a.prefix, "prefix_feature_dim": a.feature_dim}
    return cfg, _random(rng, shapes)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=["affectgpt", "kvprefix"])
    ap.add_argument("out")
    ap.add_argument("--bench", action="store_true", help="AffectGPT benchmark size (the defaults)")
    ap.add_argument("--audio-dim", type=int, default=1024)
    ap.add_argument("--video-dim", type=int, default=1024)
    ap.add_argument("--queries", type=int, default=None)
    ap.add_argument("--llm", type=int, default=None, help="LLM width (kvprefix: 0 = no projection)")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--inter", type=int, default=3072)
    ap.add_argument("--freq", type=int, default=None, help="cross_attention_frequency")
    ap.add_argument("--pos-size", type=int, default=264)
    ap.add_argument("--fusion-order", default="face,audio")
    ap.add_argument("--lavis", action="store_true")
    ap.add_argument("--prefix", type=int, default=4)
    ap.add_argument("--feature-dim", type=int, default=512)
    ap.add_argument("--encoder", type=int, default=1408)
    ap.add_argument("--dtype", default="F32", choices=["F32", "F16", "BF16"])
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    aff = a.kind == "affectgpt"
    if a.queries is None:
        a.queries = 16 if aff else 32
    if a.llm is None:
        a.llm = 4096 if aff else 0
    if a.layers is None:
        a.layers = 2 if aff else 12
    if a.freq is None:
        a.freq = 1 if aff else 2
    if a.fusion_order not in ("face,audio", "audio,face"):
        ap.error("--fusion-order must be face,audio or audio,face")
    rng = np.random.default_rng(a.seed)
    cfg, tensors = (make_affectgpt if aff else make_kvprefix)(a, rng)
    write_config(a.out, cfg)
    write_safetensors(os.path.join(a.out, "model.safetensors"), tensors, a.dtype)
    n = sum(int(np.prod(v.shape)) for v in tensors.values())
    print("%s: %s, %d tensors, %.1f M parameters" % (a.out, cfg["model_type"], len(tensors), n / 1e6))
    return 0


if __name__ == "__main__":
    sys.exit(main())
