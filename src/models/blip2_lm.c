/* blip2_lm.c - BLIP-2 / InstructBLIP end to end (transformers 5.x Blip2ForConditionalGeneration
 * and InstructBlipForConditionalGeneration): image -> qf_blip2 fused tokens -> spliced into the
 * prompt's embeddings -> the text_config decoder (qf_llm) -> logits or generated ids.
 *
 * What the reference does, and this file reproduces:
 *   language_model_inputs = language_projection(qformer(vision(pixel_values))[:, :nq])
 *   inputs_embeds = embed_tokens(input_ids)
 *   inputs_embeds = inputs_embeds.masked_scatter(input_ids == image_token_id, language_model_inputs)
 *   logits = language_model(inputs_embeds, attention_mask)            (forward)
 *   language_model.generate(inputs_embeds, attention_mask, input_ids)  (generate: the output
 *                                                                       starts with input_ids)
 * Differences, all on inputs the reference mishandles: each row must hold exactly nq image tokens
 * (masked_scatter would spill one row's tokens into the next, or leave the image out); image
 * token positions are not looked up in the embedding table (the reference needs image_token_id <
 * vocab only for a lookup whose result it overwrites).
 *
 * Loading: the image side is qf_blip2_load(folder) (vision_model.*, qformer.*, query_tokens,
 * language_projection.*); the decoder is qf_llm_load_parts over the same checkpoint opened a second
 * time with only language_model.* wanted, so a sharded checkpoint is gathered once per part and
 * never whole. generation_config.json (optional) supplies eos_token_id (int or list) and
 * pad_token_id, as the reference's generate reads them.
 *
 * Invariants:
 *   - fused, embeds and ids are grow-only planned buffers (the decoder keeps its own): a call
 *     with the shapes of an earlier one allocates nothing here.
 *   - Every check on the inputs (counts, id ranges, context length) runs before any model work,
 *     so a rejected call leaves nothing half done.
 */
#include "models/llm_internal.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct qf_vlm {
    qf_blip2 *blip2;
    qf_llm *llm;
    qf_vlm_info info;
    float *fused, *embeds;
    size_t fused_cap, embeds_cap;   /* floats */
    int32_t *ids;                   /* input_ids with image positions mapped to 0 */
    size_t ids_cap;
};

/* ---- loading ------------------------------------------------------------------------------ */

static int want_language_model(const char *name) { return !strncmp(name, "language_model.", 15); }

