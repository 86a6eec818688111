/* lora.h - PEFT LoRA adapters (adapter_config.json + adapter_model.safetensors) as plain
 * per-module pairs (not installed). The LLM (llm_adapter.c) finds each pair's base module by
 * name and applies it on the fly or merges it.
 *
 * Semantics (PEFT LoraLayer, inference): y = base(x) + scaling * (x A^T) B^T, scaling =
 * lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora; rank_pattern / alpha_pattern
 * override r / alpha per module. Dropout is an identity at inference.
 *
 * Invariants: a loaded qf_lora is complete (every module has A and B of matching rank) and
 * immutable; module names are the base model's ("model.layers.0.self_attn.q_proj"), i.e. the
 * PEFT key without "base_model.model." and ".lora_A.weight".
 */
#ifndef QF_LORA_H
#define QF_LORA_H

#include "internal.h"

typedef struct {
    char module[128];
    int64_t r, in, out;
    float scaling;
    float *A;   /* [r, in]  */
    float *B;   /* [out, r] */
} qf_lora_pair;

typedef struct qf_lora qf_lora;

qf_status qf_lora_load(const char *folder, qf_lora **out);
void qf_lora_free(qf_lora *a);
int qf_lora_num_pairs(const qf_lora *a);
const qf_lora_pair *qf_lora_pair_at(const qf_lora *a, int i);
const qf_lora_pair *qf_lora_find(const qf_lora *a, const char *module);
/* auto_mapping.base_model_class of adapter_config.json ("Qwen2ForCausalLM"), or "" if absent. */
const char *qf_lora_base_class(const qf_lora *a);
/* y[N,out] += scaling * (x[N,in] A^T) B^T. */
qf_status qf_lora_apply(const qf_lora_pair *p, const float *x, int64_t N, float *y);
/* w[out,in] += sign * scaling * B A   (sign +1 merges, -1 unmerges). */
qf_status qf_lora_merge(const qf_lora_pair *p, float *w, float sign);

#endif
