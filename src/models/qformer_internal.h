/* qformer_internal.h - the Q-Former's private state, shared by qformer.c (load, forward, maps)
 * and qformer_backward.c (backward). Not installed; the contract is include/qfuse_models.h.
 *
 * Layouts: tokens are batch-first rows [B, N, H] with N = Lq + Lt (queries first); heads are
 * [B, nh, len, hd]; cross-attention keys are [prefix (P) ; encoder (S)] per item. When Lt == 0,
 * the query-row views (aq, layer out) alias the full-token buffers, so nothing is copied. */
#ifndef QF_QFORMER_INTERNAL_H
#define QF_QFORMER_INTERNAL_H

#include "internal.h"
#include "backend/backend.h"
#include "models_internal.h"

typedef struct {
    char *name;              /* transformers name (owned)                                     */
    char *file_name;         /* the name in the checkpoint, without its prefix: LAVIS names
                              * for a LAVIS file, else == name (owned; NULL until loaded)     */
    int ndim;
    int64_t shape[2];
    size_t off, n;           /* in floats, into params and grads                              */
} qformer_ptab;

typedef struct {             /* one attention block: MultiHeadAttention + SelfOutput          */
    /* packed (plan_params): wv == wk + H*in, bv == bk + H always; self-attention also
     * wk == wq + H*H, bk == bq + H (wq is the [3H, H] q|k|v matrix); cross-attention's wk|wv
     * are rows of the model's enc_kv_w (every cross layer's k|v, one [ncross*2H, E] matrix) */
    const float *wq, *bq, *wk, *bk, *wv, *bv, *wo, *bo, *ln_w, *ln_b;
} qformer_attn;

typedef struct {             /* intermediate(_query) + output(_query)                        */
    const float *w_in, *b_in, *w_out, *b_out, *ln_w, *ln_b;
} qformer_ffn;

typedef struct {
    int has_cross;
    qformer_attn self, cross;
    qformer_ffn fq, ft;      /* query rows, text rows (ft only when has_text)                 */
} qformer_layer;

typedef struct {             /* activations of one attention block                            */
    /* qh, kh, vh, oh: heads [B, nh, len, hd]; but where the block ran strided
     * (qf_qformer_strided) qh holds the packed projection rows the SDPA read in place (self:
     * [T, 3H] q|k|v, cross: [Tq, H] q; biases added), kh, vh, oh are unused (NULL for self) and
     * the output is only in merged */
    float *qh, *kh, *vh, *oh, *lse, *merged, *sum, *mean, *rstd, *out;
    /* bf16 activations (qf_qformer_act16), else unused: proj16 the packed projection rows in
     * place of qh, merged16 the attention output in place of merged, out16 = bf16(out) */
    uint16_t *proj16, *merged16, *out16;
} attn_acts;

typedef struct {
    float *pre, *act, *sum, *mean, *rstd, *out;
    uint16_t *act16, *out16; /* bf16 activations: the up-projection then its GELU in place of pre
                              * and act, bf16(out) */
} ffn_acts;

typedef struct {
    attn_acts self, cross;   /* cross.* NULL on layers without cross-attention               */
    float *aq, *at;          /* query / text rows of self.out (aq == self.out when Lt == 0)   */
    ffn_acts fq, ft;
    float *out;              /* the layer's output [B, N, H] (== fq.out when Lt == 0)         */
} layer_acts;

struct qf_qformer {
    qf_qformer_config cfg;
    int64_t hd, pad_token_id;       /* pad_token_id -1: no padding row                       */
    int lavis, ln_embeddings_name;  /* file naming scheme                                    */
    int np, np_cap;
    qformer_ptab *ptab;
    float *params, *grads;
    size_t params_total;
    int frozen;
    const float *ln_w, *ln_b, *word_emb, *pos_emb;
    qformer_layer *layers;
    int64_t ncross;                 /* cross-attention layers                                */
    const float *enc_kv_w, *enc_kv_b; /* [ncross*2H, E], [ncross*2H]: every cross layer's k|v  */

