/* qfuse_llm.h - decoder-only language models (included by qfuse.h; do not include it alone):
 * transformers' LlamaForCausalLM, Qwen2ForCausalLM and OPTForCausalLM (5.x semantics), loaded
 * from a Hugging Face folder (config.json + model.safetensors or a sharded index) in float32 or
 * with bf16 / int8 / 4-bit linear weights; KV-cached decoding, sampling, PEFT LoRA adapters.
 *
 *   qf_llm *m;
 *   if (qf_llm_load("my-qwen2", &m) != QF_OK) { puts(qf_last_error()); ... }
 *   qf_llm_embed(m, ids, B, T, embeds);            // ids [B,T] int32 -> embeds [B,T,embed_dim]
 *   // ... splice fused modality tokens into embeds here (that is how they enter the LLM) ...
 *   qf_llm_forward(m, embeds, B, T, NULL, logits); // -> logits [B,T,vocab]
 *   qf_generate_options o = qf_generate_defaults();
 *   o.max_new_tokens = 32; o.sampling.do_sample = 1; o.sampling.top_p = 0.9f;
 *   qf_llm_generate(m, embeds, NULL, B, T, ids, &o, out_ids, &n);   // out_ids [B,32]
 *
 * LLaMA/Qwen2 layers (pre-norm): x += o_proj(attn(rope(q), rope(k), v)) with q/k/v =
 * proj(rmsnorm(x)); x += down(silu(gate(h)) * up(h)) with h = rmsnorm(x); logits =
 * lm_head(rmsnorm(x)). RMSNorm: weight * x / sqrt(mean(x^2) + rms_norm_eps). RoPE: the
 * "default" rope_type with rope_theta (config "rope_parameters.rope_theta", or "rope_theta";
 * default 10000), rotate_half convention. Attention: grouped-query, scale 1/sqrt(head_dim),
 * causal. OPT: learned positions (offset 2), LayerNorm before (or after) each block, ReLU FFN,
 * project_in/out when word_embed_proj_dim != hidden_size. Tied embeddings: the embedding table
 * is the output projection. Padding: see the KV cache section (positions follow the mask).
 *
 * Not supported (load fails with QF_ERR_UNSUPPORTED naming the key): rope types other than
 * "default" (llama3, linear, dynamic, yarn scaling), Qwen2 sliding-window attention, activations
 * other than silu (LLaMA) / relu (OPT), OPT without elementwise-affine LayerNorm.
 */
#ifndef QFUSE_LLM_H
#define QFUSE_LLM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct qf_llm qf_llm;

typedef struct {
    char model_type[16];     /* "llama", "qwen2" or "opt"                                     */
    int64_t vocab_size, hidden_size, intermediate_size, num_hidden_layers;  /* OPT: ffn_dim  */
    int64_t num_attention_heads, num_key_value_heads, head_dim;
    int64_t max_position_embeddings;
    int64_t word_embed_proj_dim; /* width of the token embeddings (OPT; hidden_size otherwise)  */
    double norm_eps;         /* RMSNorm eps (rms_norm_eps) or OPT's LayerNorm eps (1e-5)     */
    double rope_theta;       /* LLaMA/Qwen2                                                  */
    int attention_bias;      /* q/k/v biases (always for qwen2; llama: also o_proj's; OPT: all) */
    int mlp_bias;            /* FFN biases (llama's mlp_bias; OPT's enable_bias)             */
    int tie_word_embeddings; /* the output projection is the embedding table                 */
    int do_layer_norm_before;/* OPT pre-LN (1) or post-LN (0); 1 for LLaMA/Qwen2              */
    int has_final_norm;      /* a norm after the last layer                                  */
    int64_t bos_token_id, eos_token_id, pad_token_id;   /* from config.json; -1 = none        */
} qf_llm_config;

