/* sampler.c - next-token selection (qfuse_llm.h: qf_sampling_defaults, qf_sample_token):
 * transformers' logits processors in generate's order, then greedy argmax or one draw.
 *
 * Order and rules (transformers/generation/logits_process.py; generate adds each processor only
 * when it is not the identity, and the warpers only when do_sample):
 *   1. RepetitionPenaltyLogitsProcessor: for every distinct id in history,
 *      x = x < 0 ? x * p : x / p   (float32 ops; gather-then-scatter, so an id repeated in
 *      history is penalized once);
 *   greedy stops here: argmax, ties -> the lowest id (torch.argmax's first maximum);
 *   2. TemperatureLogitsWarper: x = x / t (float32 division);
 *   3. TopKLogitsWarper: thr = the k-th largest value counted with multiplicity (torch.topk's
 *      last value); x = -inf where x < thr, so ties at the threshold survive; k >= V is a no-op;
 *   4. TopPLogitsWarper (min_tokens_to_keep 1): sort ascending, c = cumsum(softmax); remove
 *      where c <= 1 - top_p (threshold rounded to float32, the dtype torch compares in), keep
 *      the largest entry always. Ties in the sort are ordered by id (torch.sort(stable=True)):
 *      of equal values the lower id comes first ascending, so it is removed first.
 *   5. softmax and one draw (torch.multinomial's role): u = a 53-bit uniform in [0,1) from
 *      Philox4x32-10 with key seed and counter (hi 0, lo counter), words 0 and 1; the token is
 *      the first id, in id order, whose running sum of exp(x - max) (double) exceeds u * total.
 *      The draw is a pure function of (processed logits, seed, counter).
 *
 * Top-p without the full ascending sort: c only grows along the ascending order, so the removed
 * tokens are a prefix of it; a weighted quickselect finds where that prefix ends (expected
 * O(V)). Top-k uses a size-k min-heap of values: O(V log k). Probabilities are computed in
 * double from the float32 logits, torch's in float32: the two can disagree only where c is
 * within float32 rounding of 1 - top_p. Validation covers every field whether or not do_sample
 * uses it, so a setting that is invalid is refused before it matters.
 *
 * Inputs: -inf logits are allowed (masked tokens); NaN and +inf are refused, and so is a row
 * that is -inf everywhere (nothing could be picked). A penalty or temperature that overflows a
 * finite logit to +inf is refused too (softmax would give NaN). Temporaries live in
 * qf_scratch; nothing else is allocated.
 */
#include "internal.h"
#include <math.h>
#include <string.h>

qf_sampling qf_sampling_defaults(void) {
    qf_sampling s;
    memset(&s, 0, sizeof s);
    s.do_sample = 0;
    s.temperature = 1.0f;
    s.top_k = 0;
    s.top_p = 1.0f;
    s.repetition_penalty = 1.0f;
    s.seed = 0;
    return s;
}

typedef struct {
    float v;
    int32_t id;
    double e;          /* exp(v - max) */
} cand;

/* the stable ascending order of top-p's sort: by value, then by id */
static int cand_less(const cand *a, const cand *b) { return a->v < b->v || (a->v == b->v && a->id < b->id); }

static void cand_swap(cand *a, cand *b) {
    cand t = *a;
    *a = *b;
    *b = t;
}

/* min-heap of floats (top-k threshold) */
static void min_sift_down(float *h, int64_t n, int64_t i) {
    float x = h[i];
    for (;;) {
        int64_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && h[c + 1] < h[c]) c++;
        if (!(h[c] < x)) break;
        h[i] = h[c];
        i = c;
    }
    h[i] = x;
}

/* The k-th largest of x[0..V) counted with multiplicity, 0 < k < V. */
static float kth_largest(const float *x, int64_t V, int64_t k, float *heap) {
    memcpy(heap, x, (size_t)k * sizeof *heap);
    for (int64_t i = k / 2 - 1; i >= 0; i--) min_sift_down(heap, k, i);
    for (int64_t i = k; i < V; i++)
        if (x[i] > heap[0]) {
            heap[0] = x[i];
            min_sift_down(heap, k, 0);
        }
    return heap[0];
}