    /* Where the forward runs (qf_qformer_to_device). be is the backend whose memory holds
     * run_params (the float32 block every view above points into: params itself on the CPU, a
     * device copy on the GPU), fwd and mir. params_bf16: a bfloat16 device copy of the whole
     * block, read for the GEMM weights when the model was placed with bf16 weights (w_bf16 =
     * params_bf16 + (w - run_params)). On the GPU the forward after its input copies is replayed
     * as one graph, captured for the shape key of the last forward (graph_key). */
    const qf_backend *be;
    int on_device;
    float *run_params;
    uint16_t *params_bf16;
    qf_model_graph graph;

    /* forward planned block (fwd: floats, mir: the small integer inputs and the NaN screen's
     * verdicts, built on the host in hmir and uploaded in one copy when on the GPU) */
    float *fwd;
    size_t fwd_cap;
    void *mir, *hmir;
    size_t mir_cap, mir_bytes;
    int64_t *screen;                /* [4] first non-finite index of qin, enc, pk, pv         */
    float *qin;                     /* [B, Lq, H] query_embeds as given (x_in when Lt == 0)   */
    float *txt;                     /* [B*Lt, H] word + position embeddings of the text       */
    float *x_in, *enc, *pk, *pv, *emb_mean, *emb_rstd, *emb, *tmp;
    float *enc_kv;                  /* [B*S, ncross*2H]: enc projected by enc_kv_w            */
    uint16_t *emb16, *enc_kv16;     /* bf16 activations: bf16(emb); enc_kv in place of enc_kv  */
    uint16_t *enc16;                /* bf16(encoder_hidden_states) [B*S, E], screened as it is
                                     * written (stage_x16) by qf_qformer_forward            */
    int enc16_staged;               /* 1: the enc_kv GEMM reads enc16 (set per forward; 0 for
                                     * callers that write enc themselves, qf_qformer_stage)  */
    const float *enc_src;           /* where the float32 encoder input sits (screen message)   */
    int32_t *ids;
    uint8_t *self_mask;             /* [B, N] 1 = attend (when has_text_mask)                */
    uint8_t *cross_mask;            /* [B, P+S] 1 = attend (when has_enc_mask)               */
    uint8_t *dead;                  /* [B] 1 = every encoder key is padding and P == 0       */
    layer_acts *acts;
    int64_t B, Lq, Lt, S, P;
    int have_fwd, has_enc_mask, has_text_mask, any_dead;

    /* backward planned block (on m->be: device memory on the GPU, freed with the forward's) */
    float *bwd;
    size_t bwd_cap;
    /* A GPU model's parameter gradients: a device block parallel to run_params, allocated at
     * the first backward on the device (initialised from grads) and accumulated there.
     * grads_on_device = 1: dgrads is newer than grads (after a GPU backward or zero_grad);
     * qf_qformer_param / qf_qformer_find_param (what shows grads to callers) and moving the
     * model back to the CPU download it first (qf_qformer_sync_grads), so a training loop that
     * accumulates several backwards or zeroes between them copies nothing per step. */
    float *dgrads;
    int grads_on_device;
};

/* 1 when the attention block ran its strided form (qformer.c: heads read in place from the
 * packed projection rows, no split/merge): on a backend with strided SDPA, except for
 * cross-attention with a prefix or an all-padding item. */
static inline int qf_qformer_strided(const qf_qformer *m, int cross) {
    return m->be->sdpa_strided && !(cross && (m->P || m->any_dead));
}

/* 1 when the bf16 buffers are planned: bf16 weights on a backend with the bf16 activation entries
 * (backend.h) and no text rows (their FFN inputs are gathered float32 copies). */
static inline int qf_qformer_plan16(const qf_qformer *m) {
    return m->params_bf16 && m->be->layernorm_forward_x16 && m->be->gelu_forward_x16 && m->be->sdpa_forward_x16 &&
           !m->Lt;
}

/* 1 when the forward keeps the inputs of its GEMMs in bf16, each written by the op producing it
 * (layer norms, GELU, attention, the q|k|v GEMMs): the bf16 buffers are planned and every
 * attention block runs strided. Inference only: backward refuses bf16 weights. */
