/* llm_forward.c - the decoder's forward over a KV cache, the cache itself, and generation.
 * Contract: include/qfuse_llm.h; layout: src/models/llm_internal.h; loading: llm.c.
 *
 * One call of qf_llm_decode appends T positions to every row of a cache:
 *   positions  real tokens count up from the row's earlier real tokens (cumsum(mask) - 1, as
 *              transformers' generate and OPT's learned positions do); a padding position gets
 *              position 0 (OPT: table row 1), which nothing real ever reads.
 *   layers     LLaMA/Qwen2: x += o(attn(rope(q), rope(k), v)) on rmsnorm(x); x += down(silu(gate)
 *              * up) on rmsnorm(x). OPT pre-LN: the same shape with LayerNorm and fc2(relu(fc1));
 *              post-LN: x = LN(x + attn(x)), x = LN(x + ffn(x)).
 *   attention  query at cache index i attends key j iff j <= i and j was a real token; scores
 *              scaled by 1/sqrt(head_dim); grouped-query (query head h reads kv head h / group).
 *              A query with no key to attend (a padding position before any token) gets zeros.
 *
 * Invariants:
 *   - The cache owns K and V of every layer as [layer][B][Hkv][capacity][head_dim] and valid
 *     [B][capacity]; length grows by T per call and only qf_llm_cache_reset lowers it. After
 *     a failed decode the cache's content is unspecified (reset it).
 *   - Activations live in m->ws, carved per call from one grow-only allocation: a call whose
 *     shapes are no larger than an earlier one allocates nothing (decode steps never do).
 */
#include "models/llm_internal.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

struct qf_llm_cache {
    int64_t B, cap, len, nl, Hkv, hd;
    float *k, *v;       /* [nl][B][Hkv][cap][hd] */
    uint8_t *valid;     /* [B][cap] */
    int64_t *next_pos;  /* [B]: real tokens so far */
};

/* ---- linear ------------------------------------------------------------------------------- */

qf_status llm_linear_forward(const llm_linear *L, float *y, const float *x, int64_t N) {
    if (L->q) QF_TRY(qf_qweight_matmul(y, x, L->q, L->bias, N));
    else QF_TRY(qf_linear_forward(y, x, L->w, L->bias, N, L->in, L->out));
    if (L->lora) QF_TRY(qf_lora_apply(L->lora, x, N, y));
    return QF_OK;
}

/* ys[i] = Ls[i](x) for linears sharing x (q/k/v, gate/up). Quantized ones at decoding sizes go
 * through qf_qweight_matmul_multi: one parallel region for all of them instead of one each
 * (a decode step's fixed cost is mostly these regions at 16 threads); LoRA pairs are added
 * per linear afterwards, as llm_linear_forward does. */
static qf_status linear_group(const llm_linear *const *Ls, float *const *ys, int n, const float *x, int64_t N) {
    const qf_qweight *qs[4];
    const float *bs[4];
    int fuse = n <= 4 && N < 16;
    for (int i = 0; i < n && fuse; i++) {
        fuse = Ls[i]->q != NULL;
        qs[i] = Ls[i]->q;
        bs[i] = Ls[i]->bias;
    }
    if (!fuse) {
        for (int i = 0; i < n; i++) QF_TRY(llm_linear_forward(Ls[i], ys[i], x, N));
        return QF_OK;
    }
    QF_TRY(qf_qweight_matmul_multi(n, ys, x, qs, bs, N));
    for (int i = 0; i < n; i++)
        if (Ls[i]->lora) QF_TRY(qf_lora_apply(Ls[i]->lora, x, N, ys[i]));
    return QF_OK;
}

/* ---- cache -------------------------------------------------------------------------------- */

