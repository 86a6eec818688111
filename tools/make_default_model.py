#!/usr/bin/python3
"""make_default_model.py - writes models/default/: a small BLIP-2 (OPT language model) with random
weights, in the layout transformers' Blip2ForConditionalGeneration.save_pretrained writes
(config.json, model.safetensors, generation_config.json) plus a byte-level BPE tokenizer.json and a
BlipImageProcessor preprocessor_config.json, so `qfuse run models/default --image ...` has a whole
model to run out of the box.

The weights are random (numpy PCG64, fixed seed): the model runs the real BLIP-2 computation from
pixels to generated tokens, but the words it produces mean nothing.

Invariants:
- Deterministic: the same seed gives byte-identical files (tensors are written in sorted name
  order; JSON with sorted keys).
- The tokenizer is tests/fixtures/tokenizer_bpe/tokenizer.json (600 ids) with a TemplateProcessing
  post-processor that puts <|endoftext|> (id 0) in front, as OPT's tokenizer puts </s>: the
  decoder's vocab_size is the tokenizer's, bos = eos = pad = 0, and the image placeholder is the
  tokenizer's "<image>" (id 1), config image_token_index.
- Initialisation follows transformers' _init_weights for BLIP-2/OPT in kind (normal weights, zero
  biases, LayerNorm 1/0) with a larger std than 0.02 so that the untrained decoder does not
  collapse to repeating one token.

Usage: /usr/bin/python3 tools/make_default_model.py [--out models/default] [--seed 0]
Needs numpy only.
"""
import argparse
import json
import os
import struct

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VISION = dict(hidden_size=96, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
              image_size=224, patch_size=16, layer_norm_eps=1e-6)
QFORMER = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
               cross_attention_frequency=1, max_position_embeddings=512, layer_norm_eps=1e-12)
TEXT = dict(hidden_size=128, ffn_dim=512, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=512)
NUM_QUERY_TOKENS = 32
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def tokenizer_json():
    src = os.path.join(ROOT, "tests", "fixtures", "tokenizer_bpe", "tokenizer.json")
    with open(src, encoding="utf-8") as f:
        tok = json.load(f)
    bos = "<|endoftext|>"
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    assert ids[bos] == 0 and ids["<image>"] == 1, "tokenizer_bpe changed: ids of <|endoftext|>/<image>"
    tok["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [0], "tokens": [bos]}},
    }
    vocab = 1 + max(max(tok["model"]["vocab"].values()), max(ids.values()))
    return tok, vocab


def make_tensors(rng, vocab):
    t = {}
    std = 0.08

    def w(name, *shape, s=std):
        t[name] = rng.normal(0.0, s, size=shape).astype(np.float32)

    def b(name, n):
        t[name] = np.zeros(n, np.float32)

    def ln(name, n):
        t[name + ".weight"] = np.ones(n, np.float32)
        t[name + ".bias"] = np.zeros(n, np.float32)

    def linear(name, out, inp, s=std):
        w(name + ".weight", out, inp, s=s)
        b(name + ".bias", out)

    # vision tower (Blip2VisionModel)
    V = VISION
    H, P = V["hidden_size"], V["patch_size"]
    n_pos = (V["image_size"] // P) ** 2 + 1
    p = "vision_model."
    w(p + "embeddings.class_embedding", 1, 1, H)
    w(p + "embeddings.patch_embedding.weight", H, 3, P, P, s=0.02)
    b(p + "embeddings.patch_embedding.bias", H)
    w(p + "embeddings.position_embedding", 1, n_pos, H)
    for i in range(V["num_hidden_layers"]):
        q = p + "encoder.layers.%d." % i
        ln(q + "layer_norm1", H)
        ln(q + "layer_norm2", H)
        linear(q + "mlp.fc1", V["intermediate_size"], H)
        linear(q + "mlp.fc2", H, V["intermediate_size"])
        linear(q + "self_attn.projection", H, H)
        w(q + "self_attn.qkv.weight", 3 * H, H)
        qkv_bias = rng.normal(0.0, 0.02, size=3 * H).astype(np.float32)
        qkv_bias[H:2 * H] = 0.0  # q_bias, 0, v_bias: the key projection has no bias
        t[q + "self_attn.qkv.bias"] = qkv_bias
    ln(p + "post_layernorm", H)

    # Q-Former (Blip2QFormerModel: no word embeddings, query FFN only)
    Q = QFORMER
    QH = Q["hidden_size"]
    p = "qformer."
    ln(p + "layernorm", QH)
    for i in range(Q["num_hidden_layers"]):
        q = p + "encoder.layer.%d." % i
        for part, kv_in in [("attention", QH)] + ([("crossattention", H)] if i % Q["cross_attention_frequency"] == 0 else []):
            linear(q + part + ".attention.query", QH, QH)
            linear(q + part + ".attention.key", QH, kv_in)
            linear(q + part + ".attention.value", QH, kv_in)
            linear(q + part + ".output.dense", QH, QH)
            ln(q + part + ".output.LayerNorm", QH)
        linear(q + "intermediate_query.dense", Q["intermediate_size"], QH)
        linear(q + "output_query.dense", QH, Q["intermediate_size"])
        ln(q + "output_query.LayerNorm", QH)
    w("query_tokens", 1, NUM_QUERY_TOKENS, QH, s=0.02)

    # language projection and the OPT decoder
    T = TEXT
    D = T["hidden_size"]
    linear("language_projection", D, QH)
    p = "language_model.model.decoder."
    w(p + "embed_tokens.weight", vocab, D, s=0.1)
    w(p + "embed_positions.weight", T["max_position_embeddings"] + 2, D, s=0.02)
    ln(p + "final_layer_norm", D)
    for i in range(T["num_hidden_layers"]):
        q = p + "layers.%d." % i
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            linear(q + "self_attn." + name, D, D)
        ln(q + "self_attn_layer_norm", D)
        linear(q + "fc1", T["ffn_dim"], D)
        linear(q + "fc2", D, T["ffn_dim"])
        ln(q + "final_layer_norm", D)
    return t


def write_safetensors(path, tensors):
    names = sorted(tensors)
    header, off = {}, 0
    for n in names:
        a = np.ascontiguousarray(tensors[n], np.float32)
        header[n] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [off, off + a.nbytes]}
        off += a.nbytes
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for n in names:
            f.write(np.ascontiguousarray(tensors[n], np.float32).tobytes())


