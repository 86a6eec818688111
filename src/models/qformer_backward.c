/* qformer_backward.c - backward of the Q-Former's last forward (qformer.c), llm.c style: walks
 * the layers in reverse over the activations the forward kept, one backward op per forward op,
 * every op through the model's backend (m->be), so a GPU model differentiates on the GPU.
 *
 * Loss = sum(out * grad_out). Input gradients (query_embeds, encoder_hidden_states, prefix K/V)
 * are written; parameter gradients are accumulated into the model's gradient block unless the
 * model is frozen (then every d_weight/d_bias is NULL and only input gradients are computed).
 *
 * Invariants:
 *   - bwd is a grow-only planned block on m->be sized from the forward's shapes: a backward
 *     with the shapes of an earlier one allocates nothing.
 *   - Each attention block's input gradient is the residual path plus the projection paths;
 *     self-attention's q|k|v is one packed weight (qformer_internal.h), so one GEMM writes the
 *     summed projection paths and the residual is added. Every cross layer's k|v is one packed
 *     weight over the same encoder rows: the layers' k|v row gradients are collected in dkv
 *     and one GEMM after the layer loop writes grad_encoder (summed over the layers). The
 *     prefix gradients are added over the cross-attention layers.
 *   - A block whose forward ran strided (GPU: no heads kept) has its heads split here from the
 *     packed projection rows it kept (attn_acts.qh, or the encoder's k|v rows) and its output
 *     heads from merged, into bwd; SDPA's backward then runs on contiguous heads as on the CPU.
 *   - An all-padding item (forward: uniform weights, see qformer.c) gets autograd's gradient of
 *     the uniform softmax (be->dead_rows_backward) in place of SDPA's zeros for fully masked rows.
 *   - word_embeddings' padding row (pad_token_id) gets no gradient, as nn.Embedding(padding_idx).
 *   - GPU model: parameter gradients accumulate in m->dgrads (device), downloaded into m->grads
 *     only when a caller looks at them (qf_qformer_sync_grads); grad_out and the input gradients may be host or device pointers
 *     (staged in bwd, copied with be->copy2d); the call returns after the GPU has finished.
 *     bf16 weights are refused (the backward products are float32 only). */
#include "qformer_internal.h"
#include <math.h>
#include <string.h>

typedef struct {
    float *dh, *dqo, *dto, *dcin, *daq, *dat, *da;
    float *dsum, *dmerged, *doh, *dqh, *dkh, *dvh, *dtok, *dI;
    float *dkv;              /* [B*S, ncross*2H]: gradient of m->enc_kv, filled layer by layer */
    float *qh, *kh, *vh, *oh; /* heads of a strided block (strided backends only)            */
    float *genc, *gpk, *gpv; /* input gradients staged on the device (GPU model only)          */
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
    w->qh = w->kh = w->vh = w->oh = w->genc = w->gpk = w->gpv = NULL;
    if (m->be->sdpa_strided) {
        w->qh = C(T * H);
        w->kh = C(kvmax * H);
        w->vh = C(kvmax * H);
        w->oh = C(T * H);
    }
    if (m->on_device) {
        w->genc = C(Te * (size_t)m->cfg.encoder_hidden_size);
        w->gpk = C(B * (size_t)m->P * H);
        w->gpv = C(B * (size_t)m->P * H);
    }
#undef C
    return off;
}

static qf_status copy_floats(const qf_qformer *m, float *dst, const float *src, int64_t n) {
    return qf_qformer_copy(m, dst, src, (size_t)n * sizeof(float));
}

/* Backward of attention_block (qformer.c): d_out [B*Lx, H] -> d_x [B*Lx, H] (written). Self:
 * the packed q|k|v GEMM gives d_x's three projection paths in one. Cross: kv (row stride kv_ld)
 * is the block's projected encoder [k | v] rows as the forward read them; the gradient of those
 * rows is written into dkv (same stride; NULL skips) for the one encoder GEMM after all layers,
 * and prefix gradients are added into gpk/gpv (NULL skips). */
