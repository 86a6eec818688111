/* qfuse_models.h - whole models of libqfuse, loaded from their checkpoints (included by qfuse.h;
 * do not include it alone). One source file per model in src/models/.
 *
 * CONVENTIONS (in addition to qfuse.h's)
 *
 *   - Models load from the files their own users have (a Hugging Face folder: config.json +
 *     model.safetensors), by the checkpoint's own tensor names, any float storage dtype
 *     (F64/F32/F16/BF16 are converted to float32 once, at load). Every loading error names the
 *     file and the tensor or config key, and the rule that was broken.
 *   - Activations are float32 in PyTorch's batch-first layouts ([B, tokens, width]).
 *   - A model keeps grow-only planned buffers: a forward with the shapes of an earlier one
 *     allocates nothing. A model handle is not safe to use from two threads at once.
 *   - Forward is inference (eval mode): dropout is off.
 */
#ifndef QFUSE_MODELS_H
#define QFUSE_MODELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- torch.nn.MultiheadAttention (qf_mha, declared in qfuse.h) on a device
 * Places m on "cpu" (where it loads) or "cuda", weights QF_F32 or QF_BF16 (cuda: the projection
 * GEMMs read bf16 copies; backward then QF_ERR_UNSUPPORTED), as qf_qformer_to_device says. On the
 * GPU, qf_mha_forward/backward take host or GPU pointers for query, key, value, out, weights,
 * grad_out and the input gradients (masks: host memory), run on the backend's stream and wait for
 * it once, at the end; parameter gradients stay on the device until qf_mha_param shows them.
 * Dropout (training with dropout > 0) and head dims above 128 are CPU-only (QF_ERR_UNSUPPORTED).
 * "cpu" moves it back, gradients included. */
qf_status qf_mha_to_device(qf_mha *m, const char *device, qf_dtype weights);

/* ---- Q-Former core (transformers' Blip2QFormerModel / InstructBlipQFormerModel, LAVIS BertModel)
 * Tokens are Lq query embeddings, then (InstructBLIP) Lt instruction-text tokens:
 *   x = LayerNorm([query_embeds ; word_emb(text_ids) + pos_emb(0..Lt-1)])
 *   per layer i:
 *     x = LN(x + dense(SelfAttention(x)))       over all Lq+Lt tokens, text_attention_mask on keys
 *     q = x[:, :Lq]                               on layers with i % cross_attention_frequency == 0:
 *     q = LN(q + dense(CrossAttention(q, [prefix ; encoder_hidden_states])))
 *     q = LN(q + dense(act(dense(q))))            "intermediate_query" / "output_query"
 *     t = LN(t + dense(act(dense(t))))            text rows: "intermediate" / "output"
 * Attention is softmax(q k^T / sqrt(head_dim) + mask) v over num_attention_heads heads.
 * KV prefix (blip2_kv_prefix): prefix_k / prefix_v [B,P,hidden] are prepended, after the layer's
 * own key/value projections of the encoder states, to the keys and values of EVERY
 * cross-attention layer; prefix keys are always attended (the encoder mask is extended with ones).
 * Tensor names are found by probing, under the tensor prefix:
 *   transformers: "layernorm.*" (BLIP-2) or "embeddings.layernorm.*" (InstructBLIP),
 *                 "encoder.layer.N.attention.attention.query.*", "...crossattention...", ...
 *   LAVIS:        "bert.embeddings.LayerNorm.*", "bert.encoder.layer.N.attention.self.query.*",
 *                 "...attention.output.dense.*", "...crossattention.self.key.*", ...
 * Parameters are reported (qf_qformer_param) by the checkpoint's own names without the prefix
 * (LAVIS names for a LAVIS file); qf_qformer_find_param takes those or the transformers names. */

typedef struct qf_qformer qf_qformer;

typedef struct {
    int64_t num_hidden_layers, hidden_size, num_attention_heads, intermediate_size;
    int64_t cross_attention_frequency, encoder_hidden_size;
    double layer_norm_eps;
    qf_gelu_kind hidden_act;  /* "gelu" -> ERF; "gelu_new", "gelu_pytorch_tanh" -> TANH */
    int has_text;             /* 1: word/position embeddings and the text FFN branch exist */
    int64_t vocab_size, max_position_embeddings;   /* meaningful when has_text */
} qf_qformer_config;

