/* llm_internal.h - the decoder LLM's internal layout, shared by the files that implement
 * include/qfuse_llm.h (not installed):
 *   llm.c          config and load (LLaMA/Qwen2 and OPT)
 *   llm_forward.c  KV cache, decode/forward, generate
 *   llm_adapter.c  PEFT LoRA adapters on a loaded model (load/select/merge/unmerge)
 *   src/ops/qmatmul.c  quantized weight formats and their matmuls (bf16, int8, q4)
 *
 * Invariants:
 *   - Every linear layer of the decoder is one llm_linear, reachable from qf_llm.linears (an
 *     array of n_linears pointers, in checkpoint order) and from the per-layer struct. Its
 *     `name` is the module path in the base checkpoint without ".weight" and without any outer
 *     prefix ("model.layers.3.self_attn.q_proj", "model.decoder.layers.0.fc1", "lm_head"): the
 *     names PEFT targets.
 *   - Exactly one of w (float32 [out,in]) and q (quantized) is non-NULL.
 *   - lora is the active adapter's pair for this module (NULL: none, or the adapter is merged
 *     into w). llm_linear_forward adds it on the fly.
 */
#ifndef QF_LLM_INTERNAL_H
#define QF_LLM_INTERNAL_H

#include "internal.h"
#include "ops/qmatmul.h"
#include "models/lora.h"

typedef struct {
    char name[96];
    int64_t in, out;
    float *w;                  /* [out,in] float32, or NULL when quantized */
    qf_qweight *q;             /* quantized weight, or NULL */
    float *bias;               /* [out] or NULL */
    const qf_lora_pair *lora;  /* active, unmerged adapter pair or NULL */
} llm_linear;

/* y[N,out] = x[N,in] W^T + bias (+ lora scaling * (x A^T) B^T). */
qf_status llm_linear_forward(const llm_linear *L, float *y, const float *x, int64_t N);

typedef struct {
    /* LLaMA/Qwen2: in_norm = input_layernorm, post_norm = post_attention_layernorm (RMSNorm,
     * weights only). OPT: in_norm = self_attn_layer_norm, post_norm = final_layer_norm
     * (LayerNorm with in_norm_b/post_norm_b). */
    float *in_norm, *in_norm_b, *post_norm, *post_norm_b;
    llm_linear q, k, v, o;     /* o = o_proj (LLaMA) / out_proj (OPT) */
    llm_linear gate, up, down; /* LLaMA: gate/up/down; OPT: up = fc1, down = fc2, gate unused */
} llm_layer;

enum { LLM_ARCH_LLAMA = 0, LLM_ARCH_QWEN2 = 1, LLM_ARCH_OPT = 2 };

/* One loaded adapter (llm_adapter.c). */
typedef struct {
    char name[64];
    qf_lora *lora;
} llm_adapter;

enum { LLM_MAX_ADAPTERS = 16, LLM_MAX_EOS = 16 };

struct qf_llm {
    qf_llm_config cfg;
    int arch;                  /* LLM_ARCH_* */
    float *params;             /* every float32 parameter, one allocation */
    float *embed;              /* [vocab, embed_dim] token embeddings (never quantized)     */
    float *pos_embed;          /* OPT: [max_position_embeddings + 2, hidden]; else NULL     */
    float *final_norm, *final_norm_b;  /* final_norm NULL for OPT without a final LayerNorm */
    llm_linear project_in, project_out;   /* OPT word_embed_proj_dim != hidden; else w NULL */
    llm_linear lm_head;        /* w == embed (not owned) when tied and float32              */
    int lm_head_tied;          /* lm_head.w is embed                                         */
    llm_layer *layers;
    llm_linear **linears;      /* every linear with a weight, checkpoint order             */
    int n_linears;

    llm_adapter adapters[LLM_MAX_ADAPTERS];
    int n_adapters;
    int active_adapter;        /* index into adapters, or -1 */
    int merged_adapter;        /* index of the adapter merged into the weights, or -1 */

    int32_t gen_eos[LLM_MAX_EOS];  /* generation_config.json's eos ids (n_gen_eos of them)  */
    int n_gen_eos;
    int32_t gen_pad;           /* generation_config.json's pad_token_id, or -1             */
    int32_t cfg_eos;           /* config.json's eos_token_id as int32 (for eos_ids)         */

    float *ws;                 /* grow-only activation workspace (floats) */
    size_t ws_cap;
    qf_llm_cache *tmp_cache;   /* qf_llm_forward's own cache (grow-only) */
};

/* Reads FOLDER/generation_config.json (if present) into gen_eos / gen_pad: what
 * qf_llm_generate_defaults returns. qf_llm_load_ex calls it; composite loaders call it too. */
qf_status llm_read_generation_config(qf_llm *m, const char *folder);

/* Finds the linear whose name is `module` (exact match), or NULL. */
llm_linear *llm_find_linear(qf_llm *m, const char *module);
/* Frees every loaded adapter and clears the linears' lora pointers (llm_adapter.c; for qf_llm_free). */
void llm_adapters_free(qf_llm *m);

#endif
