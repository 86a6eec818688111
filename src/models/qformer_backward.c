/* qformer_backward.c - backward of the Q-Former's last forward (qformer.c), llm.c style: walks
 * the layers in reverse over the activations the forward kept, one qf_*_backward per op.
 *
 * Loss = sum(out * grad_out). Input gradients (query_embeds, encoder_hidden_states, prefix K/V)
 * are written; parameter gradients are accumulated into m->grads unless the model is frozen
 * (then every d_weight/d_bias is NULL and only input gradients are computed).
 *
 * Invariants:
 *   - bwd is a grow-only planned block sized from the forward's shapes: a backward with the
 *     shapes of an earlier one allocates nothing.
 *   - Each attention block's input gradient is the residual path plus the projection paths;
 *     self-attention's q|k|v is one packed weight (qformer_internal.h), so one GEMM writes the
 *     summed projection paths and the residual is added. Every cross layer's k|v is one packed
 *     weight over the same encoder rows: the layers' k|v row gradients are collected in dkv
 *     and one GEMM after the layer loop writes grad_encoder (summed over the layers). The
 *     prefix gradients are added over the cross-attention layers.
 *   - An all-padding item (forward: uniform weights, see qformer.c) gets autograd's gradient of
 *     the uniform softmax, computed here, in place of SDPA's zeros for fully masked rows.
 *   - word_embeddings' padding row (pad_token_id) gets no gradient, as nn.Embedding(padding_idx). */
#include "qformer_internal.h"
#include <math.h>
#include <string.h>

typedef struct {
    float *dh, *dqo, *dto, *dcin, *daq, *dat, *da;
    float *dsum, *dmerged, *doh, *dqh, *dkh, *dvh, *dtok, *dI;
    float *dkv;              /* [B*S, ncross*2H]: gradient of m->enc_kv, filled layer by layer */
} bwd_bufs;

static size_t plan_backward(qf_qformer *m, float *base, bwd_bufs *w) {
    const size_t H = (size_t)m->cfg.hidden_size;
    const size_t I = (size_t)m->cfg.intermediate_size, B = (size_t)m->B;
    const size_t T = B * (size_t)(m->Lq + m->Lt), Tq = B * (size_t)m->Lq, Tt = B * (size_t)m->Lt;
    const size_t Te = B * (size_t)m->S, Tkv = B * (size_t)(m->P + m->S);
    const size_t kvmax = T > Tkv ? T : Tkv;
    size_t off = 0;
#define C(n) qf_qformer_carve(base, &off, (n))
    w->dh = C(T * H);
    w->dqo = C(Tq * H);
    w->dto = C(Tt * H);
    w->dcin = C(Tq * H);
    w->daq = C(Tq * H);
    w->dat = C(Tt * H);
    w->da = C(T * H);
    w->dsum = C(T * H);
    w->dmerged = C(T * H);
    w->doh = C(T * H);
    w->dqh = C(T * H);
    w->dkh = C(kvmax * H);
    w->dvh = C(kvmax * H);
    w->dtok = C(3 * T * H); /* packed q|k|v row gradients */
    w->dkv = C(Te * 2 * H * (size_t)m->ncross);
    w->dI = C((Tq > Tt ? Tq : Tt) * I);
#undef C
    return off;
}

static void add_to(float *dst, const float *src, size_t n) {
#pragma omp parallel for num_threads(qf_threads()) if (n > 65536)
    for (size_t i = 0; i < n; i++) dst[i] += src[i];
}

/* Autograd's gradient for one dead item (uniform weights 1/K over K keys, scale 1/sqrt(hd)):
 * dv_j = sum_i do_i / K; ds_ij = (do_i.v_j - mean_j' do_i.v_j') / K; dq = scale ds k; dk = scale ds^T q. */
