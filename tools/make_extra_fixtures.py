"""make_extra_fixtures.py - adds intermediate references to the InstructBLIP fixture, so the
Q-Former with instruction text can be checked on its own before the LLM runs on top of it.

    python3 tools/make_extra_fixtures.py [FIXTURE_DIR] [OUT_FILE]
        FIXTURE_DIR  default tests/fixtures/instructblip_llama_0 (model files + io.safetensors)
        OUT_FILE     default FIXTURE_DIR/extra.safetensors

Runs where transformers (5.x) and PyTorch are installed (the device machine); nothing is trained
or randomised here: the model is the fixture's own (from_pretrained of its folder, eval mode) and
the inputs are the fixture's pixel_values, qformer_input_ids and qformer_attention_mask. What it
computes mirrors InstructBlipForConditionalGeneration's image path (vision tower -> Q-Former with
the queries and the instruction tokens side by side -> language_projection of the query rows):
  qformer_last_hidden_state      [B, nq + Lt, qformer hidden]  float32 model, float32
  language_projection            [B, nq, llm hidden]           float32
  qformer_last_hidden_state_f64  the same in a float64 copy of the model (stored as float64)
  language_projection_f64        likewise
  vision_last_hidden_state_f64   the vision tower's output in float64
Invariants: the Q-Former's attention mask is cat(ones for the nq queries, qformer_attention_mask);
the cross-attention mask is all ones over the image tokens; dropout is off (eval). The script
prints the transformers source of the image path it mirrors and, as checks, the differences to
the fixture's stored vision_last_hidden_state and to the model's own get_image_features where
that exists; it exits 1 if a check fails.
"""
import inspect
import os
import sys

import torch
from safetensors.torch import load_file, save_file


def load_model(folder, dtype):
    from transformers import InstructBlipForConditionalGeneration
    try:
        model = InstructBlipForConditionalGeneration.from_pretrained(folder, dtype=dtype)
    except TypeError:  # transformers 4.x spells it torch_dtype
        model = InstructBlipForConditionalGeneration.from_pretrained(folder, torch_dtype=dtype)
    return model.to(dtype).eval()


def image_path(model, pixel_values, qformer_input_ids, qformer_attention_mask):
    """(vision last hidden state, Q-Former last hidden state, language_projection of the query rows)."""
    image_embeds = model.vision_model(pixel_values=pixel_values).last_hidden_state
    image_attention_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long)
    query_tokens = model.query_tokens.expand(image_embeds.shape[0], -1, -1)
    query_attention_mask = torch.ones(query_tokens.shape[:-1], dtype=torch.long)
    attention_mask = torch.cat([query_attention_mask, qformer_attention_mask], dim=1)
    qout = model.qformer(input_ids=qformer_input_ids, attention_mask=attention_mask, query_embeds=query_tokens,
                         encoder_hidden_states=image_embeds, encoder_attention_mask=image_attention_mask)
    hidden = qout.last_hidden_state if hasattr(qout, "last_hidden_state") else qout[0]
    projected = model.language_projection(hidden[:, : query_tokens.shape[1], :])
    return image_embeds, hidden, projected


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def main():
    folder = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/instructblip_llama_0"
    out_file = sys.argv[2] if len(sys.argv) > 2 else os.path.join(folder, "extra.safetensors")
    import transformers
    print("transformers", transformers.__version__, "torch", torch.__version__)
    from transformers.models.instructblip import modeling_instructblip as mi
    cls = mi.InstructBlipForConditionalGeneration
    for name in ("get_image_features", "forward"):
        fn = getattr(cls, name, None)
        if fn is not None:
            src = inspect.getsource(fn)
            start = src.find("vision_model(")
            print("---- %s (image path, from transformers' source)" % name)
            print(src[max(0, start - 200): start + 2200] if start >= 0 else src[:1500])

    io = load_file(os.path.join(folder, "io.safetensors"))
    px = io["pixel_values"].float()
    ids = io["qformer_input_ids"].long()
    mask = io["qformer_attention_mask"].long()
    ok = True
    result = {}
    with torch.no_grad():
        m32 = load_model(folder, torch.float32)
        vis, hid, proj = image_path(m32, px, ids, mask)
        d = rel(vis, io["vision_last_hidden_state"])
        print("float32: vision vs fixture's vision_last_hidden_state: max rel diff %.3g" % d)
        ok &= d < 1e-5
        if hasattr(m32, "get_image_features"):
            try:
                feats = m32.get_image_features(pixel_values=px, qformer_input_ids=ids, qformer_attention_mask=mask)
                if not torch.is_tensor(feats):
                    feats = feats[0] if isinstance(feats, (tuple, list)) else getattr(feats, "pooler_output", feats)
                if torch.is_tensor(feats) and feats.shape == proj.shape:
                    d = rel(proj, feats)
                    print("float32: language_projection vs model.get_image_features: max rel diff %.3g" % d)
                    ok &= d < 1e-6
                else:
                    print("get_image_features returned %s; not compared" % type(feats).__name__)
            except Exception as e:  # noqa: BLE001 - a cross-check only
                print("get_image_features not compared: %s: %s" % (type(e).__name__, e))
        result["qformer_last_hidden_state"] = hid.float().contiguous()
        result["language_projection"] = proj.float().contiguous()
        print("qformer_last_hidden_state", tuple(hid.shape), "language_projection", tuple(proj.shape))
        try:
            m64 = load_model(folder, torch.float64)
            vis64, hid64, proj64 = image_path(m64, px.double(), ids, mask)
            d = rel(hid, hid64)
            print("float32 vs float64 Q-Former output: max rel diff %.3g" % d)
            ok &= d < 1e-4
            result["qformer_last_hidden_state_f64"] = hid64.contiguous()
            result["language_projection_f64"] = proj64.contiguous()
            result["vision_last_hidden_state_f64"] = vis64.contiguous()
        except Exception as e:  # noqa: BLE001 - float64 is optional
            print("float64 variant not made: %s: %s" % (type(e).__name__, e))
    save_file(result, out_file, metadata={
        "made_by": "tools/make_extra_fixtures.py", "transformers": transformers.__version__,
        "torch": torch.__version__,
        "qformer_attention_mask": "cat(ones(B, nq), qformer_attention_mask); encoder mask all ones"})
    print("wrote", out_file, sorted(result))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