static qf_status read_info(qf_vlm *m, const qf_config *cfg, const qf_safetensors *st, const char *folder,
                           const char *cfg_path) {
    const char *fn = "qf_vlm_load";
    qf_vlm_info *in = &m->info;
    const char *mt = NULL;
    QF_TRY(qf_config_string(cfg, "model_type", &mt));
    in->instruct = !strcmp(mt, "instructblip");
    const char *tmt = NULL;
    if (qf_config_has(cfg, "text_config.model_type")) QF_TRY(qf_config_string(cfg, "text_config.model_type", &tmt));
    snprintf(in->text_model_type, sizeof in->text_model_type, "%s", tmt ? tmt : "");
    in->num_query_tokens = qf_blip2_num_query_tokens(m->blip2);
    in->embed_dim = qf_blip2_projection_dim(m->blip2);
    qf_vision_config vc;
    QF_TRY(qf_vision_get_config(qf_blip2_vision(m->blip2), &vc));
    in->image_size = vc.image_size;
    qf_llm_config lc;
    QF_TRY(qf_llm_get_config(m->llm, &lc));
    in->vocab_size = lc.vocab_size;
    /* the decoder's input embedding width must be what language_projection produces */
    static const char *const tables[] = {"language_model.model.decoder.embed_tokens.weight",
                                         "language_model.model.embed_tokens.weight"};
    for (int i = 0; i < 2; i++) {
        qf_tensor_view tv;
        if (qf_st_find(st, tables[i], &tv) != QF_OK) continue;
        if (tv.ndim != 2 || tv.shape[1] != in->embed_dim)
            return qf_fail(QF_ERR_SHAPE, "%s: tensor \"%s\" has width %lld but language_projection makes %lld-wide "
                                         "tokens: the image tokens cannot take the place of word embeddings",
                           fn, tables[i], (long long)(tv.ndim == 2 ? tv.shape[1] : -1), (long long)in->embed_dim);
    }
    qf_clear_error();
    QF_TRY(qf_config_int_or(cfg, "text_config.max_position_embeddings", 2048, &in->max_positions));
    if (in->max_positions < 1)
        return qf_fail(QF_ERR_FORMAT, "%s: %s: text_config.max_position_embeddings = %lld must be >= 1", fn, cfg_path,
                       (long long)in->max_positions);
    int64_t v;
    const char *img_key = qf_config_has(cfg, "image_token_id") ? "image_token_id" : "image_token_index";
    if (!qf_config_has(cfg, img_key))
        return qf_fail(QF_ERR_FORMAT, "%s: %s has neither image_token_id nor image_token_index: the prompt's image "
                                      "placeholders cannot be found (older checkpoints: add the id the processor uses)",
                       fn, cfg_path);
    QF_TRY(qf_config_int(cfg, img_key, &v));
    if (v < 0 || v > INT32_MAX) return qf_fail(QF_ERR_FORMAT, "%s: %s: %s = %lld is not a token id", fn, cfg_path, img_key, (long long)v);
    in->image_token_id = (int32_t)v;
    QF_TRY(qf_config_int_or(cfg, "text_config.bos_token_id", -1, &v));
    in->bos_token_id = (int32_t)v;
    /* eos / pad: generation_config.json, else text_config, pad falling back to the first eos
     * (the decoder resolves them as for a plain LLM folder) */
    QF_TRY(llm_read_generation_config(m->llm, folder));
    qf_generate_options d = qf_llm_generate_defaults(m->llm);
    if (d.n_eos > QF_VLM_MAX_EOS)
        return qf_fail(QF_ERR_UNSUPPORTED, "%s: %s lists %d eos ids, more than %d", fn, folder, d.n_eos, QF_VLM_MAX_EOS);
    in->n_eos = d.n_eos;
    for (int i = 0; i < d.n_eos; i++) in->eos_ids[i] = d.eos_ids[i];
    in->pad_token_id = d.pad_id;
    return QF_OK;
}

void qf_vlm_free(qf_vlm *m) {
    if (!m) return;
    qf_blip2_free(m->blip2);
    qf_llm_free(m->llm);
    free(m->fused);
    free(m->embeds);
    free(m->ids);
    free(m);
}

qf_status qf_vlm_load(const char *folder, const qf_llm_options *opt, qf_vlm **out) {
    const char *fn = "qf_vlm_load";
    if (!out) return qf_fail(QF_ERR_ARG, "%s: out is NULL", fn);
    *out = NULL;
    if (!folder) return qf_fail(QF_ERR_ARG, "%s: folder is NULL", fn);
    char cfg_path[4096];
    if (snprintf(cfg_path, sizeof cfg_path, "%s/config.json", folder) >= (int)sizeof cfg_path - 40)
        return qf_fail(QF_ERR_ARG, "%s: folder path is too long", fn);
    qf_vlm *m = calloc(1, sizeof *m);
    if (!m) return qf_fail(QF_ERR_NOMEM, "%s: cannot allocate the model", fn);
    qf_config *cfg = NULL;
    qf_safetensors *st = NULL;
    qf_status s = qf_blip2_load(folder, &m->blip2); /* checks model_type, loads the image side */
    if (s == QF_OK) s = qf_config_load(cfg_path, &cfg);
    if (s == QF_OK && !qf_config_has(cfg, "text_config"))
        s = qf_fail(QF_ERR_FORMAT, "%s: %s has no text_config: no language model to load", fn, cfg_path);
    int decoder_only = 1;
    if (s == QF_OK && qf_config_has(cfg, "use_decoder_only_language_model"))
        s = qf_config_bool(cfg, "use_decoder_only_language_model", &decoder_only);
    if (s == QF_OK && !decoder_only)
        s = qf_fail(QF_ERR_UNSUPPORTED, "%s: %s: use_decoder_only_language_model = false (an encoder-decoder language "
                                        "model such as Flan-T5) is not supported; OPT and LLaMA decoders are", fn, cfg_path);
    if (s == QF_OK) s = qf_open_checkpoint(folder, want_language_model, &st);
    if (s == QF_OK) {
        s = qf_llm_load_parts(cfg, "text_config.", st, "language_model.", opt, &m->llm);
        if (s != QF_OK) s = qf_fail_prefix(s, "%s: %s: language model", fn, folder);
    }
    if (s == QF_OK) s = read_info(m, cfg, st, folder, cfg_path);
    qf_st_close(st);
    qf_config_free(cfg);
    if (s != QF_OK) {
        qf_vlm_free(m);
        return s;
    }
    *out = m;
    return QF_OK;
}