/* Loads a Hugging Face folder: FOLDER/config.json and FOLDER/model.safetensors. The config is
 * a Q-Former config (model_type "blip_2_qformer" / "instructblip_qformer": tensors at the top)
 * or a whole BLIP-2 / InstructBLIP config (model_type "blip-2" / "instructblip": the Q-Former
 * config under "qformer_config", its tensors under "qformer."). An unsupported value is
 * QF_ERR_UNSUPPORTED or QF_ERR_FORMAT naming the key; every expected tensor must be present with
 * its shape (QF_ERR_NOT_FOUND / QF_ERR_SHAPE naming it). */
qf_status qf_qformer_load(const char *folder, qf_qformer **out);
/* The same from an opened config and safetensors file: config keys are read under cfg_prefix
 * ("" or e.g. "qformer_config.") and tensors under tensor_prefix ("" or e.g. "qformer." or
 * "multi_Qformer."). Other tensors in the file are ignored. */
qf_status qf_qformer_load_parts(const qf_config *cfg, const char *cfg_prefix,
                                const qf_safetensors *st, const char *tensor_prefix,
                                qf_qformer **out);
void qf_qformer_free(qf_qformer *m);
qf_status qf_qformer_get_config(const qf_qformer *m, qf_qformer_config *out);

typedef struct {
    int64_t B;                              /* batch                                          */
    int64_t num_queries;                    /* Lq: query tokens per item                      */
    int64_t encoder_len;                    /* S: encoder tokens per item                     */
    const uint8_t *encoder_attention_mask;  /* [B,S], nonzero = attend, 0 = padding (optional) */
    int64_t text_len;                       /* Lt: instruction tokens per item (0 = none)     */
    const int32_t *text_ids;                /* [B,Lt] token ids (has_text models only)        */
    const uint8_t *text_attention_mask;     /* [B,Lt], nonzero = attend (optional)           */
    int64_t prefix_len;                     /* P: KV-prefix tokens (0 = none)                 */
    const float *prefix_k, *prefix_v;       /* [B,P,hidden] each, already projected           */
} qf_qformer_args;

/* query_embeds [B,Lq,hidden], encoder_hidden_states [B,S,encoder_hidden_size] ->
 * out [B,Lq+Lt,hidden] (last_hidden_state; the query rows first). A batch item whose encoder
 * tokens are all padding (and has no prefix) attends uniformly to all S tokens in
 * cross-attention, as transformers does (its additive mask is the dtype's minimum on every
 * key). The forward keeps what backward and the attention maps need. */
qf_status qf_qformer_forward(qf_qformer *m, const qf_qformer_args *a, const float *query_embeds,
                             const float *encoder_hidden_states, float *out);

/* Places m for its forward on a device: "cpu" (where it loads) or "cuda" (the parameters are
 * uploaded once; needs a libqfuse built with CUDA=1 and a GPU). weights: QF_F32, or QF_BF16 on
 * "cuda": the GEMMs read a bfloat16 copy of the weight matrices and accumulate in float32
 * (activations, LayerNorm, softmax stay float32). On the GPU qf_qformer_forward takes host or
 * GPU pointers for its float inputs and out (text ids and masks: host), runs on the backend's
 * stream and replays everything after its input copies as one CUDA graph, captured for the last
 * input shape (QFUSE_CUDA_GRAPHS=0: no graphs); it waits for the GPU once, at the end. Backward
 * runs on the GPU with QF_F32 weights (QF_BF16: QF_ERR_UNSUPPORTED); the attention maps need
 * the CPU (QF_ERR_UNSUPPORTED on a GPU model). "cpu" moves it back. Parameter edits through qf_qformer_param after placing are not uploaded. */
qf_status qf_qformer_to_device(qf_qformer *m, const char *device, qf_dtype weights);

/* Backward of the last forward for loss = sum(out * grad_out), grad_out [B,Lq+Lt,hidden].
 * Input gradients are WRITTEN (each may be NULL to skip): grad_query_embeds [B,Lq,hidden],
 * grad_encoder [B,S,encoder_hidden_size], grad_prefix_k / grad_prefix_v [B,P,hidden] (summed
 * over the cross-attention layers). Parameter gradients are ACCUMULATED (+=) into the grads
 * that qf_qformer_param shows, unless the model is frozen. QF_ERR_ARG without a successful forward.
 * On a GPU model grad_out and the input gradients may be host or GPU pointers; the parameter
 * gradients accumulate in a device copy (made at the first GPU backward from the host grads)
 * that is downloaded whole into the host grads at the end of every call, which returns after the
 * GPU has finished. */
