/* dtype.c - element sizes, names (safetensors spelling) and float conversions.
 * F16 and BF16 are converted bit-exactly (round-to-nearest-even on the way down, NaN kept NaN,
 * overflow to Inf), matching torch's .half()/.bfloat16(). */
#include "internal.h"
#include <string.h>

static const struct { const char *name; size_t size; } table[QF_DTYPE_COUNT] = {
    [QF_F32] = {"F32", 4}, [QF_F64] = {"F64", 8}, [QF_F16] = {"F16", 2}, [QF_BF16] = {"BF16", 2},
    [QF_I64] = {"I64", 8}, [QF_I32] = {"I32", 4}, [QF_I16] = {"I16", 2}, [QF_I8] = {"I8", 1},
    [QF_U8] = {"U8", 1},   [QF_BOOL] = {"BOOL", 1},
};

size_t qf_dtype_size(qf_dtype t) { return (unsigned)t < QF_DTYPE_COUNT ? table[t].size : 0; }
const char *qf_dtype_name(qf_dtype t) { return (unsigned)t < QF_DTYPE_COUNT ? table[t].name : "?"; }

qf_status qf_dtype_parse(const char *name, qf_dtype *out) {
    if (!name) return qf_fail(QF_ERR_DTYPE, "dtype is missing");
    for (int i = 0; i < QF_DTYPE_COUNT; i++)
        if (!strcmp(name, table[i].name)) { *out = (qf_dtype)i; return QF_OK; }
    return qf_fail(QF_ERR_DTYPE, "unknown dtype \"%.32s\" (known: F64 F32 F16 BF16 I64 I32 I16 I8 U8 BOOL)", name);
}

static float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
    if (exp == 0) {
        if (man == 0) bits = sign;
        else { /* subnormal: normalise */
            int e = -1;
            do { e++; man <<= 1; } while (!(man & 0x400u));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (exp == 31) bits = sign | 0x7f800000u | (man << 13);
    else bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static uint16_t f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0));
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* rounds to >= 65520: Inf */
    if (ax < 0x38800000u) {                                    /* result is subnormal or 0 */
        if (ax < 0x33000000u) return (uint16_t)sign;            /* < 2^-25: rounds to 0 */
        uint32_t e = ax >> 23, m = (ax & 0x7fffffu) | 0x800000u;
        uint32_t shift = 126 - e;                               /* 14 + (113 - e) */
        uint32_t r = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (r & 1))) r++;
        return (uint16_t)(sign | r);
    }
    uint32_t r = ((ax >> 13) - ((127 - 15) << 10));
    uint32_t rem = ax & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (r & 1))) r++;
    return (uint16_t)(sign | r);
}

static float bf16_to_f32(uint16_t b) {
    uint32_t x = (uint32_t)b << 16;
    float f;
    memcpy(&f, &x, 4);
    return f;
}

static uint16_t f32_to_bf16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u); /* quiet NaN */
    x += 0x7fffu + ((x >> 16) & 1u);
    return (uint16_t)(x >> 16);
}

qf_status qf_to_f32(qf_dtype t, const void *src, float *dst, size_t n) {
    if (n && (!src || !dst)) return qf_fail(QF_ERR_ARG, "qf_to_f32: NULL buffer");
    if (n == 0) return t == QF_F32 || t == QF_F64 || t == QF_F16 || t == QF_BF16 ? QF_OK
                     : qf_fail(QF_ERR_DTYPE, "qf_to_f32: cannot convert %s to F32 (float dtypes only)", qf_dtype_name(t));
    const unsigned char *s = src;
    switch (t) {
    case QF_F32: memmove(dst, src, n * 4); return QF_OK;
    case QF_F64:
        for (size_t i = 0; i < n; i++) { double d; memcpy(&d, s + 8 * i, 8); dst[i] = (float)d; }
        return QF_OK;
    case QF_F16:
        for (size_t i = 0; i < n; i++) { uint16_t h; memcpy(&h, s + 2 * i, 2); dst[i] = f16_to_f32(h); }
        return QF_OK;
    case QF_BF16:
        for (size_t i = 0; i < n; i++) { uint16_t h; memcpy(&h, s + 2 * i, 2); dst[i] = bf16_to_f32(h); }
        return QF_OK;
    default:
        return qf_fail(QF_ERR_DTYPE, "qf_to_f32: cannot convert %s to F32 (float dtypes only)", qf_dtype_name(t));
    }
}

qf_status qf_from_f32(qf_dtype t, const float *src, void *dst, size_t n) {
    if (n && (!src || !dst)) return qf_fail(QF_ERR_ARG, "qf_from_f32: NULL buffer");
    if (n == 0) return t == QF_F32 || t == QF_F64 || t == QF_F16 || t == QF_BF16 ? QF_OK
                     : qf_fail(QF_ERR_DTYPE, "qf_from_f32: cannot convert F32 to %s (float dtypes only)", qf_dtype_name(t));
    unsigned char *d = dst;
    switch (t) {
    case QF_F32: memmove(dst, src, n * 4); return QF_OK;
    case QF_F64:
        for (size_t i = 0; i < n; i++) { double v = src[i]; memcpy(d + 8 * i, &v, 8); }
        return QF_OK;
    case QF_F16:
        for (size_t i = 0; i < n; i++) { uint16_t h = f32_to_f16(src[i]); memcpy(d + 2 * i, &h, 2); }
        return QF_OK;
    case QF_BF16:
        for (size_t i = 0; i < n; i++) { uint16_t h = f32_to_bf16(src[i]); memcpy(d + 2 * i, &h, 2); }
        return QF_OK;
    default:
        return qf_fail(QF_ERR_DTYPE, "qf_from_f32: cannot convert F32 to %s (float dtypes only)", qf_dtype_name(t));
    }
}