qf_status qf_llm_cache_new(const qf_llm *m, int64_t B, int64_t capacity, qf_llm_cache **out) {
    if (!m || !out) return qf_fail(QF_ERR_ARG, "qf_llm_cache_new: NULL model or out");
    *out = NULL;
    if (B < 1 || B > (1 << 20) || capacity < 1 || capacity > (1 << 24))
        return qf_fail(QF_ERR_ARG, "qf_llm_cache_new: B = %lld must be in [1, 2^20] and capacity = %lld in [1, 2^24]",
                       (long long)B, (long long)capacity);
    const qf_llm_config *c = &m->cfg;
    qf_llm_cache *k = calloc(1, sizeof *k);
    if (!k) return qf_fail(QF_ERR_NOMEM, "qf_llm_cache_new: out of memory");
    k->B = B;
    k->cap = capacity;
    k->nl = c->num_hidden_layers;
    k->Hkv = c->num_key_value_heads;
    k->hd = c->head_dim;
    size_t n, bytes;
    qf_status s = qf_mul_size((size_t)k->nl * (size_t)B * (size_t)k->Hkv, (size_t)capacity * (size_t)k->hd,
                              "kv cache", &n);
    if (s == QF_OK) s = qf_mul_size(n, sizeof(float), "kv cache", &bytes);
    if (s == QF_OK) {
        k->k = malloc(bytes);
        k->v = malloc(bytes);
        k->valid = calloc((size_t)B * (size_t)capacity, 1);
        k->next_pos = calloc((size_t)B, sizeof *k->next_pos);
        if (!k->k || !k->v || !k->valid || !k->next_pos)
            s = qf_fail(QF_ERR_NOMEM, "qf_llm_cache_new: cannot allocate a %zu-byte KV cache (B = %lld, capacity = %lld)",
                        2 * bytes, (long long)B, (long long)capacity);
    }
    if (s != QF_OK) {
        qf_llm_cache_free(k);
        return s;
    }
    *out = k;
    return QF_OK;
}

void qf_llm_cache_free(qf_llm_cache *c) {
    if (!c) return;
    free(c->k);
    free(c->v);
    free(c->valid);
    free(c->next_pos);
    free(c);
}

void qf_llm_cache_reset(qf_llm_cache *c) {
    if (!c) return;
    c->len = 0;
    memset(c->valid, 0, (size_t)(c->B * c->cap));
    memset(c->next_pos, 0, (size_t)c->B * sizeof *c->next_pos);
}

int64_t qf_llm_cache_length(const qf_llm_cache *c) { return c ? c->len : 0; }

/* ---- kernels ------------------------------------------------------------------------------ */

/* out[n,:] = w * x[n,:] / sqrt(mean(x[n,:]^2) + eps); mean accumulated in double. */
static void rmsnorm(float *out, const float *x, const float *w, int64_t N, int64_t C, float eps) {
#pragma omp parallel for num_threads(qf_threads()) schedule(static) if (N > 1)
    for (int64_t n = 0; n < N; n++) {
        const float *xr = x + n * C;
        float *o = out + n * C;
        double ss = 0;
        for (int64_t i = 0; i < C; i++) ss += (double)xr[i] * xr[i];
        float r = (float)(1.0 / sqrt(ss / (double)C + (double)eps));
        for (int64_t i = 0; i < C; i++) o[i] = w[i] * (xr[i] * r);
    }
}

/* LayerNorm over rows (biased variance, two passes, double accumulation); out may equal x. */
static void layernorm(float *out, const float *x, const float *w, const float *b, int64_t N, int64_t C, float eps) {
#pragma omp parallel for num_threads(qf_threads()) schedule(static) if (N > 1)
    for (int64_t n = 0; n < N; n++) {
        const float *xr = x + n * C;
        float *o = out + n * C;
        double s = 0, v = 0;
        for (int64_t i = 0; i < C; i++) s += xr[i];
        double mean = s / (double)C;
        for (int64_t i = 0; i < C; i++) v += ((double)xr[i] - mean) * ((double)xr[i] - mean);
        float rstd = (float)(1.0 / sqrt(v / (double)C + (double)eps)), mu = (float)mean;
        for (int64_t i = 0; i < C; i++) o[i] = (xr[i] - mu) * rstd * w[i] + b[i];
    }
}

/* Rotates each head of rows x [N, nh*hd] in place by the row's cos/sin (cs [N, hd]: cos in the
 * first half, sin in the second), rotate_half convention. */