qf_status qf_vlm_get_info(const qf_vlm *m, qf_vlm_info *out) {
    if (!m || !out) return qf_fail(QF_ERR_ARG, "qf_vlm_get_info: NULL argument");
    *out = m->info;
    return QF_OK;
}

qf_blip2 *qf_vlm_blip2(qf_vlm *m) { return m ? m->blip2 : NULL; }
qf_llm *qf_vlm_llm(qf_vlm *m) { return m ? m->llm : NULL; }

/* ---- checks and buffers -------------------------------------------------------------------- */

static qf_status grow_f(float **buf, size_t *cap, size_t n, const char *fn) {
    if (n <= *cap) return QF_OK;
    void *p = NULL;
    if (posix_memalign(&p, 64, (n ? n : 1) * sizeof(float)))
        return qf_fail(QF_ERR_NOMEM, "%s: cannot allocate %zu bytes of activations", fn, n * sizeof(float));
    free(*buf);
    *buf = p;
    *cap = n;
    return QF_OK;
}

static qf_status check_shape(const char *fn, const qf_vlm *m, int64_t B, int64_t T) {
    if (!m) return qf_fail(QF_ERR_ARG, "%s: m is NULL", fn);
    if (B < 1 || B > (1 << 20)) return qf_fail(QF_ERR_ARG, "%s: B = %lld, expected 1 <= B <= 2^20", fn, (long long)B);
    if (T < 1) return qf_fail(QF_ERR_ARG, "%s: T = %lld, expected a prompt of at least 1 token", fn, (long long)T);
    if (T > m->info.max_positions)
        return qf_fail(QF_ERR_ARG, "%s: the prompt has %lld tokens but the language model's context is %lld "
                                   "(text_config.max_position_embeddings)", fn, (long long)T,
                       (long long)m->info.max_positions);
    return QF_OK;
}

/* Every row holds exactly nq image tokens; every other id is in [0, vocab). Writes ids_out with
 * image positions mapped to 0 (a valid row of the table, overwritten afterwards). */
static qf_status check_ids(const char *fn, const qf_vlm *m, const int32_t *ids, int64_t B, int64_t T, int32_t *ids_out) {
    if (!ids) return qf_fail(QF_ERR_ARG, "%s: input_ids is NULL", fn);
    const int32_t img = m->info.image_token_id;
    const int64_t nq = m->info.num_query_tokens, V = m->info.vocab_size;
    for (int64_t b = 0; b < B; b++) {
        int64_t count = 0;
        for (int64_t t = 0; t < T; t++) {
            int32_t id = ids[b * T + t];
            if (id == img) {
                count++;
                id = 0;
            } else if (id < 0 || id >= V) {
                return qf_fail(QF_ERR_ARG, "%s: input_ids[%lld,%lld] = %d is outside the vocabulary [0, %lld) (image "
                                           "token id %d)", fn, (long long)b, (long long)t, id, (long long)V, img);
            }
            if (ids_out) ids_out[b * T + t] = id;
        }
        if (count != nq)
            return qf_fail(QF_ERR_ARG, "%s: input_ids row %lld holds %lld image tokens (id %d) but the model makes "
                                       "num_query_tokens = %lld image embeddings per image: the prompt must hold exactly "
                                       "%lld (Blip2Processor puts them first, before BOS)", fn, (long long)b,
                           (long long)count, img, (long long)nq, (long long)nq);
    }
    return QF_OK;
}

