/* image.c - image files in, model pixels out: decoding (stb_image, Debian's libstb) and the
 * preprocessing of transformers' BlipImageProcessor (resize, rescale, normalize, CHW float32).
 *
 * Resizing reproduces Pillow's Image.resize (ImagingResample, Pillow 9-11) on 8-bit images bit for
 * bit: separable convolution, horizontal pass first into an 8-bit intermediate, filter support
 * widened by the downscale factor (antialias), taps cut at the image edge and renormalised,
 * coefficients rounded to 22-bit fixed point, each pass rounded and clipped to 0..255. stb's own
 * resizer (Catmull-Rom, clamped edges, float intermediate) was measured 4-10 levels off Pillow on
 * test images, which is 0.06-0.15 after normalisation: too far for a model fed PIL pixels.
 *
 * Invariants: qf_image_load returns QF_OK with a malloc'd [h,w,3] buffer the caller frees, or an
 * error with nothing allocated. qf_image_preprocess writes out[3,size_h,size_w] completely on
 * success and allocates only its temporaries (freed before it returns). */
#include "io_internal.h"
#include <cjson/cJSON.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <stb/stb_image.h>

#define IMAGE_MAX_FILE ((size_t)1 << 30)
#define IMAGE_MAX_SIDE 65536
#define PRECISION_BITS (32 - 8 - 2)

qf_status qf_image_load(const char *path, int64_t *w, int64_t *h, uint8_t **rgb) {
    if (!w || !h || !rgb) return qf_fail(QF_ERR_ARG, "qf_image_load: NULL output");
    *rgb = NULL;
    *w = *h = 0;
    unsigned char *buf;
    size_t len;
    QF_TRY(qf_io_read_file(path, IMAGE_MAX_FILE, "image", &buf, &len));
    int iw = 0, ih = 0, comp = 0;
    unsigned char *px = stbi_load_from_memory(buf, (int)len, &iw, &ih, &comp, 3);
    free(buf);
    if (!px) {
        const char *why = stbi_failure_reason();
        return qf_fail(QF_ERR_FORMAT, "image: cannot decode %s: %s (PNG, JPEG, BMP, TGA, GIF are read)", path,
                       why ? why : "unknown reason");
    }
    if (iw <= 0 || ih <= 0 || iw > IMAGE_MAX_SIDE || ih > IMAGE_MAX_SIDE) {
        stbi_image_free(px);
        return qf_fail(QF_ERR_FORMAT, "image: %s is %dx%d pixels: each side must be 1..%d", path, iw, ih,
                       IMAGE_MAX_SIDE);
    }
    size_t n = (size_t)iw * (size_t)ih * 3;
    uint8_t *out = malloc(n);
    if (!out) {
        stbi_image_free(px);
        return qf_fail(QF_ERR_NOMEM, "image: no memory for the %dx%d pixels of %s", iw, ih, path);
    }
    memcpy(out, px, n); /* the caller frees with free(), whatever allocator stb was built with */
    stbi_image_free(px);
    *w = iw;
    *h = ih;
    *rgb = out;
    return QF_OK;
}

/* ---- preprocessing parameters ------------------------------------------------------------- */

qf_image_preproc qf_image_preproc_defaults(int64_t image_size) {
    qf_image_preproc p = {
        .size_h = image_size, .size_w = image_size, .do_resize = 1, .do_rescale = 1, .do_normalize = 1,
        .resample = 3, .rescale_factor = 1.0 / 255.0,
        .mean = {0.48145466, 0.4578275, 0.40821073}, .std = {0.26862954, 0.26130258, 0.27577711}};
    return p;
}

static qf_status json_bool(const cJSON *root, const char *key, const char *path, int *out) {
    const cJSON *x = cJSON_GetObjectItemCaseSensitive(root, key);
    if (!x || cJSON_IsNull(x)) return QF_OK;
    if (!cJSON_IsBool(x)) return qf_fail(QF_ERR_FORMAT, "%s: key \"%s\" must be true or false", path, key);
    *out = cJSON_IsTrue(x);
    return QF_OK;
}

