/* test_llm.c - the decoder LLM's C API (include/qfuse_llm.h) against the transformers fixtures
 * tests/fixtures/llm_{llama,qwen2,opt}: logits of qf_llm_forward, the same logits built position
 * by position through qf_llm_decode on a KV cache, greedy qf_llm_generate vs the fixture's
 * generated_ids, and the argument errors. (The Python suite covers padding, formats, LoRA.)
 * Bar: max|out - ref| / max|ref| <= 1e-4 (float32 through a 2-layer model; expect ~5e-7). */
#include "testutil.h"

static void check_case(const char *name) {
    char dir[256], io_path[300];
    snprintf(dir, sizeof dir, "tests/fixtures/%s", name);
    snprintf(io_path, sizeof io_path, "%s/io.safetensors", dir);
    qf_llm *m = NULL;
    qf_safetensors *io = NULL;
    CHECK_OK(qf_llm_load(dir, &m));
    CHECK_OK(qf_st_open(io_path, &io));
    if (!m || !io) {
        qf_llm_free(m);
        qf_st_close(io);
        return;
    }
    qf_llm_config c;
    CHECK_OK(qf_llm_get_config(m, &c));
    qf_tensor_view ids_v, gen_v, logit_v;
    CHECK_OK(qf_st_find(io, "input_ids", &ids_v));
    CHECK_OK(qf_st_find(io, "generated_ids", &gen_v));
    CHECK_OK(qf_st_find(io, "logits", &logit_v));
    const int64_t B = ids_v.shape[0], T = ids_v.shape[1], V = c.vocab_size, E = c.word_embed_proj_dim;
    const int64_t M = gen_v.shape[1] - T;
    const int32_t *ids = ids_v.data, *gen = gen_v.data;
    float *emb = malloc((size_t)(B * T * E) * sizeof *emb), *logits = malloc((size_t)(B * T * V) * sizeof *logits);
    float *step = malloc((size_t)(B * V) * sizeof *step), *row = malloc((size_t)(B * E) * sizeof *row);
    double *ref = malloc((size_t)(B * T * V) * sizeof *ref);
    int32_t *out = malloc((size_t)(B * M) * sizeof *out);
    const float *lr = logit_v.data;
    for (int64_t i = 0; i < B * T * V; i++) ref[i] = lr[i];

    /* whole prompt at once */
    CHECK_OK(qf_llm_embed(m, ids, B, T, emb));
    CHECK_OK(qf_llm_forward(m, emb, B, T, NULL, logits));
    double err = tu_rel_err(logits, ref, (size_t)(B * T * V));
    printf("test_llm: %-9s forward rel err %.2e", name, err);
    CHECK(err < 1e-4);

    /* position by position through a KV cache: the last-position logits of each step */
    qf_llm_cache *cache = NULL;
    CHECK_OK(qf_llm_cache_new(m, B, T, &cache));
    double worst = 0;
    for (int64_t t = 0; t < T && cache; t++) {
        for (int64_t b = 0; b < B; b++) memcpy(row + b * E, emb + (b * T + t) * E, (size_t)E * sizeof *row);
        CHECK_OK(qf_llm_decode(m, cache, row, 1, NULL, step, 1));
        for (int64_t b = 0; b < B; b++) {
            double e = tu_rel_err(step + b * V, ref + (b * T + t) * V, (size_t)V);
            if (e > worst) worst = e;
        }
    }
    printf(", cached steps %.2e\n", worst);
    CHECK(worst < 1e-4);
    CHECK(qf_llm_cache_length(cache) == T);
    CHECK_ERR(qf_llm_decode(m, cache, row, 1, NULL, step, 1), QF_ERR_ARG, "capacity");
    qf_llm_cache_free(cache);

    /* greedy generation with the folder's eos/pad */
    qf_generate_options o = qf_llm_generate_defaults(m);
    o.max_new_tokens = M;
    int64_t steps = 0;
    CHECK_OK(qf_llm_generate(m, emb, NULL, B, T, ids, &o, out, &steps));
    int same = 1;
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i < steps; i++) same &= out[b * M + i] == gen[b * (T + M) + T + i];
    CHECK(steps >= 1 && same);

    /* argument errors name what is wrong */
    int32_t bad[2] = {0, (int32_t)V};
    CHECK_ERR(qf_llm_embed(m, bad, 1, 2, emb), QF_ERR_ARG, "input_ids[0,1]");
    o.pad_id = -1;
    CHECK_ERR(qf_llm_generate(m, emb, NULL, B, T, ids, &o, out, &steps), QF_ERR_ARG, "pad_id");
    CHECK_ERR(qf_llm_cache_new(m, 0, 4, &cache), QF_ERR_ARG, "B = 0");

    free(emb);
    free(logits);
    free(step);
    free(row);
    free(ref);
    free(out);
    qf_st_close(io);
    qf_llm_free(m);
}

int main(void) {
    check_case("llm_llama");
    check_case("llm_qwen2");
    check_case("llm_opt");
    qf_llm *m = NULL;
    CHECK_ERR(qf_llm_load("tests/fixtures/qformer_0", &m), QF_ERR_UNSUPPORTED, "model_type");
    CHECK(m == NULL);
    TEST_MAIN_END("test_llm");
}