qf_status qf_qformer_backward(qf_qformer *m, const float *grad_out, float *grad_query_embeds,
                              float *grad_encoder, float *grad_prefix_k, float *grad_prefix_v);

int qf_qformer_num_params(const qf_qformer *m);
qf_status qf_qformer_param(qf_qformer *m, int i, qf_param *out);
/* Finds a parameter by its checkpoint name or its transformers name
 * ("encoder.layer.0.attention.attention.query.weight"). */
qf_status qf_qformer_find_param(qf_qformer *m, const char *name, qf_param *out);
void qf_qformer_zero_grad(qf_qformer *m);
/* frozen = 1: backward computes input gradients only (no parameter gradients, grad views NULL). */
void qf_qformer_set_frozen(qf_qformer *m, int frozen);

/* Cross-attention weights of the last forward. layer counts cross-attention layers only
 * (0 .. qf_qformer_num_cross_layers-1). weights: [B, heads, Lq, P+S] (prefix keys first), or
 * [B, Lq, P+S] averaged over heads when average != 0. Computed on request from what the forward
 * kept (no cost when not asked for). */
int qf_qformer_num_cross_layers(const qf_qformer *m);
qf_status qf_qformer_cross_attention(qf_qformer *m, int layer, int average, float *weights);

/* ---- BLIP-2 vision tower (transformers' Blip2VisionModel / InstructBlipVisionModel) ---------
 * pixel_values [B,3,image_size,image_size] -> patch embedding (conv, stride = patch_size) with
 * a class token in front and position embeddings added; pre-LN layers
 *   x = x + projection(MHA(layer_norm1(x)))   (fused "qkv" weight; its bias is q_bias, 0, v_bias)
 *   x = x + fc2(act(fc1(layer_norm2(x))))
 * and post_layernorm -> last_hidden_state [B, 1 + (image_size/patch_size)^2, hidden]. */
typedef struct qf_vision qf_vision;
typedef struct {
    int64_t hidden_size, intermediate_size, num_hidden_layers, num_attention_heads;
    int64_t image_size, patch_size, num_channels;
    double layer_norm_eps;
    qf_gelu_kind hidden_act;
} qf_vision_config;
/* cfg_prefix e.g. "vision_config.", tensor_prefix e.g. "vision_model.". */
qf_status qf_vision_load_parts(const qf_config *cfg, const char *cfg_prefix, const qf_safetensors *st,
                               const char *tensor_prefix, qf_vision **out);
void qf_vision_free(qf_vision *m);
qf_status qf_vision_get_config(const qf_vision *m, qf_vision_config *out);
int64_t qf_vision_num_tokens(const qf_vision *m);     /* 1 + patches */
qf_status qf_vision_forward(qf_vision *m, int64_t B, const float *pixel_values, float *out);
/* grad_pixel_values may be NULL; parameter gradients accumulate unless frozen. */
qf_status qf_vision_backward(qf_vision *m, const float *grad_out, float *grad_pixel_values);
int qf_vision_num_params(const qf_vision *m);
qf_status qf_vision_param(qf_vision *m, int i, qf_param *out);
void qf_vision_zero_grad(qf_vision *m);
void qf_vision_set_frozen(qf_vision *m, int frozen);
/* Places the vision tower on "cpu" or "cuda", weights QF_F32 or QF_BF16 (cuda), as
 * qf_qformer_to_device says; on the GPU pixel_values stay host memory (their im2col runs on the
 * host), out may be host or GPU memory, everything after the pixel upload is one graph per B,
 * and backward runs there too with float32 weights (bf16 weights: refused; parameter gradients
 * stay on the GPU until qf_vision_param reads them). */
qf_status qf_vision_to_device(qf_vision *m, const char *device, qf_dtype weights);

/* ---- BLIP-2 / InstructBLIP: image -> LLM-space tokens (model_type "blip-2", "instructblip") --
 * pixel_values -> vision tower -> Q-Former(query_tokens [, instruction ids]) -> query rows ->
 * language_projection -> out [B, num_query_tokens, text hidden]. The LLM is not loaded here. */