static qf_status json_triple(const cJSON *root, const char *key, const char *path, double out[3]) {
    const cJSON *x = cJSON_GetObjectItemCaseSensitive(root, key);
    if (!x || cJSON_IsNull(x)) return QF_OK;
    if (cJSON_IsNumber(x)) { /* one value for every channel */
        out[0] = out[1] = out[2] = x->valuedouble;
        return QF_OK;
    }
    if (!cJSON_IsArray(x) || cJSON_GetArraySize(x) != 3)
        return qf_fail(QF_ERR_FORMAT, "%s: key \"%s\" must be a list of 3 numbers (R, G, B)", path, key);
    for (int i = 0; i < 3; i++) {
        const cJSON *e = cJSON_GetArrayItem(x, i);
        if (!cJSON_IsNumber(e)) return qf_fail(QF_ERR_FORMAT, "%s: key \"%s\"[%d] is not a number", path, key, i);
        out[i] = e->valuedouble;
    }
    return QF_OK;
}

static qf_status parse_preproc(const cJSON *root, const char *path, qf_image_preproc *p) {
    if (!cJSON_IsObject(root)) return qf_fail(QF_ERR_FORMAT, "%s: not a JSON object", path);
    const cJSON *size = cJSON_GetObjectItemCaseSensitive(root, "size");
    if (size && !cJSON_IsNull(size)) {
        if (cJSON_IsNumber(size)) {
            p->size_h = p->size_w = (int64_t)size->valuedouble;
        } else if (cJSON_IsObject(size)) {
            const cJSON *hh = cJSON_GetObjectItemCaseSensitive(size, "height");
            const cJSON *ww = cJSON_GetObjectItemCaseSensitive(size, "width");
            if (!cJSON_IsNumber(hh) || !cJSON_IsNumber(ww))
                return qf_fail(QF_ERR_UNSUPPORTED,
                               "%s: key \"size\" must hold numbers \"height\" and \"width\" (BLIP resizes to a fixed "
                               "size; shortest-edge resizing with cropping is not implemented)", path);
            p->size_h = (int64_t)hh->valuedouble;
            p->size_w = (int64_t)ww->valuedouble;
        } else {
            return qf_fail(QF_ERR_FORMAT, "%s: key \"size\" must be a number or {\"height\", \"width\"}", path);
        }
        if (p->size_h < 1 || p->size_w < 1 || p->size_h > IMAGE_MAX_SIDE || p->size_w > IMAGE_MAX_SIDE)
            return qf_fail(QF_ERR_FORMAT, "%s: key \"size\" = %lldx%lld: each side must be 1..%d", path,
                           (long long)p->size_h, (long long)p->size_w, IMAGE_MAX_SIDE);
    }
    QF_TRY(json_bool(root, "do_resize", path, &p->do_resize));
    QF_TRY(json_bool(root, "do_rescale", path, &p->do_rescale));
    QF_TRY(json_bool(root, "do_normalize", path, &p->do_normalize));
    const cJSON *rs = cJSON_GetObjectItemCaseSensitive(root, "resample");
    if (rs && !cJSON_IsNull(rs)) {
        if (!cJSON_IsNumber(rs)) return qf_fail(QF_ERR_FORMAT, "%s: key \"resample\" must be a PIL filter number", path);
        p->resample = (int)rs->valuedouble;
    }
    const cJSON *rf = cJSON_GetObjectItemCaseSensitive(root, "rescale_factor");
    if (rf && !cJSON_IsNull(rf)) {
        if (!cJSON_IsNumber(rf)) return qf_fail(QF_ERR_FORMAT, "%s: key \"rescale_factor\" must be a number", path);
        p->rescale_factor = rf->valuedouble;
    }
    QF_TRY(json_triple(root, "image_mean", path, p->mean));
    QF_TRY(json_triple(root, "image_std", path, p->std));
    return QF_OK;
}

