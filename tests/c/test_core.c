/* test_core.c - unit tests of src/core: error reporting, status names, the arena, dtype
 * conversions, Philox4x32-10, thread count and ISA selection.
 * References: F16 bit patterns from numpy's astype(float16) and BF16 ones from torch 1.13's
 * .to(torch.bfloat16) (tables below, produced by /usr/bin/python3 when this test was written);
 * every F16 value against the CPU's own F16C conversion instructions; Philox against the
 * Random123 known-answer vectors (kat_vectors in the Random123 distribution). */
#include "internal.h"
#include "testutil.h"
#include <immintrin.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

static uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

static void test_errors(void) {
    qf_clear_error();
    CHECK(strcmp(qf_last_error(), "") == 0);
    CHECK(qf_fail(QF_ERR_SHAPE, "x has %d dims", 3) == QF_ERR_SHAPE);
    CHECK(strcmp(qf_last_error(), "x has 3 dims") == 0);
    CHECK(qf_fail_prefix(QF_ERR_SHAPE, "file %s", "a.bin") == QF_ERR_SHAPE);
    CHECK(strcmp(qf_last_error(), "file a.bin: x has 3 dims") == 0);
    /* a long message is truncated, never overflowed */
    char big[3000];
    memset(big, 'a', sizeof big - 1);
    big[sizeof big - 1] = '\0';
    qf_fail(QF_ERR_ARG, "%s", big);
    CHECK(strlen(qf_last_error()) == 1023);
    qf_fail_prefix(QF_ERR_ARG, "%s", big);
    CHECK(strlen(qf_last_error()) == 1023);
    /* the message is per thread */
    qf_fail(QF_ERR_IO, "main thread message");
    int other_empty = 0;
#pragma omp parallel num_threads(2)
    {
#ifdef _OPENMP
        if (omp_get_thread_num() == 1) other_empty = qf_last_error()[0] == '\0';
#else
        other_empty = 1;
#endif
    }
    CHECK(other_empty);
    CHECK(strcmp(qf_last_error(), "main thread message") == 0);
    qf_clear_error();
    CHECK(qf_last_error()[0] == '\0');

    const struct { qf_status s; const char *name; } names[] = {
        {QF_OK, "QF_OK"}, {QF_ERR_ARG, "QF_ERR_ARG"}, {QF_ERR_SHAPE, "QF_ERR_SHAPE"},
        {QF_ERR_DTYPE, "QF_ERR_DTYPE"}, {QF_ERR_NONFINITE, "QF_ERR_NONFINITE"}, {QF_ERR_IO, "QF_ERR_IO"},
        {QF_ERR_FORMAT, "QF_ERR_FORMAT"}, {QF_ERR_NOT_FOUND, "QF_ERR_NOT_FOUND"},
        {QF_ERR_NOMEM, "QF_ERR_NOMEM"}, {QF_ERR_UNSUPPORTED, "QF_ERR_UNSUPPORTED"},
        {QF_ERR_INTERNAL, "QF_ERR_INTERNAL"},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) CHECK(strcmp(qf_status_name(names[i].s), names[i].name) == 0);
    CHECK(strcmp(qf_status_name((qf_status)99), "QF_ERR_UNKNOWN") == 0);

    size_t out = 7;
    CHECK_OK(qf_mul_size(3, 5, "m", &out));
    CHECK(out == 15);
    CHECK_ERR(qf_mul_size(SIZE_MAX / 2, 3, "weights", &out), QF_ERR_ARG, "weights: size overflows");
}