typedef struct qf_blip2 qf_blip2;
qf_status qf_blip2_load(const char *folder, qf_blip2 **out);
void qf_blip2_free(qf_blip2 *m);
qf_vision *qf_blip2_vision(qf_blip2 *m);       /* owned by m */
qf_qformer *qf_blip2_qformer(qf_blip2 *m);     /* owned by m */
int64_t qf_blip2_num_query_tokens(const qf_blip2 *m);
int64_t qf_blip2_projection_dim(const qf_blip2 *m);
/* text_ids/text_mask: InstructBLIP instruction [B,text_len] (text_len 0 for BLIP-2). */
qf_status qf_blip2_fuse(qf_blip2 *m, int64_t B, const float *pixel_values, int64_t text_len,
                        const int32_t *text_ids, const uint8_t *text_mask, float *out);
/* Backward of the last qf_blip2_fuse: through language_projection, the Q-Former (query_tokens
 * get a gradient) and the vision tower unless frozen. */
qf_status qf_blip2_backward(qf_blip2 *m, const float *grad_out, float *grad_pixel_values);
int qf_blip2_num_params(const qf_blip2 *m);                 /* all groups, checkpoint names */
qf_status qf_blip2_param(qf_blip2 *m, int i, qf_param *out);
void qf_blip2_zero_grad(qf_blip2 *m);
typedef enum { QF_GROUP_VISION = 1, QF_GROUP_QFORMER = 2, QF_GROUP_QUERY_TOKENS = 4,
               QF_GROUP_PROJECTION = 8 } qf_param_group;
void qf_blip2_set_frozen(qf_blip2 *m, unsigned groups, int frozen);
/* Places the whole fuse (vision tower, Q-Former, query tokens, language_projection) on "cpu" or
 * "cuda", weights QF_F32 or QF_BF16 (cuda), as qf_qformer_to_device says; on the GPU
 * pixel_values and the text ids/mask are host memory, out host or GPU memory, and backward
 * runs there too with float32 weights (bf16: refused). */
qf_status qf_blip2_to_device(qf_blip2 *m, const char *device, qf_dtype weights);

/* ---- AffectGPT pre-fusion (model_type "affectgpt_prefusion") ---------------------------------
 * audio [B,ta,audio_dim] -> multi_audio_embs, face [B,tf,video_dim] -> multi_video_embs (both to
 * max_hidden_size); concatenated in time in fusion_order (default face, then audio); plus
 * multi_position_embedding rows 0..tf+ta-1; read by multi_query_tokens through the Q-Former
 * (multi_Qformer., cross-attention to the sequence, masks from audio_mask/face_mask); then
 * multi_llama_proj -> out [B,num_multi_query_token,llm_hidden_size].
 * Padded frames (mask 0): the sequence is NOT compacted. Position ids run over the padded layout
 * 0..tf+ta-1 (with face first, real audio frame i sits at position tf+i whatever the item's own
 * face count); a padded frame is only removed from the cross-attention keys (its projection is
 * still computed, so it must be finite, and its input gradient is 0). A NULL mask = all frames
 * real (AffectGPT's all-ones mask). An item with no real frame follows the Q-Former core's rule.
 * qformer_config may omit encoder_hidden_size (it is max_hidden_size; a present one must match).
 * Parameters: own tensors by checkpoint name, then the Q-Former's as "multi_Qformer." + its
 * transformers name (whichever names the file used). */
typedef struct qf_prefusion qf_prefusion;
typedef struct {
    int64_t audio_dim, video_dim, max_hidden_size, num_multi_query_token;
    int64_t position_embedding_size, llm_hidden_size;
    int face_first;                         /* fusion_order ["face","audio"] (1) or reverse (0) */
} qf_prefusion_config;
typedef struct {
    int64_t B, audio_len, face_len;         /* ta, tf (either may be 0, not both)              */
    const uint8_t *audio_mask, *face_mask;  /* [B,ta], [B,tf] nonzero = real frame (optional)  */
} qf_prefusion_args;
qf_status qf_prefusion_load(const char *folder, qf_prefusion **out);
void qf_prefusion_free(qf_prefusion *m);
qf_status qf_prefusion_get_config(const qf_prefusion *m, qf_prefusion_config *out);
qf_status qf_prefusion_forward(qf_prefusion *m, const qf_prefusion_args *a, const float *audio,
                               const float *face, float *out);
qf_status qf_prefusion_backward(qf_prefusion *m, const float *grad_out, float *grad_audio, float *grad_face);
/* Places the whole pre-fusion (projections, position rows, Q-Former, LLM projection) on "cpu"
 * or "cuda", weights QF_F32 or QF_BF16 (cuda), as qf_qformer_to_device says; on the GPU the
 * forward after its input copies is one graph per shape, audio/face/out may be host or GPU
 * pointers (masks: host), and backward runs there too with float32 weights (bf16: refused;
 * gradients stay on the GPU until qf_prefusion_param reads them). */
