/* cuda_internal.h - what the CUDA backend's .cu files share (C++; never included from C).
 *
 * Invariants:
 *   - Every CUDA runtime error is turned into a qfuse status right where it happens, through
 *     qf_cuda_check (QF_ERR_NOMEM for out-of-memory, QF_ERR_INTERNAL otherwise, the message
 *     naming the call and cudaGetErrorString); nothing here prints, aborts or throws.
 *   - Device memory is owned by whoever allocated it: callers' tensors by the caller
 *     (qf_cuda_malloc/qf_cuda_free), temporaries by the per-thread grow-only scratch below,
 *     which the backend reuses across calls (no allocation once it is large enough).
 *   - Kernels run on the default stream, in order; host code synchronises only where it must
 *     read a result back (the NaN/Inf screen, downloads). */
#ifndef QF_CUDA_INTERNAL_H
#define QF_CUDA_INTERNAL_H

#include <cuda_runtime.h>

extern "C" {
#include "backend/backend.h"
}

/* QF_OK if e == cudaSuccess, else qf_fail naming `what`. Clears the runtime's sticky last error
 * for non-sticky failures so the next call does not report it again. */
qf_status qf_cuda_check(cudaError_t e, const char *what);

/* The launch error of the kernel just queued (cudaGetLastError), as qf_cuda_check. */
qf_status qf_cuda_launched(const char *kernel);

/* A device buffer of at least `bytes`, owned by this host thread, valid until the next call of
 * qf_cuda_scratch on this thread (slot 0..3: independent buffers). Grow-only. */
qf_status qf_cuda_scratch(int slot, size_t bytes, void **out);

/* SDPA kernels (sdpa.cu): pr validated by sdpa.c, every pointer device memory. */
qf_status qf_cuda_sdpa_forward(const qf_sdpa_problem *pr, const float *q, const float *k,
                               const float *v, float *out, float *lse, float *weights);
qf_status qf_cuda_sdpa_backward(const qf_sdpa_problem *pr, const float *q, const float *k,
                                const float *v, const float *out, const float *lse,
                                const float *grad_out, float *dq, float *dk, float *dv);

#endif