static void test_arena(void) {
    qf_arena *a = NULL;
    CHECK_ERR(qf_arena_create(10, NULL), QF_ERR_ARG, "out is NULL");
    CHECK_OK(qf_arena_create(1000, &a));
    if (!a) return;
    CHECK(qf_arena_capacity(a) == 1000);
    char *p1 = qf_arena_alloc(a, 10, 1);
    CHECK(p1 != NULL && qf_arena_used(a) == 10);
    char *p2 = qf_arena_alloc(a, 100, 64);
    CHECK(p2 != NULL && ((uintptr_t)p2 % 64) == 0 && p2 >= p1 + 10);
    CHECK(qf_arena_used(a) == 164);
    void *p3 = qf_arena_alloc(a, 8, 4096); /* offset 4096 > capacity */
    CHECK(p3 == NULL);
    CHECK(qf_arena_used(a) == 164); /* a failed alloc leaves the arena unchanged */
    CHECK(qf_arena_alloc(a, 8, 3) == NULL);      /* not a power of two */
    CHECK(qf_arena_alloc(a, 8, 8192) == NULL);   /* above 4096 */
    CHECK(qf_arena_alloc(a, 8, 0) == NULL);
    void *p4 = NULL;
    CHECK_ERR(qf_arena_alloc_checked(a, 900, 16, "activations", &p4), QF_ERR_NOMEM, "activations");
    CHECK(p4 == NULL);
    CHECK_ERR(qf_arena_alloc_checked(a, 8, 24, "grads", &p4), QF_ERR_ARG, "not a power of two");
    /* exactly filling the arena works; one more byte does not */
    CHECK_OK(qf_arena_alloc_checked(a, 1000 - 176, 16, "rest", &p4));
    CHECK(p4 != NULL && ((uintptr_t)p4 % 16) == 0 && qf_arena_used(a) == 1000);
    CHECK(qf_arena_alloc(a, 1, 1) == NULL);
    CHECK(qf_arena_alloc(a, SIZE_MAX, 1) == NULL); /* no wrap-around */
    memset(p1, 1, 10);
    memset(p2, 2, 100);
    memset(p4, 3, 1000 - 176); /* ASan flags any block that lies outside the arena */
    qf_arena_reset(a);
    CHECK(qf_arena_used(a) == 0);
    CHECK(qf_arena_alloc(a, 10, 1) == p1); /* reset hands out the same memory again */
    CHECK(((uintptr_t)p1 % 4096) == 0);    /* the base is page aligned, so align <= 4096 holds */
    qf_arena_destroy(a);
    qf_arena_destroy(NULL);
}

/* {float32 bits, numpy float16 bits, torch bfloat16 bits} */
static const uint32_t round_table[][3] = {
    {0x3f800000, 0x3c00, 0x3f80}, {0x477fe000, 0x7bff, 0x4780}, {0x477ff000, 0x7c00, 0x4780},
    {0x477fefff, 0x7bff, 0x4780}, {0x7f7fffff, 0x7c00, 0x7f80}, {0x33000000, 0x0000, 0x3300},
    {0x33000001, 0x0001, 0x3300}, {0x33800000, 0x0001, 0x3380}, {0x387fc000, 0x03ff, 0x3880},
    {0x38800000, 0x0400, 0x3880}, {0x3f801000, 0x3c00, 0x3f80}, {0x3f803000, 0x3c02, 0x3f80},
    {0x3f801001, 0x3c01, 0x3f80}, {0x80000000, 0x8000, 0x8000}, {0x7f800000, 0x7c00, 0x7f80},
    {0xff800000, 0xfc00, 0xff80}, {0x38000000, 0x0200, 0x3800}, {0x3c000000, 0x2000, 0x3c00},
    {0x33c00000, 0x0002, 0x33c0}, {0x3f808000, 0x3c04, 0x3f80}, {0x3f818000, 0x3c0c, 0x3f82},
    {0x3f808001, 0x3c04, 0x3f81}, {0xc0490fdb, 0xc248, 0xc049}, {0x00000001, 0x0000, 0x0000},
    {0x00800000, 0x0000, 0x0080},
};

QF_TARGET_AVX2 static float hw_h2f(uint16_t h) { return _cvtsh_ss(h); }
QF_TARGET_AVX2 static uint16_t hw_f2h(float f) { return (uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT); }