qf_status qf_prefusion_to_device(qf_prefusion *m, const char *device, qf_dtype weights);
int qf_prefusion_num_params(const qf_prefusion *m);
qf_status qf_prefusion_param(qf_prefusion *m, int i, qf_param *out);  /* checkpoint names */
void qf_prefusion_zero_grad(qf_prefusion *m);
qf_qformer *qf_prefusion_qformer(qf_prefusion *m);   /* for attention maps; owned by m */

/* ---- BLIP-2 with KV-prefix modulation (model_type "blip2_kv_prefix") -------------------------
 * g [B,prefix_feature_dim] -> feature_proj.0 -> GELU(erf) -> feature_proj.2 -> + prefix_tokens
 * [P,hidden] -> k_proj, v_proj -> prefix K/V prepended in every cross-attention layer. */
typedef struct qf_kvprefix qf_kvprefix;
qf_status qf_kvprefix_load(const char *folder, qf_kvprefix **out);
void qf_kvprefix_free(qf_kvprefix *m);
/* query_embeds NULL = the model's query_tokens. out [B,nq,hidden] (Q-Former last_hidden_state);
 * qf_kvprefix_project then maps it through language_projection when the checkpoint has one. */
qf_status qf_kvprefix_forward(qf_kvprefix *m, const qf_qformer_args *a, const float *global_feature,
                              const float *query_embeds, const float *encoder_hidden_states, float *out);
qf_status qf_kvprefix_backward(qf_kvprefix *m, const float *grad_out, float *grad_global_feature,
                               float *grad_query_embeds, float *grad_encoder);
int qf_kvprefix_num_params(const qf_kvprefix *m);
qf_status qf_kvprefix_param(qf_kvprefix *m, int i, qf_param *out);   /* checkpoint names */
void qf_kvprefix_zero_grad(qf_kvprefix *m);
qf_qformer *qf_kvprefix_qformer(qf_kvprefix *m);
/* Sizes read from the checkpoint; projection_dim is language_projection's output width (0: none). */
typedef struct {
    int64_t hidden_size, num_query_tokens, num_prefix_tokens, prefix_feature_dim, projection_dim;
} qf_kvprefix_shape;
qf_status qf_kvprefix_get_shape(const qf_kvprefix *m, qf_kvprefix_shape *out);
/* in [rows,hidden] -> out [rows,projection_dim] through language_projection (QF_ERR_NOT_FOUND
 * when the checkpoint has none). The backward of that product: grad_in [rows,hidden] (may be
 * NULL) overwritten, language_projection's gradients accumulated. */
qf_status qf_kvprefix_project(qf_kvprefix *m, int64_t rows, const float *in, float *out);
qf_status qf_kvprefix_project_backward(qf_kvprefix *m, int64_t rows, const float *in, const float *grad_out,
                                       float *grad_in);
/* Places the whole KV-prefix forward (the global-feature MLP, the prefix tokens and their K/V
 * projections, the Q-Former) and qf_kvprefix_project on "cpu" or "cuda", weights QF_F32 or
 * QF_BF16 (cuda), as qf_qformer_to_device says; on the GPU the forward after its input copies
 * is one graph per shape, global_feature/query_embeds/encoder_hidden_states/out (and project's
 * in/out) may be host or GPU pointers (masks: host), and both backwards run there too with
 * float32 weights (bf16: refused). */
qf_status qf_kvprefix_to_device(qf_kvprefix *m, const char *device, qf_dtype weights);

/* ---- attention heatmap ------------------------------------------------------------------------
 * Writes weights [rows, cols] (queries down, encoder tokens across) as an 8-bit RGB PNG, each
 * cell cell_px square, min..max mapped through a perceptual colormap; boundaries[0..nb) are
 * column indices where a vertical separator is drawn (modality boundaries). Atomic write like
 * qf_st_write. */
qf_status qf_heatmap_png(const char *path, const float *weights, int64_t rows, int64_t cols,
                         int cell_px, const int64_t *boundaries, int nb);

