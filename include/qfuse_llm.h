/* qfuse_llm.h - decoder-only language models of the LLaMA family (included by qfuse.h; do not
 * include it alone): transformers' LlamaForCausalLM and Qwen2ForCausalLM (5.x semantics), float32
 * inference forward from a Hugging Face folder (config.json + model.safetensors).
 *
 *   qf_llm *m;
 *   if (qf_llm_load("my-llama", &m) != QF_OK) { puts(qf_last_error()); ... }
 *   qf_llm_config c; qf_llm_get_config(m, &c);
 *   qf_llm_embed(m, ids, B, T, embeds);            // ids [B,T] int32 -> embeds [B,T,hidden]
 *   // ... splice fused modality tokens into embeds here (that is how they enter the LLM) ...
 *   qf_llm_forward(m, embeds, B, T, logits);       // embeds [B,T,hidden] -> logits [B,T,vocab]
 *
 * What the forward computes (per layer, pre-norm): x += o_proj(causal_attn(rope(q), rope(k), v))
 * with q/k/v = proj(rmsnorm(x)); x += down(silu(gate(h)) * up(h)) with h = rmsnorm(x); then
 * logits = lm_head(rmsnorm(x)). RMSNorm: weight * x / sqrt(mean(x^2) + rms_norm_eps). RoPE: the
 * "default" rope_type with rope_theta (config "rope_parameters.rope_theta", or "rope_theta";
 * default 10000), rotate_half convention (first half / second half of each head, not
 * interleaved), positions 0..T-1 in every row. Attention: grouped-query (num_key_value_heads),
 * scale 1/sqrt(head_dim), causal. lm_head.weight absent and tie_word_embeddings -> the embedding
 * table is the output projection.
 *
 * Not supported (load fails with QF_ERR_UNSUPPORTED naming the key): rope types other than
 * "default" (llama3, linear, dynamic, yarn scaling), Qwen2 sliding-window attention, activations
 * other than silu, a KV cache, padding masks (every row attends to all its earlier positions).
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
    char model_type[16];     /* "llama" or "qwen2"                                            */
    int64_t vocab_size, hidden_size, intermediate_size, num_hidden_layers;
    int64_t num_attention_heads, num_key_value_heads, head_dim;
    double rms_norm_eps, rope_theta;
    int attention_bias;      /* q/k/v biases (always for qwen2; llama: also o_proj's)         */
    int mlp_bias;            /* gate/up/down biases (llama's mlp_bias)                        */
    int tie_word_embeddings; /* the output projection is the embedding table                 */
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

/* logits [B,T,vocab] of inputs_embeds [B,T,hidden] (causal, positions 0..T-1). Activations live
 * in a grow-only workspace of m: a call with shapes no larger than an earlier one allocates
 * nothing. Not thread-safe on one m. */
qf_status qf_llm_forward(qf_llm *m, const float *inputs_embeds, int64_t B, int64_t T,
                         float *logits);

#ifdef __cplusplus
}
#endif
#endif /* QFUSE_LLM_H */