static void test_dtypes(void) {
    CHECK(qf_dtype_size(QF_F32) == 4 && qf_dtype_size(QF_F64) == 8 && qf_dtype_size(QF_F16) == 2 &&
          qf_dtype_size(QF_BF16) == 2 && qf_dtype_size(QF_I64) == 8 && qf_dtype_size(QF_BOOL) == 1);
    CHECK(qf_dtype_size((qf_dtype)77) == 0);
    for (int t = 0; t < QF_DTYPE_COUNT; t++) {
        qf_dtype back;
        CHECK_OK(qf_dtype_parse(qf_dtype_name((qf_dtype)t), &back));
        CHECK(back == (qf_dtype)t);
    }
    qf_dtype dt;
    CHECK_ERR(qf_dtype_parse("F8_E4M3", &dt), QF_ERR_DTYPE, "unknown dtype \"F8_E4M3\"");
    CHECK_ERR(qf_dtype_parse(NULL, &dt), QF_ERR_DTYPE, "missing");

    /* F32 -> F16 / BF16 against numpy / torch, and the way back */
    size_t nt = sizeof round_table / sizeof round_table[0];
    for (size_t i = 0; i < nt; i++) {
        float f = u2f(round_table[i][0]);
        uint16_t h = 0, b = 0;
        CHECK_OK(qf_from_f32(QF_F16, &f, &h, 1));
        CHECK_OK(qf_from_f32(QF_BF16, &f, &b, 1));
        if (h != round_table[i][1] || b != round_table[i][2]) {
            fprintf(stderr, "f32 %08x: f16 %04x (want %04x) bf16 %04x (want %04x)\n", round_table[i][0], h,
                    (unsigned)round_table[i][1], b, (unsigned)round_table[i][2]);
            CHECK(0);
        }
    }
    uint16_t h1 = 0x3c00, hmax = 0x7bff, hsub = 0x0001, hinf = 0xfc00, hnan = 0x7e00;
    float f;
    CHECK_OK(qf_to_f32(QF_F16, &h1, &f, 1)); CHECK(f == 1.0f);
    CHECK_OK(qf_to_f32(QF_F16, &hmax, &f, 1)); CHECK(f == 65504.0f);
    CHECK_OK(qf_to_f32(QF_F16, &hsub, &f, 1)); CHECK(f == ldexpf(1.0f, -24));
    CHECK_OK(qf_to_f32(QF_F16, &hinf, &f, 1)); CHECK(isinf(f) && f < 0);
    CHECK_OK(qf_to_f32(QF_F16, &hnan, &f, 1)); CHECK(isnan(f));
    float nanf_ = u2f(0x7fc00000), snan = u2f(0x7f800001);
    uint16_t hn, bn;
    CHECK_OK(qf_from_f32(QF_F16, &nanf_, &hn, 1)); CHECK((hn & 0x7c00) == 0x7c00 && (hn & 0x3ff));
    CHECK_OK(qf_from_f32(QF_BF16, &snan, &bn, 1)); CHECK((bn & 0x7f80) == 0x7f80 && (bn & 0x7f)); /* stays NaN */

    /* every F16 value: decode equals the F16C instruction, and encode(decode(h)) == h */
    int bad_dec = 0, bad_rt = 0, bad_bf = 0;
    for (uint32_t i = 0; i < 65536; i++) {
        uint16_t h = (uint16_t)i, h2 = 0, b2 = 0;
        float v, w;
        qf_to_f32(QF_F16, &h, &v, 1);
        float ref = hw_h2f(h);
        int is_nan = (h & 0x7c00) == 0x7c00 && (h & 0x3ff);
        if (is_nan ? !isnan(v) : f2u(v) != f2u(ref)) bad_dec++;
        qf_from_f32(QF_F16, &v, &h2, 1);
        if (is_nan ? !((h2 & 0x7c00) == 0x7c00 && (h2 & 0x3ff)) : h2 != h) bad_rt++;
        /* BF16: decode is exact (bits << 16), so round-tripping every non-NaN value is exact */
        qf_to_f32(QF_BF16, &h, &w, 1);
        qf_from_f32(QF_BF16, &w, &b2, 1);
        int bnan = (h & 0x7f80) == 0x7f80 && (h & 0x7f);
        if (f2u(w) != (uint32_t)h << 16 || (bnan ? !(isnan(w) && (b2 & 0x7f)) : b2 != h)) bad_bf++;
    }
    CHECK(bad_dec == 0);
    CHECK(bad_rt == 0);
    CHECK(bad_bf == 0);
    if (bad_dec || bad_rt || bad_bf) fprintf(stderr, "f16 decode %d, f16 round trip %d, bf16 %d mismatches\n", bad_dec, bad_rt, bad_bf);

    /* F32 -> F16 on 2M pseudo-random bit patterns (half of them rounding ties), against F16C */
    int bad_enc = 0;
    uint32_t x = 12345;
    for (int i = 0; i < 2000000; i++) {
        x = x * 1664525u + 1013904223u;
        /* the first half are exact ties in the normal F16 range: bit 12 set, bits 0..11 clear */
        uint32_t bits = i < 1000000 ? (x & ~0x1fffu) | 0x1000u : x;
        float v = u2f(bits);
        uint16_t mine;
        qf_from_f32(QF_F16, &v, &mine, 1);
        uint16_t ref = hw_f2h(v);
        if (isnan(v) ? !((mine & 0x7c00) == 0x7c00 && (mine & 0x3ff)) : mine != ref) {
            if (bad_enc < 5) fprintf(stderr, "f32 %08x -> f16 %04x, F16C says %04x\n", bits, mine, ref);
            bad_enc++;
        }
    }
    CHECK(bad_enc == 0);

    /* F64 -> F32 rounds to nearest even; F32 -> F64 exact */
    double d[6] = {0.1, 1.0 + ldexp(1, -24), 1.0 + 3 * ldexp(1, -24), 1e300, -1e-310, 65504.0};
    float fd[6];
    CHECK_OK(qf_to_f32(QF_F64, d, fd, 6));
    CHECK(f2u(fd[0]) == 0x3dcccccd);
    CHECK(fd[1] == 1.0f);                          /* tie -> even */
    CHECK(fd[2] == 1.0f + ldexpf(1, -22));         /* tie -> even (upward) */
    CHECK(isinf(fd[3]));
    CHECK(fd[4] == 0.0f && signbit(fd[4]));
    CHECK(fd[5] == 65504.0f);
    double back[6];
    CHECK_OK(qf_from_f32(QF_F64, fd, back, 6));
    CHECK(back[0] == (double)u2f(0x3dcccccd) && back[5] == 65504.0);
    /* unaligned sources are allowed */
    unsigned char raw[1 + 8];
    memcpy(raw + 1, &d[0], 8);
    CHECK_OK(qf_to_f32(QF_F64, raw + 1, fd, 1));
    CHECK(f2u(fd[0]) == 0x3dcccccd);

    CHECK_ERR(qf_to_f32(QF_I32, raw, fd, 1), QF_ERR_DTYPE, "cannot convert I32");
    CHECK_ERR(qf_from_f32(QF_U8, fd, raw, 1), QF_ERR_DTYPE, "cannot convert F32 to U8");
    CHECK_ERR(qf_to_f32(QF_F32, NULL, fd, 1), QF_ERR_ARG, "NULL");
}

