/* llm_adapter.c - PEFT LoRA adapters on a loaded decoder LLM (include/qfuse_llm.h): load several
 * under distinct names, select one, merge it into the float32 weights and unmerge it again.
 *
 * Rules (as PEFT's PeftModel behaves, where it has a rule):
 *   - Loading checks every pair against the model before the adapter is kept: the module must
 *     exist (an adapter for another architecture names modules this model lacks, and is refused
 *     naming the first such module) and its A/B must fit the linear's in/out. When the adapter
 *     records auto_mapping.base_model_class, a class of another family than the model's
 *     model_type is refused too.
 *   - The first adapter loaded while none is active becomes active (PeftModel.from_pretrained);
 *     later ones are only loaded (PeftModel.load_adapter) until qf_llm_set_adapter selects them.
 *   - The active adapter is applied on the fly: each targeted llm_linear's `lora` points at its
 *     pair, every other linear's `lora` is NULL.
 *   - Merge adds scaling * B A to each targeted float32 weight and clears those `lora` pointers;
 *     quantized weights and an lm_head tied to the embedding table are refused before anything
 *     changes. Merging an already merged adapter does nothing.
 *   - Unmerge subtracts it again (the weights come back to float32 rounding) and the adapter is
 *     applied on the fly again. Unmerge with nothing merged does nothing.
 *   - Selecting another adapter (or none) while one is merged unmerges it first, as PEFT's
 *     set_adapter does; selecting the merged one again changes nothing.
 *
 * Invariants: adapters[0..n_adapters) hold distinct names and each its own qf_lora; active and
 * merged are -1 or valid indices, merged is -1 or equal to active; the `lora` pointers of the
 * linears are exactly those the rules above give.
 */
#include "models/llm_internal.h"
#include <stdio.h>
#include <string.h>

static int valid_index(const qf_llm *m, int i) { return i >= 0 && i < m->n_adapters; }

/* Points every linear's `lora` at the active, unmerged adapter's pair for it, or NULL. */
static void point_linears(qf_llm *m) {
    for (int i = 0; i < m->n_linears; i++) m->linears[i]->lora = NULL;
    int a = m->active_adapter;
    if (!valid_index(m, a) || m->merged_adapter == a) return;
    const qf_lora *l = m->adapters[a].lora;
    for (int k = 0; k < qf_lora_num_pairs(l); k++) {
        const qf_lora_pair *p = qf_lora_pair_at(l, k);
        llm_linear *L = llm_find_linear(m, p->module);
        if (L) L->lora = p; /* always found: checked at load */
    }
}

static int find_adapter(const qf_llm *m, const char *name) {
    for (int i = 0; i < m->n_adapters; i++)
        if (!strcmp(m->adapters[i].name, name)) return i;
    return -1;
}

/* The transformers class family of a model_type ("Llama" for LlamaForCausalLM), or NULL. */
static const char *class_family(const char *model_type) {
    if (!strcmp(model_type, "llama")) return "Llama";
    if (!strcmp(model_type, "qwen2")) return "Qwen2";
    if (!strcmp(model_type, "opt")) return "OPT";
    return NULL;
}

static qf_status check_fits(qf_llm *m, const qf_lora *l, const char *name, const char *folder) {
    const char *cls = qf_lora_base_class(l);
    const char *fam = class_family(m->cfg.model_type);
    if (cls[0] && fam && strncmp(cls, fam, strlen(fam)) != 0)
        return qf_fail(QF_ERR_ARG,
                       "adapter \"%s\" (%s) was trained on %s (auto_mapping.base_model_class) but this model is a "
                       "%s model (model_type \"%s\")",
                       name, folder, cls, fam, m->cfg.model_type);
    for (int k = 0; k < qf_lora_num_pairs(l); k++) {
        const qf_lora_pair *p = qf_lora_pair_at(l, k);
        const llm_linear *L = llm_find_linear(m, p->module);
        if (!L)
            return qf_fail(QF_ERR_NOT_FOUND, "adapter \"%s\" (%s) targets %s, which this model does not have", name,
                           folder, p->module);
        if (L->in != p->in || L->out != p->out)
            return qf_fail(QF_ERR_SHAPE,
                           "adapter \"%s\" (%s): %s is a [%lld -> %lld] linear in this model but the adapter's "
                           "lora_A/lora_B map %lld -> %lld",
                           name, folder, p->module, (long long)L->in, (long long)L->out, (long long)p->in,
                           (long long)p->out);
    }
    return QF_OK;
}

