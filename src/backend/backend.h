/* backend.h - the boundary between what an op means and where it runs.
 *
 * Public entry points (the .c files of src/ops) validate arguments once, then call the backend's function
 * for the device that holds the tensors (qf_backend_for). The CPU backend is always built; the
 * CUDA backend (src/backend/cuda/, make CUDA=1) fills the same table for GPU pointers, and
 * tests/python/test_cuda.py runs each of its entries against the CPU one (ggml's
 * test-backend-ops pattern). An op enters this table when a second backend implements it. */
#ifndef QF_BACKEND_H
#define QF_BACKEND_H

#include "ops/sdpa_internal.h"

typedef struct {
    const char *name;
    qf_status (*sdpa_forward)(const qf_sdpa_problem *pr, const float *q, const float *k,
                              const float *v, float *out, float *lse, float *weights);
    qf_status (*sdpa_backward)(const qf_sdpa_problem *pr, const float *q, const float *k,
                               const float *v, const float *out, const float *lse,
                               const float *grad_out, float *dq, float *dk, float *dv);
    /* Where the kernels do not screen for NaN/Inf themselves, sdpa.c asks the backend that holds
     * a tensor: *index = the first i in x[0..n) whose value is NaN or Inf (nan_or_posinf_only:
     * NaN or +Inf, the rule for float masks), or n if none; *value = x[*index]. NULL in the CPU
     * backend, whose tensors sdpa.c scans directly. */
    qf_status (*find_nonfinite)(const float *x, size_t n, int nan_or_posinf_only, size_t *index,
                                float *value);
} qf_backend;

/* The backend for host pointers. */
const qf_backend *qf_backend_cpu(void);

/* The backend whose memory holds the n tensors ptrs[i] (NULL entries are skipped), names[i] for
 * the message: the CPU unless the CUDA backend is built, initialised (qf_cuda_init) and the
 * pointers are in GPU memory; QF_ERR_ARG naming two tensors on different sides. (dispatch.c) */
qf_status qf_backend_for(const char *op, const void *const *ptrs, const char *const *names, int n,
                         const qf_backend **out);

#ifdef QF_HAVE_CUDA
/* src/backend/cuda/: the GPU backend, and whether the CUDA runtime has been initialised here
 * (until then no pointer is asked about, so CPU-only callers never create a GPU context). */
const qf_backend *qf_backend_cuda(void);
int qf_cuda_active(void);
/* 1 if p is GPU (device or managed) memory, 0 for host memory or unknown pointers. */
int qf_cuda_is_device_ptr(const void *p);
#endif

#endif