static void dead_item_backward(const float *q, const float *k, const float *v, const float *dout, float *dq, float *dk,
                               float *dv, int64_t L, int64_t K, int64_t hd, float scale) {
    memset(dq, 0, (size_t)(L * hd) * sizeof(float));
    memset(dk, 0, (size_t)(K * hd) * sizeof(float));
    memset(dv, 0, (size_t)(K * hd) * sizeof(float));
    const double invK = 1.0 / (double)K;
    for (int64_t i = 0; i < L; i++) {
        const float *g = dout + i * hd;
        double mean = 0.0;
        for (int64_t j = 0; j < K; j++) {
            double dp = 0.0;
            for (int64_t d = 0; d < hd; d++) dp += (double)g[d] * v[j * hd + d];
            mean += dp;
        }
        mean *= invK;
        for (int64_t j = 0; j < K; j++) {
            double dp = 0.0;
            for (int64_t d = 0; d < hd; d++) dp += (double)g[d] * v[j * hd + d];
            const float ds = (float)((dp - mean) * invK) * scale;
            for (int64_t d = 0; d < hd; d++) {
                dq[i * hd + d] += ds * k[j * hd + d];
                dk[j * hd + d] += ds * q[i * hd + d];
                dv[j * hd + d] += (float)(g[d] * invK);
            }
        }
    }
}

/* Backward of attention_block (qformer.c): d_out [B*Lx, H] -> d_x [B*Lx, H] (written). Self:
 * the packed q|k|v GEMM gives d_x's three projection paths in one. Cross: the gradient of the
 * block's projected [k | v] rows is written into dkv (row stride dkv_ld; NULL skips) for the
 * one encoder GEMM after all layers, and prefix gradients are added into gpk/gpv (NULL skips). */
static qf_status attn_backward(qf_qformer *m, bwd_bufs *w, const qformer_attn *p, const attn_acts *t, const float *x,
                               int64_t Lx, int64_t kv_len, float *dkv, int64_t dkv_ld, int cross,
                               const float *d_out, float *d_x, float *gpk, float *gpv) {
    const char *fn = "qf_qformer_backward";
    const int64_t B = m->B, H = m->cfg.hidden_size, nh = m->cfg.num_attention_heads, hd = m->hd;
    const int64_t P = cross ? m->P : 0, tot = P + kv_len, T = B * Lx;
    QF_PROF(QFP_BWD_LN, QF_TRY(qf_layernorm_backward(w->dsum, qformer_grad(m, p->ln_w), qformer_grad(m, p->ln_b),
                                                     d_out, t->sum, p->ln_w, t->mean, t->rstd, T, H)));
    QF_PROF(QFP_BWD_LINEAR, QF_TRY(qf_linear_backward(w->dmerged, qformer_grad(m, p->wo), qformer_grad(m, p->bo),
                                                      w->dsum, t->merged, p->wo, T, H, H)));
    QF_PROF(QFP_BWD_HEADS, qf_qformer_split_heads(w->doh, w->dmerged, H, B, nh, Lx, 0, Lx, hd));
    qf_sdpa_params sp = qf_qformer_sdpa_params(m, cross);
    qf_status s;
    QF_PROF(QFP_BWD_SDPA,
            s = qf_sdpa_backward(&sp, t->qh, t->kh, t->vh, t->oh, t->lse, w->doh, w->dqh, w->dkh, w->dvh));
    if (s != QF_OK) return qf_fail_prefix(s, "%s (%s-attention)", fn, cross ? "cross" : "self");
    if (cross && m->any_dead) {
        const float scale = 1.0f / sqrtf((float)hd);
        for (int64_t b = 0; b < B; b++) {
            if (!m->dead[b]) continue;
            for (int64_t h = 0; h < nh; h++) {
                const int64_t qo = (b * nh + h) * Lx * hd, ko = (b * nh + h) * tot * hd;
                dead_item_backward(t->qh + qo, t->kh + ko, t->vh + ko, w->doh + qo, w->dqh + qo, w->dkh + ko,
                                   w->dvh + ko, Lx, tot, hd, scale);
            }
        }
    }
    if (!cross) {
        /* [q | k | v] = x Wqkv^T + bqkv with the packed [3H, H] weight: one GEMM for the weight
         * gradient and one for d_x, which sums the three paths itself */
        QF_PROF(QFP_BWD_HEADS, qf_qformer_merge_heads(w->dtok, 3 * H, w->dqh, B, nh, Lx, 0, Lx, hd, 0));
        QF_PROF(QFP_BWD_HEADS, qf_qformer_merge_heads(w->dtok + H, 3 * H, w->dkh, B, nh, tot, 0, kv_len, hd, 0));
        QF_PROF(QFP_BWD_HEADS, qf_qformer_merge_heads(w->dtok + 2 * H, 3 * H, w->dvh, B, nh, tot, 0, kv_len, hd, 0));
        QF_PROF(QFP_BWD_LINEAR, QF_TRY(qf_linear_backward(d_x, qformer_grad(m, p->wq), qformer_grad(m, p->bq),
                                                          w->dtok, x, p->wq, T, H, 3 * H)));
        QF_PROF(QFP_BWD_ADD, add_to(d_x, w->dsum, (size_t)(T * H))); /* residual */
        return QF_OK;
    }
    /* q = x Wq^T + bq */
    QF_PROF(QFP_BWD_HEADS, qf_qformer_merge_heads(w->dtok, H, w->dqh, B, nh, Lx, 0, Lx, hd, 0));
    QF_PROF(QFP_BWD_LINEAR, QF_TRY(qf_linear_backward(d_x, qformer_grad(m, p->wq), qformer_grad(m, p->bq), w->dtok, x,
                                                      p->wq, T, H, H)));
    QF_PROF(QFP_BWD_ADD, add_to(d_x, w->dsum, (size_t)(T * H))); /* residual */
    /* the layer's own keys are rows P.. of the heads; the prefix gradients are rows 0..P */
    if (P && gpk) QF_PROF(QFP_BWD_HEADS, qf_qformer_merge_heads(gpk, H, w->dkh, B, nh, tot, 0, P, hd, 1));
    if (P && gpv) QF_PROF(QFP_BWD_HEADS, qf_qformer_merge_heads(gpv, H, w->dvh, B, nh, tot, 0, P, hd, 1));
    if (dkv) {
        QF_PROF(QFP_BWD_HEADS, qf_qformer_merge_heads(dkv, dkv_ld, w->dkh, B, nh, tot, P, kv_len, hd, 0));
        QF_PROF(QFP_BWD_HEADS, qf_qformer_merge_heads(dkv + H, dkv_ld, w->dvh, B, nh, tot, P, kv_len, hd, 0));
    }
    return QF_OK;
}

