/* qfuse.h - the public API of libqfuse, a C engine for attention-based multimodal fusion.
 *
 * QUICK START
 *
 *   #include <qfuse.h>
 *
 *   // q [B,Hq,L,D], k/v [B,Hkv,S,D] float32, contiguous, torch's layout.
 *   qf_sdpa_params p = qf_sdpa_defaults(B, Hq, Hkv, L, S, D);
 *   p.is_causal = 1;                         // optional: see qf_sdpa_params below
 *   if (qf_sdpa_forward(&p, q, k, v, out, NULL, NULL) != QF_OK) {
 *       fprintf(stderr, "qfuse: %s\n", qf_last_error());
 *       return 1;
 *   }
 *
 * THE REST OF THE API, BY HEADER (each opens with its own example)
 *
 *   qfuse_ops.h     linear, layer norm, GELU, softmax, dropout, embedding, residual: fwd + bwd;
 *                   the CUDA device-buffer calls (qf_cuda_*) and bf16 attention when built with
 *                   make CUDA=1 (the ops above run on the GPU when their tensors live there)
 *   qfuse_models.h  Q-Former, BLIP-2 vision tower, BLIP-2 / InstructBLIP (qf_blip2_*, and qf_vlm_*:
 *                   image + prompt -> logits / generation), AffectGPT pre-fusion, KV-prefix,
 *                   attention heatmaps; qf_*_to_device(m, "cuda", QF_F32 | QF_BF16) moves a
 *                   model's forward to the GPU (one CUDA graph per input shape)
 *   qfuse_text.h    tokenizer.json byte-level BPE and BERT WordPiece; streaming detokenizer with
 *                   stop strings
 *   qfuse_llm.h     decoder LLMs (LLaMA, Qwen2, OPT): KV cache, sampling, generation, LoRA,
 *                   bf16 / int8 / 4-bit weights
 *   qfuse_train.h   AdamW (torch.optim.AdamW semantics) over any model's qf_param list, with
 *                   optimizer state saved and loaded so training resumes exactly
 *
 *   // an LLM continuing a prompt (tokenizer and model from one Hugging Face folder)
 *   qf_llm *m; qf_tokenizer *tok;
 *   qf_llm_load("Qwen2.5-0.5B", &m); qf_tokenizer_load("Qwen2.5-0.5B/tokenizer.json", &tok);
 *   qf_tokenizer_encode(tok, text, strlen(text), 1, ids, cap, &T);
 *   qf_llm_embed(m, ids, 1, T, embeds);                  // splice fused tokens here
 *   qf_generate_options o = qf_llm_generate_defaults(m);  // eos / pad from the folder
 *   o.max_new_tokens = 32;
 *   qf_llm_generate(m, embeds, NULL, 1, T, ids, &o, out_ids, &n_steps);
 *
 * CONVENTIONS
 *
 *   - Every function that can fail returns a qf_status. On failure the library stores a message
 *     naming the argument, tensor or file and the rule that was broken; qf_last_error() returns it
 *     (per calling thread). The library never prints and never aborts.
 *   - Tensors are float32, contiguous, row-major, in PyTorch's layouts. The caller owns every
 *     buffer it passes; outputs are written, never allocated, unless a function says otherwise.
 *   - Masks follow torch.nn.functional.scaled_dot_product_attention: a bool mask is uint8 with
 *     1 = attend; a float mask is added to the scores. Both broadcast like numpy to [B,Hq,L,S].
 *   - Threads: QFUSE_THREADS in the environment or qf_set_num_threads(); default all cores.
 *   - SIMD: the best of AVX-512 / AVX2 / scalar is picked at run time; QFUSE_ISA=scalar|avx2|avx512
 *     or qf_set_isa() forces one (tests use this to check every path).
 *
 * WHAT IT DOES NOT DO (yet): reduced-precision attention on the CPU; on the GPU, the LLM, MHA and
 * the backward of anything but attention and the Q-Former.
 */
#ifndef QFUSE_H
#define QFUSE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define QFUSE_VERSION "0.1.0"

/* ------------------------------------------------------------------------------------------ */
/* Status and errors                                                                          */

typedef enum {
    QF_OK = 0,
    QF_ERR_ARG,         /* an argument is invalid (NULL pointer, negative size, bad option)   */
    QF_ERR_SHAPE,       /* shapes are inconsistent or do not broadcast                         */
    QF_ERR_DTYPE,       /* a dtype is unknown or not accepted here                             */
    QF_ERR_NONFINITE,   /* NaN or Inf where a finite value is required                         */
    QF_ERR_IO,          /* open/read/write/rename failed (errno text in the message)           */
    QF_ERR_FORMAT,      /* a file breaks its format's rules (message names the rule)           */
    QF_ERR_NOT_FOUND,   /* a named tensor or key is absent                                     */
    QF_ERR_NOMEM,       /* an allocation failed                                                */
    QF_ERR_UNSUPPORTED, /* valid request that this build does not implement                    */
    QF_ERR_INTERNAL     /* a bug in qfuse: please report                                       */
} qf_status;

