/* finite.c - the one scan for NaN/Inf that inputs go through before a model or optimizer uses
 * them (the caller names the tensor and the element in its message).
 * Invariant: the result is the FIRST non-finite index whatever the thread count: blocks are
 * tested in parallel with an integer exponent test (it vectorizes; isfinite does not under
 * every compiler), the earliest flagged block is then searched serially. */
#include "internal.h"
#include <math.h>
#include <string.h>

static int block_has_nonfinite(const float *x, size_t n) {
    uint32_t any = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, &x[i], 4);
        any |= (uint32_t)((u & 0x7f800000u) == 0x7f800000u);
    }
    return any != 0;
}

size_t qf_first_nonfinite(const float *x, size_t n) {
    const size_t blk = 4096, nblk = (n + blk - 1) / blk;
    size_t first = nblk;
#pragma omp parallel for num_threads(qf_threads()) reduction(min : first) schedule(static) if (n > 262144)
    for (size_t b = 0; b < nblk; b++) {
        const size_t lo = b * blk, len = lo + blk < n ? blk : n - lo;
        if (b < first && block_has_nonfinite(x + lo, len)) first = b;
    }
    if (first == nblk) return n;
    size_t i = first * blk;
    while (isfinite(x[i])) i++;
    return i;
}