static qf_status check_inputs(const char *fn, qf_vlm *m, const qf_vlm_inputs *in) {
    if (!in) return qf_fail(QF_ERR_ARG, "%s: inputs is NULL", fn);
    QF_TRY(check_shape(fn, m, in->B, in->T));
    if (!in->pixel_values) return qf_fail(QF_ERR_ARG, "%s: pixel_values is NULL", fn);
    if (in->qformer_len < 0) return qf_fail(QF_ERR_ARG, "%s: qformer_len = %lld < 0", fn, (long long)in->qformer_len);
    if (in->qformer_len > 0 && !m->info.instruct)
        return qf_fail(QF_ERR_ARG, "%s: qformer_len = %lld but this BLIP-2 model's Q-Former reads no instruction "
                                   "(only InstructBLIP's does)", fn, (long long)in->qformer_len);
    if (in->qformer_len > 0 && !in->qformer_ids) return qf_fail(QF_ERR_ARG, "%s: qformer_ids is NULL", fn);
    return check_ids(fn, m, in->input_ids, in->B, in->T, NULL);
}

/* ---- splicing ------------------------------------------------------------------------------ */

qf_status qf_vlm_splice_image_tokens(qf_vlm *m, const int32_t *input_ids, int64_t B, int64_t T, const float *fused,
                                     float *embeds) {
    const char *fn = "qf_vlm_splice_image_tokens";
    QF_TRY(check_shape(fn, m, B, T));
    if (!fused || !embeds) return qf_fail(QF_ERR_ARG, "%s: fused or embeds is NULL", fn);
    size_t n = (size_t)(B * T);
    if (n > m->ids_cap) {
        int32_t *p = malloc(n * sizeof *p);
        if (!p) return qf_fail(QF_ERR_NOMEM, "%s: cannot allocate %zu ids", fn, n);
        free(m->ids);
        m->ids = p;
        m->ids_cap = n;
    }
    QF_TRY(check_ids(fn, m, input_ids, B, T, m->ids));
    QF_TRY(qf_llm_embed(m->llm, m->ids, B, T, embeds));
    const int64_t D = m->info.embed_dim, nq = m->info.num_query_tokens;
    for (int64_t b = 0; b < B; b++) {
        int64_t k = 0;
        for (int64_t t = 0; t < T; t++)
            if (input_ids[b * T + t] == m->info.image_token_id)
                memcpy(embeds + (b * T + t) * D, fused + (b * nq + k++) * D, (size_t)D * sizeof(float));
    }
    return QF_OK;
}

qf_status qf_splice_embeds(const float *prompt, const uint8_t *prompt_mask, int64_t B, int64_t T, int64_t D,
                           const float *fused, int64_t n, int64_t pos, float *out, uint8_t *mask_out) {
    const char *fn = "qf_splice_embeds";
    if (!prompt || !fused || !out) return qf_fail(QF_ERR_ARG, "%s: prompt, fused or out is NULL", fn);
    if (B < 1 || T < 0 || D < 1 || n < 0)
        return qf_fail(QF_ERR_ARG, "%s: B = %lld, T = %lld, D = %lld, n = %lld: expected B >= 1, T >= 0, D >= 1, n >= 0",
                       fn, (long long)B, (long long)T, (long long)D, (long long)n);
    if (pos < 0 || pos > T)
        return qf_fail(QF_ERR_ARG, "%s: pos = %lld is outside the prompt: expected 0 <= pos <= T = %lld", fn,
                       (long long)pos, (long long)T);
    const int64_t L = T + n;
    const size_t row = (size_t)D * sizeof(float);
    const char *o0 = (const char *)out, *o1 = o0 + (size_t)(B * L) * row;
    const char *p0 = (const char *)prompt, *p1 = p0 + (size_t)(B * T) * row;
    const char *f0 = (const char *)fused, *f1 = f0 + (size_t)(B * n) * row;
    if ((o0 < p1 && p0 < o1 && T) || (o0 < f1 && f0 < o1 && n))
        return qf_fail(QF_ERR_ARG, "%s: out overlaps prompt or fused (the splice cannot run in place)", fn);
    for (int64_t b = 0; b < B; b++) {
        float *o = out + b * L * D;
        const float *p = prompt + b * T * D;
        memcpy(o, p, (size_t)pos * row);
        memcpy(o + pos * D, fused + b * n * D, (size_t)n * row);
        memcpy(o + (pos + n) * D, p + pos * D, (size_t)(T - pos) * row);
        if (mask_out) {
            uint8_t *mo = mask_out + b * L;
            for (int64_t t = 0; t < L; t++) {
                int64_t src = t < pos ? t : t < pos + n ? -1 : t - n;
                mo[t] = src < 0 ? 1 : prompt_mask ? (prompt_mask[b * T + src] != 0) : 1;
            }
        }
    }
    return QF_OK;
}

