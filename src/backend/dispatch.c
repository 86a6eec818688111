/* dispatch.c - which backend runs a call: the one whose memory holds its tensors.
 *
 * Invariants: in a build without CUDA (no QF_HAVE_CUDA) every call goes to the CPU backend and the
 * qf_cuda_* functions of qfuse_ops.h are stubs returning QF_ERR_UNSUPPORTED, so a program written
 * for both builds links against either. With CUDA, no pointer is looked up before qf_cuda_init
 * has succeeded (a CPU-only caller never starts the CUDA runtime), and a call whose tensors are
 * split between host and GPU memory fails with a message naming one tensor of each side. */
#include "backend.h"

qf_status qf_backend_for(const char *op, const void *const *ptrs, const char *const *names, int n,
                         const qf_backend **out) {
    *out = qf_backend_cpu();
#ifdef QF_HAVE_CUDA
    if (!qf_cuda_active()) return QF_OK;
    int first = -1, first_on_gpu = 0;
    for (int i = 0; i < n; i++) {
        if (!ptrs[i]) continue;
        int on_gpu = qf_cuda_is_device_ptr(ptrs[i]);
        if (first < 0) {
            first = i;
            first_on_gpu = on_gpu;
        } else if (on_gpu != first_on_gpu) {
            return qf_fail(QF_ERR_ARG, "%s: %s is in %s memory but %s is in %s memory: all tensors of one call "
                           "(the mask's data too) must be on the same device", op, names[first],
                           first_on_gpu ? "GPU" : "host", names[i], on_gpu ? "GPU" : "host");
        }
    }
    if (first_on_gpu) *out = qf_backend_cuda();
#else
    (void)op; (void)ptrs; (void)names; (void)n;
#endif
    return QF_OK;
}

#ifndef QF_HAVE_CUDA
static qf_status no_cuda(const char *fn) {
    return qf_fail(QF_ERR_UNSUPPORTED, "%s: this libqfuse was built without the CUDA backend (build it with make CUDA=1)", fn);
}
qf_status qf_cuda_init(void) { return no_cuda("qf_cuda_init"); }
qf_status qf_cuda_malloc(void **out, size_t bytes) {
    (void)bytes;
    if (out) *out = NULL;
    return no_cuda("qf_cuda_malloc");
}
qf_status qf_cuda_free(void *ptr) { return ptr ? no_cuda("qf_cuda_free") : QF_OK; }
qf_status qf_cuda_upload(void *dst, const void *src, size_t bytes) {
    (void)dst; (void)src; (void)bytes;
    return no_cuda("qf_cuda_upload");
}
qf_status qf_cuda_download(void *dst, const void *src, size_t bytes) {
    (void)dst; (void)src; (void)bytes;
    return no_cuda("qf_cuda_download");
}
qf_status qf_cuda_synchronize(void) { return no_cuda("qf_cuda_synchronize"); }
qf_status qf_cuda_set_tf32(int on) {
    (void)on;
    return no_cuda("qf_cuda_set_tf32");
}
#endif
