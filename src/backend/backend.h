/* backend.h - the boundary between what an op means and where it runs.
 *
 * Public entry points (the .c files of src/ops) validate arguments once, then call the backend's function
 * for the device that holds the tensors. Today only the CPU backend exists; the CUDA backend
 * (planned) fills the same table, and a cross-backend test will run every entry of every
 * backend against the CPU one (ggml's test-backend-ops pattern). An op enters this table when a
 * second backend is about to implement it. */
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
} qf_backend;

/* The backend for host pointers. */
const qf_backend *qf_backend_cpu(void);

#endif