/* Backward of ffn_block: d_out [rows, H] -> d_x [rows, H] (written). */
static qf_status ffn_backward(qf_qformer *m, bwd_bufs *w, const qformer_ffn *p, const ffn_acts *f, const float *x,
                              int64_t rows, const float *d_out, float *d_x) {
    const int64_t H = m->cfg.hidden_size, I = m->cfg.intermediate_size;
    QF_PROF(QFP_BWD_LN, QF_TRY(qf_layernorm_backward(w->dsum, qformer_grad(m, p->ln_w), qformer_grad(m, p->ln_b),
                                                     d_out, f->sum, p->ln_w, f->mean, f->rstd, rows, H)));
    QF_PROF(QFP_BWD_LINEAR, QF_TRY(qf_linear_backward(w->dI, qformer_grad(m, p->w_out), qformer_grad(m, p->b_out),
                                                      w->dsum, f->act, p->w_out, rows, I, H)));
    QF_PROF(QFP_BWD_GELU, QF_TRY(qf_gelu_backward(w->dI, w->dI, f->pre, rows * I, m->cfg.hidden_act)));
    QF_PROF(QFP_BWD_LINEAR, QF_TRY(qf_linear_backward(d_x, qformer_grad(m, p->w_in), qformer_grad(m, p->b_in), w->dI,
                                                      x, p->w_in, rows, H, I)));
    QF_PROF(QFP_BWD_ADD, add_to(d_x, w->dsum, (size_t)(rows * H)));
    return QF_OK;
}

