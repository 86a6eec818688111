/* heatmap.c - attention weights as a PNG picture (qf_heatmap_png), for looking at what the
 * queries of a Q-Former read.
 *
 * Layout: weights[rows, cols] row-major; cell (r, c) is a cell_px x cell_px square, queries down,
 * keys across. Before each boundary column b (0 < b < cols, strictly increasing) one white pixel
 * column is INSERTED (no cell is painted over), so the image is (cols * cell_px + nb) pixels wide
 * and rows * cell_px high; the first cell column after a separator starts one pixel further right.
 * Colors: the 11 stops of matplotlib's viridis (0.0, 0.1, ..., 1.0) interpolated linearly; value v
 * maps to t = (v - min) / (max - min) over the whole array (t = 0 everywhere when max == min).
 * White (255,255,255) is never a viridis color, so separators stay distinguishable.
 * Invariants: every input is checked before anything is written; the file appears atomically
 * (temporary + fsync + rename, src/io/fileio.c) or not at all. */
#include "io/io_internal.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <stb/stb_image_write.h>

#define HEATMAP_MAX_SIDE 32768

static const unsigned char viridis_stops[11][3] = {
    {68, 1, 84},    {72, 36, 117},  {65, 68, 135},  {53, 95, 141},  {42, 120, 142}, {33, 145, 140},
    {34, 168, 132}, {68, 191, 112}, {122, 209, 81}, {189, 223, 38}, {253, 231, 37}};

static void colormap(double t, unsigned char rgb[3]) {
    if (!(t > 0.0)) t = 0.0;
    if (t > 1.0) t = 1.0;
    double x = t * 10.0;
    int i = (int)x;
    if (i > 9) i = 9;
    double f = x - i;
    for (int c = 0; c < 3; c++) {
        double v = viridis_stops[i][c] + f * (viridis_stops[i + 1][c] - viridis_stops[i][c]);
        rgb[c] = (unsigned char)lround(v);
    }
}

typedef struct {
    unsigned char *data;
    size_t len, cap;
    int failed;
} png_buffer;

static void png_sink(void *ctx, void *data, int size) {
    png_buffer *b = ctx;
    if (b->failed || size <= 0) return;
    if (b->len + (size_t)size > b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 65536;
        while (cap < b->len + (size_t)size) cap *= 2;
        unsigned char *p = realloc(b->data, cap);
        if (!p) { b->failed = 1; return; }
        b->data = p;
        b->cap = cap;
    }
    memcpy(b->data + b->len, data, (size_t)size);
    b->len += (size_t)size;
}

qf_status qf_heatmap_png(const char *path, const float *weights, int64_t rows, int64_t cols, int cell_px,
                         const int64_t *boundaries, int nb) {
    if (!path || !*path) return qf_fail(QF_ERR_ARG, "heatmap: path is NULL or empty");
    if (!weights) return qf_fail(QF_ERR_ARG, "heatmap %s: weights is NULL", path);
    if (rows < 1 || cols < 1) return qf_fail(QF_ERR_SHAPE, "heatmap %s: weights are [%lld,%lld]: need at least one "
                                             "row and one column", path, (long long)rows, (long long)cols);
    if (cell_px < 1 || cell_px > 256) return qf_fail(QF_ERR_ARG, "heatmap %s: cell_px = %d is not in 1..256", path, cell_px);
    if (nb < 0 || (nb > 0 && !boundaries))
        return qf_fail(QF_ERR_ARG, "heatmap %s: nb = %d with %s boundaries", path, nb, boundaries ? "given" : "NULL");
    for (int i = 0; i < nb; i++) {
        if (boundaries[i] <= 0 || boundaries[i] >= cols)
            return qf_fail(QF_ERR_ARG, "heatmap %s: boundaries[%d] = %lld is not a column inside 1..%lld", path, i,
                           (long long)boundaries[i], (long long)(cols - 1));
        if (i > 0 && boundaries[i] <= boundaries[i - 1])
            return qf_fail(QF_ERR_ARG, "heatmap %s: boundaries must increase: boundaries[%d] = %lld after %lld", path, i,
                           (long long)boundaries[i], (long long)boundaries[i - 1]);
    }
    int64_t width = cols * cell_px + nb, height = rows * cell_px;
    if (width > HEATMAP_MAX_SIDE || height > HEATMAP_MAX_SIDE)
        return qf_fail(QF_ERR_SHAPE, "heatmap %s: [%lld,%lld] at %d px a cell makes %lldx%lld pixels, over the %d-pixel "
                       "limit per side (use a smaller cell_px)", path, (long long)rows, (long long)cols, cell_px,
                       (long long)width, (long long)height, HEATMAP_MAX_SIDE);
    double lo = INFINITY, hi = -INFINITY;
    for (int64_t i = 0; i < rows * cols; i++) {
        float v = weights[i];
        if (!isfinite(v))
            return qf_fail(QF_ERR_NONFINITE, "heatmap %s: weights[%lld,%lld] = %g is not finite", path,
                           (long long)(i / cols), (long long)(i % cols), (double)v);
        if (v < lo) lo = v;
        if (v > hi) hi = v;
    }
    size_t stride = (size_t)width * 3;
    unsigned char *img = malloc(stride * (size_t)height);
    if (!img) return qf_fail(QF_ERR_NOMEM, "heatmap %s: no memory for %lldx%lld pixels", path, (long long)width,
                             (long long)height);
    double span = hi > lo ? hi - lo : 1.0;
    for (int64_t r = 0; r < rows; r++) {
        unsigned char *line = img + (size_t)r * cell_px * stride;
        int64_t x = 0;
        int next = 0;
        for (int64_t c = 0; c < cols; c++) {
            if (next < nb && boundaries[next] == c) {
                line[x * 3] = line[x * 3 + 1] = line[x * 3 + 2] = 255;
                x++;
                next++;
            }
            unsigned char rgb[3];
            colormap(((double)weights[r * cols + c] - lo) / span, rgb);
            for (int k = 0; k < cell_px; k++, x++) memcpy(line + x * 3, rgb, 3);
        }
        for (int k = 1; k < cell_px; k++) memcpy(line + (size_t)k * stride, line, stride);
    }
    png_buffer buf = {0};
    int ok = stbi_write_png_to_func(png_sink, &buf, (int)width, (int)height, 3, img, (int)stride);
    free(img);
    if (!ok || buf.failed) {
        free(buf.data);
        return qf_fail(QF_ERR_NOMEM, "heatmap %s: PNG encoding failed (out of memory)", path);
    }
    qf_io_chunk chunk = {buf.data, buf.len};
    qf_status s = qf_io_write_atomic(path, &chunk, 1, "heatmap");
    free(buf.data);
    return s;
}