/* ---- images (src/io/image.c; section added by helper "tools") --------------------------------
 * qf_image_load decodes a PNG / JPEG / BMP / TGA / GIF (first frame) file to 8-bit RGB, row-major
 * [h,w,3] (grey is replicated, alpha dropped, as PIL's convert("RGB")); *rgb is malloc'd, the
 * caller free()s it. qf_image_preprocess is transformers' BlipImageProcessor: resize to
 * size_h x size_w with PIL's resampling (bicubic with antialias, bit-exact with Pillow on 8-bit
 * images), rescale, normalize, and CHW float32 out [3,size_h,size_w]. */
qf_status qf_image_load(const char *path, int64_t *w, int64_t *h, uint8_t **rgb);
typedef struct {
    int64_t size_h, size_w;   /* resize target                                                 */
    int do_resize, do_rescale, do_normalize;
    int resample;             /* PIL code: 0 nearest, 1 lanczos, 2 bilinear, 3 bicubic, 4 box, 5 hamming */
    double rescale_factor;    /* 1/255                                                         */
    double mean[3], std[3];   /* OPENAI CLIP mean / std                                        */
} qf_image_preproc;
/* BlipImageProcessor's defaults for a square image_size. */
qf_image_preproc qf_image_preproc_defaults(int64_t image_size);
/* The defaults for image_size, overridden by the keys of the preprocessor_config.json at path
 * (NULL: defaults only): size ({"height","width"} or a number; "shortest_edge" is
 * QF_ERR_UNSUPPORTED), do_resize, resample, do_rescale, rescale_factor, do_normalize, image_mean,
 * image_std. */
qf_status qf_image_preproc_load(const char *path, int64_t image_size, qf_image_preproc *out);
qf_status qf_image_preprocess(const qf_image_preproc *p, const uint8_t *rgb, int64_t w, int64_t h,
                              float *out);

/* ---- AffectGPT per-modality Q-Formers and attention fusion (section added by helper "siblings";
 * src/models/modality_qformer.c, which states the semantics followed and the tensor names) ------
 * Per-modality Q-Former (model_type "affectgpt_video_qformer" / "affectgpt_audio_qformer"):
 * frames [B,T,input_dim] (or [B,T,K,input_dim], K = tokens_per_frame) + frame position row t
 * (video_frame_position_embedding [32,input_dim] / audio_position_embedding [8,input_dim]; the
 * same row for the K tokens of frame t) -> Q-Former (video_Qformer. / audio_Qformer.) read by
 * video_query_tokens / audio_query_tokens -> affectgpt_proj (video; Video-LLaMA's
 * video_llama_proj accepted) / audio_llama_proj -> out [B,num_query_token,llm_hidden_size].
 * T > frame_position_size is QF_ERR_SHAPE. frame_mask [B,T] (optional, nonzero = real frame)
 * removes a padded frame's K tokens from the cross-attention keys (positions still run over the
 * padded layout; its input gradient is 0). Config: input_dim, num_query_token,
 * frame_position_size (default 32 video / 8 audio), llm_hidden_size, qformer_config
 * (encoder_hidden_size optional; a present one must equal input_dim). */
typedef struct qf_modality_qformer qf_modality_qformer;
typedef enum { QF_MODALITY_VIDEO = 0, QF_MODALITY_AUDIO = 1 } qf_modality;
typedef struct {
    int modality;                           /* qf_modality                                     */
    int64_t input_dim, num_query_token, frame_position_size, llm_hidden_size;
} qf_modality_qformer_config;
typedef struct {
    int64_t B, frames;                      /* T (1 .. frame_position_size)                    */
    int64_t tokens_per_frame;               /* K (0 means 1)                                   */
    const uint8_t *frame_mask;              /* [B,T] nonzero = real frame (optional)           */
} qf_modality_qformer_args;
qf_status qf_modality_qformer_load(const char *folder, qf_modality_qformer **out);
void qf_modality_qformer_free(qf_modality_qformer *m);
qf_status qf_modality_qformer_get_config(const qf_modality_qformer *m, qf_modality_qformer_config *out);
qf_status qf_modality_qformer_forward(qf_modality_qformer *m, const qf_modality_qformer_args *a,
                                      const float *frames, float *out);
/* grad_frames [B,T,(K,)input_dim] written (NULL skips); parameter gradients accumulate. */
qf_status qf_modality_qformer_backward(qf_modality_qformer *m, const float *grad_out, float *grad_frames);
int qf_modality_qformer_num_params(const qf_modality_qformer *m);
/* Own tensors by checkpoint name, then the Q-Former's as "video_Qformer." / "audio_Qformer." +
 * the core's name (the file's own naming). */