static qf_status attn_backward(qf_qformer *m, bwd_bufs *w, const qformer_attn *p, const attn_acts *t, const float *x,
                               int64_t Lx, const float *kv, int64_t kv_len, int64_t kv_ld, float *dkv, int cross,
                               const float *d_out, float *d_x, float *gpk, float *gpv) {
    const char *fn = "qf_qformer_backward";
    const qf_backend *be = m->be;
    const int64_t B = m->B, H = m->cfg.hidden_size, nh = m->cfg.num_attention_heads, hd = m->hd;
    const int64_t P = cross ? m->P : 0, tot = P + kv_len, T = B * Lx;
    QF_PROF(QFP_BWD_LN, QF_TRY(be->layernorm_backward(w->dsum, qformer_grad(m, p->ln_w), qformer_grad(m, p->ln_b),
                                                      d_out, t->sum, p->ln_w, t->mean, t->rstd, T, H)));
    QF_PROF(QFP_BWD_LINEAR, QF_TRY(be->linear_backward(w->dmerged, qformer_grad(m, p->wo), qformer_grad(m, p->bo),
                                                       w->dsum, t->merged, p->wo, T, H, H)));
    QF_PROF(QFP_BWD_HEADS, QF_TRY(be->split_heads(w->doh, w->dmerged, H, NULL, B, nh, Lx, 0, Lx, hd)));
    const float *qh = t->qh, *kh = t->kh, *vh = t->vh, *oh = t->oh;
    if (qf_qformer_strided(m, cross)) { /* no prefix here: tot == kv_len */
        const float *kp = cross ? kv : t->qh + H, *vp = cross ? kv + H : t->qh + 2 * H;
        const int64_t qld = cross ? H : 3 * H, kld = cross ? kv_ld : 3 * H;
        QF_PROF(QFP_BWD_HEADS, {
            QF_TRY(be->split_heads(w->qh, t->qh, qld, NULL, B, nh, Lx, 0, Lx, hd));
            QF_TRY(be->split_heads(w->kh, kp, kld, NULL, B, nh, tot, 0, kv_len, hd));
            QF_TRY(be->split_heads(w->vh, vp, kld, NULL, B, nh, tot, 0, kv_len, hd));
            QF_TRY(be->split_heads(w->oh, t->merged, H, NULL, B, nh, Lx, 0, Lx, hd));
        });
        qh = w->qh, kh = w->kh, vh = w->vh, oh = w->oh;
    }
    qf_sdpa_params sp = qf_qformer_sdpa_params(m, cross);
    if (m->on_device) sp.check_finite = 0; /* a screen would wait for the GPU at every block */
    qf_status s;
    QF_PROF(QFP_BWD_SDPA, s = qf_sdpa_backward(&sp, qh, kh, vh, oh, t->lse, w->doh, w->dqh, w->dkh, w->dvh));
    if (s != QF_OK) return qf_fail_prefix(s, "%s (%s-attention)", fn, cross ? "cross" : "self");
    if (cross && m->any_dead)
        QF_TRY(be->dead_rows_backward(w->dqh, w->dkh, w->dvh, qh, kh, vh, w->doh, m->dead, B, nh, Lx, tot, hd,
                                      1.0f / sqrtf((float)hd)));
    if (!cross) {
        /* [q | k | v] = x Wqkv^T + bqkv with the packed [3H, H] weight: one GEMM for the weight
         * gradient and one for d_x, which sums the three paths itself */
        QF_PROF(QFP_BWD_HEADS, {
            QF_TRY(be->merge_heads(w->dtok, 3 * H, w->dqh, B, nh, Lx, 0, Lx, hd, 0));
            QF_TRY(be->merge_heads(w->dtok + H, 3 * H, w->dkh, B, nh, tot, 0, kv_len, hd, 0));
            QF_TRY(be->merge_heads(w->dtok + 2 * H, 3 * H, w->dvh, B, nh, tot, 0, kv_len, hd, 0));
        });
        QF_PROF(QFP_BWD_LINEAR, QF_TRY(be->linear_backward(d_x, qformer_grad(m, p->wq), qformer_grad(m, p->bq),
                                                           w->dtok, x, p->wq, T, H, 3 * H)));
        QF_PROF(QFP_BWD_ADD, QF_TRY(be->add(d_x, d_x, w->dsum, T * H))); /* residual */
        return QF_OK;
    }
    /* q = x Wq^T + bq */
    QF_PROF(QFP_BWD_HEADS, QF_TRY(be->merge_heads(w->dtok, H, w->dqh, B, nh, Lx, 0, Lx, hd, 0)));
    QF_PROF(QFP_BWD_LINEAR, QF_TRY(be->linear_backward(d_x, qformer_grad(m, p->wq), qformer_grad(m, p->bq), w->dtok,
                                                       x, p->wq, T, H, H)));
    QF_PROF(QFP_BWD_ADD, QF_TRY(be->add(d_x, d_x, w->dsum, T * H))); /* residual */
    /* the layer's own keys are rows P.. of the heads; the prefix gradients are rows 0..P */
    if (P && gpk) QF_PROF(QFP_BWD_HEADS, QF_TRY(be->merge_heads(gpk, H, w->dkh, B, nh, tot, 0, P, hd, 1)));
    if (P && gpv) QF_PROF(QFP_BWD_HEADS, QF_TRY(be->merge_heads(gpv, H, w->dvh, B, nh, tot, 0, P, hd, 1)));
    if (dkv) {
        QF_PROF(QFP_BWD_HEADS, QF_TRY(be->merge_heads(dkv, kv_ld, w->dkh, B, nh, tot, P, kv_len, hd, 0)));
        QF_PROF(QFP_BWD_HEADS, QF_TRY(be->merge_heads(dkv + H, kv_ld, w->dvh, B, nh, tot, P, kv_len, hd, 0)));
    }
    return QF_OK;
}

