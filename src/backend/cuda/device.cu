/* device.cu - the CUDA backend's device memory API (qf_cuda_* of qfuse_ops.h), its entry table,
 * error translation, per-thread scratch, and the NaN/Inf screen for tensors in GPU memory.
 *
 * Invariants:
 *   - qf_cuda_init is the only way the backend becomes active (qf_cuda_active); qf_cuda_malloc
 *     calls it too. Before that, dispatch.c looks up no pointer, so the CUDA runtime is never
 *     started by CPU-only callers of a CUDA build.
 *   - Every copy, memset, kernel and cuBLAS call is queued on the backend's stream (g_stream,
 *     non-blocking, so it never waits on the legacy default stream). Uploads and downloads queue
 *     their copy there and wait for the stream: a download therefore also waits for the calls
 *     queued before it and reports their errors.
 *   - Scratch buffers are per host thread and grow-only; they are never freed while the thread
 *     lives (like qf_scratch on the CPU side), so a steady state allocates nothing. */
#include "cuda_internal.h"

#include <stdint.h>

static int g_active; /* set once qf_cuda_init succeeded; read by dispatch.c */
static cudaStream_t g_stream; /* the backend's stream (qf_cuda_stream) */

cudaStream_t qf_cuda_stream(void) { return g_stream; }

qf_status qf_cuda_check(cudaError_t e, const char *what) {
    if (e == cudaSuccess) return QF_OK;
    (void)cudaGetLastError(); /* clear a non-sticky error so later calls start clean */
    qf_status s = e == cudaErrorMemoryAllocation ? QF_ERR_NOMEM : QF_ERR_INTERNAL;
    return qf_fail(s, "cuda: %s failed: %s (%s)", what, cudaGetErrorString(e), cudaGetErrorName(e));
}

qf_status qf_cuda_launched(const char *kernel) {
    cudaError_t e = cudaGetLastError();
    if (e == cudaSuccess) return QF_OK;
    return qf_fail(QF_ERR_INTERNAL, "cuda: launching %s failed: %s (%s)", kernel, cudaGetErrorString(e),
                   cudaGetErrorName(e));
}

extern "C" int qf_cuda_active(void) { return g_active; }

extern "C" qf_status qf_cuda_init(void) {
    if (g_active) return QF_OK;
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        return qf_fail(QF_ERR_UNSUPPORTED, "qf_cuda_init: no usable GPU: %s (%s)", cudaGetErrorString(e),
                       cudaGetErrorName(e));
    }
    if (n < 1) return qf_fail(QF_ERR_UNSUPPORTED, "qf_cuda_init: no usable GPU: the CUDA runtime sees 0 devices");
    e = cudaSetDevice(0);
    if (e == cudaSuccess) e = cudaFree(0); /* creates the context now, not inside a timed call */
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        return qf_fail(QF_ERR_UNSUPPORTED, "qf_cuda_init: GPU 0 is not usable: %s (%s)", cudaGetErrorString(e),
                       cudaGetErrorName(e));
    }
    e = cudaStreamCreateWithFlags(&g_stream, cudaStreamNonBlocking);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        return qf_fail(QF_ERR_UNSUPPORTED, "qf_cuda_init: cudaStreamCreate failed: %s", cudaGetErrorString(e));
    }
    g_active = 1;
    return QF_OK;
}

extern "C" int qf_cuda_is_device_ptr(const void *p) {
    cudaPointerAttributes a;
    if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
        (void)cudaGetLastError();
        return 0;
    }
    return a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged;
}

extern "C" qf_status qf_cuda_malloc(void **out, size_t bytes) {
    if (!out) return qf_fail(QF_ERR_ARG, "qf_cuda_malloc: out is NULL");
    *out = NULL;
    QF_TRY(qf_cuda_init());
    if (bytes == 0) bytes = 1; /* a distinct, freeable pointer, as malloc(0) may give */
    void *p = NULL;
    cudaError_t e = cudaMalloc(&p, bytes);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        return qf_fail(e == cudaErrorMemoryAllocation ? QF_ERR_NOMEM : QF_ERR_INTERNAL,
                       "qf_cuda_malloc: %zu bytes: %s", bytes, cudaGetErrorString(e));
    }
    *out = p;
    return QF_OK;
}

extern "C" qf_status qf_cuda_free(void *ptr) {
    if (!ptr) return QF_OK;
    return qf_cuda_check(cudaFree(ptr), "qf_cuda_free: cudaFree");
}

extern "C" qf_status qf_cuda_upload(void *dst, const void *src, size_t bytes) {
    if (bytes && (!dst || !src))
        return qf_fail(QF_ERR_ARG, "qf_cuda_upload: %s is NULL", !dst ? "dst_device" : "src_host");
    if (!bytes) return QF_OK;
    QF_TRY(qf_cuda_init());
    QF_TRY(qf_cuda_check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, g_stream), "qf_cuda_upload: cudaMemcpyAsync"));
    /* pageable memory: src may be reused as soon as we return, so wait for the copy */
    return qf_cuda_check(cudaStreamSynchronize(g_stream), "qf_cuda_upload: cudaStreamSynchronize");
}