static inline int qf_qformer_act16(const qf_qformer *m) {
    return qf_qformer_plan16(m) && qf_qformer_strided(m, 0) && (m->ncross == 0 || qf_qformer_strided(m, 1));
}

/* The forward in steps, for a model that feeds the Q-Former from its own work on the same
 * backend (prefusion.c on the GPU): qf_qformer_stage checks a (whose float pointers are
 * ignored), plans for its shapes and places the masks and text ids (host arrays); the caller
 * then writes m->qin [B,Lq,H] and m->enc [B,S,E] (m->pk, m->pv [B,P,H] when P) on m->be and
 * calls qf_qformer_run, which only queues backend calls (capturable in the caller's graph) and
 * leaves the output [B, Lq+Lt, H] at qf_qformer_result(m). The key of the calls run_layers
 * makes is qf_qformer_key (6 values). */
qf_status qf_qformer_stage(qf_qformer *m, const qf_qformer_args *a, const char *fn);
qf_status qf_qformer_run(qf_qformer *m);
const float *qf_qformer_result(const qf_qformer *m);
void qf_qformer_key(const qf_qformer *m, int64_t key[6]);

/* grads = dgrads when the device copy is newer (one download); QF_OK otherwise. */
qf_status qf_qformer_sync_grads(qf_qformer *m);

/* gradient view of a parameter view p (NULL when frozen) */
static inline float *qformer_grad(const qf_qformer *m, const float *p) {
    return m->frozen ? NULL : (m->on_device ? m->dgrads : m->grads) + (p - m->run_params);
}

float *qf_qformer_carve(float *base, size_t *off, size_t n);
/* Copies on m->be, either side host or device memory: bytes from src to dst; rows [r0, r0+len)
 * of each item of src [B, tot, C] -> dst [B, len, C] (gather) and back (scatter). */
qf_status qf_qformer_copy(const qf_qformer *m, void *dst, const void *src, size_t bytes);
qf_status qf_qformer_rows_gather(const qf_qformer *m, float *dst, const float *src, int64_t tot, int64_t r0,
                                 int64_t len, int64_t C);
qf_status qf_qformer_rows_scatter(const qf_qformer *m, float *dst, const float *src, int64_t tot, int64_t r0,
                                  int64_t len, int64_t C);
qf_sdpa_params qf_qformer_sdpa_params(const qf_qformer *m, int cross);

/* ---- optional op profile (bench_qformer --profile) ----
 * Wall-clock seconds per op kind, summed over qf_qformer_forward / qf_qformer_backward calls
 * while enabled. Process-global and not thread-safe: a measuring aid for one model driven from
 * one thread; off by default, where it costs one predictable branch per op. */
enum {
    QFP_ENC_KV, QFP_QKV, QFP_HEADS, QFP_SDPA, QFP_OUT_RES, QFP_LN, QFP_FFN_UP, QFP_GELU, QFP_FFN_DOWN_RES,
    QFP_INPUT, QFP_BWD_LINEAR, QFP_BWD_SDPA, QFP_BWD_LN, QFP_BWD_GELU, QFP_BWD_HEADS, QFP_BWD_ADD, QFP_N
};
extern int qf_qformer_prof_on;
extern double qf_qformer_prof_s[QFP_N];
double qf_qformer_prof_now(void);
#define QF_PROF(kind, stmt)                                                                         \
    do {                                                                                            \
        const double qfp_t0_ = qf_qformer_prof_on ? qf_qformer_prof_now() : 0.0;                    \
        stmt;                                                                                       \
        if (qf_qformer_prof_on) qf_qformer_prof_s[kind] += qf_qformer_prof_now() - qfp_t0_;         \
    } while (0)
/* Turns the profile on (1) or off (0); either resets the sums. */
void qf_qformer_profile_enable(int on);
/* Copies up to cap sums (seconds) and their names; returns QFP_N. */
int qf_qformer_profile_read(double *seconds, const char **names, int cap);

#endif