qf_status qf_image_preproc_load(const char *path, int64_t image_size, qf_image_preproc *out) {
    if (!out) return qf_fail(QF_ERR_ARG, "qf_image_preproc_load: out is NULL");
    if (image_size < 1 || image_size > IMAGE_MAX_SIDE)
        return qf_fail(QF_ERR_ARG, "qf_image_preproc_load: image_size %lld is not in 1..%d", (long long)image_size,
                       IMAGE_MAX_SIDE);
    qf_image_preproc p = qf_image_preproc_defaults(image_size);
    if (path) {
        unsigned char *buf;
        size_t len;
        QF_TRY(qf_io_read_file(path, (size_t)16 << 20, "preprocessor config", &buf, &len));
        cJSON *root = cJSON_ParseWithLength((const char *)buf, len);
        free(buf);
        if (!root) return qf_fail(QF_ERR_FORMAT, "%s: not valid JSON", path);
        qf_status s = parse_preproc(root, path, &p);
        cJSON_Delete(root);
        if (s != QF_OK) return s;
    }
    *out = p;
    return QF_OK;
}

/* ---- Pillow-exact resampling ------------------------------------------------------------- */

static double filter_box(double x) { return x > -0.5 && x <= 0.5 ? 1.0 : 0.0; }
static double filter_bilinear(double x) {
    if (x < 0.0) x = -x;
    return x < 1.0 ? 1.0 - x : 0.0;
}
static double filter_hamming(double x) {
    if (x < 0.0) x = -x;
    if (x == 0.0) return 1.0;
    if (x >= 1.0) return 0.0;
    x = x * M_PI;
    return sin(x) / x * (0.54 + 0.46 * cos(x));
}
static double filter_bicubic(double x) { /* Keys cubic, a = -0.5, as Pillow */
    const double a = -0.5;
    if (x < 0.0) x = -x;
    if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
    return 0.0;
}
static double sinc(double x) {
    if (x == 0.0) return 1.0;
    x = x * M_PI;
    return sin(x) / x;
}
static double filter_lanczos(double x) {
    if (-3.0 <= x && x < 3.0) return sinc(x) * sinc(x / 3);
    return 0.0;
}

typedef struct {
    double (*fn)(double);
    double support;
} resample_filter;

/* Per output index: first source index (bounds[2i]), tap count (bounds[2i+1]) and ksize
 * fixed-point coefficients kk[i*ksize ..]; Pillow's precompute_coeffs + normalize_coeffs_8bpc. */
typedef struct {
    int ksize;
    int *bounds;
    int32_t *kk;
} coeffs;

static qf_status precompute(int in_size, int out_size, resample_filter f, coeffs *c) {
    double scale = (double)in_size / out_size, filterscale = scale < 1.0 ? 1.0 : scale;
    double support = f.support * filterscale;
    int ksize = (int)ceil(support) * 2 + 1;
    c->ksize = ksize;
    c->bounds = malloc((size_t)out_size * 2 * sizeof *c->bounds);
    c->kk = calloc((size_t)out_size * (size_t)ksize, sizeof *c->kk);
    double *k = malloc((size_t)ksize * sizeof *k);
    if (!c->bounds || !c->kk || !k) {
        free(k);
        return qf_fail(QF_ERR_NOMEM, "image resize: no memory for %d x %d filter taps", out_size, ksize);
    }
    for (int xx = 0; xx < out_size; xx++) {
        double center = (xx + 0.5) * scale, ww = 0.0, ss = 1.0 / filterscale;
        int xmin = (int)(center - support + 0.5);
        if (xmin < 0) xmin = 0;
        int xmax = (int)(center + support + 0.5);
        if (xmax > in_size) xmax = in_size;
        xmax -= xmin;
        for (int x = 0; x < xmax; x++) {
            double w = f.fn((x + xmin - center + 0.5) * ss);
            k[x] = w;
            ww += w;
        }
        for (int x = 0; x < xmax; x++) {
            double v = ww != 0.0 ? k[x] / ww : k[x];
            c->kk[(size_t)xx * ksize + x] = v < 0 ? (int32_t)(-0.5 + v * (1 << PRECISION_BITS))
                                                  : (int32_t)(0.5 + v * (1 << PRECISION_BITS));
        }
        c->bounds[xx * 2] = xmin;
        c->bounds[xx * 2 + 1] = xmax;
    }
    free(k);
    return QF_OK;
}