qf_status qf_qformer_backward(qf_qformer *m, const float *grad_out, float *grad_query_embeds, float *grad_encoder,
                              float *grad_prefix_k, float *grad_prefix_v) {
    const char *fn = "qf_qformer_backward";
    if (!m) return qf_fail(QF_ERR_ARG, "%s: m is NULL", fn);
    if (!grad_out) return qf_fail(QF_ERR_ARG, "%s: grad_out is NULL", fn);
    if (m->on_device)
        return qf_fail(QF_ERR_UNSUPPORTED, "%s: backward runs on the CPU only: this model runs on %s "
                                           "(qf_qformer_to_device(m, \"cpu\", QF_F32) first)", fn, m->be->name);
    if (!m->have_fwd)
        return qf_fail(QF_ERR_ARG, "%s: no successful qf_qformer_forward on this model to differentiate", fn);
    const int64_t B = m->B, Lq = m->Lq, Lt = m->Lt, N = Lq + Lt, S = m->S, P = m->P;
    const int64_t H = m->cfg.hidden_size, E = m->cfg.encoder_hidden_size;
    const int64_t T = B * N, Tq = B * Lq, Tt = B * Lt;

    bwd_bufs w;
    size_t need = plan_backward(m, NULL, &w);
    QF_TRY(qf_qformer_grow(&m->bwd, &m->bwd_cap, need, fn));
    plan_backward(m, m->bwd, &w);

    if (P && grad_prefix_k) memset(grad_prefix_k, 0, (size_t)(B * P * H) * sizeof(float));
    if (P && grad_prefix_v) memset(grad_prefix_v, 0, (size_t)(B * P * H) * sizeof(float));

    const int want_kv = grad_encoder || !m->frozen; /* the encoder-side GEMMs are needed */
    memcpy(w.dh, grad_out, (size_t)(T * H) * sizeof(float));
    for (int64_t i = m->cfg.num_hidden_layers - 1; i >= 0; i--) {
        const qformer_layer *l = &m->layers[i];
        const layer_acts *t = &m->acts[i];
        const float *x_l = i ? m->acts[i - 1].out : m->emb;
        const float *dq = w.dh;
        if (Lt) {
            qf_qformer_gather_rows(w.dqo, w.dh, B, N, 0, Lq, H);
            qf_qformer_gather_rows(w.dto, w.dh, B, N, Lq, Lt, H);
            dq = w.dqo;
        }
        const float *cin = l->has_cross ? t->cross.out : t->aq;
        QF_TRY(ffn_backward(m, &w, &l->fq, &t->fq, cin, Tq, dq, w.dcin));
        const float *daq = w.dcin;
        if (l->has_cross) {
            const int64_t c = i / m->cfg.cross_attention_frequency, kv_ld = 2 * H * m->ncross;
            QF_TRY(attn_backward(m, &w, &l->cross, &t->cross, t->aq, Lq, S, want_kv ? w.dkv + c * 2 * H : NULL, kv_ld,
                                 1, w.dcin, w.daq, grad_prefix_k, grad_prefix_v));
            daq = w.daq;
        }
        const float *da = daq;
        if (Lt) {
            QF_TRY(ffn_backward(m, &w, &l->ft, &t->ft, t->at, Tt, w.dto, w.dat));
            qf_qformer_scatter_rows(w.da, daq, B, N, 0, Lq, H);
            qf_qformer_scatter_rows(w.da, w.dat, B, N, Lq, Lt, H);
            da = w.da;
        }
        QF_TRY(attn_backward(m, &w, &l->self, &t->self, x_l, N, N, NULL, 0, 0, da, w.dh, NULL, NULL));
    }
    /* every cross layer's [k | v] = enc W^T + b (one packed weight, plan_params): one GEMM for
     * the weight gradients and one for the encoder gradient, which sums the layers itself */
    if (want_kv)
        QF_PROF(QFP_BWD_LINEAR,
                QF_TRY(qf_linear_backward(grad_encoder, qformer_grad(m, m->enc_kv_w), qformer_grad(m, m->enc_kv_b),
                                          w.dkv, m->enc, m->enc_kv_w, B * S, E, 2 * H * m->ncross)));
    /* embeddings: emb = LN(x_in), x_in = [query_embeds ; word(ids) + pos] */
    float *dx = w.da; /* [T, H], free now */
    QF_PROF(QFP_BWD_LN, QF_TRY(qf_layernorm_backward(dx, qformer_grad(m, m->ln_w), qformer_grad(m, m->ln_b), w.dh,
                                                     m->x_in, m->ln_w, m->emb_mean, m->emb_rstd, T, H)));
    if (grad_query_embeds) qf_qformer_gather_rows(grad_query_embeds, dx, B, N, 0, Lq, H);
    if (Lt && !m->frozen) {
        float *dt = w.dto; /* [Tt, H] */
        qf_qformer_gather_rows(dt, dx, B, N, Lq, Lt, H);
        float *gpos = qformer_grad(m, m->pos_emb);
        for (int64_t b = 0; b < B; b++) add_to(gpos, dt + b * Lt * H, (size_t)(Lt * H));
        if (m->pad_token_id >= 0)
            for (int64_t r = 0; r < Tt; r++)
                if (m->ids[r] == m->pad_token_id) memset(dt + r * H, 0, (size_t)H * sizeof(float));
        QF_TRY(qf_embedding_backward(qformer_grad(m, m->word_emb), dt, m->ids, Tt, m->cfg.vocab_size, H));
    }
    return QF_OK;
}