/* Message of the last failing call on this thread ("" if none). Valid until the next failure. */
const char *qf_last_error(void);
/* Short constant name of a status, e.g. "QF_ERR_SHAPE". */
const char *qf_status_name(qf_status s);
void qf_clear_error(void);

/* ------------------------------------------------------------------------------------------ */
/* Data types and conversion                                                                  */

typedef enum {
    QF_F32 = 0, QF_F64, QF_F16, QF_BF16,
    QF_I64, QF_I32, QF_I16, QF_I8, QF_U8, QF_BOOL,
    QF_DTYPE_COUNT
} qf_dtype;

size_t qf_dtype_size(qf_dtype t);              /* bytes per element; 0 for an unknown dtype   */
const char *qf_dtype_name(qf_dtype t);         /* safetensors spelling: "F32", "BF16", ...    */
/* Parses a safetensors dtype string; QF_ERR_DTYPE if unknown. */
qf_status qf_dtype_parse(const char *name, qf_dtype *out);
/* Converts n elements of src (F64/F32/F16/BF16) to float32 (F64 rounds to nearest). */
qf_status qf_to_f32(qf_dtype src_type, const void *src, float *dst, size_t n);
/* Converts n float32 values to dst_type (F64/F32/F16/BF16), rounding to nearest even. */
qf_status qf_from_f32(qf_dtype dst_type, const float *src, void *dst, size_t n);

/* ------------------------------------------------------------------------------------------ */
/* Threads and instruction sets                                                               */

qf_status qf_set_num_threads(int n);           /* n >= 1; also sets the BLAS's thread count   */
int qf_get_num_threads(void);

typedef enum { QF_ISA_SCALAR = 0, QF_ISA_AVX2 = 1, QF_ISA_AVX512 = 2 } qf_isa;
/* Forces a kernel path; QF_ERR_UNSUPPORTED if this CPU lacks it. */
qf_status qf_set_isa(qf_isa isa);
qf_isa qf_get_isa(void);                       /* the path kernels use now                    */
const char *qf_isa_name(qf_isa isa);

/* ------------------------------------------------------------------------------------------ */
/* Counter-based RNG (Philox4x32-10)                                                          */

/* Fills out[0..3] with the four 32-bit words of Philox4x32-10 at (key = seed, counter = ctr).
 * Pure function of its inputs: dropout masks are reproducible from (seed, offset). */
void qf_philox4x32(uint64_t seed, uint64_t ctr_hi, uint64_t ctr_lo, uint32_t out[4]);
/* Uniform float in [0,1) for element `index` of a stream (seed, offset). */
float qf_philox_uniform(uint64_t seed, uint64_t offset, uint64_t index);

/* ------------------------------------------------------------------------------------------ */
/* Arena: a bump allocator for planned buffers (parameters, activations, workspaces)          */

typedef struct qf_arena qf_arena;
qf_status qf_arena_create(size_t capacity, qf_arena **out);
/* Returns a block aligned to `align` (power of two, <= 4096) or NULL when full (no message set:
 * callers size arenas by plan; use qf_arena_alloc_checked for a status). */
void *qf_arena_alloc(qf_arena *a, size_t bytes, size_t align);
qf_status qf_arena_alloc_checked(qf_arena *a, size_t bytes, size_t align, const char *what, void **out);
size_t qf_arena_used(const qf_arena *a);
size_t qf_arena_capacity(const qf_arena *a);
void qf_arena_reset(qf_arena *a);              /* frees every block at once                   */
void qf_arena_destroy(qf_arena *a);

/* ------------------------------------------------------------------------------------------ */
/* Files: safetensors, .npy, Hugging Face config.json                                         */

#define QF_MAX_DIMS 8

typedef struct {
    const char *name;        /* owned by the file handle                                      */
    qf_dtype dtype;
    int ndim;
    int64_t shape[QF_MAX_DIMS];
    const void *data;        /* points into the mapping; little-endian, unaligned possible    */
    size_t nbytes;
} qf_tensor_view;

typedef struct qf_safetensors qf_safetensors;

/* Maps and validates a whole safetensors file: 8-byte header length within bounds, JSON
 * well-formed, every dtype known, shape x dtype size = byte length, offsets inside the data
 * section, tensors neither overlapping nor leaving gaps. Errors name the file, tensor, rule. */