/* ---- forward ------------------------------------------------------------------------------- */

qf_status qf_vlm_fused_tokens(qf_vlm *m, const qf_vlm_inputs *in, float *fused) {
    const char *fn = "qf_vlm_fused_tokens";
    if (!m || !in || !fused) return qf_fail(QF_ERR_ARG, "%s: NULL argument", fn);
    if (in->B < 1 || in->B > (1 << 20)) return qf_fail(QF_ERR_ARG, "%s: B = %lld, expected 1 <= B <= 2^20", fn, (long long)in->B);
    if (!in->pixel_values) return qf_fail(QF_ERR_ARG, "%s: pixel_values is NULL", fn);
    return qf_blip2_fuse(m->blip2, in->B, in->pixel_values, in->qformer_len, in->qformer_len ? in->qformer_ids : NULL,
                         in->qformer_len ? in->qformer_mask : NULL, fused);
}

qf_status qf_vlm_embed(qf_vlm *m, const qf_vlm_inputs *in, float *embeds) {
    const char *fn = "qf_vlm_embed";
    QF_TRY(check_inputs(fn, m, in));
    if (!embeds) return qf_fail(QF_ERR_ARG, "%s: embeds is NULL", fn);
    QF_TRY(grow_f(&m->fused, &m->fused_cap, (size_t)(in->B * m->info.num_query_tokens * m->info.embed_dim), fn));
    QF_TRY(qf_vlm_fused_tokens(m, in, m->fused));
    return qf_vlm_splice_image_tokens(m, in->input_ids, in->B, in->T, m->fused, embeds);
}

static qf_status embed_own(const char *fn, qf_vlm *m, const qf_vlm_inputs *in) {
    QF_TRY(check_inputs(fn, m, in));
    QF_TRY(grow_f(&m->embeds, &m->embeds_cap, (size_t)(in->B * in->T * m->info.embed_dim), fn));
    return qf_vlm_embed(m, in, m->embeds);
}

qf_status qf_vlm_logits(qf_vlm *m, const qf_vlm_inputs *in, float *logits) {
    const char *fn = "qf_vlm_logits";
    if (!logits) return qf_fail(QF_ERR_ARG, "%s: logits is NULL", fn);
    QF_TRY(embed_own(fn, m, in));
    return qf_llm_forward(m->llm, m->embeds, in->B, in->T, in->attention_mask, logits);
}

qf_generate_options qf_vlm_generate_defaults(const qf_vlm *m) {
    qf_generate_options o = qf_generate_defaults();
    if (m) {
        o.eos_ids = m->info.eos_ids;
        o.n_eos = m->info.n_eos;
        o.pad_id = m->info.pad_token_id;
    }
    return o;
}

qf_status qf_vlm_generate(qf_vlm *m, const qf_vlm_inputs *in, const qf_generate_options *o, int32_t *out_ids,
                          int64_t *n_steps) {
    const char *fn = "qf_vlm_generate";
    if (!o || !out_ids) return qf_fail(QF_ERR_ARG, "%s: options or out_ids is NULL", fn);
    QF_TRY(check_inputs(fn, m, in));
    if (o->max_new_tokens < 0)
        return qf_fail(QF_ERR_ARG, "%s: max_new_tokens = %lld < 0", fn, (long long)o->max_new_tokens);
    if (in->T + o->max_new_tokens > m->info.max_positions)
        return qf_fail(QF_ERR_ARG, "%s: the prompt's %lld tokens + max_new_tokens %lld exceed the language model's "
                                   "context of %lld (text_config.max_position_embeddings)", fn, (long long)in->T,
                       (long long)o->max_new_tokens, (long long)m->info.max_positions);
    QF_TRY(embed_own(fn, m, in));
    return qf_llm_generate(m->llm, m->embeds, in->attention_mask, in->B, in->T, in->input_ids, o, out_ids, n_steps);
}