static inline uint8_t clip8(int64_t v) {
    if (v < 0) return 0;
    v >>= PRECISION_BITS;
    return v > 255 ? 255 : (uint8_t)v;
}

/* Pillow's resize of an 8-bit RGB image (in [ih,iw,3] -> out [oh,ow,3]). */
static qf_status resize_rgb8(const uint8_t *in, int iw, int ih, uint8_t *out, int ow, int oh, int resample) {
    resample_filter f;
    switch (resample) {
    case 1: f = (resample_filter){filter_lanczos, 3.0}; break;
    case 2: f = (resample_filter){filter_bilinear, 1.0}; break;
    case 3: f = (resample_filter){filter_bicubic, 2.0}; break;
    case 4: f = (resample_filter){filter_box, 0.5}; break;
    case 5: f = (resample_filter){filter_hamming, 1.0}; break;
    case 0: /* nearest: Pillow samples the source pixel under each output pixel's centre */
        for (int y = 0; y < oh; y++) {
            int sy = (int)((y + 0.5) * ih / oh);
            if (sy >= ih) sy = ih - 1;
            for (int x = 0; x < ow; x++) {
                int sx = (int)((x + 0.5) * iw / ow);
                if (sx >= iw) sx = iw - 1;
                memcpy(out + ((size_t)y * ow + x) * 3, in + ((size_t)sy * iw + sx) * 3, 3);
            }
        }
        return QF_OK;
    default:
        return qf_fail(QF_ERR_UNSUPPORTED, "image resize: resample = %d is not a PIL filter (0 nearest, 1 lanczos, "
                       "2 bilinear, 3 bicubic, 4 box, 5 hamming)", resample);
    }
    if (iw == ow && ih == oh) {
        memcpy(out, in, (size_t)iw * ih * 3);
        return QF_OK;
    }
    coeffs ch = {0}, cv = {0};
    uint8_t *tmp = NULL;
    qf_status s = precompute(iw, ow, f, &ch);
    if (s == QF_OK) s = precompute(ih, oh, f, &cv);
    if (s != QF_OK) goto done;
    /* rows of the source the vertical pass reads */
    int y_first = cv.bounds[0], y_last = cv.bounds[oh * 2 - 2] + cv.bounds[oh * 2 - 1];
    const uint8_t *src = in;
    int src_row0 = 0;
    if (iw != ow) { /* horizontal pass over the needed rows only, as Pillow */
        tmp = malloc((size_t)(y_last - y_first) * ow * 3);
        if (!tmp) { s = qf_fail(QF_ERR_NOMEM, "image resize: no memory for the intermediate image"); goto done; }
        for (int y = y_first; y < y_last; y++) {
            const uint8_t *row = in + (size_t)y * iw * 3;
            uint8_t *o = tmp + (size_t)(y - y_first) * ow * 3;
            for (int x = 0; x < ow; x++) {
                int xmin = ch.bounds[x * 2], n = ch.bounds[x * 2 + 1];
                const int32_t *k = ch.kk + (size_t)x * ch.ksize;
                int64_t s0 = 1 << (PRECISION_BITS - 1), s1 = s0, s2 = s0;
                for (int t = 0; t < n; t++) {
                    const uint8_t *p = row + (size_t)(xmin + t) * 3;
                    s0 += p[0] * (int64_t)k[t];
                    s1 += p[1] * (int64_t)k[t];
                    s2 += p[2] * (int64_t)k[t];
                }
                o[x * 3] = clip8(s0);
                o[x * 3 + 1] = clip8(s1);
                o[x * 3 + 2] = clip8(s2);
            }
        }
        src = tmp;
        src_row0 = y_first;
    }
    if (ih != oh) {
        for (int y = 0; y < oh; y++) {
            int ymin = cv.bounds[y * 2] - src_row0, n = cv.bounds[y * 2 + 1];
            const int32_t *k = cv.kk + (size_t)y * cv.ksize;
            for (int x = 0; x < ow * 3; x++) {
                int64_t acc = 1 << (PRECISION_BITS - 1);
                for (int t = 0; t < n; t++) acc += src[(size_t)(ymin + t) * ow * 3 + x] * (int64_t)k[t];
                out[(size_t)y * ow * 3 + x] = clip8(acc);
            }
        }
    } else {
        /* only the width changed: the horizontal pass covered every row (y_first 0, y_last ih) */
        memcpy(out, src, (size_t)oh * ow * 3);
    }
done:
    free(ch.bounds); free(ch.kk); free(cv.bounds); free(cv.kk); free(tmp);
    return s;
}