qf_status qf_st_open(const char *path, qf_safetensors **out);
/* Same rules on a buffer in memory (copied); `label` names it in messages. */
qf_status qf_st_open_memory(const void *buf, size_t len, const char *label, qf_safetensors **out);
void qf_st_close(qf_safetensors *f);
int qf_st_count(const qf_safetensors *f);
qf_status qf_st_get(const qf_safetensors *f, int index, qf_tensor_view *out);
/* QF_ERR_NOT_FOUND (message names the file and tensor) when absent. */
qf_status qf_st_find(const qf_safetensors *f, const char *name, qf_tensor_view *out);
/* Value of a __metadata__ key, or NULL. */
const char *qf_st_metadata(const qf_safetensors *f, const char *key);
/* Reads a tensor of any float dtype into float32 after checking its shape equals
 * shape[0..ndim) (QF_ERR_SHAPE naming file, tensor, expected and actual shape otherwise). */
qf_status qf_st_read_f32(const qf_safetensors *f, const char *name, int ndim,
                         const int64_t *shape, float *dst);

typedef struct {
    const char *name; qf_dtype dtype; int ndim; int64_t shape[QF_MAX_DIMS]; const void *data;
} qf_tensor_ref;

/* Writes tensors atomically: PATH.tmp.XXXXXX, fsync, rename over PATH. metadata is a NULL-ended
 * list of key, value strings (or NULL). Tensor names must be unique. */
qf_status qf_st_write(const char *path, const qf_tensor_ref *tensors, int n,
                      const char *const *metadata);

/* .npy (format 1.0-3.0, C order, little-endian f4/f8/f2/i8/i4/i2/i1/u1/b1). On success the
 * caller owns out->data and frees it with qf_npy_free. */
typedef struct {
    qf_dtype dtype; int ndim; int64_t shape[QF_MAX_DIMS]; void *data; size_t nbytes;
} qf_npy;
qf_status qf_npy_read(const char *path, qf_npy *out);
qf_status qf_npy_parse(const void *buf, size_t len, const char *label, qf_npy *out);
void qf_npy_free(qf_npy *a);
qf_status qf_npy_write(const char *path, qf_dtype dtype, int ndim, const int64_t *shape,
                       const void *data);

/* Hugging Face config.json (any JSON object). Keys are dotted paths: "text_config.hidden_size". */
typedef struct qf_config qf_config;
qf_status qf_config_load(const char *path, qf_config **out);
qf_status qf_config_parse(const char *json, size_t len, const char *label, qf_config **out);
void qf_config_free(qf_config *c);
int qf_config_has(const qf_config *c, const char *key);
/* QF_ERR_NOT_FOUND if absent, QF_ERR_FORMAT if of another type (message names file and key). */
qf_status qf_config_int(const qf_config *c, const char *key, int64_t *out);
qf_status qf_config_float(const qf_config *c, const char *key, double *out);
qf_status qf_config_bool(const qf_config *c, const char *key, int *out);
/* The string stays valid until qf_config_free. */
qf_status qf_config_string(const qf_config *c, const char *key, const char **out);
/* Convenience: absent key -> def; present but wrong type -> error. */
qf_status qf_config_int_or(const qf_config *c, const char *key, int64_t def, int64_t *out);
qf_status qf_config_float_or(const qf_config *c, const char *key, double def, double *out);

/* ------------------------------------------------------------------------------------------ */
/* Scaled dot-product attention (torch.nn.functional.scaled_dot_product_attention)            */

typedef enum { QF_MASK_NONE = 0, QF_MASK_BOOL, QF_MASK_FLOAT } qf_mask_kind;

/* An attention mask, broadcastable (numpy rules, right-aligned) to [B,Hq,L,S].
 * BOOL: uint8, nonzero = attend. FLOAT: float32, added to the scaled scores (-inf = blocked). */
typedef struct {
    qf_mask_kind kind;
    const void *data;        /* contiguous, of the shape below                                */
    int ndim;                /* 0..4                                                          */
    int64_t shape[4];
} qf_mask;

typedef struct {
    int64_t B, Hq, Hkv, L, S, D, Dv;  /* q [B,Hq,L,D]; k [B,Hkv,S,D]; v [B,Hkv,S,Dv]; out [B,Hq,L,Dv] */
    float scale;             /* NaN (the default) = 1/sqrt(D)                                 */
    int is_causal;           /* query i sees keys j <= i (top-left aligned when L != S)       */
    int enable_gqa;          /* Hq may be a multiple of Hkv; otherwise Hq must equal Hkv      */
    float dropout_p;         /* in [0,1); applied to the attention probabilities              */
    uint64_t seed, offset;   /* dropout stream: element (b,h,i,j) draws index ((b*Hq+h)*L+i)*S+j */
    int check_finite;        /* nonzero: reject NaN/Inf in q, k, v (and grad_out); read while the
                                kernel packs its inputs where it can, else one extra pass     */
    qf_mask mask;
} qf_sdpa_params;