extern "C" qf_status qf_cuda_download(void *dst, const void *src, size_t bytes) {
    if (bytes && (!dst || !src))
        return qf_fail(QF_ERR_ARG, "qf_cuda_download: %s is NULL", !dst ? "dst_host" : "src_device");
    if (!bytes) return QF_OK;
    QF_TRY(qf_cuda_init());
    QF_TRY(qf_cuda_check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, g_stream), "qf_cuda_download: cudaMemcpyAsync"));
    /* waits for the copy and for every call queued before it (their errors are reported here) */
    return qf_cuda_check(cudaStreamSynchronize(g_stream), "qf_cuda_download: a queued GPU call or the copy");
}

extern "C" qf_status qf_cuda_synchronize(void) {
    if (!g_active) return QF_OK;
    return qf_cuda_check(cudaStreamSynchronize(g_stream), "qf_cuda_synchronize: a queued GPU call");
}

/* ---- scratch ----------------------------------------------------------------------------------- */

namespace {
struct Scratch {
    void *ptr[QF_CUDA_SCRATCH_SLOTS] = {};
    size_t cap[QF_CUDA_SCRATCH_SLOTS] = {};
};
thread_local Scratch t_scratch;
} // namespace

qf_status qf_cuda_scratch(int slot, size_t bytes, void **out) {
    if (slot < 0 || slot >= QF_CUDA_SCRATCH_SLOTS) return qf_fail(QF_ERR_INTERNAL, "cuda scratch: no slot %d", slot);
    Scratch &s = t_scratch;
    if (bytes > s.cap[slot]) {
        if (s.ptr[slot]) QF_TRY(qf_cuda_check(cudaFree(s.ptr[slot]), "scratch: cudaFree"));
        s.ptr[slot] = nullptr;
        s.cap[slot] = 0;
        size_t want = bytes + bytes / 4; /* headroom so slowly growing sizes reallocate rarely */
        cudaError_t e = cudaMalloc(&s.ptr[slot], want);
        if (e != cudaSuccess) {
            s.ptr[slot] = nullptr;
            return qf_cuda_check(e, "scratch: cudaMalloc");
        }
        s.cap[slot] = want;
    }
    *out = s.ptr[slot];
    return QF_OK;
}

/* ---- NaN/Inf screen ------------------------------------------------------------------------------ */

/* first = min index i with x[i] NaN/Inf (mode 0) or NaN/+Inf (mode 1); left alone if none.
 * A grid-stride loop: any grid size covers any n. */
__global__ void find_nonfinite_kernel(const uint32_t *x, size_t n, int mode, unsigned long long *first) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        uint32_t u = x[i];
        bool bad = (u & 0x7f800000u) == 0x7f800000u;      /* NaN or +-Inf */
        if (mode == 1) bad = bad && u != 0xff800000u;        /* -Inf allowed in a float mask */
        if (bad) atomicMin(first, (unsigned long long)i);
    }
}

static qf_status cuda_find_nonfinite(const float *x, size_t n, int nan_or_posinf_only, size_t *index, float *value) {
    *index = n;
    *value = 0.0f;
    if (n == 0) return QF_OK;
    void *buf;
    QF_TRY(qf_cuda_scratch(QF_CUDA_SCRATCH_SCREEN, sizeof(unsigned long long), &buf));
    unsigned long long *first = (unsigned long long *)buf, host = ~0ull;
    QF_TRY(qf_cuda_check(cudaMemsetAsync(first, 0xff, sizeof host, g_stream), "nan screen: cudaMemsetAsync"));
    size_t blocks = (n + 255) / 256;
    if (blocks > 4096) blocks = 4096;
    find_nonfinite_kernel<<<(unsigned)blocks, 256, 0, g_stream>>>((const uint32_t *)x, n, nan_or_posinf_only ? 1 : 0, first);
    QF_TRY(qf_cuda_launched("find_nonfinite_kernel"));
    QF_TRY(qf_cuda_check(cudaMemcpyAsync(&host, first, sizeof host, cudaMemcpyDeviceToHost, g_stream), "nan screen: cudaMemcpyAsync"));
    QF_TRY(qf_cuda_check(cudaStreamSynchronize(g_stream), "nan screen: cudaStreamSynchronize"));
    if (host < n) {
        *index = (size_t)host;
        QF_TRY(qf_cuda_check(cudaMemcpyAsync(value, x + host, sizeof *value, cudaMemcpyDeviceToHost, g_stream), "nan screen: cudaMemcpyAsync"));
        QF_TRY(qf_cuda_check(cudaStreamSynchronize(g_stream), "nan screen: cudaStreamSynchronize"));
    }
    return QF_OK;
}

/* ---- the entry table ----------------------------------------------------------------------------- */

static qf_backend make_cuda_backend() {
    qf_backend b = {};
    b.name = "cuda";
    b.sdpa_forward = qf_cuda_sdpa_forward;
    b.sdpa_backward = qf_cuda_sdpa_backward;
    b.find_nonfinite = cuda_find_nonfinite;
    return b;
}
static const qf_backend cuda_backend = make_cuda_backend();

extern "C" const qf_backend *qf_backend_cuda(void) { return &cuda_backend; }