/* Top-p over the finite entries of x (at least one), with max m. A weighted quickselect on the
 * candidates c[0..n): each round partitions the open range around a pivot (keys are unique:
 * value, then id), and the pivot's ascending cumsum - the mass below the range, plus the part
 * below the pivot, plus its own - says on which side the first kept candidate lies. The largest
 * candidate is set apart first: it is kept whatever the threshold (min_tokens_to_keep = 1).
 * Expected O(n). */
static void top_p_filter(float *x, int64_t V, float top_p, float m, cand *c) {
    int64_t n = 0, top = 0;
    double total = 0.0;
    for (int64_t i = 0; i < V; i++)
        if (x[i] != -INFINITY) {
            double e = exp((double)x[i] - (double)m);
            c[n] = (cand){x[i], (int32_t)i, e};
            if (cand_less(&c[top], &c[n])) top = n;
            total += e;
            n++;
        }
    const float thr = (float)(1.0 - (double)top_p);
    cand_swap(&c[top], &c[n - 1]);
    int64_t lo = 0, hi = n - 1;   /* undecided range; [0,lo) removed, [hi,n) kept */
    double below = 0.0;           /* mass of c[0..lo) */
    uint32_t rng = 0x9E3779B9u;
    while (lo < hi) {
        rng = rng * 1664525u + 1013904223u;
        int64_t p = lo + (int64_t)((uint64_t)rng * (uint64_t)(hi - lo) >> 32);
        cand_swap(&c[p], &c[hi - 1]);
        const cand piv = c[hi - 1];
        int64_t store = lo;
        double mass = 0.0;
        for (int64_t i = lo; i < hi - 1; i++)
            if (cand_less(&c[i], &piv)) {
                mass += c[i].e;
                cand_swap(&c[i], &c[store++]);
            }
        cand_swap(&c[store], &c[hi - 1]); /* pivot at store: [lo,store) below it, (store,hi) above */
        float cum = (float)((below + mass + piv.e) / total);
        if (cum <= thr) {  /* pivot and everything below it removed */
            below += mass + piv.e;
            lo = store + 1;
        } else {           /* pivot and everything above it kept */
            hi = store;
        }
    }
    for (int64_t i = 0; i < lo; i++) x[c[i].id] = -INFINITY;
}

static uint64_t draw_bits53(uint64_t seed, uint64_t counter) {
    uint32_t w[4];
    qf_philox4x32(seed, 0, counter, w);
    return ((uint64_t)w[0] << 21) ^ (uint64_t)(w[1] >> 11);
}

