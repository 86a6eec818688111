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

#include <atomic>
#include <mutex>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static int g_active; /* set once qf_cuda_init succeeded; read by dispatch.c */
static cudaStream_t g_stream; /* the backend's stream (qf_cuda_stream) */
static std::atomic<unsigned long long> g_scratch_gen{0}; /* bumped by every scratch growth */
static std::atomic<int> g_tf32{0}; /* qf_cuda_set_tf32 */

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
    /* a blocking stream: it orders with the legacy default stream, so tensors written there by
     * other libraries (PyTorch) are complete before our kernels read them, and vice versa */
    e = cudaStreamCreateWithFlags(&g_stream, cudaStreamDefault);
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

static bool capturing(void) {
    cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(g_stream, &cs) != cudaSuccess) {
        (void)cudaGetLastError();
        return false;
    }
    return cs != cudaStreamCaptureStatusNone;
}

qf_status qf_cuda_scratch(int slot, size_t bytes, void **out) {
    if (slot < 0 || slot >= QF_CUDA_SCRATCH_SLOTS) return qf_fail(QF_ERR_INTERNAL, "cuda scratch: no slot %d", slot);
    Scratch &s = t_scratch;
    if (bytes > s.cap[slot]) {
        if (capturing()) /* cudaFree/cudaMalloc would invalidate the capture, or free memory it uses */
            return qf_fail(QF_ERR_INTERNAL, "cuda scratch: slot %d must grow from %zu to %zu bytes while a CUDA graph "
                           "is being captured: run the same shapes once outside a capture first", slot, s.cap[slot], bytes);
        g_scratch_gen.fetch_add(1);
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

/* ---- cuBLAS ---------------------------------------------------------------------------------------- */

/* cuBLAS's recommended workspace on Hopper; handed to it once so no call allocates (graphs). */
#define QF_CUBLAS_WORKSPACE ((size_t)32 << 20)

static cublasHandle_t g_blas;
static cublasLtHandle_t g_blaslt;
static void *g_blas_ws; /* shared by both handles: their calls are ordered on the one stream */
static std::mutex g_blas_mu;

qf_status qf_cuda_blas_check(cublasStatus_t s, const char *what) {
    if (s == CUBLAS_STATUS_SUCCESS) return QF_OK;
    return qf_fail(s == CUBLAS_STATUS_ALLOC_FAILED ? QF_ERR_NOMEM : QF_ERR_INTERNAL, "cuda: %s failed: %s (%s)", what,
                   cublasGetStatusString(s), cublasGetStatusName(s));
}

qf_status qf_cuda_blas(cublasHandle_t *out) {
    std::lock_guard<std::mutex> lock(g_blas_mu);
    if (!g_blas) {
        if (!g_active) return qf_fail(QF_ERR_INTERNAL, "cuda: cuBLAS asked for before qf_cuda_init");
        if (capturing())
            return qf_fail(QF_ERR_INTERNAL, "cuda: the first cuBLAS call is inside a CUDA graph capture (creating the "
                           "handle allocates): run the same calls once outside a capture first");
        cublasHandle_t h;
        QF_TRY(qf_cuda_blas_check(cublasCreate(&h), "cublasCreate"));
        cudaError_t e = cudaMalloc(&g_blas_ws, QF_CUBLAS_WORKSPACE);
        if (e != cudaSuccess) {
            g_blas_ws = nullptr;
            cublasDestroy(h);
            return qf_cuda_check(e, "cuBLAS workspace: cudaMalloc");
        }
        cublasStatus_t bs = cublasSetStream(h, g_stream);
        if (bs == CUBLAS_STATUS_SUCCESS) bs = cublasSetWorkspace(h, g_blas_ws, QF_CUBLAS_WORKSPACE);
        cublasLtHandle_t lt = nullptr;
        if (bs == CUBLAS_STATUS_SUCCESS) bs = cublasLtCreate(&lt);
        if (bs != CUBLAS_STATUS_SUCCESS) {
            cublasDestroy(h);
            (void)cudaFree(g_blas_ws);
            g_blas_ws = nullptr;
            return qf_cuda_blas_check(bs, "cublasSetStream/cublasSetWorkspace/cublasLtCreate");
        }
        g_blas = h;
        g_blaslt = lt;
    }
    QF_TRY(qf_cuda_blas_check(cublasSetMathMode(g_blas, g_tf32.load() ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH),
                              "cublasSetMathMode"));
    *out = g_blas;
    return QF_OK;
}

qf_status qf_cuda_blaslt(cublasLtHandle_t *out, void **workspace, size_t *workspace_bytes) {
    cublasHandle_t h;
    QF_TRY(qf_cuda_blas(&h)); /* creates both handles */
    *out = g_blaslt;
    *workspace = g_blas_ws;
    *workspace_bytes = QF_CUBLAS_WORKSPACE;
    return QF_OK;
}

int qf_cuda_tf32(void) { return g_tf32.load(); }

extern "C" qf_status qf_cuda_set_tf32(int on) {
    QF_TRY(qf_cuda_init());
    g_tf32.store(on ? 1 : 0);
    return QF_OK;
}

/* ---- model memory and graphs --------------------------------------------------------------------- */

static qf_status cuda_alloc(void **out, size_t bytes) { return qf_cuda_malloc(out, bytes); }

static void cuda_free(void *p) {
    if (p && cudaFree(p) != cudaSuccess) (void)cudaGetLastError();
}

static qf_status cuda_synchronize(void) { return qf_cuda_synchronize(); }

namespace {
struct Graph {
    cudaGraphExec_t exec;
    unsigned long long gen; /* g_scratch_gen when the capture began */
};
thread_local unsigned long long t_capture_gen;
} // namespace

static qf_status cuda_capture_begin(void) {
    t_capture_gen = g_scratch_gen.load();
    return qf_cuda_check(cudaStreamBeginCapture(g_stream, cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture");
}

static qf_status cuda_capture_end(void **out) {
    *out = nullptr;
    cudaGraph_t graph = nullptr;
    /* ends the capture also when a call inside it failed (then the error is returned here) */
    cudaError_t e = cudaStreamEndCapture(g_stream, &graph);
    if (e != cudaSuccess) {
        if (graph) (void)cudaGraphDestroy(graph);
        return qf_cuda_check(e, "cudaStreamEndCapture (a call inside the capture failed)");
    }
    cudaGraphExec_t exec = nullptr;
    e = cudaGraphInstantiate(&exec, graph, 0);
    (void)cudaGraphDestroy(graph);
    if (e != cudaSuccess) return qf_cuda_check(e, "cudaGraphInstantiate");
    Graph *g = (Graph *)malloc(sizeof *g);
    if (!g) {
        (void)cudaGraphExecDestroy(exec);
        return qf_fail(QF_ERR_NOMEM, "cuda graph: %zu bytes for the handle", sizeof *g);
    }
    g->exec = exec;
    g->gen = t_capture_gen;
    *out = g;
    return QF_OK;
}

static qf_status cuda_graph_launch(void *graph, int *stale) {
    Graph *g = (Graph *)graph;
    *stale = 0;
    if (g->gen != g_scratch_gen.load()) { /* a buffer it reads or writes has been freed since */
        *stale = 1;
        return QF_OK;
    }
    return qf_cuda_check(cudaGraphLaunch(g->exec, g_stream), "cudaGraphLaunch");
}

static void cuda_graph_free(void *graph) {
    Graph *g = (Graph *)graph;
    if (!g) return;
    if (cudaGraphExecDestroy(g->exec) != cudaSuccess) (void)cudaGetLastError();
    free(g);
}

/* ---- the entry table ----------------------------------------------------------------------------- */

static qf_backend make_cuda_backend() {
    qf_backend b = {};
    b.name = "cuda";
    b.sdpa_strided = 1;
    b.sdpa_forward = qf_cuda_sdpa_forward;
    b.sdpa_backward = qf_cuda_sdpa_backward;
    b.find_nonfinite = cuda_find_nonfinite;
    b.gemm_nt = qf_cuda_gemm_nt;
    b.layernorm_forward = qf_cuda_layernorm_forward;
    b.gelu_forward = qf_cuda_gelu_forward;
    b.layernorm_forward_x16 = qf_cuda_layernorm_forward_x16;
    b.gelu_forward_x16 = qf_cuda_gelu_forward_x16;
    b.sdpa_forward_x16 = qf_cuda_sdpa_forward_bf16;
    b.stage_x16 = qf_cuda_stage_x16;
    b.add = qf_cuda_add;
    b.embedding_forward = qf_cuda_embedding_forward;
    b.split_heads = qf_cuda_split_heads;
    b.merge_heads = qf_cuda_merge_heads;
    b.copy2d = qf_cuda_copy2d;
    b.dead_rows_mean = qf_cuda_dead_rows_mean;
    b.add_periodic = qf_cuda_add_periodic;
    b.screen_nonfinite = qf_cuda_screen_nonfinite;
    b.linear_backward = qf_cuda_linear_backward;
    b.layernorm_backward = qf_cuda_layernorm_backward;
    b.gelu_backward = qf_cuda_gelu_backward;
    b.dead_rows_backward = qf_cuda_dead_rows_backward;
    b.embedding_backward = qf_cuda_embedding_backward;
    b.zero = qf_cuda_zero;
    b.alloc = cuda_alloc;
    b.free = cuda_free;
    b.synchronize = cuda_synchronize;
    b.capture_begin = cuda_capture_begin;
    b.capture_end = cuda_capture_end;
    b.graph_launch = cuda_graph_launch;
    b.graph_free = cuda_graph_free;
    return b;
}
static const qf_backend cuda_backend = make_cuda_backend();

extern "C" const qf_backend *qf_backend_cuda(void) { return &cuda_backend; }

/* Test hook (tests/python/test_cuda_ops.py; not in a public header): the entry `op` of the CPU
 * (which = 0) or CUDA (which = 1) table as a plain pointer, NULL if there is none, so the tests
 * call both tables without mirroring the struct's layout. */
extern "C" void *qf_cuda_backend_entry(int which, const char *op) {
    static const struct {
        const char *name;
        size_t off;
    } fields[] = {
#define QF_FIELD(f) {#f, offsetof(qf_backend, f)}
        QF_FIELD(gemm_nt), QF_FIELD(layernorm_forward), QF_FIELD(gelu_forward), QF_FIELD(add),
        QF_FIELD(embedding_forward), QF_FIELD(split_heads), QF_FIELD(merge_heads), QF_FIELD(copy2d),
        QF_FIELD(dead_rows_mean), QF_FIELD(add_periodic), QF_FIELD(screen_nonfinite), QF_FIELD(linear_backward),
        QF_FIELD(layernorm_backward), QF_FIELD(gelu_backward), QF_FIELD(dead_rows_backward),
        QF_FIELD(embedding_backward), QF_FIELD(zero), QF_FIELD(alloc), QF_FIELD(free),
        QF_FIELD(synchronize), QF_FIELD(capture_begin), QF_FIELD(capture_end), QF_FIELD(graph_launch),
        QF_FIELD(graph_free), QF_FIELD(layernorm_forward_x16), QF_FIELD(gelu_forward_x16), QF_FIELD(sdpa_forward_x16), QF_FIELD(stage_x16),
#undef QF_FIELD
    };
    if (!op) return nullptr;
    const qf_backend *be = which ? &cuda_backend : qf_backend_cpu();
    for (const auto &f : fields)
        if (!strcmp(f.name, op)) {
            void *p;
            memcpy(&p, (const char *)be + f.off, sizeof p);
            return p;
        }
    return nullptr;
}
