/* fuzz_npy.c - libFuzzer target for the .npy parser.
 * Any input must either be rejected (status, message, no data left allocated) or parse into an
 * array whose shape x element size equals the bytes it owns. */
#include "qfuse.h"
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    qf_npy a;
    if (qf_npy_parse(data, size, "fuzz", &a) != QF_OK) {
        if (a.data || !qf_last_error()[0]) abort();
        return 0;
    }
    size_t count = 1;
    for (int d = 0; d < a.ndim; d++) count *= (size_t)a.shape[d];
    if (!a.data || count * qf_dtype_size(a.dtype) != a.nbytes || a.nbytes > size) abort();
    volatile unsigned char sink = 0;
    for (size_t k = 0; k < a.nbytes; k++) sink ^= ((const unsigned char *)a.data)[k];
    (void)sink;
    if ((a.dtype == QF_F32 || a.dtype == QF_F64 || a.dtype == QF_F16) && count) {
        float *dst = malloc(count * sizeof(float));
        if (dst && qf_to_f32(a.dtype, a.data, dst, count) != QF_OK) abort();
        free(dst);
    }
    qf_npy_free(&a);
    return 0;
}