/* Backward of ffn_block: d_out [rows, H] -> d_x [rows, H] (written). */
static qf_status ffn_backward(qf_qformer *m, bwd_bufs *w, const qformer_ffn *p, const ffn_acts *f, const float *x,
                              int64_t rows, const float *d_out, float *d_x) {
    const qf_backend *be = m->be;
    const int64_t H = m->cfg.hidden_size, I = m->cfg.intermediate_size;
    QF_PROF(QFP_BWD_LN, QF_TRY(be->layernorm_backward(w->dsum, qformer_grad(m, p->ln_w), qformer_grad(m, p->ln_b),
                                                      d_out, f->sum, p->ln_w, f->mean, f->rstd, rows, H)));
    QF_PROF(QFP_BWD_LINEAR, QF_TRY(be->linear_backward(w->dI, qformer_grad(m, p->w_out), qformer_grad(m, p->b_out),
                                                       w->dsum, f->act, p->w_out, rows, I, H)));
    QF_PROF(QFP_BWD_GELU, QF_TRY(be->gelu_backward(w->dI, w->dI, f->pre, rows * I, m->cfg.hidden_act)));
    QF_PROF(QFP_BWD_LINEAR, QF_TRY(be->linear_backward(d_x, qformer_grad(m, p->w_in), qformer_grad(m, p->b_in), w->dI,
                                                       x, p->w_in, rows, H, I)));
    QF_PROF(QFP_BWD_ADD, QF_TRY(be->add(d_x, d_x, w->dsum, rows * H)));
    return QF_OK;
}

/* The layers in reverse, the encoder GEMM and the embeddings (grad_out already in w->dh). The
 * input gradients go to genc, gpk, gpv (this backend's memory, NULL skips) and gq (either side). */
static qf_status run_backward(qf_qformer *m, bwd_bufs *w, float *gq, float *genc, float *gpk, float *gpv) {
    const qf_backend *be = m->be;
    const int64_t B = m->B, Lq = m->Lq, Lt = m->Lt, N = Lq + Lt, S = m->S, P = m->P;
    const int64_t H = m->cfg.hidden_size, E = m->cfg.encoder_hidden_size;
    const int64_t T = B * N, Tq = B * Lq, Tt = B * Lt;
    if (P && gpk) QF_TRY(be->zero(gpk, (size_t)(B * P * H) * sizeof(float)));
    if (P && gpv) QF_TRY(be->zero(gpv, (size_t)(B * P * H) * sizeof(float)));
    const int want_kv = genc || !m->frozen; /* the encoder-side GEMMs are needed */
    const int64_t kv_ld = 2 * H * m->ncross;
    for (int64_t i = m->cfg.num_hidden_layers - 1; i >= 0; i--) {
        const qformer_layer *l = &m->layers[i];
        const layer_acts *t = &m->acts[i];
        const float *x_l = i ? m->acts[i - 1].out : m->emb;
        const float *dq = w->dh;
        if (Lt) {
            QF_TRY(qf_qformer_rows_gather(m, w->dqo, w->dh, N, 0, Lq, H));
            QF_TRY(qf_qformer_rows_gather(m, w->dto, w->dh, N, Lq, Lt, H));
            dq = w->dqo;
        }
        const float *cin = l->has_cross ? t->cross.out : t->aq;
        QF_TRY(ffn_backward(m, w, &l->fq, &t->fq, cin, Tq, dq, w->dcin));
        const float *daq = w->dcin;
        if (l->has_cross) {
            const int64_t c = i / m->cfg.cross_attention_frequency;
            QF_TRY(attn_backward(m, w, &l->cross, &t->cross, t->aq, Lq, m->enc_kv + c * 2 * H, S, kv_ld,
                                 want_kv ? w->dkv + c * 2 * H : NULL, 1, w->dcin, w->daq, gpk, gpv));
            daq = w->daq;
        }
        const float *da = daq;
        if (Lt) {
            QF_TRY(ffn_backward(m, w, &l->ft, &t->ft, t->at, Tt, w->dto, w->dat));
            QF_TRY(qf_qformer_rows_scatter(m, w->da, daq, N, 0, Lq, H));
            QF_TRY(qf_qformer_rows_scatter(m, w->da, w->dat, N, Lq, Lt, H));
            da = w->da;
        }
        QF_TRY(attn_backward(m, w, &l->self, &t->self, x_l, N, NULL, N, 0, NULL, 0, da, w->dh, NULL, NULL));
    }
    /* every cross layer's [k | v] = enc W^T + b (one packed weight, plan_params): one GEMM for
     * the weight gradients and one for the encoder gradient, which sums the layers itself */
    if (want_kv)
        QF_PROF(QFP_BWD_LINEAR,
                QF_TRY(be->linear_backward(genc, qformer_grad(m, m->enc_kv_w), qformer_grad(m, m->enc_kv_b), w->dkv,
                                           m->enc, m->enc_kv_w, B * S, E, 2 * H * m->ncross)));
    /* embeddings: emb = LN(x_in), x_in = [query_embeds ; word(ids) + pos] */
    float *dx = w->da; /* [T, H], free now */
    QF_PROF(QFP_BWD_LN, QF_TRY(be->layernorm_backward(dx, qformer_grad(m, m->ln_w), qformer_grad(m, m->ln_b), w->dh,
                                                      m->x_in, m->ln_w, m->emb_mean, m->emb_rstd, T, H)));
    if (gq) QF_TRY(qf_qformer_rows_gather(m, gq, dx, N, 0, Lq, H));
    if (Lt && !m->frozen) {
        float *dt = w->dto; /* [Tt, H] */
        QF_TRY(qf_qformer_rows_gather(m, dt, dx, N, Lq, Lt, H));
        QF_TRY(be->embedding_backward(qformer_grad(m, m->word_emb), qformer_grad(m, m->pos_emb), dt, m->ids,
                                      m->pad_token_id, Tt, Lt, H));
    }
    return QF_OK;
}

