/* cpu.c - the CPU backend's entry table (kernels live in src/ops). */
#include "backend.h"

static const qf_backend cpu = {
    .name = "cpu",
    .sdpa_forward = qf_cpu_sdpa_forward,
    .sdpa_backward = qf_cpu_sdpa_backward,
};

const qf_backend *qf_backend_cpu(void) { return &cpu; }
