/* fuzz_safetensors.c - libFuzzer target for the safetensors reader.
 * Any input must either be rejected with a status and a non-empty message, or open into a
 * handle whose every tensor view lies inside the buffer and converts (float dtypes) without
 * reading out of bounds. ASan/UBSan turn any violation into a crash. */
#include "qfuse.h"
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    qf_safetensors *f = NULL;
    if (qf_st_open_memory(data, size, "fuzz", &f) != QF_OK) {
        if (f || !qf_last_error()[0]) abort(); /* failure must leave no handle and say why */
        return 0;
    }
    int n = qf_st_count(f);
    for (int i = 0; i < n; i++) {
        qf_tensor_view v;
        if (qf_st_get(f, i, &v) != QF_OK) abort();
        qf_tensor_view w;
        if (qf_st_find(f, v.name, &w) != QF_OK || w.data != v.data) abort();
        size_t count = 1;
        for (int d = 0; d < v.ndim; d++) count *= (size_t)v.shape[d];
        if (count * qf_dtype_size(v.dtype) != v.nbytes) abort();
        /* touch every byte so ASan sees an out-of-range view */
        volatile unsigned char sink = 0;
        for (size_t k = 0; k < v.nbytes; k++) sink ^= ((const unsigned char *)v.data)[k];
        (void)sink;
        if (v.dtype == QF_F32 || v.dtype == QF_F64 || v.dtype == QF_F16 || v.dtype == QF_BF16) {
            if (count > ((size_t)1 << 24)) continue;
            float *dst = malloc(count ? count * sizeof(float) : 1);
            if (!dst) continue;
            if (qf_st_read_f32(f, v.name, v.ndim, v.shape, dst) != QF_OK) abort();
            free(dst);
        }
    }
    (void)qf_st_metadata(f, "format");
    qf_st_close(f);
    return 0;
}