static void rope(float *x, const float *cs, int64_t N, int64_t nh, int64_t hd) {
    const int64_t half = hd / 2;
#pragma omp parallel for num_threads(qf_threads()) schedule(static) if (N > 1)
    for (int64_t n = 0; n < N; n++) {
        const float *co = cs + n * hd, *si = co + half;
        for (int64_t h = 0; h < nh; h++) {
            float *r = x + (n * nh + h) * hd;
            for (int64_t i = 0; i < half; i++) {
                float x1 = r[i], x2 = r[i + half];
                r[i] = x1 * co[i] - x2 * si[i];
                r[i + half] = x2 * co[i] + x1 * si[i];
            }
        }
    }
}

static float dot(const float *a, const float *b, int64_t n) {
    float s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

/* att[b*T+t, hq*hd ...] = softmax over the row's attendable cached keys of layer l. */
static qf_status attend(const qf_llm_cache *c, int64_t l, const float *q, float *att, int64_t T, int64_t Hq) {
    const int64_t B = c->B, Hkv = c->Hkv, hd = c->hd, cap = c->cap, group = Hq / Hkv, S = c->len + T;
    const float scale = 1.0f / sqrtf((float)hd);
    qf_status st = QF_OK;
#pragma omp parallel num_threads(qf_threads()) if (B * Hq * T > 1)
    {
        float *sc = NULL;
        if (qf_scratch((size_t)S * sizeof(float), (void **)&sc) != QF_OK) {
#pragma omp critical
            st = QF_ERR_NOMEM;
        }
#pragma omp barrier
        if (st == QF_OK) {
#pragma omp for collapse(3) schedule(static)
            for (int64_t b = 0; b < B; b++)
                for (int64_t t = 0; t < T; t++)
                    for (int64_t h = 0; h < Hq; h++) {
                        const int64_t i = c->len + t, hk = h / group;
                        const float *qr = q + ((b * T + t) * Hq + h) * hd;
                        const float *kb = c->k + (((l * B + b) * Hkv + hk) * cap) * hd;
                        const float *vb = c->v + (((l * B + b) * Hkv + hk) * cap) * hd;
                        const uint8_t *valid = c->valid + b * cap;
                        float *o = att + ((b * T + t) * Hq + h) * hd;
                        float mx = -INFINITY;
                        for (int64_t j = 0; j <= i; j++) {
                            if (!valid[j]) continue;
                            sc[j] = dot(qr, kb + j * hd, hd) * scale;
                            if (sc[j] > mx) mx = sc[j];
                        }
                        memset(o, 0, (size_t)hd * sizeof *o);
                        if (mx == -INFINITY) continue; /* nothing to attend: zeros */
                        float sum = 0;
                        for (int64_t j = 0; j <= i; j++) {
                            if (!valid[j]) continue;
                            float p = expf(sc[j] - mx);
                            sum += p;
                            const float *vr = vb + j * hd;
#pragma omp simd
                            for (int64_t d = 0; d < hd; d++) o[d] += p * vr[d];
                        }
                        const float inv = 1.0f / sum;
                        for (int64_t d = 0; d < hd; d++) o[d] *= inv;
                    }
        }
    }
    if (st != QF_OK) return qf_fail(QF_ERR_NOMEM, "llm attention: cannot allocate %lld scores of scratch", (long long)S);
    return QF_OK;
}

/* ---- decode ------------------------------------------------------------------------------- */

static float *carve(char **p, size_t floats) {
    float *r = (float *)*p;
    *p += qf_align_up(floats * sizeof(float), 64);
    return r;
}

qf_status qf_llm_decode(qf_llm *m, qf_llm_cache *c, const float *embeds, int64_t T, const uint8_t *mask,
                        float *logits, int last_only) {
    const char *fn = "qf_llm_decode";
    if (!m || !c || !embeds || !logits) return qf_fail(QF_ERR_ARG, "%s: NULL model, cache, embeds or logits", fn);
    const qf_llm_config *cf = &m->cfg;
    if (c->nl != cf->num_hidden_layers || c->Hkv != cf->num_key_value_heads || c->hd != cf->head_dim)
        return qf_fail(QF_ERR_ARG, "%s: the cache was made for another model", fn);
    if (T < 1 || T > c->cap - c->len)
        return qf_fail(QF_ERR_ARG, "%s: %lld new positions do not fit the cache (length %lld, capacity %lld)", fn,
                       (long long)T, (long long)c->len, (long long)c->cap);
    const int64_t B = c->B, N = B * T, H = cf->hidden_size, E = cf->word_embed_proj_dim, I = cf->intermediate_size,
                  hd = cf->head_dim, Hq = cf->num_attention_heads, Hkv = cf->num_key_value_heads,
                  QD = Hq * hd, KD = Hkv * hd, half = hd / 2, cap = c->cap;
    const int opt = m->arch == LLM_ARCH_OPT;
    const float eps = (float)cf->norm_eps;
    /* The context: OPT's learned-position table has max_position_embeddings rows; RoPE models
     * were trained up to it and transformers' configs state it as the limit. */
    for (int64_t b = 0; b < B; b++) {
        int64_t add = 0;
        for (int64_t t = 0; t < T; t++) add += mask ? mask[b * T + t] != 0 : 1;
        if (c->next_pos[b] + add > cf->max_position_embeddings)
            return qf_fail(QF_ERR_ARG, "%s: row %lld reaches position %lld but max_position_embeddings (the "
                           "context) is %lld", fn, (long long)b, (long long)(c->next_pos[b] + add - 1),
                           (long long)cf->max_position_embeddings);
    }
    const int64_t NL = last_only ? B : N, Wmax = H > E ? H : E;
    /* workspace plan */
    size_t fl[] = {(size_t)N * H, (size_t)N * (Wmax > QD ? Wmax : QD), (size_t)N * QD, (size_t)N * KD,
                   (size_t)N * KD, (size_t)N * QD, (size_t)N * I, (size_t)N * I, (size_t)N * hd,
                   (size_t)NL * H, (size_t)NL * E};
    size_t need = 0;
    for (size_t i = 0; i < sizeof fl / sizeof fl[0]; i++) need += qf_align_up(fl[i] * sizeof(float), 64);
    need += qf_align_up((size_t)N * sizeof(int64_t), 64);
    if (need > m->ws_cap) {
        void *w = NULL;
        if (posix_memalign(&w, 64, need)) return qf_fail(QF_ERR_NOMEM, "%s: cannot allocate a %zu-byte workspace", fn, need);
        free(m->ws);
        m->ws = w;
        m->ws_cap = need;
    }
    char *p = (char *)m->ws;
    float *x = carve(&p, fl[0]), *h = carve(&p, fl[1]), *q = carve(&p, fl[2]), *k = carve(&p, fl[3]),
          *v = carve(&p, fl[4]), *att = carve(&p, fl[5]), *g = carve(&p, fl[6]), *u = carve(&p, fl[7]),
          *cs = carve(&p, fl[8]), *fin = carve(&p, fl[9]), *fin2 = carve(&p, fl[10]);
    int64_t *pos = (int64_t *)p;

    /* NaN/Inf would poison the cache and every later step silently: refuse them, naming the first
     * (checked before the cache changes). */
    const int64_t bad = (int64_t)qf_first_nonfinite(embeds, (size_t)(N * E));
    if (bad < N * E)
        return qf_fail(QF_ERR_NONFINITE, "%s: embeds[%lld,%lld,%lld] = %g: inputs must be finite", fn,
                       (long long)(bad / (T * E)), (long long)(bad / E % T), (long long)(bad % E), (double)embeds[bad]);
    /* positions and validity of the new cache slots */
    for (int64_t b = 0; b < B; b++)
        for (int64_t t = 0; t < T; t++) {
            int real = mask ? mask[b * T + t] != 0 : 1;
            c->valid[b * cap + c->len + t] = (uint8_t)real;
            pos[b * T + t] = real ? c->next_pos[b]++ : -1;
        }

    /* input: (project_in) embeds, plus OPT's learned positions */
    if (opt && m->project_in.out) QF_TRY(llm_linear_forward(&m->project_in, x, embeds, N));
    else memcpy(x, embeds, (size_t)N * H * sizeof *x);
    if (opt) {
        for (int64_t n = 0; n < N; n++) {
            const float *pe = m->pos_embed + (pos[n] + 2) * H; /* padding: -1 + 2 = row 1 */
            for (int64_t i = 0; i < H; i++) x[n * H + i] += pe[i];
        }
    } else {
        /* RoPE tables per row, float32 as transformers computes them */
        for (int64_t i = 0; i < half; i++) {
            float inv = 1.0f / powf((float)cf->rope_theta, (float)(2 * i) / (float)hd);
            for (int64_t n = 0; n < N; n++) {
                float ang = (float)(pos[n] < 0 ? 0 : pos[n]) * inv;
                cs[n * hd + i] = (float)cos((double)ang);
                cs[n * hd + half + i] = (float)sin((double)ang);
            }
        }
    }

    for (int64_t l = 0; l < cf->num_hidden_layers; l++) {
        const llm_layer *L = &m->layers[l];
        const int pre = cf->do_layer_norm_before;
        /* attention block */
        if (!opt) rmsnorm(h, x, L->in_norm, N, H, eps);
        else if (pre) layernorm(h, x, L->in_norm, L->in_norm_b, N, H, eps);
        const float *ain = (!opt || pre) ? h : x;
        {
            const llm_linear *qkv[3] = {&L->q, &L->k, &L->v};
            float *const qkv_y[3] = {q, k, v};
            QF_TRY(linear_group(qkv, qkv_y, 3, ain, N));
        }
        if (!opt) {
            rope(q, cs, N, Hq, hd);
            rope(k, cs, N, Hkv, hd);
        }
        for (int64_t b = 0; b < B; b++)
            for (int64_t hk = 0; hk < Hkv; hk++) {
                float *kd = c->k + ((((l * B + b) * Hkv + hk) * cap) + c->len) * hd;
                float *vd = c->v + ((((l * B + b) * Hkv + hk) * cap) + c->len) * hd;
                for (int64_t t = 0; t < T; t++) {
                    memcpy(kd + t * hd, k + (b * T + t) * KD + hk * hd, (size_t)hd * sizeof(float));
                    memcpy(vd + t * hd, v + (b * T + t) * KD + hk * hd, (size_t)hd * sizeof(float));
                }
            }
        QF_TRY(attend(c, l, q, att, T, Hq));
        QF_TRY(llm_linear_forward(&L->o, h, att, N));
        QF_TRY(qf_residual_forward(x, x, h, N * H));
        if (opt && !pre) layernorm(x, x, L->in_norm, L->in_norm_b, N, H, eps);

        /* feed-forward block */
        if (!opt) rmsnorm(h, x, L->post_norm, N, H, eps);
        else if (pre) layernorm(h, x, L->post_norm, L->post_norm_b, N, H, eps);
        const float *fin_ = (!opt || pre) ? h : x;
        if (opt) {
            QF_TRY(llm_linear_forward(&L->up, g, fin_, N));
#pragma omp parallel for num_threads(qf_threads()) schedule(static) if (N * I > 65536)
            for (int64_t i = 0; i < N * I; i++) g[i] = g[i] > 0 ? g[i] : 0;
        } else {
            if (L->gate.q && L->up.q && !L->gate.lora && !L->up.lora && L->gate.out == L->up.out) {
                /* quantized, no adapter: matmuls and silu * up in one region (qmatmul.h) */
                QF_TRY(qf_qweight_matmul_glu(g, u, fin_, L->gate.q, L->up.q, L->gate.bias, L->up.bias, N));
            } else {
                const llm_linear *gu[2] = {&L->gate, &L->up};
                float *const gu_y[2] = {g, u};
                QF_TRY(linear_group(gu, gu_y, 2, fin_, N));
                /* silu(g) * u: scalar expf is ~30 us per 4864-wide row, serial at one row (decoding) */
#pragma omp parallel for num_threads(qf_threads()) schedule(static) if (N * I > 2048)
                for (int64_t i = 0; i < N * I; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
            }
        }
        QF_TRY(llm_linear_forward(&L->down, h, g, N));
        QF_TRY(qf_residual_forward(x, x, h, N * H));
        if (opt && !pre) layernorm(x, x, L->post_norm, L->post_norm_b, N, H, eps);
    }
    c->len += T;

    /* head: final norm, (project_out), lm_head on every row or each batch row's last one */
    const float *src = x;
    if (last_only) {
        for (int64_t b = 0; b < B; b++) memcpy(fin + b * H, x + (b * T + T - 1) * H, (size_t)H * sizeof *x);
        src = fin;
    }
    float *normed = last_only ? fin : h;
    if (m->final_norm) {
        if (opt) layernorm(normed, src, m->final_norm, m->final_norm_b, NL, H, eps);
        else rmsnorm(normed, src, m->final_norm, NL, H, eps);
    } else if (normed != src) {
        memcpy(normed, src, (size_t)NL * H * sizeof *normed);
    }
    const float *head_in = normed;
    if (opt && m->project_out.out) {
        QF_TRY(llm_linear_forward(&m->project_out, fin2, normed, NL));
        head_in = fin2;
    }
    return llm_linear_forward(&m->lm_head, logits, head_in, NL);
}

/* ---- argument checks shared by the entry points ----------------------------------------- */

static qf_status check_bt(const char *fn, int64_t B, int64_t T) {
    if (B < 1 || T < 1 || B > (1 << 20) || T > (1 << 24))
        return qf_fail(QF_ERR_ARG, "%s: B = %lld and T = %lld must be in [1, 2^20] and [1, 2^24]", fn, (long long)B,
                       (long long)T);
    return QF_OK;
}

/* Every ids[b,t] in [0, V); the message names `what`[b,t]. */
static qf_status check_ids(const char *fn, const char *what, const int32_t *ids, int64_t B, int64_t T, int64_t V) {
    for (int64_t i = 0; i < B * T; i++)
        if (ids[i] < 0 || ids[i] >= V)
            return qf_fail(QF_ERR_ARG, "%s: %s[%lld,%lld] = %d is outside [0, vocab_size = %lld)", fn, what,
                           (long long)(i / T), (long long)(i % T), (int)ids[i], (long long)V);
    return QF_OK;
}

/* ---- forward without a caller's cache ----------------------------------------------------- */

qf_status qf_llm_forward(qf_llm *m, const float *inputs_embeds, int64_t B, int64_t T,
                         const uint8_t *attention_mask, float *logits) {
    if (!m || !inputs_embeds || !logits)
        return qf_fail(QF_ERR_ARG, "qf_llm_forward: NULL model, inputs_embeds or logits");
    QF_TRY(check_bt("qf_llm_forward", B, T));
    if (!m->tmp_cache || m->tmp_cache->B != B || m->tmp_cache->cap < T) {
        qf_llm_cache_free(m->tmp_cache);
        m->tmp_cache = NULL;
        QF_TRY(qf_llm_cache_new(m, B, T, &m->tmp_cache));
    }
    qf_llm_cache_reset(m->tmp_cache);
    return qf_llm_decode(m, m->tmp_cache, inputs_embeds, T, attention_mask, logits, 0);
}

/* ---- embeddings --------------------------------------------------------------------------- */

qf_status qf_llm_embed(qf_llm *m, const int32_t *ids, int64_t B, int64_t T, float *out) {
    if (!m || !ids || !out) return qf_fail(QF_ERR_ARG, "qf_llm_embed: NULL model, input_ids or out");
    QF_TRY(check_bt("qf_llm_embed", B, T));
    const int64_t V = m->cfg.vocab_size;
    QF_TRY(check_ids("llm embed", "input_ids", ids, B, T, V));
    return qf_embedding_forward(out, ids, m->embed, B * T, V, m->cfg.word_embed_proj_dim);
}

/* ---- generation --------------------------------------------------------------------------- */

qf_generate_options qf_generate_defaults(void) {
    qf_generate_options o;
    memset(&o, 0, sizeof o);
    o.max_new_tokens = 20;
    o.sampling = qf_sampling_defaults();
    return o;
}

qf_status qf_llm_generate(qf_llm *m, const float *embeds, const uint8_t *mask, int64_t B, int64_t T,
                          const int32_t *prompt_ids, const qf_generate_options *o, int32_t *out_ids,
                          int64_t *n_steps) {
    const char *fn = "qf_llm_generate";
    if (!m || !embeds || !o || !out_ids) return qf_fail(QF_ERR_ARG, "%s: NULL model, embeds, options or out_ids", fn);
    if (n_steps) *n_steps = 0;
    const int64_t V = m->cfg.vocab_size, E = m->cfg.word_embed_proj_dim, M = o->max_new_tokens;
    QF_TRY(check_bt(fn, B, T));
    if (M < 1 || M > (1 << 24)) return qf_fail(QF_ERR_ARG, "%s: max_new_tokens = %lld must be >= 1", fn, (long long)M);
    if (o->n_eos < 0 || (o->n_eos && !o->eos_ids)) return qf_fail(QF_ERR_ARG, "%s: n_eos = %d without eos_ids", fn, o->n_eos);
    if (o->pad_id < 0 || o->pad_id >= V)
        return qf_fail(QF_ERR_ARG, "%s: pad_id = %d is outside [0, vocab_size = %lld)", fn, (int)o->pad_id, (long long)V);
    if (prompt_ids) QF_TRY(check_ids(fn, "prompt_ids", prompt_ids, B, T, V));
    { /* the prompt plus every new token must fit the context */
        for (int64_t b = 0; b < B; b++) {
            int64_t n = 0;
            for (int64_t t = 0; t < T; t++) n += mask ? mask[b * T + t] != 0 : 1;
            if (n + M > m->cfg.max_position_embeddings)
                return qf_fail(QF_ERR_ARG, "%s: row %lld: %lld prompt tokens + max_new_tokens %lld exceed "
                               "max_position_embeddings %lld (the context)", fn, (long long)b, (long long)n,
                               (long long)M, (long long)m->cfg.max_position_embeddings);
        }
    }

    /* every buffer of the run, allocated once here: none in the decoding loop */
    qf_llm_cache *cache = NULL;
    QF_TRY(qf_llm_cache_new(m, B, T + M, &cache));
    float *logits = malloc((size_t)B * V * sizeof *logits), *emb = malloc((size_t)B * E * sizeof *emb);
    int32_t *hist = malloc((size_t)B * (T + M) * sizeof *hist), *next = malloc((size_t)B * sizeof *next);
    int64_t *hlen = calloc((size_t)B, sizeof *hlen);
    uint8_t *alive = malloc((size_t)B);
    qf_status s = QF_OK;
    if (!logits || !emb || !hist || !next || !hlen || !alive) {
        s = qf_fail(QF_ERR_NOMEM, "%s: out of memory", fn);
        goto done;
    }
    for (int64_t b = 0; b < B; b++) {
        alive[b] = 1;
        if (prompt_ids)
            for (int64_t t = 0; t < T; t++)
                if (!mask || mask[b * T + t]) hist[b * (T + M) + hlen[b]++] = prompt_ids[b * T + t];
    }
    s = qf_llm_decode(m, cache, embeds, T, mask, logits, 1);
    for (int64_t step = 0; s == QF_OK && step < M; step++) {
        int any = 0;
        for (int64_t b = 0; b < B; b++) {
            if (!alive[b]) {
                out_ids[b * M + step] = o->pad_id;
                next[b] = o->pad_id;
                continue;
            }
            int32_t id;
            s = qf_sample_token(&o->sampling, logits + b * V, V, hist + b * (T + M), hlen[b],
                                (uint64_t)step * (uint64_t)B + (uint64_t)b, &id);
            if (s != QF_OK) {
                qf_fail_prefix(s, "%s: row %lld, step %lld", fn, (long long)b, (long long)step);
                break;
            }
            out_ids[b * M + step] = id;
            next[b] = id;
            hist[b * (T + M) + hlen[b]++] = id;
            int stop = o->on_token ? o->on_token(o->user, b, id) != 0 : 0;
            for (int e = 0; e < o->n_eos; e++) stop |= id == o->eos_ids[e];
            if (stop) alive[b] = 0;
            any |= alive[b];
        }
        if (s != QF_OK) break;
        if (n_steps) *n_steps = step + 1;
        if (!any || step == M - 1) {
            for (int64_t b = 0; b < B; b++) /* rows that stopped early: pad the rest */
                for (int64_t r = step + 1; r < M; r++) out_ids[b * M + r] = o->pad_id;
            break;
        }
        s = qf_embedding_forward(emb, next, m->embed, B, V, E);
        if (s == QF_OK) s = qf_llm_decode(m, cache, emb, 1, alive, logits, 1);
    }
done:
    qf_llm_cache_free(cache);
    free(logits);
    free(emb);
    free(hist);
    free(next);
    free(hlen);
    free(alive);
    return s;
}