def configs(vocab):
    V, Q, T = VISION, QFORMER, TEXT
    config = {
        "architectures": ["Blip2ForConditionalGeneration"],
        "model_type": "blip-2",
        "dtype": "float32",
        "num_query_tokens": NUM_QUERY_TOKENS,
        "image_token_index": 1,
        "image_text_hidden_size": 256,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "use_decoder_only_language_model": True,
        "vision_config": dict(V, model_type="blip_2_vision_model", hidden_act="gelu", qkv_bias=True,
                              attention_dropout=0.0, initializer_range=1e-10),
        "qformer_config": dict(Q, model_type="blip_2_qformer", hidden_act="gelu", encoder_hidden_size=V["hidden_size"],
                               vocab_size=30522, pad_token_id=0, attention_probs_dropout_prob=0.1,
                               hidden_dropout_prob=0.1, initializer_range=0.02, use_qformer_text_input=False),
        "text_config": dict(T, model_type="opt", vocab_size=vocab, word_embed_proj_dim=T["hidden_size"],
                            activation_function="relu", do_layer_norm_before=True, enable_bias=True,
                            layer_norm_elementwise_affine=True, _remove_final_layer_norm=False,
                            bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=True,
                            dropout=0.0, attention_dropout=0.0, layerdrop=0.0, init_std=0.02, use_cache=True),
    }
    generation = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, "max_new_tokens": 32}
    preprocessor = {
        "image_processor_type": "BlipImageProcessor", "processor_class": "Blip2Processor",
        "do_convert_rgb": True, "do_resize": True, "size": {"height": V["image_size"], "width": V["image_size"]},
        "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
    }
    return config, generation, preprocessor


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "models", "default"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    tok, vocab = tokenizer_json()
    rng = np.random.Generator(np.random.PCG64(args.seed))
    tensors = make_tensors(rng, vocab)
    config, generation, preprocessor = configs(vocab)
    write_safetensors(os.path.join(args.out, "model.safetensors"), tensors)
    for name, obj in (("config.json", config), ("generation_config.json", generation),
                      ("preprocessor_config.json", preprocessor), ("tokenizer.json", tok)):
        with open(os.path.join(args.out, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, sort_keys=True, ensure_ascii=False)
            f.write("\n")
    n = sum(a.size for a in tensors.values())
    print("wrote %s: %d tensors, %d parameters (%.1f MB float32), vocab %d"
          % (args.out, len(tensors), n, n * 4 / 1e6, vocab))


if __name__ == "__main__":
    main()
