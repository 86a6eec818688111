/* fuzz_checkpoint.c - libFuzzer target for the sharded-checkpoint opener (src/io/checkpoint.c):
 * the input is model.safetensors.index.json, in a private folder that also holds two valid
 * shards ("a.safetensors" with tensors x and y, "b.safetensors" with z). qf_open_checkpoint must
 * either fail with a message (and no file) or give a safetensors image in which every listed
 * tensor it kept reads back whole (checked by reading them all). */
#include "qfuse.h"
#include "internal.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static char dir[64];

static void put(const char *name, const void *p, size_t n) {
    char path[128];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    if (!f || (n && fwrite(p, 1, n, f) != n)) abort();
    fclose(f);
}

static void shard(const char *name, const char *t1, const char *t2) {
    float a[6] = {1, 2, 3, 4, 5, 6}, b[2] = {7, 8};
    int64_t s1[2] = {2, 3}, s2[1] = {2};
    qf_tensor_ref t[2] = {{t1, QF_F32, 2, {s1[0], s1[1]}, a}, {t2, QF_F32, 1, {s2[0]}, b}};
    char path[128];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    if (qf_st_write(path, t, t2 ? 2 : 1, NULL) != QF_OK) abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!dir[0]) {
        snprintf(dir, sizeof dir, "/tmp/qfuse-fuzz-ckpt-XXXXXX");
        if (!mkdtemp(dir)) abort();
        shard("a.safetensors", "x", "y");
        shard("b.safetensors", "z", NULL);
    }
    put("model.safetensors.index.json", data, size);
    qf_safetensors *st = NULL;
    if (qf_open_checkpoint(dir, NULL, &st) != QF_OK) {
        if (st || !qf_last_error()[0]) abort();
        return 0;
    }
    for (int i = 0; i < qf_st_count(st); i++) {
        qf_tensor_view v;
        if (qf_st_get(st, i, &v) != QF_OK) abort();
        volatile unsigned char acc = 0;
        for (size_t j = 0; j < v.nbytes; j++) acc ^= ((const unsigned char *)v.data)[j];
    }
    qf_st_close(st);
    return 0;
}