static void test_philox(void) {
    /* Random123 kat_vectors, philox4x32 R=10: ctr words c0..c3, key words k0..k1, expected out.
     * qf_philox4x32 maps ctr_lo = c1:c0, ctr_hi = c3:c2, seed = k1:k0 (high:low). */
    static const uint32_t kat[3][10] = {
        {0, 0, 0, 0, 0, 0, 0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8},
        {0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff,
         0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd},
        {0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344, 0xa4093822, 0x299f31d0,
         0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1},
    };
    for (int i = 0; i < 3; i++) {
        const uint32_t *k = kat[i];
        uint64_t ctr_lo = (uint64_t)k[1] << 32 | k[0], ctr_hi = (uint64_t)k[3] << 32 | k[2];
        uint64_t seed = (uint64_t)k[5] << 32 | k[4];
        uint32_t out[4];
        qf_philox4x32(seed, ctr_hi, ctr_lo, out);
        for (int j = 0; j < 4; j++) CHECK(out[j] == k[6 + j]);
        if (memcmp(out, k + 6, 16))
            fprintf(stderr, "philox kat %d: %08x %08x %08x %08x\n", i, out[0], out[1], out[2], out[3]);
    }
    /* uniform: element `index` takes word index%4 of counter (offset, index/4), top 24 bits */
    uint32_t w[4];
    qf_philox4x32(42, 7, 2, w);
    for (int j = 0; j < 4; j++) CHECK(qf_philox_uniform(42, 7, 8 + j) == (float)(w[j] >> 8) / 16777216.0f);
    double sum = 0, lo = 1, hi = 0;
    for (uint64_t i = 0; i < 100000; i++) {
        float u = qf_philox_uniform(1, 0, i);
        sum += u;
        if (u < lo) lo = u;
        if (u > hi) hi = u;
    }
    CHECK(lo >= 0 && hi < 1);
    CHECK(fabs(sum / 100000 - 0.5) < 0.005); /* 5.5 sigma for 1e5 uniforms */
    CHECK(qf_philox_uniform(1, 0, 5) != qf_philox_uniform(2, 0, 5));
    CHECK(qf_philox_uniform(1, 0, 5) != qf_philox_uniform(1, 1, 5));
}

