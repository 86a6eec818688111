/* cuda_internal.h - what the CUDA backend's .cu files share (C++; never included from C).
 *
 * Invariants:
 *   - Every CUDA runtime error is turned into a qfuse status right where it happens, through
 *     qf_cuda_check (QF_ERR_NOMEM for out-of-memory, QF_ERR_INTERNAL otherwise, the message
 *     naming the call and cudaGetErrorString); nothing here prints, aborts or throws.
 *   - Device memory is owned by whoever allocated it: callers' tensors by the caller
 *     (qf_cuda_malloc/qf_cuda_free), temporaries by the per-thread grow-only scratch below,
 *     which the backend reuses across calls (no allocation once it is large enough).
 *   - Kernels, copies and cuBLAS calls run on qf_cuda_stream(), in order; host code synchronises
 *     only where it must read a result back (the NaN/Inf screen, downloads). */
#ifndef QF_CUDA_INTERNAL_H
#define QF_CUDA_INTERNAL_H

#include <cuda_runtime.h>

extern "C" {
#include "backend/backend.h"
}

/* QF_OK if e == cudaSuccess, else qf_fail naming `what`. Clears the runtime's sticky last error
 * for non-sticky failures so the next call does not report it again. */
qf_status qf_cuda_check(cudaError_t e, const char *what);

/* The stream every kernel, cuBLAS call and copy of the backend is queued on (created by
 * qf_cuda_init; a non-default stream, so a model's calls can be captured as a CUDA graph). */
cudaStream_t qf_cuda_stream(void);

/* The launch error of the kernel just queued (cudaGetLastError), as qf_cuda_check. */
qf_status qf_cuda_launched(const char *kernel);

/* A device buffer of at least `bytes`, owned by this host thread, valid until the next call of
 * qf_cuda_scratch with the same slot on this thread. Grow-only. One slot per use, so buffers of
 * kernels still queued are never reallocated under them by another use. */
enum {
    QF_CUDA_SCRATCH_LSE = 0,     /* sdpa forward: lse when only weights were asked for     */
    QF_CUDA_SCRATCH_PART_O,      /* sdpa forward split: partial outputs                     */
    QF_CUDA_SCRATCH_PART_ML,     /* sdpa forward split: partial (max, sum)                  */
    QF_CUDA_SCRATCH_DELTA,       /* sdpa backward: rowwise dO . O                           */
    QF_CUDA_SCRATCH_SCREEN,      /* NaN/Inf screen: the first bad index                     */
    QF_CUDA_SCRATCH_SLOTS
};
qf_status qf_cuda_scratch(int slot, size_t bytes, void **out);

/* SDPA kernels (sdpa.cu): pr validated by sdpa.c, every pointer device memory. */
qf_status qf_cuda_sdpa_forward(const qf_sdpa_problem *pr, const float *q, const float *k,
                               const float *v, float *out, float *lse, float *weights);
qf_status qf_cuda_sdpa_backward(const qf_sdpa_problem *pr, const float *q, const float *k,
                                const float *v, const float *out, const float *lse,
                                const float *grad_out, float *dq, float *dk, float *dv);

#endif
