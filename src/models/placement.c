/* placement.c - what every model's qf_*_to_device shares (models_internal.h): checking the device
 * and weight arguments, uploading a parameter block (and its bfloat16 copy) once, the GEMM that
 * reads a bf16 weight copy, and whether graphs are off.
 *
 * Invariants: qf_model_check_device changes nothing when it fails (it only starts the GPU);
 * qf_model_upload_params either returns both device blocks filled and the copies finished, or
 * frees what it allocated. */
#include "models_internal.h"

#include <stdlib.h>
#include <string.h>

qf_status qf_model_check_device(const char *fn, const char *what, const char *device, qf_dtype weights, int *cuda) {
    if (!device) return qf_fail(QF_ERR_ARG, "%s: device is NULL (\"cpu\" or \"cuda\")", fn);
    *cuda = !strcmp(device, "cuda");
    if (!*cuda && strcmp(device, "cpu"))
        return qf_fail(QF_ERR_ARG, "%s: device \"%s\" is unknown (\"cpu\" or \"cuda\")", fn, device);
    if (weights != QF_F32 && weights != QF_BF16)
        return qf_fail(QF_ERR_ARG, "%s: weights dtype %s is not supported (F32, or BF16 on cuda)", fn,
                       qf_dtype_name(weights));
    if (weights == QF_BF16 && !*cuda)
        return qf_fail(QF_ERR_UNSUPPORTED, "%s: bf16 weights run on the cuda device only (the CPU %s is float32)", fn,
                       what);
#if defined(QF_FAKE_DEVICE)
    /* the test-only stand-in (fake_device.c): "cuda" is host memory, nothing to start */
#elif defined(QF_HAVE_CUDA)
    if (*cuda) QF_TRY(qf_cuda_init());
#else
    if (*cuda)
        return qf_fail(QF_ERR_UNSUPPORTED, "%s: this libqfuse was built without the CUDA backend (build it with make "
                                           "CUDA=1)", fn);
#endif
    return QF_OK;
}

const qf_backend *qf_model_cuda_backend(void) {
#if defined(QF_FAKE_DEVICE)
    return qf_backend_fake();
#elif defined(QF_HAVE_CUDA)
    return qf_backend_cuda();
#else
    return NULL;
#endif
}

qf_status qf_model_upload_params(const qf_backend *be, const float *host, size_t n, size_t extra, qf_dtype weights,
                                 float **dev, uint16_t **dev_bf16, const char *fn) {
    float *dp = NULL;
    uint16_t *db = NULL;
    qf_status s = be->alloc((void **)&dp, (n + extra) * sizeof(float));
    if (s == QF_OK) s = be->copy2d(dp, n * sizeof(float), host, n * sizeof(float), n * sizeof(float), 1);
    if (s == QF_OK && weights == QF_BF16) {
        uint16_t *hb = malloc(n * sizeof(uint16_t));
        if (!hb) s = qf_fail(QF_ERR_NOMEM, "%s: cannot allocate %zu bytes for the bf16 weights", fn, n * 2);
        if (s == QF_OK) s = qf_from_f32(QF_BF16, host, hb, n);
        if (s == QF_OK) s = be->alloc((void **)&db, n * sizeof(uint16_t));
        if (s == QF_OK) s = be->copy2d(db, n * 2, hb, n * 2, n * 2, 1);
        if (s == QF_OK) s = be->synchronize(); /* hb is freed next */
        free(hb);
    }
    if (s != QF_OK) {
        be->free(dp);
        be->free(db);
        return qf_fail_prefix(s, "%s (uploading %zu parameters)", fn, n);
    }
    *dev = dp;
    *dev_bf16 = db;
    return QF_OK;
}

int qf_model_graphs_off(void) {
    const char *g = getenv("QFUSE_CUDA_GRAPHS");
    return g && !strcmp(g, "0");
}

qf_status qf_model_linear_x16(const qf_backend *be, float *out, uint16_t *out16, const float *in, const uint16_t *in16,
                              const float *w, const uint16_t *w16, const float *b, const uint16_t *b16,
                              const float *res, int64_t rows, int64_t Cin, int64_t Cout) {
    qf_gemm_nt_args g = {.x = in, .ldx = Cin, .w = w, .bias = b, .res = res, .ldr = Cout, .out = out, .ldo = Cout,
                         .M = rows, .N = Cout, .K = Cin, .w_bf16 = w16, .x_bf16 = in16, .out_bf16 = out16,
                         .bias_bf16 = b16};
    return be->gemm_nt(&g);
}

qf_status qf_model_linear(const qf_backend *be, float *out, const float *in, const float *w, const uint16_t *w16,
                          const float *b, const float *res, int64_t rows, int64_t Cin, int64_t Cout) {
    return qf_model_linear_x16(be, out, NULL, in, NULL, w, w16, b, NULL, res, rows, Cin, Cout);
}

qf_status qf_model_grow(const qf_backend *be, float **buf, size_t *cap, size_t floats, const char *what) {
    if (floats <= *cap) return QF_OK;
    void *p = NULL;
    if (be && be->alloc) {
        be->free(*buf);
        *buf = NULL;
        *cap = 0;
        qf_status s = be->alloc(&p, floats * sizeof(float));
        if (s != QF_OK)
            return qf_fail_prefix(s, "%s: cannot allocate %zu bytes of planned buffers on %s", what,
                                  floats * sizeof(float), be->name);
    } else {
        if (posix_memalign(&p, 64, floats * sizeof(float)))
            return qf_fail(QF_ERR_NOMEM, "%s: cannot allocate %zu bytes of activations", what, floats * sizeof(float));
        free(*buf);
    }
    *buf = p;
    *cap = floats;
    return QF_OK;
}

qf_status qf_model_device_grads(const qf_backend *be, int on_device, float **dgrads, const float *grads, size_t n,
                                int *grads_on_device, const char *fn) {
    if (!on_device || *dgrads) return QF_OK;
    const size_t bytes = n * sizeof(float);
    *grads_on_device = 0;
    QF_TRY(be->alloc((void **)dgrads, bytes));
    qf_status s = be->copy2d(*dgrads, bytes, grads, bytes, bytes, 1);
    if (s != QF_OK) {
        be->free(*dgrads);
        *dgrads = NULL;
        return qf_fail_prefix(s, "%s (uploading the gradients)", fn);
    }
    return QF_OK;
}

qf_status qf_model_sync_grads(const qf_backend *be, float *grads, const float *dgrads, size_t n, int *grads_on_device) {
    if (!*grads_on_device || !dgrads) return QF_OK;
    const size_t bytes = n * sizeof(float);
    QF_TRY(be->copy2d(grads, bytes, dgrads, bytes, bytes, 1));
    QF_TRY(be->synchronize());
    *grads_on_device = 0;
    return QF_OK;
}