qf_status qf_modality_qformer_param(qf_modality_qformer *m, int i, qf_param *out);
void qf_modality_qformer_zero_grad(qf_modality_qformer *m);
qf_qformer *qf_modality_qformer_qformer(qf_modality_qformer *m);   /* owned by m */
/* Places the whole per-modality Q-Former (position rows, query tokens, Q-Former, projection) on
 * "cpu" or "cuda", weights QF_F32 or QF_BF16 (cuda), as qf_prefusion_to_device does: on the GPU
 * the forward after its input copies is one graph per shape, frames/out may be host or GPU
 * pointers (frame_mask: host), backward runs there with float32 weights (bf16: refused). */
qf_status qf_modality_qformer_to_device(qf_modality_qformer *m, const char *device, qf_dtype weights);

/* Attention fusion (model_type "affectgpt_attention_fusion", AffectGPT's multi_fusion_type
 * "attention"): v = multi_video_embs(mean_t face), a = multi_audio_embs(mean_t audio) [B,M];
 * w = fc_att(attention_mlp([v ; a])) [B,2] (plain Linears, no softmax); fused = w0 v + w1 a;
 * out[b,j] = multi_llama_proj(fused[b]) for j < num_multi_query_token. Both modalities required;
 * masks (qf_prefusion_args) make the means run over real frames (an item with none: QF_ERR_ARG).
 * Config: audio_dim, video_dim, max_hidden_size (optional, must be max of the two),
 * num_multi_query_token, llm_hidden_size. */
typedef struct qf_attn_fusion qf_attn_fusion;
typedef struct {
    int64_t audio_dim, video_dim, max_hidden_size, num_multi_query_token, llm_hidden_size;
} qf_attn_fusion_config;
qf_status qf_attn_fusion_load(const char *folder, qf_attn_fusion **out);
void qf_attn_fusion_free(qf_attn_fusion *m);
qf_status qf_attn_fusion_get_config(const qf_attn_fusion *m, qf_attn_fusion_config *out);
qf_status qf_attn_fusion_forward(qf_attn_fusion *m, const qf_prefusion_args *a, const float *audio,
                                 const float *face, float *out);
qf_status qf_attn_fusion_backward(qf_attn_fusion *m, const float *grad_out, float *grad_audio,
                                  float *grad_face);
/* The modality weights w [B,2] (face, audio) of the last forward. */
qf_status qf_attn_fusion_weights(const qf_attn_fusion *m, float *weights);
int qf_attn_fusion_num_params(const qf_attn_fusion *m);
qf_status qf_attn_fusion_param(qf_attn_fusion *m, int i, qf_param *out);   /* checkpoint names */
void qf_attn_fusion_zero_grad(qf_attn_fusion *m);
/* Places the attention fusion on "cpu" or "cuda", weights QF_F32 or QF_BF16 (cuda), as
 * qf_prefusion_to_device does: audio/face/out may be host or GPU pointers (masks: host), the
 * forward after its input copies is one graph per shape, backward runs there with float32
 * weights (bf16: refused). */
qf_status qf_attn_fusion_to_device(qf_attn_fusion *m, const char *device, qf_dtype weights);

/* ---- BLIP-2 / InstructBLIP with their language model (section added by helper "vlm";
 * src/models/blip2_lm.c) ------------------------------------------------------------------------
 * transformers' Blip2ForConditionalGeneration / InstructBlipForConditionalGeneration (5.x), whole:
 * the image side is qf_blip2 (vision -> Q-Former -> language_projection), the decoder is the
 * qf_llm of text_config (OPT or LLaMA; tensors "language_model.*"). Splicing follows the
 * reference exactly: embeds = embed_tokens(input_ids), then the positions holding image_token_id
 * (config "image_token_id" or "image_token_index") receive the projected query outputs in order
 * (masked_scatter). Every row must hold exactly num_query_tokens image tokens (the reference
 * spreads a miscount silently across rows; here it is QF_ERR_ARG naming the row and both counts).
 * Blip2Processor puts them first, before the BOS token: [img x nq, BOS, prompt...].
 * The decoder sees attention_mask (NULL = all ones; left padding for rows of different lengths).
 * A prompt longer than text_config.max_position_embeddings, or one that would grow past it while
 * generating, is QF_ERR_ARG. Ids other than image tokens must lie in [0, vocab) (QF_ERR_ARG names
 * input_ids[b,t]); image-token positions are never looked up in the embedding table. */