qf_status qf_sample_token(const qf_sampling *s, float *logits, int64_t V, const int32_t *history,
                          int64_t n_history, uint64_t counter, int32_t *out_id) {
    if (!s || !logits || !out_id)
        return qf_fail(QF_ERR_ARG, "qf_sample_token: %s is NULL", !s ? "s" : !logits ? "logits" : "out_id");
    *out_id = -1;
    if (V <= 0 || V > INT32_MAX)
        return qf_fail(QF_ERR_ARG, "qf_sample_token: V = %lld, expected 1..%d", (long long)V, INT32_MAX);
    if (n_history < 0) return qf_fail(QF_ERR_ARG, "qf_sample_token: n_history = %lld < 0", (long long)n_history);
    if (n_history > 0 && !history)
        return qf_fail(QF_ERR_ARG, "qf_sample_token: history is NULL but n_history = %lld", (long long)n_history);
    if (!(s->temperature > 0.0f) || isinf(s->temperature))
        return qf_fail(QF_ERR_ARG, "qf_sample_token: temperature = %g, must be a finite value > 0 (1 = off)",
                       (double)s->temperature);
    if (!(s->top_p > 0.0f && s->top_p <= 1.0f))
        return qf_fail(QF_ERR_ARG, "qf_sample_token: top_p = %g, must be in (0, 1] (1 = off)", (double)s->top_p);
    if (s->top_k < 0)
        return qf_fail(QF_ERR_ARG, "qf_sample_token: top_k = %lld, must be >= 0 (0 = off)", (long long)s->top_k);
    if (!(s->repetition_penalty > 0.0f) || isinf(s->repetition_penalty))
        return qf_fail(QF_ERR_ARG, "qf_sample_token: repetition_penalty = %g, must be a finite value > 0 (1 = off)",
                       (double)s->repetition_penalty);
    int any = 0;
    for (int64_t i = 0; i < V; i++) {
        float v = logits[i];
        if (isnan(v) || v == INFINITY)
            return qf_fail(QF_ERR_NONFINITE, "qf_sample_token: logits[%lld] is %s (only finite values and -inf are "
                           "allowed)", (long long)i, isnan(v) ? "NaN" : "+inf");
        any |= v != -INFINITY;
    }
    if (!any) return qf_fail(QF_ERR_ARG, "qf_sample_token: every one of the %lld logits is -inf", (long long)V);
    for (int64_t j = 0; j < n_history; j++)
        if (history[j] < 0 || history[j] >= V)
            return qf_fail(QF_ERR_ARG, "qf_sample_token: history[%lld] = %d is not a token id (0..%lld)",
                           (long long)j, history[j], (long long)V - 1);

    const int64_t k = s->top_k;
    const int use_k = s->do_sample && k > 0 && k < V;
    const int use_p = s->do_sample && s->top_p < 1.0f;
    size_t need = (size_t)n_history * sizeof(float);
    if (use_k && (size_t)k * sizeof(float) > need) need = (size_t)k * sizeof(float);
    if (use_p && (size_t)V * sizeof(cand) > need) need = (size_t)V * sizeof(cand);
    void *scratch = NULL;
    if (need) QF_TRY(qf_scratch(need, &scratch));

    /* 1. repetition penalty: gather every new value from the untouched logits, then scatter */
    const float pen = s->repetition_penalty;
    if (pen != 1.0f && n_history > 0) {
        float *nv = scratch;
        for (int64_t j = 0; j < n_history; j++) {
            float v = logits[history[j]];
            nv[j] = v < 0.0f ? v * pen : v / pen;
            if (nv[j] == INFINITY)
                return qf_fail(QF_ERR_NONFINITE, "qf_sample_token: repetition_penalty %g turns logits[%d] = %g into +inf",
                               (double)pen, history[j], (double)v);
        }
        for (int64_t j = 0; j < n_history; j++) logits[history[j]] = nv[j];
    }

    if (!s->do_sample) {
        int64_t best = 0;
        for (int64_t i = 1; i < V; i++)
            if (logits[i] > logits[best]) best = i;
        if (logits[best] == -INFINITY)
            return qf_fail(QF_ERR_ARG, "qf_sample_token: every logit is -inf after the repetition penalty");
        *out_id = (int32_t)best;
        return QF_OK;
    }

    /* 2. temperature */
    const float t = s->temperature;
    if (t != 1.0f)
        for (int64_t i = 0; i < V; i++) {
            float v = logits[i] / t;
            if (v == INFINITY)
                return qf_fail(QF_ERR_NONFINITE, "qf_sample_token: temperature %g turns logits[%lld] = %g into +inf",
                               (double)t, (long long)i, (double)logits[i]);
            logits[i] = v;
        }

    /* 3. top-k */
    if (use_k) {
        float thr = kth_largest(logits, V, k, scratch);
        for (int64_t i = 0; i < V; i++)
            if (logits[i] < thr) logits[i] = -INFINITY;
    }

    float m = -INFINITY;
    for (int64_t i = 0; i < V; i++) m = logits[i] > m ? logits[i] : m;
    if (m == -INFINITY) /* cannot happen: penalty and temperature keep finite values finite */
        return qf_fail(QF_ERR_INTERNAL, "qf_sample_token: no finite logit left before top-p");

    /* 4. top-p */
    if (use_p) top_p_filter(logits, V, s->top_p, m, scratch);

    /* 5. softmax + inverse-CDF draw in id order */
    double total = 0.0;
    for (int64_t i = 0; i < V; i++)
        if (logits[i] != -INFINITY) total += exp((double)logits[i] - (double)m);
    const double u = (double)draw_bits53(s->seed, counter) * 0x1.0p-53;
    const double target = u * total;
    double run = 0.0;
    int64_t last = -1;
    for (int64_t i = 0; i < V; i++) {
        if (logits[i] == -INFINITY) continue;
        double e = exp((double)logits[i] - (double)m);
        if (e <= 0.0) continue;
        run += e;
        last = i;
        if (run > target) break;
    }
    if (last < 0) return qf_fail(QF_ERR_INTERNAL, "qf_sample_token: no token with positive probability");
    *out_id = (int32_t)last;
    return QF_OK;
}