/* Fills the shape fields; scale = NaN (default), Dv = D, enable_gqa = (Hq != Hkv), no mask, no
 * dropout, finite check on (which also rejects NaN/+Inf in a float mask). */
qf_sdpa_params qf_sdpa_defaults(int64_t B, int64_t Hq, int64_t Hkv, int64_t L, int64_t S, int64_t D);

/* Validates p and the mask's broadcast; the message names the offending field. */
qf_status qf_sdpa_check(const qf_sdpa_params *p);

/* Forward. On any error the contents of out, lse and weights are unspecified.
 * out [B,Hq,L,Dv] is required. lse [B,Hq,L] (optional) receives the log-sum-exp of each
 * row's scaled, masked scores, which qf_sdpa_backward needs. weights [B,Hq,L,S] (optional)
 * receives the attention probabilities (after dropout when dropout_p > 0, as torch returns them).
 * A row whose every key is masked yields out = 0, weights = 0 and lse = -inf (torch's math path
 * gives NaN there; zeros keep padded batches finite). */
qf_status qf_sdpa_forward(const qf_sdpa_params *p, const float *q, const float *k, const float *v,
                          float *out, float *lse, float *weights);

/* Backward of loss = sum(out * grad_out). out and lse come from qf_sdpa_forward with the same
 * params. Writes dq [B,Hq,L,D], dk [B,Hkv,S,D], dv [B,Hkv,S,Dv] (overwritten, not accumulated). */
qf_status qf_sdpa_backward(const qf_sdpa_params *p, const float *q, const float *k, const float *v,
                           const float *out, const float *lse, const float *grad_out,
                           float *dq, float *dk, float *dv);

/* ------------------------------------------------------------------------------------------ */
/* Multi-head attention (torch.nn.MultiheadAttention)                                         */

typedef struct qf_mha qf_mha;

typedef struct {
    int64_t embed_dim, num_heads, kdim, vdim; /* kdim/vdim 0 = embed_dim                       */
    int bias;                /* in_proj_bias and out_proj.bias present                        */
    int batch_first;         /* inputs [B,L,E] instead of [L,B,E]                             */
    float dropout;           /* attention dropout in training mode                            */
} qf_mha_config;

/* Loads a torch state_dict saved as safetensors (in_proj_weight or q/k/v_proj_weight,
 * in_proj_bias, out_proj.weight, out_proj.bias), any float dtype; checks every shape. */
qf_status qf_mha_load(const char *path, const qf_mha_config *cfg, qf_mha **out);
void qf_mha_free(qf_mha *m);

typedef struct {
    int64_t B, L, S;                /* batch, query length, key length                        */
    const uint8_t *key_padding_mask;/* [B,S], nonzero = ignore this key (optional)            */
    qf_mask attn_mask;              /* [L,S] or [B*H,L,S]; BOOL here means nonzero = NOT allowed,
                                       torch.nn.MultiheadAttention's convention; FLOAT is added */
    int is_causal;                  /* adds a causal mask (attn_mask may then be NONE)        */
    int need_weights;               /* fill weights                                           */
    int average_attn_weights;       /* weights [B,L,S] averaged over heads, else [B,H,L,S]    */
    int training;                   /* apply dropout                                          */
    uint64_t seed, offset;
} qf_mha_args;

/* query [L,B,E] (or [B,L,E] batch_first), key [S,B,kdim], value [S,B,vdim]; out like query. */
qf_status qf_mha_forward(qf_mha *m, const qf_mha_args *a, const float *query, const float *key,
                         const float *value, float *out, float *weights);

/* Backward of the last qf_mha_forward on m (it keeps what backward needs). Input gradients are
 * written (may be NULL to skip); parameter gradients are accumulated into qf_mha_grads(m). */
qf_status qf_mha_backward(qf_mha *m, const float *grad_out, float *grad_query, float *grad_key,
                          float *grad_value);

/* Parameter and gradient views, named as in torch's state_dict (every model uses this view;
 * shape[ndim..4) are 0; grad is NULL while the parameter's group is frozen). */
typedef struct {
    const char *name; float *data; float *grad; int ndim; int64_t shape[4];
} qf_param;
int qf_mha_num_params(const qf_mha *m);
qf_status qf_mha_param(qf_mha *m, int i, qf_param *out);
void qf_mha_zero_grad(qf_mha *m);

#include "qfuse_ops.h"
#include "qfuse_models.h"
#include "qfuse_text.h"
#include "qfuse_llm.h"
#include "qfuse_train.h"

#ifdef __cplusplus
}
#endif
#endif /* QFUSE_H */
