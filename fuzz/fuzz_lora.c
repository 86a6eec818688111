/* fuzz_lora.c - libFuzzer target for the PEFT adapter reader (src/models/lora.c): the input is
 *   [u32 little-endian n][n bytes: adapter_config.json][the rest: adapter_model.safetensors]
 * written into a private folder and loaded with qf_lora_load. Any input must either be rejected
 * with a message (and no adapter) or give an adapter whose every pair has positive rank, A and B
 * of the stated shapes and a finite scaling (checked by reading them all). */
#include "qfuse.h"
#include "models/lora.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static char dir[64];

static int put(const char *name, const uint8_t *p, size_t n) {
    char path[128];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    size_t w = n ? fwrite(p, 1, n, f) : 0;
    fclose(f);
    return w == n ? 0 : -1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!dir[0]) {
        snprintf(dir, sizeof dir, "/tmp/qfuse-fuzz-lora-XXXXXX");
        if (!mkdtemp(dir)) abort();
    }
    if (size < 4) return 0;
    size_t n = (size_t)data[0] | (size_t)data[1] << 8 | (size_t)data[2] << 16 | (size_t)data[3] << 24;
    if (n > size - 4) n = size - 4;
    if (put("adapter_config.json", data + 4, n) || put("adapter_model.safetensors", data + 4 + n, size - 4 - n))
        abort();
    qf_lora *a = NULL;
    if (qf_lora_load(dir, &a) != QF_OK) {
        if (a || !qf_last_error()[0]) abort();
        return 0;
    }
    for (int i = 0; i < qf_lora_num_pairs(a); i++) {
        const qf_lora_pair *p = qf_lora_pair_at(a, i);
        if (!p || p->r < 1 || p->in < 1 || p->out < 1 || !isfinite(p->scaling) || !p->A || !p->B) abort();
        volatile float s = 0;
        for (int64_t j = 0; j < p->r * p->in; j++) s += p->A[j];
        for (int64_t j = 0; j < p->out * p->r; j++) s += p->B[j];
        if (qf_lora_find(a, p->module) == NULL) abort();
    }
    qf_lora_free(a);
    return 0;
}
