"""qfuse.load(folder): one object for every model of the Q-Former family, with the API of the
issue tracker's contract (the names mirror transformers where it has them):

    m = qfuse.load(folder)   # Blip2QFormerModel / InstructBlipQFormerModel, affectgpt_prefusion,
                             # blip2_kv_prefix, affectgpt_{video,audio}_qformer, affectgpt_attention_fusion,
                             # and BLIP-2 / InstructBLIP folders without a language model
    # A Blip2ForConditionalGeneration / InstructBlipForConditionalGeneration folder with its
    # language model loads as qfuse.VisionLM (logits, generate; see vlm.py); its fusion part
    # alone (vision tower -> Q-Former -> projection, with backward and maps) is
    # qfuse.load(folder, part="fusion").
    # A decoder LLM (llama, qwen2, opt) loads as qfuse.CausalLM.
    h = m.qformer(query_embeds=None, encoder_hidden_states=..., encoder_attention_mask=None,
                  qformer_input_ids=None, qformer_attention_mask=None, global_feature=None)
    grads = m.qformer_backward(grad_out, **same_inputs)
    v = m.vision(pixel_values)
    t = m.fuse(pixel_values=None, encoder_hidden_states=None, audio=None, face=None,
               audio_mask=None, face_mask=None, global_feature=None)
    maps = m.cross_attention_maps()   # per cross-attention layer [B, heads, nq, keys]

The per-family classes (qfuse.QFormer, qfuse.Blip2, qfuse.Prefusion, qfuse.KVPrefix) do the work;
this module only picks one by config.json and routes the calls. Invariants:
- The model kind comes from config.json's model_type (architectures[0] when model_type is absent);
  an unknown one is a QfuseError naming the folder and the value.
- qformer_backward runs the Q-Former forward again on the same inputs, then its backward; the
  dict holds every trainable Q-Former parameter by the checkpoint's own name (with its prefix,
  e.g. "qformer." or "multi_Qformer."), "query_embeds" and "encoder_hidden_states"; when the
  model's query tokens were used (query_embeds None) also their gradient under the checkpoint's
  name ("query_tokens" / "multi_query_tokens"), summed over the batch; with a global feature
  (KV-prefix) the prefix parameters and "global_feature" too.
- A method the loaded kind has no part for (vision() on a pre-fusion) raises QfuseError saying so.
"""
import json
import os

import numpy as np

from ._native import QfuseError
from .blip2 import Blip2
from .fusion import KVPrefix, Prefusion
from .modality import AttentionFusion, ModalityQFormer
from .heatmap import save_heatmap
from .llm import CausalLM
from .qformer import QFormer

_KINDS = {
    "blip_2_qformer": "qformer", "instructblip_qformer": "qformer",
    "Blip2QFormerModel": "qformer", "InstructBlipQFormerModel": "qformer",
    "blip-2": "blip2", "instructblip": "blip2",
    "Blip2ForConditionalGeneration": "blip2", "InstructBlipForConditionalGeneration": "blip2",
    "affectgpt_prefusion": "prefusion", "blip2_kv_prefix": "kv_prefix",
    "affectgpt_video_qformer": "video_qformer", "affectgpt_audio_qformer": "audio_qformer",
    "affectgpt_attention_fusion": "attention_fusion",
    "llama": "llm", "qwen2": "llm", "opt": "llm",
    "LlamaForCausalLM": "llm", "Qwen2ForCausalLM": "llm", "OPTForCausalLM": "llm",
}


def model_kind(folder):
    """The family member a folder holds: "qformer", "blip2", "prefusion", "kv_prefix",
    "video_qformer", "audio_qformer" or "attention_fusion"."""
    path = os.path.join(os.fspath(folder), "config.json")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except OSError as e:
        raise QfuseError("load: cannot read %s: %s" % (path, e.strerror or e), "QF_ERR_IO") from None
    except ValueError as e:
        raise QfuseError("load: %s is not valid JSON: %s" % (path, e), "QF_ERR_FORMAT") from None
    if not isinstance(cfg, dict):
        raise QfuseError("load: %s: the top level is not a JSON object" % path, "QF_ERR_FORMAT")
    mt = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    for key in [mt] + (archs if isinstance(archs, list) else []):
        if isinstance(key, str) and key in _KINDS:
            return _KINDS[key]
    raise QfuseError("load: %s: model_type %r (architectures %r) is not a model qfuse loads; "
                     "expected one of %s" % (path, mt, archs, ", ".join(sorted(k for k in _KINDS if k[0].islower()))),
                     "QF_ERR_UNSUPPORTED")