/* Loads folder/config.json and folder/model.safetensors (any float dtype, converted to float32).
 * model_type must be "llama" or "qwen2" (else QF_ERR_UNSUPPORTED naming the value); every tensor
 * is checked by name and shape (QF_ERR_NOT_FOUND / QF_ERR_SHAPE naming file and tensor). */
qf_status qf_llm_load(const char *folder, qf_llm **out);
void qf_llm_free(qf_llm *m);
qf_status qf_llm_get_config(const qf_llm *m, qf_llm_config *out);

/* out [B,T,hidden] = embed_tokens[ids]. Every id must be in [0,vocab): otherwise QF_ERR_ARG
 * naming input_ids[b,t], the id and the vocabulary size (nothing written). */
qf_status qf_llm_embed(qf_llm *m, const int32_t *ids, int64_t B, int64_t T, float *out);

/* logits [B,T,vocab] of inputs_embeds [B,T,embed_dim], causal, with attention_mask [B,T]
 * (1 = token, 0 = padding; NULL = all tokens; positions as qf_llm_decode counts them).
 * Activations and the cache live in grow-only buffers of m: a call with shapes no larger than
 * an earlier one allocates nothing. Not thread-safe on one m. */
qf_status qf_llm_forward(qf_llm *m, const float *inputs_embeds, int64_t B, int64_t T,
                         const uint8_t *attention_mask, float *logits);

/* ---- sampling (src/models/sampler.c) ------------------------------------------------------
 * transformers' logits processors, in generate's order: repetition_penalty (over every id in
 * `history`: logit < 0 ? logit * p : logit / p), then temperature (logits / t), top_k (keep the
 * k largest, ties at the k-th kept as torch.topk's threshold does), top_p (keep the smallest
 * set of highest-probability tokens whose mass reaches top_p, at least one), softmax and one
 * draw from a counter-based generator: the draw is a function of (seed, counter) only, so a run
 * is reproducible and rows of a batch are independent (counter = step * B + row).
 * do_sample 0 = greedy (argmax after the repetition penalty; ties pick the lowest id). */
typedef struct {
    int do_sample;
    float temperature;         /* > 0; 1 = off           */
    int64_t top_k;             /* 0 = off                */
    float top_p;               /* (0,1]; 1 = off         */
    float repetition_penalty;  /* > 0; 1 = off           */
    uint64_t seed;
} qf_sampling;

qf_sampling qf_sampling_defaults(void);   /* greedy, every processor off, seed 0 */
/* Picks the next id from logits [V] (modified in place: the processed logits). history: the ids
 * seen so far in this row (prompt and generated), n_history >= 0. */
qf_status qf_sample_token(const qf_sampling *s, float *logits, int64_t V, const int32_t *history,
                          int64_t n_history, uint64_t counter, int32_t *out_id);

/* ---- weights formats, options, partial loads ------------------------------------------- */
enum { QF_WEIGHTS_F32 = 0, QF_WEIGHTS_BF16 = 1, QF_WEIGHTS_INT8 = 2, QF_WEIGHTS_Q4 = 3 };

typedef struct {
    int weights;     /* QF_WEIGHTS_*: storage of every linear layer (lm_head included); the
                        embedding tables and norms stay float32                               */
    int64_t block;   /* scale block along the input dimension: int8 0 = per output channel;
                        q4 0 = 32                                                           */
} qf_llm_options;

qf_status qf_llm_load_ex(const char *folder, const qf_llm_options *opt, qf_llm **out);
/* The decoder inside a composite checkpoint (BLIP-2's language_model): the config's keys under
 * cfg_prefix ("text_config.") and tensors under tensor_prefix ("language_model."). */
qf_status qf_llm_load_parts(const qf_config *cfg, const char *cfg_prefix, const qf_safetensors *st,
                            const char *tensor_prefix, const qf_llm_options *opt, qf_llm **out);
/* Bytes held by the weights as stored (quantized formats count their scales). */
size_t qf_llm_weight_bytes(const qf_llm *m);