qf_status qf_image_preprocess(const qf_image_preproc *p, const uint8_t *rgb, int64_t w, int64_t h, float *out) {
    if (!p || !rgb || !out) return qf_fail(QF_ERR_ARG, "qf_image_preprocess: NULL preproc, pixels or output");
    if (w < 1 || h < 1 || w > IMAGE_MAX_SIDE || h > IMAGE_MAX_SIDE)
        return qf_fail(QF_ERR_SHAPE, "qf_image_preprocess: image is %lldx%lld: each side must be 1..%d", (long long)w,
                       (long long)h, IMAGE_MAX_SIDE);
    int64_t oh = p->do_resize ? p->size_h : h, ow = p->do_resize ? p->size_w : w;
    if (oh < 1 || ow < 1 || oh > IMAGE_MAX_SIDE || ow > IMAGE_MAX_SIDE)
        return qf_fail(QF_ERR_ARG, "qf_image_preprocess: target size %lldx%lld: each side must be 1..%d",
                       (long long)oh, (long long)ow, IMAGE_MAX_SIDE);
    for (int c = 0; c < 3 && p->do_normalize; c++)
        if (!(p->std[c] != 0.0) || !isfinite(p->std[c]) || !isfinite(p->mean[c]))
            return qf_fail(QF_ERR_ARG, "qf_image_preprocess: image_std[%d] = %g, image_mean[%d] = %g: std must be "
                           "finite and nonzero", c, p->std[c], c, p->mean[c]);
    const uint8_t *px = rgb;
    uint8_t *resized = NULL;
    if (p->do_resize) {
        resized = malloc((size_t)oh * (size_t)ow * 3);
        if (!resized) return qf_fail(QF_ERR_NOMEM, "qf_image_preprocess: no memory for a %lldx%lld image",
                                     (long long)oh, (long long)ow);
        qf_status s = resize_rgb8(rgb, (int)w, (int)h, resized, (int)ow, (int)oh, p->resample);
        if (s != QF_OK) { free(resized); return s; }
        px = resized;
    }
    /* float32 arithmetic in transformers' order: rescale (in double, stored as float32), then
     * (x - mean) / std with mean and std as float32 */
    size_t plane = (size_t)oh * (size_t)ow;
    for (int c = 0; c < 3; c++) {
        float mean = p->do_normalize ? (float)p->mean[c] : 0.0f, std = p->do_normalize ? (float)p->std[c] : 1.0f;
        double fac = p->do_rescale ? p->rescale_factor : 1.0;
        for (size_t i = 0; i < plane; i++) {
            float v = (float)((double)px[i * 3 + c] * fac);
            out[c * plane + i] = p->do_normalize ? (v - mean) / std : v;
        }
    }
    free(resized);
    return QF_OK;
}