def _has_language_model(folder):
    """Whether the folder's weights (one file or a sharded index) hold language_model.* tensors."""
    folder = os.fspath(folder)
    try:
        idx = os.path.join(folder, "model.safetensors.index.json")
        if os.path.exists(idx):
            with open(idx) as f:
                names = json.load(f).get("weight_map", {})
        else:
            with open(os.path.join(folder, "model.safetensors"), "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                names = json.loads(f.read(min(n, 100 << 20)))
    except (OSError, ValueError, AttributeError):
        return False            # the C loader reports what is wrong with the files
    return any(k.startswith("language_model.") for k in names)


def load(folder, weights="f32", block=0, part=None, device="cpu", dtype="float32"):
    """Loads a Hugging Face (or qfuse-layout) folder:
    - a decoder LLM (llama, qwen2, opt) as a qfuse.CausalLM;
    - a BLIP-2 / InstructBLIP folder whose weights hold the language model as a qfuse.VisionLM
      (image + prompt -> logits / generated ids), unless part="fusion";
    - every Q-Former family member (and BLIP-2 with part="fusion") as a FusionModel.
    weights ("f32", "bf16", "int8", "q4"; block: the scale block) is the storage of the
    language model's linear layers.
    device="cuda" runs a fusion model on the GPU (dtype "float32" or "bfloat16" for its weights):
    the whole forward of every Q-Former family member (BLIP-2 / InstructBLIP with its vision
    tower), and backward with float32 weights; language models run on the CPU only."""
    kind = model_kind(folder)
    if part not in (None, "fusion"):
        raise QfuseError("load: part = %r; expected None or \"fusion\"" % (part,))
    if device != "cpu" and (kind == "llm" or (kind == "blip2" and part is None and _has_language_model(folder))):
        raise QfuseError("load: device = %r: language models run on the CPU only (the GPU runs the Q-Former "
                         "family: load with part=\"fusion\")" % (device,), "QF_ERR_UNSUPPORTED")
    if kind == "llm":
        return CausalLM.load(folder, weights=weights, block=block)
    if kind == "blip2" and part is None and _has_language_model(folder):
        from .vlm import VisionLM
        return VisionLM.load(folder, weights=weights, block=block)
    if weights != "f32":
        raise QfuseError("load: weights = %r applies to language models; %s loads as a fusion model"
                         % (weights, folder))
    return FusionModel(folder, device=device, dtype=dtype)


class _QFormerView(QFormer):
    """A QFormer over a Q-Former handle owned by a bigger model (never freed here)."""

    def __init__(self, handle, owner):
        super().__init__(handle)
        self._owner = owner          # keeps the owning model (and so the handle) alive

    def close(self):
        self._h = None


class FusionModel:
    """See the module docstring. .kind is "qformer", "blip2", "prefusion" or "kv_prefix";
    .impl is the per-family object (for everything beyond this common API)."""

    def __init__(self, folder, device="cpu", dtype="float32"):
        folder = os.fspath(folder)
        self.kind = model_kind(folder)
        self.folder = folder
        if self.kind == "qformer":
            self.impl = QFormer.load(folder)
            self._qf, self._qprefix, self._query_name = self.impl, "", None
        elif self.kind == "blip2":
            self.impl = Blip2.load(folder)
            self._qf = _QFormerView(self.impl._qh, self.impl)
            self._qprefix, self._query_name = "qformer.", "query_tokens"
        elif self.kind == "prefusion":
            self.impl = Prefusion.load(folder)
            self._qf = _QFormerView(self.impl._qh, self.impl)
            self._qprefix, self._query_name = "multi_Qformer.", "multi_query_tokens"
        elif self.kind in ("video_qformer", "audio_qformer"):
            self.impl = ModalityQFormer.load(folder)
            self._qf = _QFormerView(self.impl._qh, self.impl)
            mod = self.impl.modality
            self._qprefix, self._query_name = mod + "_Qformer.", mod + "_query_tokens"
        elif self.kind == "attention_fusion":
            self.impl = AttentionFusion.load(folder)     # no Q-Former: mean-pooled MLP weights
            self._qf, self._qprefix, self._query_name = None, "", None
        else:
            self.impl = KVPrefix.load(folder)
            self._qf = _QFormerView(self.impl._qh, self.impl)
            self._qprefix, self._query_name = "qformer.", "query_tokens"
        self._maps_from = self._qf
        if device != "cpu" or dtype != "float32":
            try:
                if self.kind == "qformer":
                    self._qf.to(device, dtype)
                else:
                    self.impl.to(device, dtype)      # the whole model's forward, not only its Q-Former
            except Exception:
                self.impl.close()
                raise
        self.device, self.dtype = device, dtype

    def close(self):
        self.impl.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _no(self, what):
        raise QfuseError("%s: a %s model (%s) has no %s" % (what, self.kind, self.folder, what),
                         "QF_ERR_UNSUPPORTED")

    def _queries(self, query_embeds, B, fn):
        if query_embeds is not None:
            return query_embeds, False
        if self._query_name is None:
            raise QfuseError("%s: a bare Q-Former checkpoint has no query tokens: pass query_embeds" % fn,
                             "QF_ERR_ARG")
        qt = self.impl.parameter(self._query_name)
        return np.ascontiguousarray(np.broadcast_to(qt, (B,) + qt.shape[1:]), np.float32), True

    # ---- Q-Former ----
    def qformer(self, query_embeds=None, encoder_hidden_states=None, encoder_attention_mask=None,
                qformer_input_ids=None, qformer_attention_mask=None, global_feature=None):
        """Q-Former last_hidden_state [B, Lq (+Lt), hidden]; query_embeds None = the model's own
        query tokens; global_feature only for blip2_kv_prefix (its prefix then modulates the
        cross-attention)."""
        fn = "qformer"
        if self._qf is None:
            self._no("Q-Former")
        if encoder_hidden_states is None:
            raise QfuseError("%s: encoder_hidden_states is required" % fn, "QF_ERR_ARG")
        if global_feature is not None:
            if self.kind != "kv_prefix":
                raise QfuseError("%s: global_feature is only taken by blip2_kv_prefix models (this is "
                                 "a %s model)" % (fn, self.kind), "QF_ERR_ARG")
            if qformer_input_ids is not None:
                raise QfuseError("%s: a KV-prefix Q-Former takes no instruction text" % fn, "QF_ERR_UNSUPPORTED")
            self._maps_from = self.impl
            return self.impl.fuse(encoder_hidden_states=encoder_hidden_states, global_feature=global_feature,
                                  query_embeds=query_embeds, encoder_attention_mask=encoder_attention_mask)
        if self.kind == "kv_prefix":
            raise QfuseError("%s: a blip2_kv_prefix model needs global_feature [B, prefix_feature_dim]" % fn,
                             "QF_ERR_ARG")
        B = np.shape(encoder_hidden_states)[0] if np.ndim(encoder_hidden_states) >= 1 else 0
        q, _ = self._queries(query_embeds, B, fn)
        self._maps_from = self._qf
        return self._qf.forward(q, encoder_hidden_states, encoder_attention_mask,
                                qformer_input_ids, qformer_attention_mask)

    def qformer_backward(self, grad_out, query_embeds=None, encoder_hidden_states=None,
                         encoder_attention_mask=None, qformer_input_ids=None, qformer_attention_mask=None,
                         global_feature=None):
        """Gradients of sum(qformer(...) * grad_out) (see the module docstring for the keys)."""
        self.qformer(query_embeds, encoder_hidden_states, encoder_attention_mask, qformer_input_ids,
                     qformer_attention_mask, global_feature)
        if global_feature is not None:
            g = self.impl.backward(grad_out)
            if query_embeds is None:
                g[self._query_name] = g["query_embeds"].sum(axis=0, keepdims=True)
            return g
        raw = self._qf.backward(grad_out)
        out = {}
        for k, v in raw.items():
            if k in ("query_embeds", "encoder_hidden_states", "prefix_k", "prefix_v"):
                out[k] = v
            else:
                out[self._qprefix + k] = v
        if query_embeds is None and self._query_name:
            out[self._query_name] = raw["query_embeds"].sum(axis=0, keepdims=True)
        return out

    # ---- vision ----
    def vision(self, pixel_values):
        """Vision tower last_hidden_state (BLIP-2 / InstructBLIP folders)."""
        if self.kind != "blip2":
            self._no("vision")
        return self.impl.vision(pixel_values)

    # ---- whole fusion ----
    def fuse(self, pixel_values=None, encoder_hidden_states=None, audio=None, face=None, audio_mask=None,
             face_mask=None, global_feature=None, qformer_input_ids=None, qformer_attention_mask=None):
        """LLM-space tokens: BLIP-2/InstructBLIP from pixel_values (instruction ids for
        InstructBLIP); AffectGPT pre-fusion from audio/face (+ masks); KV-prefix from
        encoder_hidden_states + global_feature (through language_projection when present)."""
        fn = "fuse"
        given = {k for k, v in dict(pixel_values=pixel_values, encoder_hidden_states=encoder_hidden_states,
                                    audio=audio, face=face, audio_mask=audio_mask, face_mask=face_mask,
                                    global_feature=global_feature, qformer_input_ids=qformer_input_ids,
                                    qformer_attention_mask=qformer_attention_mask).items() if v is not None}
        takes = {"blip2": {"pixel_values", "qformer_input_ids", "qformer_attention_mask"},
                 "prefusion": {"audio", "face", "audio_mask", "face_mask"},
                 "attention_fusion": {"audio", "face", "audio_mask", "face_mask"},
                 "video_qformer": {"face", "face_mask"},
                 "audio_qformer": {"audio", "audio_mask"},
                 "kv_prefix": {"encoder_hidden_states", "global_feature"},
                 "qformer": set()}[self.kind]
        extra = sorted(given - takes)
        if self.kind == "qformer":
            raise QfuseError("%s: a bare Q-Former checkpoint has no query tokens or projection; "
                             "call qformer(query_embeds=..., encoder_hidden_states=...)" % fn, "QF_ERR_UNSUPPORTED")
        if extra:
            raise QfuseError("%s: a %s model does not take %s (it takes %s)"
                             % (fn, self.kind, ", ".join(extra), ", ".join(sorted(takes))), "QF_ERR_ARG")
        self._maps_from = self.impl
        if self.kind == "blip2":
            if pixel_values is None:
                raise QfuseError("%s: pixel_values is required" % fn, "QF_ERR_ARG")
            return self.impl.fuse(pixel_values, qformer_input_ids, qformer_attention_mask)
        if self.kind in ("prefusion", "attention_fusion"):
            return self.impl.fuse(audio=audio, face=face, audio_mask=audio_mask, face_mask=face_mask)
        if self.kind == "video_qformer":      # the video branch reads the face-frame sequence
            return self.impl.fuse(face, frame_mask=face_mask)
        if self.kind == "audio_qformer":
            return self.impl.fuse(audio, frame_mask=audio_mask)
        h = self.impl.fuse(encoder_hidden_states=encoder_hidden_states, global_feature=global_feature)
        return self.impl.project(h) if self.impl.projection_dim else h

    def cross_attention_maps(self, average=False):
        """From the last qformer()/fuse(): one array per cross-attention layer, [B, heads, nq,
        keys] (or [B, nq, keys] averaged). Keys: prefix then encoder tokens (KV-prefix); face
        then audio frames in fusion order (pre-fusion); image patches with the class token first."""
        if self._qf is None:
            self._no("cross-attention")
        return self._maps_from.cross_attention_maps(average=average)

    def save_attention_png(self, path, layer=-1, item=0, cell_px=8):
        """Writes one cross-attention layer of the last qformer()/fuse() (batch item `item`,
        averaged over heads) as a heatmap PNG: queries down, keys across, a white column at each
        modality boundary (prefix | encoder for KV-prefix; first | second modality in fusion
        order for the AffectGPT pre-fusion). Returns the boundaries drawn."""
        maps = self.cross_attention_maps(average=True)
        try:
            m = maps[layer][item]
        except IndexError:
            raise QfuseError("save_attention_png: layer %r / item %r out of range (%d cross-attention "
                             "layers, batch %d)" % (layer, item, len(maps), maps[0].shape[0]), "QF_ERR_ARG") from None
        bounds = []
        if self.kind == "kv_prefix" and self._maps_from is self.impl:
            bounds = [self.impl.num_prefix_tokens]
        elif self.kind == "prefusion" and self.impl._state is not None:
            _, ta, tf = self.impl._state
            first = tf if self.impl.fusion_order[0] == "face" else ta
            if 0 < first < m.shape[1]:
                bounds = [first]
        save_heatmap(path, m, bounds, cell_px)
        return bounds