qf_status qf_qformer_backward(qf_qformer *m, const float *grad_out, float *grad_query_embeds, float *grad_encoder,
                              float *grad_prefix_k, float *grad_prefix_v) {
    const char *fn = "qf_qformer_backward";
    if (!m) return qf_fail(QF_ERR_ARG, "%s: m is NULL", fn);
    if (!grad_out) return qf_fail(QF_ERR_ARG, "%s: grad_out is NULL", fn);
    if (m->params_bf16)
        return qf_fail(QF_ERR_UNSUPPORTED, "%s: this model runs with bf16 weights on %s: backward is float32 only "
                                           "(qf_qformer_to_device(m, \"%s\", QF_F32) first)", fn, m->be->name,
                       m->be->name);
    if (!m->have_fwd)
        return qf_fail(QF_ERR_ARG, "%s: no successful qf_qformer_forward on this model to differentiate", fn);
    const qf_backend *be = m->be;
    const int64_t B = m->B, N = m->Lq + m->Lt, P = m->P, H = m->cfg.hidden_size;
    const int64_t SE = m->S * m->cfg.encoder_hidden_size;

    bwd_bufs w;
    size_t need = plan_backward(m, NULL, &w);
    QF_TRY(qf_model_grow(m->be, &m->bwd, &m->bwd_cap, need, fn));
    plan_backward(m, m->bwd, &w);
    /* the device gradients start from the host's */
    if (!m->frozen)
        QF_TRY(qf_model_device_grads(be, m->on_device, &m->dgrads, m->grads, m->params_total, &m->grads_on_device, fn));
    /* on the GPU the encoder and prefix gradients are made in bwd and copied out at the end */
    float *genc = grad_encoder, *gpk = P ? grad_prefix_k : NULL, *gpv = P ? grad_prefix_v : NULL;
    if (m->on_device) {
        genc = genc ? w.genc : NULL;
        gpk = gpk ? w.gpk : NULL;
        gpv = gpv ? w.gpv : NULL;
    }
    qf_status s = copy_floats(m, w.dh, grad_out, B * N * H);
    if (s == QF_OK) s = run_backward(m, &w, grad_query_embeds, genc, gpk, gpv);
    if (m->on_device) {
        if (s == QF_OK && grad_encoder) s = copy_floats(m, grad_encoder, genc, B * SE);
        if (s == QF_OK && gpk) s = copy_floats(m, grad_prefix_k, gpk, B * P * H);
        if (s == QF_OK && gpv) s = copy_floats(m, grad_prefix_v, gpv, B * P * H);
        if (s == QF_OK && !m->frozen) m->grads_on_device = 1; /* downloaded when shown (qf_qformer_sync_grads) */
        qf_status s2 = be->synchronize(); /* wait even after a failure: nothing may still run on bwd */
        if (s == QF_OK) s = s2;
    }
    return s;
}