/* ---- KV cache and incremental decoding ---------------------------------------------------
 * A cache holds, for B rows, the keys and values of up to `capacity` positions of every layer,
 * plus which positions were real tokens (mask 1) or padding (0). Position ids follow the mask
 * as transformers' generate computes them (cumsum(mask) - 1): left padding does not shift a
 * row's positions, so a padded row gives the logits it gives alone. */
typedef struct qf_llm_cache qf_llm_cache;
qf_status qf_llm_cache_new(const qf_llm *m, int64_t B, int64_t capacity, qf_llm_cache **out);
void qf_llm_cache_free(qf_llm_cache *c);
void qf_llm_cache_reset(qf_llm_cache *c);                   /* length 0, memory kept */
int64_t qf_llm_cache_length(const qf_llm_cache *c);
/* Appends T positions to every row: embeds [B,T,embed_dim], mask [B,T] for these positions
 * (NULL = all real). logits [B,T,vocab], or [B,vocab] of the last position when last_only.
 * QF_ERR_ARG naming capacity when length + T exceeds it; QF_ERR_NONFINITE naming embeds[b,t,i]
 * for a NaN/Inf input (checked before the cache changes). No allocation once warm. */
qf_status qf_llm_decode(qf_llm *m, qf_llm_cache *c, const float *embeds, int64_t T,
                        const uint8_t *mask, float *logits, int last_only);

/* ---- LoRA adapters (src/models/llm_adapter.c; PEFT format) -------------------------------
 * Several adapters may be loaded under distinct names; at most one is active. The active one is
 * applied on the fly (y += scaling * (x A^T) B^T on every module it targets) unless merged into
 * the float32 weights; unmerge subtracts it again (restores the base weights to float32
 * rounding). An adapter whose target module the model lacks, or whose shapes differ, is refused
 * by name (an adapter for another architecture). Merging needs float32 weights (and an lm_head
 * not tied to the embeddings). As in PEFT: the first adapter loaded while none is active becomes
 * active; selecting another (or none) while one is merged unmerges it first. */
qf_status qf_llm_load_adapter(qf_llm *m, const char *folder, const char *name);
qf_status qf_llm_set_adapter(qf_llm *m, const char *name);   /* NULL: no adapter */
qf_status qf_llm_merge_adapter(qf_llm *m);                   /* merges the active adapter */
qf_status qf_llm_unmerge_adapter(qf_llm *m);

/* ---- generation (KV cache + sampling) ---------------------------------------------------
 * Prefills embeds [B,T,embed_dim] (mask [B,T], NULL = all real; left padding is how rows of
 * different lengths share a batch), then decodes up to max_new_tokens per row. A row stops at
 * one of eos_ids or when on_token returns nonzero for it; stopped rows are filled with pad_id.
 * prompt_ids [B,T] (may be NULL) seed the repetition-penalty history. out_ids [B,max_new_tokens];
 * *n_steps = the number of decoding steps run (<= max_new_tokens). Row b's draw at step i uses
 * counter i * B + b. */
typedef struct {
    int64_t max_new_tokens;
    qf_sampling sampling;
    const int32_t *eos_ids;
    int n_eos;
    int32_t pad_id;
    int (*on_token)(void *user, int64_t row, int32_t id);
    void *user;
} qf_generate_options;

qf_generate_options qf_generate_defaults(void);  /* greedy, 20 tokens, no eos, pad 0 */
/* The same with the model's eos ids and pad id as transformers' generate takes them:
 * generation_config.json (read by qf_llm_load / _ex when the folder has one), else config.json;
 * pad falls back to the first eos. The eos array lives as long as m. */
qf_generate_options qf_llm_generate_defaults(const qf_llm *m);
qf_status qf_llm_generate(qf_llm *m, const float *embeds, const uint8_t *mask, int64_t B, int64_t T,
                          const int32_t *prompt_ids, const qf_generate_options *o, int32_t *out_ids,
                          int64_t *n_steps);

#ifdef __cplusplus
}
#endif
#endif /* QFUSE_LLM_H */