qf_status qf_llm_load_adapter(qf_llm *m, const char *folder, const char *name) {
    if (!m || !folder || !name)
        return qf_fail(QF_ERR_ARG, "qf_llm_load_adapter: %s is NULL", !m ? "model" : !folder ? "folder" : "name");
    if (!name[0] || strlen(name) >= sizeof m->adapters[0].name)
        return qf_fail(QF_ERR_ARG, "qf_llm_load_adapter: adapter name \"%s\" must have 1 to %zu characters", name,
                       sizeof m->adapters[0].name - 1);
    if (m->n_adapters <= 0) { /* whatever the loader left there, nothing is active yet */
        m->n_adapters = 0;
        m->active_adapter = m->merged_adapter = -1;
    }
    if (find_adapter(m, name) >= 0)
        return qf_fail(QF_ERR_ARG, "qf_llm_load_adapter: an adapter named \"%s\" is already loaded", name);
    if (m->n_adapters >= LLM_MAX_ADAPTERS)
        return qf_fail(QF_ERR_ARG, "qf_llm_load_adapter: %d adapters are loaded, the most a model holds", m->n_adapters);
    qf_lora *l;
    QF_TRY(qf_lora_load(folder, &l));
    qf_status s = check_fits(m, l, name, folder);
    if (s != QF_OK) {
        qf_lora_free(l);
        return s;
    }
    llm_adapter *a = &m->adapters[m->n_adapters];
    snprintf(a->name, sizeof a->name, "%s", name);
    a->lora = l;
    int idx = m->n_adapters++;
    if (!valid_index(m, m->active_adapter)) {
        m->active_adapter = idx;
        point_linears(m);
    }
    return QF_OK;
}

/* The targeted linears of adapter i, checked for merging (float32, not shared) before any change. */
static qf_status check_mergeable(qf_llm *m, int i) {
    const qf_lora *l = m->adapters[i].lora;
    for (int k = 0; k < qf_lora_num_pairs(l); k++) {
        const qf_lora_pair *p = qf_lora_pair_at(l, k);
        const llm_linear *L = llm_find_linear(m, p->module);
        if (!L || !L->w || L->q)
            return qf_fail(QF_ERR_UNSUPPORTED,
                           "qf_llm_merge_adapter: adapter \"%s\" targets %s, whose weight is quantized: merging needs "
                           "float32 weights (the adapter still applies on the fly)",
                           m->adapters[i].name, p->module);
        if (L == &m->lm_head && L->w == m->embed)
            return qf_fail(QF_ERR_UNSUPPORTED,
                           "qf_llm_merge_adapter: adapter \"%s\" targets lm_head, which shares its weight with "
                           "embed_tokens (tie_word_embeddings): merging would change the embeddings too",
                           m->adapters[i].name);
    }
    return QF_OK;
}

static void merge_signed(qf_llm *m, int i, float sign) {
    const qf_lora *l = m->adapters[i].lora;
    for (int k = 0; k < qf_lora_num_pairs(l); k++) {
        const qf_lora_pair *p = qf_lora_pair_at(l, k);
        llm_linear *L = llm_find_linear(m, p->module);
        qf_lora_merge(p, L->w, sign); /* cannot fail: pair, w and sign checked */
    }
}

qf_status qf_llm_unmerge_adapter(qf_llm *m) {
    if (!m) return qf_fail(QF_ERR_ARG, "qf_llm_unmerge_adapter: model is NULL");
    if (!valid_index(m, m->merged_adapter)) return QF_OK;
    merge_signed(m, m->merged_adapter, -1.0f);
    m->merged_adapter = -1;
    point_linears(m);
    return QF_OK;
}

qf_status qf_llm_merge_adapter(qf_llm *m) {
    if (!m) return qf_fail(QF_ERR_ARG, "qf_llm_merge_adapter: model is NULL");
    int a = m->active_adapter;
    if (!valid_index(m, a))
        return qf_fail(QF_ERR_ARG, "qf_llm_merge_adapter: no adapter is active (load one, or select it with "
                                   "qf_llm_set_adapter)");
    if (m->merged_adapter == a) return QF_OK;
    QF_TRY(check_mergeable(m, a));
    merge_signed(m, a, 1.0f);
    m->merged_adapter = a;
    point_linears(m);
    return QF_OK;
}

qf_status qf_llm_set_adapter(qf_llm *m, const char *name) {
    if (!m) return qf_fail(QF_ERR_ARG, "qf_llm_set_adapter: model is NULL");
    int i = -1;
    if (name) {
        i = find_adapter(m, name);
        if (i < 0) {
            char have[LLM_MAX_ADAPTERS * 68 + 8] = "";
            size_t at = 0;
            for (int k = 0; k < m->n_adapters && at < sizeof have; k++)
                at += (size_t)snprintf(have + at, sizeof have - at, "%s\"%s\"", k ? ", " : "", m->adapters[k].name);
            return qf_fail(QF_ERR_NOT_FOUND, "qf_llm_set_adapter: no adapter named \"%s\" is loaded (loaded: %s)", name,
                           m->n_adapters ? have : "none");
        }
    }
    if (valid_index(m, m->merged_adapter) && m->merged_adapter != i) QF_TRY(qf_llm_unmerge_adapter(m));
    m->active_adapter = i;
    point_linears(m);
    return QF_OK;
}

void llm_adapters_free(qf_llm *m) {
    if (!m) return;
    for (int i = 0; i < m->n_linears; i++) m->linears[i]->lora = NULL;
    for (int i = 0; i < m->n_adapters && i < LLM_MAX_ADAPTERS; i++) {
        qf_lora_free(m->adapters[i].lora);
        m->adapters[i].lora = NULL;
    }
    m->n_adapters = 0;
    m->active_adapter = m->merged_adapter = -1;
}