static void test_threads_isa(void) {
    int n0 = qf_get_num_threads();
    CHECK(n0 >= 1);
    CHECK_OK(qf_set_num_threads(3));
    CHECK(qf_get_num_threads() == 3);
    CHECK_ERR(qf_set_num_threads(0), QF_ERR_ARG, "n = 0");
    CHECK_ERR(qf_set_num_threads(-2), QF_ERR_ARG, "n = -2");
    CHECK_ERR(qf_set_num_threads(100000), QF_ERR_ARG, "expected 1..4096");
    CHECK(qf_get_num_threads() == 3); /* a refused call changes nothing */
    CHECK_OK(qf_set_num_threads(n0));

    qf_isa isa0 = qf_get_isa();
    CHECK_ERR(qf_set_isa((qf_isa)7), QF_ERR_ARG, "unknown isa 7");
    CHECK_ERR(qf_set_isa((qf_isa)-1), QF_ERR_ARG, "unknown isa -1");
    CHECK(qf_get_isa() == isa0);
    CHECK_OK(qf_set_isa(QF_ISA_SCALAR));
    CHECK(qf_get_isa() == QF_ISA_SCALAR);
    for (int i = QF_ISA_AVX2; i <= QF_ISA_AVX512; i++) {
        if (qf_cpu_has((qf_isa)i)) {
            CHECK_OK(qf_set_isa((qf_isa)i));
            CHECK(qf_get_isa() == (qf_isa)i);
        } else {
            CHECK_ERR(qf_set_isa((qf_isa)i), QF_ERR_UNSUPPORTED, "does not support");
        }
    }
    CHECK(strcmp(qf_isa_name(QF_ISA_AVX2), "avx2") == 0 && strcmp(qf_isa_name(QF_ISA_SCALAR), "scalar") == 0 &&
          strcmp(qf_isa_name(QF_ISA_AVX512), "avx512") == 0);
    CHECK_OK(qf_set_isa(isa0));
}

int main(void) {
    test_errors();
    test_arena();
    test_dtypes();
    test_philox();
    test_threads_isa();
    TEST_MAIN_END("test_core");
}