#include "qfuse_llm.h"   /* qf_llm, qf_llm_options, qf_generate_options (qfuse.h includes it later) */
typedef struct qf_vlm qf_vlm;
enum { QF_VLM_MAX_EOS = 8 };
typedef struct {
    int instruct;                   /* model_type "instructblip": the Q-Former reads an instruction */
    char text_model_type[16];       /* "opt", "llama", ...                                      */
    int64_t num_query_tokens, embed_dim, vocab_size, max_positions;
    int64_t image_size;             /* vision_config.image_size (pixel_values are [B,3,s,s])    */
    int32_t image_token_id, bos_token_id, pad_token_id;   /* bos -1 when the config has none   */
    int32_t eos_ids[QF_VLM_MAX_EOS];/* generation_config.json's eos_token_id (int or list), else */
    int n_eos;                      /* text_config.eos_token_id                                 */
} qf_vlm_info;
typedef struct {
    int64_t B, T;                   /* batch, prompt length                                     */
    const float *pixel_values;      /* [B,3,image_size,image_size]                              */
    const int32_t *input_ids;       /* [B,T]                                                    */
    const uint8_t *attention_mask;  /* [B,T] nonzero = real token (NULL = all real)             */
    int64_t qformer_len;            /* InstructBLIP: instruction length Lt (0 for BLIP-2)       */
    const int32_t *qformer_ids;     /* [B,Lt] Q-Former (BERT) token ids                         */
    const uint8_t *qformer_mask;    /* [B,Lt] (NULL = all real)                                 */
} qf_vlm_inputs;
/* Loads FOLDER/config.json (model_type "blip-2" / "instructblip"), the weights (model.safetensors
 * or a sharded index) and FOLDER/generation_config.json when present. opt NULL = float32. */
qf_status qf_vlm_load(const char *folder, const qf_llm_options *opt, qf_vlm **out);
void qf_vlm_free(qf_vlm *m);
qf_status qf_vlm_get_info(const qf_vlm *m, qf_vlm_info *out);
qf_blip2 *qf_vlm_blip2(qf_vlm *m);   /* owned by m */
qf_llm *qf_vlm_llm(qf_vlm *m);       /* owned by m */
/* The projected Q-Former outputs fused [B,num_query_tokens,embed_dim] (qf_blip2_fuse). */
qf_status qf_vlm_fused_tokens(qf_vlm *m, const qf_vlm_inputs *in, float *fused);
/* embeds [B,T,embed_dim] = embed_tokens(input_ids) with each row's image tokens replaced, in
 * order, by that row's fused [B,num_query_tokens,embed_dim]. */
qf_status qf_vlm_splice_image_tokens(qf_vlm *m, const int32_t *input_ids, int64_t B, int64_t T,
                                     const float *fused, float *embeds);
/* fused tokens + splice: the decoder's inputs_embeds [B,T,embed_dim]. */
qf_status qf_vlm_embed(qf_vlm *m, const qf_vlm_inputs *in, float *embeds);
/* logits [B,T,vocab] of the whole model (what the reference's forward returns as logits). */
qf_status qf_vlm_logits(qf_vlm *m, const qf_vlm_inputs *in, float *logits);
/* qf_generate_defaults() with the model's eos ids and pad id filled in. */
qf_generate_options qf_vlm_generate_defaults(const qf_vlm *m);
/* Embeds as qf_vlm_embed, then qf_llm_generate with input_ids as the repetition-penalty history.
 * out_ids [B,o->max_new_tokens]: the new tokens only (the reference returns the prompt followed by
 * them); rows that stopped are filled with o->pad_id. */
qf_status qf_vlm_generate(qf_vlm *m, const qf_vlm_inputs *in, const qf_generate_options *o,
                          int32_t *out_ids, int64_t *n_steps);

/* General splice (e.g. AffectGPT's pre-fusion tokens into a prompt): out [B,T+n,D] =
 * prompt[:, :pos] ; fused [B,n,D] ; prompt[:, pos:], with 0 <= pos <= T. out must not overlap
 * the inputs. mask_out [B,T+n] (may be NULL) gets prompt_mask (NULL = all 1) with 1s at the fused
 * tokens. */
qf_status qf_splice_embeds(const float *prompt, const uint8_t *prompt_mask, int64_t B, int64_t T,
                           int64_t D, const float *fused, int64_t n, int64_t pos, float *out,
                           uint8_t *mask_out);

#ifdef __cplusplus
}
#endif
#endif /* QFUSE_MODELS_H */
