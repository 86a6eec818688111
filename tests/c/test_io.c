/* test_io.c - tests of the file formats: safetensors, .npy, config.json.
 * References: the fixtures in tests/fixtures (written by Python's safetensors library; the
 * values checked below were read from them with numpy), and the .npy files in tests/c/data
 * (written by numpy 1.24's np.save / format.write_array; tests/c/data/make_data.py). qf_npy_write's output
 * is compared byte for byte with numpy's file for the same array. Every malformed-file rule has
 * a test that checks the status and that the message names the rule and the tensor.
 * Run from the repository root. Temporary files go to a mkdtemp directory under /tmp. */
#include "testutil.h"
#include <dirent.h>
#include <stdint.h>
#include <sys/stat.h>
#include <unistd.h>

static char tmpdir[64];

static const char *tmp_path(const char *name) {
    static char buf[8][256];
    static int k;
    char *b = buf[k++ & 7];
    snprintf(b, 256, "%s/%s", tmpdir, name);
    return b;
}

static unsigned char *slurp(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *b = malloc((size_t)n + 1);
    if (b && fread(b, 1, (size_t)n, f) != (size_t)n) { free(b); b = NULL; }
    fclose(f);
    *len = (size_t)n;
    return b;
}

static void spit(const char *path, const void *data, size_t len) {
    FILE *f = fopen(path, "wb");
    if (!f) { perror(path); exit(2); }
    fwrite(data, 1, len, f);
    fclose(f);
}

static float hexf(const char *s) { return strtof(s, NULL); }

/* ---- safetensors: the real files ---------------------------------------------------------- */

static void test_st_fixtures(void) {
    const char *path = "tests/fixtures/mha_0/mha.safetensors";
    qf_safetensors *f = NULL;
    CHECK_OK(qf_st_open(path, &f));
    if (!f) return;
    CHECK(qf_st_count(f) == 4);
    /* header (read with Python's json): name -> dtype, shape, data_offsets */
    static const struct { const char *name; int ndim; int64_t shape[2]; size_t begin, end; } want[] = {
        {"in_proj_bias", 1, {96}, 0, 384}, {"in_proj_weight", 2, {96, 32}, 384, 12672},
        {"out_proj.bias", 1, {32}, 12672, 12800}, {"out_proj.weight", 2, {32, 32}, 12800, 16896},
    };
    size_t flen = 0;
    unsigned char *raw = slurp(path, &flen);
    CHECK(raw && flen == 17208);
    size_t data0 = 8 + 304; /* the header length field of this file says 304 */
    CHECK(raw && raw[0] == 0x30 && raw[1] == 0x01);
    for (int i = 0; i < 4; i++) {
        qf_tensor_view v;
        CHECK_OK(qf_st_find(f, want[i].name, &v));
        CHECK(v.dtype == QF_F32 && v.ndim == want[i].ndim && v.shape[0] == want[i].shape[0]);
        if (want[i].ndim == 2) CHECK(v.shape[1] == want[i].shape[1]);
        CHECK(v.nbytes == want[i].end - want[i].begin);
        CHECK(strcmp(v.name, want[i].name) == 0);
        if (raw) CHECK(memcmp(v.data, raw + data0 + want[i].begin, v.nbytes) == 0);
    }
    /* header order is the file's order */
    qf_tensor_view v0;
    CHECK_OK(qf_st_get(f, 0, &v0));
    CHECK(strcmp(v0.name, "in_proj_bias") == 0);
    CHECK_ERR(qf_st_get(f, 4, &v0), QF_ERR_ARG, "index 4 out of range");
    /* values printed by numpy from the same file */
    float bias[96], w[32 * 32];
    int64_t sb[1] = {96}, sw[2] = {32, 32};
    CHECK_OK(qf_st_read_f32(f, "in_proj_bias", 1, sb, bias));
    CHECK(bias[0] == hexf("0x1.0d978ap-2") && bias[1] == hexf("-0x1.dfcc1ap-2") && bias[2] == hexf("0x1.c2f13cp-2"));
    CHECK(bias[95] == hexf("0x1.42b814p-1"));
    CHECK_OK(qf_st_read_f32(f, "out_proj.weight", 2, sw, w));
    CHECK(w[0] == hexf("0x1.15de76p-4") && w[1] == hexf("0x1.c09678p-5") && w[2] == hexf("-0x1.3a4facp-2"));
    CHECK(w[1023] == hexf("-0x1.ef7258p-4"));
    int64_t wrong[2] = {32, 96};
    CHECK_ERR(qf_st_read_f32(f, "in_proj_weight", 2, wrong, w), QF_ERR_SHAPE,
              "mha.safetensors: tensor \"in_proj_weight\": expected shape [32,96] but the file has [96,32]");
    CHECK_ERR(qf_st_read_f32(f, "in_proj_bias", 2, wrong, w), QF_ERR_SHAPE, "expected shape [32,96] but the file has [96]");
    CHECK_ERR(qf_st_find(f, "k_proj_weight", &v0), QF_ERR_NOT_FOUND, "mha.safetensors: no tensor named \"k_proj_weight\"");
    CHECK(qf_st_metadata(f, "format") == NULL);
    qf_st_close(f);
    free(raw);

    f = NULL;
    CHECK_OK(qf_st_open("tests/fixtures/mha_0/io.safetensors", &f));
    if (f) {
        qf_tensor_view v;
        CHECK_OK(qf_st_find(f, "key_padding_mask", &v));
        static const uint8_t kpm[15] = {0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1};
        CHECK(v.dtype == QF_U8 && v.ndim == 2 && v.shape[0] == 3 && v.shape[1] == 5 && v.nbytes == 15);
        CHECK(memcmp(v.data, kpm, 15) == 0);
        int64_t s[2] = {3, 5};
        float tmp[15];
        CHECK_ERR(qf_st_read_f32(f, "key_padding_mask", 2, s, tmp), QF_ERR_DTYPE, "tensor \"key_padding_mask\"");
        CHECK_OK(qf_st_find(f, "attn_weights_avg", &v));
        CHECK(v.ndim == 3 && v.shape[0] == 3 && v.shape[1] == 5 && v.shape[2] == 5);
        CHECK(qf_st_count(f) == 6);
        qf_st_close(f);
    }
    /* every fixture file opens */
    const char *all[] = {"mha_1/mha", "mha_1/io", "mha_2/mha", "mha_2/io", "sdpa_0/io", "sdpa_1/io",
                         "sdpa_2/io", "sdpa_3/io", "sdpa_4/io"};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) {
        char p[128];
        snprintf(p, sizeof p, "tests/fixtures/%s.safetensors", all[i]);
        f = NULL;
        CHECK_OK(qf_st_open(p, &f));
        CHECK(f && qf_st_count(f) > 0);
        qf_st_close(f);
    }
    CHECK_ERR(qf_st_open("tests/fixtures/nope.safetensors", &f), QF_ERR_IO,
              "tests/fixtures/nope.safetensors: cannot open: No such file or directory");
    CHECK(f == NULL);
    CHECK_ERR(qf_st_open("tests/fixtures", &f), QF_ERR_IO, "not a regular file");
}

/* ---- safetensors: round trip --------------------------------------------------------------- */

static void test_st_roundtrip(void) {
    float f32[6] = {1, -2, 3.5f, 1e-30f, -0.0f, 65504};
    double f64[3] = {0.1, -1e300, 2.5};
    uint16_t f16[4] = {0x3c00, 0xc000, 0x7bff, 0x0001}; /* 1, -2, 65504, 2^-24 */
    uint16_t bf16[2] = {0x3f80, 0xc049};                /* 1, -3.140625 */
    int64_t i64[2] = {INT64_MIN, INT64_MAX};
    int32_t i32[3] = {-7, 0, 7};
    int16_t i16[1] = {-32768};
    int8_t i8[2] = {-128, 127};
    uint8_t u8[5] = {0, 1, 2, 254, 255};
    uint8_t b[2] = {1, 0};
    float scalar = 42.0f;
    qf_tensor_ref t[] = {
        {"a.f32", QF_F32, 2, {2, 3}, f32}, {"f64", QF_F64, 1, {3}, f64}, {"f16", QF_F16, 2, {2, 2}, f16},
        {"bf16", QF_BF16, 3, {1, 2, 1}, bf16}, {"i64", QF_I64, 1, {2}, i64}, {"i32", QF_I32, 1, {3}, i32},
        {"i16", QF_I16, 1, {1}, i16}, {"i8", QF_I8, 1, {2}, i8}, {"u8", QF_U8, 1, {5}, u8},
        {"bool", QF_BOOL, 1, {2}, b}, {"scalar", QF_F32, 0, {0}, &scalar},
        {"empty", QF_F32, 2, {0, 4}, NULL}, {"empty2", QF_I64, 1, {0}, NULL},
        {"odd \"name\"\\/\t\xc3\xbc", QF_U8, 1, {1}, u8}, /* JSON escapes and UTF-8 survive */
    };
    int n = (int)(sizeof t / sizeof t[0]);
    const char *meta[] = {"format", "pt", "note", "quoted \"text\"\n", NULL};
    const char *path = tmp_path("rt.safetensors");
    CHECK_OK(qf_st_write(path, t, n, meta));
    qf_safetensors *f = NULL;
    CHECK_OK(qf_st_open(path, &f));
    if (!f) return;
    CHECK(qf_st_count(f) == n);
    for (int i = 0; i < n; i++) {
        qf_tensor_view v;
        CHECK_OK(qf_st_find(f, t[i].name, &v));
        CHECK(v.dtype == t[i].dtype && v.ndim == t[i].ndim);
        size_t bytes = qf_dtype_size(t[i].dtype);
        for (int d = 0; d < t[i].ndim; d++) {
            CHECK(v.shape[d] == t[i].shape[d]);
            bytes *= (size_t)t[i].shape[d];
        }
        CHECK(v.nbytes == bytes);
        if (bytes) CHECK(memcmp(v.data, t[i].data, bytes) == 0);
        qf_tensor_view g;
        CHECK_OK(qf_st_get(f, i, &g)); /* header order = argument order */
        CHECK(strcmp(g.name, t[i].name) == 0);
    }
    CHECK(qf_st_metadata(f, "format") && strcmp(qf_st_metadata(f, "format"), "pt") == 0);
    CHECK(qf_st_metadata(f, "note") && strcmp(qf_st_metadata(f, "note"), "quoted \"text\"\n") == 0);
    CHECK(qf_st_metadata(f, "other") == NULL);
    /* float conversions on read */
    float out[6];
    int64_t s3[1] = {3}, s22[2] = {2, 2}, s121[3] = {1, 2, 1};
    CHECK_OK(qf_st_read_f32(f, "f64", 1, s3, out));
    CHECK(out[0] == 0.1f && isinf(out[1]) && out[1] < 0 && out[2] == 2.5f);
    CHECK_OK(qf_st_read_f32(f, "f16", 2, s22, out));
    CHECK(out[0] == 1 && out[1] == -2 && out[2] == 65504 && out[3] == ldexpf(1, -24));
    CHECK_OK(qf_st_read_f32(f, "bf16", 3, s121, out));
    CHECK(out[0] == 1 && out[1] == -3.140625f);
    CHECK_OK(qf_st_read_f32(f, "scalar", 0, NULL, out));
    CHECK(out[0] == 42.0f);
    int64_t s04[2] = {0, 4};
    CHECK_OK(qf_st_read_f32(f, "empty", 2, s04, NULL));
    CHECK_ERR(qf_st_read_f32(f, "i32", 1, s3, out), QF_ERR_DTYPE, "tensor \"i32\"");
    qf_st_close(f);

    /* the layout the Rust implementation writes: header padded with spaces to 8 bytes */
    size_t len = 0;
    unsigned char *raw = slurp(path, &len);
    CHECK(raw != NULL);
    if (raw) {
        uint64_t hlen = 0;
        for (int i = 7; i >= 0; i--) hlen = hlen << 8 | raw[i];
        CHECK(hlen % 8 == 0 && raw[8] == '{');
        size_t last = 8 + hlen - 1;
        while (last > 8 && raw[last] == ' ') last--;
        CHECK(raw[last] == '}');
        CHECK(memcmp(raw + 8 + hlen, f32, sizeof f32) == 0); /* first tensor starts the data */
        free(raw);
    }
    /* overwrite in place (atomic rename) leaves no temporary behind */
    CHECK_OK(qf_st_write(path, t, 1, NULL));
    f = NULL;
    CHECK_OK(qf_st_open(path, &f));
    CHECK(f && qf_st_count(f) == 1 && qf_st_metadata(f, "format") == NULL);
    qf_st_close(f);
    CHECK_OK(qf_st_write(tmp_path("none.safetensors"), NULL, 0, NULL));
    f = NULL;
    CHECK_OK(qf_st_open(tmp_path("none.safetensors"), &f));
    CHECK(f && qf_st_count(f) == 0);
    qf_st_close(f);
    DIR *d = opendir(tmpdir);
    int temps = 0;
    for (struct dirent *e; d && (e = readdir(d));)
        if (strstr(e->d_name, ".tmp.")) temps++;
    if (d) closedir(d);
    CHECK(temps == 0);
    struct stat st;
    CHECK(stat(path, &st) == 0 && (st.st_mode & 0777) == 0644);

    /* writer argument checks */
    qf_tensor_ref bad[2] = {{"x", QF_F32, 1, {2}, f32}, {"x", QF_F32, 1, {1}, f32}};
    CHECK_ERR(qf_st_write(path, bad, 2, NULL), QF_ERR_ARG, "tensor \"x\": duplicate tensor name");
    bad[1].name = "";
    CHECK_ERR(qf_st_write(path, bad, 2, NULL), QF_ERR_ARG, "tensor 1 has a NULL or empty name");
    bad[1].name = NULL;
    CHECK_ERR(qf_st_write(path, bad, 2, NULL), QF_ERR_ARG, "tensor 1 has a NULL or empty name");
    bad[1].name = "__metadata__";
    CHECK_ERR(qf_st_write(path, bad, 2, NULL), QF_ERR_ARG, "reserved");
    bad[1].name = "y";
    bad[1].data = NULL;
    CHECK_ERR(qf_st_write(path, bad, 2, NULL), QF_ERR_ARG, "tensor \"y\": data is NULL for 4 bytes");
    bad[1].data = f32;
    bad[1].shape[0] = -1;
    CHECK_ERR(qf_st_write(path, bad, 2, NULL), QF_ERR_SHAPE, "tensor \"y\": shape[0] = -1 is negative");
    bad[1].shape[0] = 1;
    bad[1].ndim = 9;
    CHECK_ERR(qf_st_write(path, bad, 2, NULL), QF_ERR_SHAPE, "tensor \"y\": ndim 9");
    bad[1].ndim = 1;
    bad[1].dtype = (qf_dtype)99;
    CHECK_ERR(qf_st_write(path, bad, 2, NULL), QF_ERR_DTYPE, "tensor \"y\": unknown dtype 99");
    bad[1].dtype = QF_F32;
    bad[1].ndim = 4;
    bad[1].shape[0] = bad[1].shape[1] = bad[1].shape[2] = bad[1].shape[3] = INT64_C(1) << 40;
    CHECK_ERR(qf_st_write(path, bad, 2, NULL), QF_ERR_SHAPE, "tensor \"y\": shape x dtype size overflows");
    const char *odd[] = {"k", NULL};
    CHECK_ERR(qf_st_write(path, bad, 1, odd), QF_ERR_ARG, "metadata key \"k\" has no value");
    const char *dupm[] = {"k", "1", "k", "2", NULL};
    CHECK_ERR(qf_st_write(path, bad, 1, dupm), QF_ERR_ARG, "metadata key \"k\" appears twice");
    CHECK_ERR(qf_st_write("/nonexistent-dir/x.safetensors", bad, 1, NULL), QF_ERR_IO, "No such file or directory");
    CHECK_ERR(qf_st_write(path, bad, -1, NULL), QF_ERR_ARG, "n = -1");
    /* the failed writes left the last good file in place */
    f = NULL;
    CHECK_OK(qf_st_open(path, &f));
    CHECK(f && qf_st_count(f) == 1);
    qf_st_close(f);
}

/* ---- safetensors: malformed files ------------------------------------------------------- */

/* Builds length + header + `data_len` bytes of data (values 0,1,2,...). */
static unsigned char *st_bytes(const char *header, size_t data_len, size_t *len) {
    size_t h = strlen(header);
    unsigned char *b = malloc(8 + h + data_len + 1);
    for (int i = 0; i < 8; i++) b[i] = (unsigned char)((uint64_t)h >> (8 * i));
    memcpy(b + 8, header, h);
    for (size_t i = 0; i < data_len; i++) b[8 + h + i] = (unsigned char)i;
    *len = 8 + h + data_len;
    return b;
}

/* Expects the header (with data_len data bytes) to be rejected with `want` and `needle`. */
#define ST_BAD(header, data_len, want, needle)                                                  \
    do {                                                                                        \
        size_t len_;                                                                            \
        unsigned char *b_ = st_bytes(header, data_len, &len_);                                  \
        qf_safetensors *f_ = (qf_safetensors *)1;                                               \
        CHECK_ERR(qf_st_open_memory(b_, len_, "bad.st", &f_), want, needle);                    \
        CHECK(f_ == NULL);                                                                      \
        free(b_);                                                                               \
    } while (0)

static void test_st_malformed(void) {
    qf_safetensors *f = NULL;
    /* a valid baseline so the bad cases below differ from it in one rule each */
    size_t len;
    unsigned char *good = st_bytes("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                                   "\"b\":{\"dtype\":\"U8\",\"shape\":[],\"data_offsets\":[8,9]},"
                                   "\"z\":{\"dtype\":\"F16\",\"shape\":[0,3],\"data_offsets\":[9,9]},"
                                   "\"__metadata__\":{\"k\":\"v\"}}", 9, &len);
    CHECK_OK(qf_st_open_memory(good, len, "good.st", &f));
    CHECK(f && qf_st_count(f) == 3 && qf_st_metadata(f, "k") && !strcmp(qf_st_metadata(f, "k"), "v"));
    qf_st_close(f);

    /* truncated */
    CHECK_ERR(qf_st_open_memory(good, 5, "short.st", &f), QF_ERR_FORMAT,
              "short.st: file is 5 bytes, shorter than the 8-byte header length");
    CHECK_ERR(qf_st_open_memory(good, len - 1, "cut.st", &f), QF_ERR_FORMAT, "cut.st");
    /* header length bounds */
    unsigned char hl[16] = {0};
    uint64_t big = 200000000;
    for (int i = 0; i < 8; i++) hl[i] = (unsigned char)(big >> (8 * i));
    CHECK_ERR(qf_st_open_memory(hl, 16, "big.st", &f), QF_ERR_FORMAT, "big.st: header length 200000000 exceeds the 100000000-byte limit");
    hl[0] = 9; hl[1] = hl[2] = hl[3] = 0;
    CHECK_ERR(qf_st_open_memory(hl, 16, "h.st", &f), QF_ERR_FORMAT, "h.st: header length 9 exceeds the 8 bytes after the length field");
    memset(hl, 0xff, 8);
    CHECK_ERR(qf_st_open_memory(hl, 16, "h.st", &f), QF_ERR_FORMAT, "exceeds the 100000000-byte limit");
    /* JSON */
    ST_BAD("{\"a\":{\"dtype\":\"F32\",", 0, QF_ERR_FORMAT, "bad.st: header is not valid JSON");
    ST_BAD("", 0, QF_ERR_FORMAT, "header is not valid JSON");
    ST_BAD("[1,2]", 0, QF_ERR_FORMAT, "bad.st: header is not a JSON object");
    ST_BAD("{} x", 0, QF_ERR_FORMAT, "trailing bytes");
    ST_BAD("{\"a\":[1]}", 0, QF_ERR_FORMAT, "tensor \"a\": header entry is not a JSON object");
    /* dtype */
    ST_BAD("{\"w\":{\"dtype\":\"F8_E5M2\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1, QF_ERR_DTYPE,
           "bad.st: tensor \"w\": unknown dtype \"F8_E5M2\"");
    ST_BAD("{\"w\":{\"shape\":[1],\"data_offsets\":[0,1]}}", 1, QF_ERR_FORMAT, "tensor \"w\": \"dtype\" is missing or not a string");
    ST_BAD("{\"w\":{\"dtype\":4,\"shape\":[1],\"data_offsets\":[0,1]}}", 1, QF_ERR_FORMAT, "tensor \"w\": \"dtype\" is missing");
    /* shape */
    ST_BAD("{\"w\":{\"dtype\":\"F32\",\"shape\":3,\"data_offsets\":[0,12]}}", 12, QF_ERR_FORMAT, "tensor \"w\": \"shape\" is missing or not an array");
    ST_BAD("{\"w\":{\"dtype\":\"F32\",\"shape\":[3,-1],\"data_offsets\":[0,12]}}", 12, QF_ERR_FORMAT, "tensor \"w\": shape[1] is not a non-negative integer");
    ST_BAD("{\"w\":{\"dtype\":\"F32\",\"shape\":[1.5],\"data_offsets\":[0,12]}}", 12, QF_ERR_FORMAT, "tensor \"w\": shape[0] is not a non-negative integer");
    ST_BAD("{\"w\":{\"dtype\":\"F32\",\"shape\":[\"3\"],\"data_offsets\":[0,12]}}", 12, QF_ERR_FORMAT, "shape[0] is not a non-negative integer");
    ST_BAD("{\"w\":{\"dtype\":\"U8\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,1]}}", 1, QF_ERR_FORMAT, "tensor \"w\": shape has 9 dims, more than QF_MAX_DIMS = 8");
    ST_BAD("{\"w\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,4294967296],\"data_offsets\":[0,4]}}", 4, QF_ERR_FORMAT, "tensor \"w\": shape x dtype size overflows");
    ST_BAD("{\"w\":{\"dtype\":\"F32\",\"shape\":[1e300],\"data_offsets\":[0,4]}}", 4, QF_ERR_FORMAT, "tensor \"w\": shape[0] is not a non-negative integer");
    /* shape x dtype size must equal the byte range */
    ST_BAD("{\"w\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,20]}}", 20, QF_ERR_FORMAT,
           "bad.st: tensor \"w\": shape [2,3] x F32 (4 bytes) = 24 bytes but data_offsets span 20 bytes");
    /* offsets */
    ST_BAD("{\"w\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]}}", 3, QF_ERR_FORMAT,
           "tensor \"w\": data_offsets end 4 is outside the data section (3 bytes)");
    ST_BAD("{\"w\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[4,2]}}", 4, QF_ERR_FORMAT, "tensor \"w\": data_offsets begin 4 > end 2");
    ST_BAD("{\"w\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2,4]}}", 4, QF_ERR_FORMAT, "tensor \"w\": \"data_offsets\" is missing or not [begin, end]");
    ST_BAD("{\"w\":{\"dtype\":\"U8\",\"shape\":[2]}}", 2, QF_ERR_FORMAT, "tensor \"w\": \"data_offsets\" is missing");
    ST_BAD("{\"w\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[-2,0]}}", 2, QF_ERR_FORMAT, "tensor \"w\": \"data_offsets\"");
    /* overlap */
    ST_BAD("{\"a\":{\"dtype\":\"U8\",\"shape\":[8],\"data_offsets\":[0,8]},"
           "\"b\":{\"dtype\":\"U8\",\"shape\":[8],\"data_offsets\":[4,12]}}", 12, QF_ERR_FORMAT,
           "tensor \"b\": bytes [4,12) overlap tensor \"a\"");
    ST_BAD("{\"b\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[4,4]},"
           "\"a\":{\"dtype\":\"U8\",\"shape\":[8],\"data_offsets\":[0,8]}}", 8, QF_ERR_FORMAT,
           "tensor \"b\": bytes [4,4) overlap tensor \"a\"");
    /* gap: in the middle and at the end */
    ST_BAD("{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]},"
           "\"b\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[8,12]}}", 12, QF_ERR_FORMAT,
           "tensor \"b\": gap of 4 unused bytes [4,8)");
    ST_BAD("{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[4,8]}}", 8, QF_ERR_FORMAT, "tensor \"a\": gap of 4 unused bytes [0,4)");
    ST_BAD("{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]}}", 8, QF_ERR_FORMAT,
           "gap: the data section has 8 bytes but tensors cover only 4 (unused bytes at the end, after tensor \"a\")");
    ST_BAD("{}", 3, QF_ERR_FORMAT, "gap: the data section has 3 bytes but tensors cover only 0");
    /* duplicate names */
    ST_BAD("{\"w\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
           "\"w\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[1,2]}}", 2, QF_ERR_FORMAT,
           "bad.st: tensor \"w\": duplicate tensor name");
    /* metadata */
    ST_BAD("{\"__metadata__\":{\"k\":1}}", 0, QF_ERR_FORMAT, "bad.st: __metadata__ value of key \"k\" is not a string");
    ST_BAD("{\"__metadata__\":[\"k\"]}", 0, QF_ERR_FORMAT, "bad.st: __metadata__ is not a JSON object");
    ST_BAD("{\"__metadata__\":{},\"__metadata__\":{}}", 0, QF_ERR_FORMAT, "__metadata__ appears twice");
    ST_BAD("{\"__metadata__\":{\"k\":\"1\",\"k\":\"2\"}}", 0, QF_ERR_FORMAT, "__metadata__ has duplicate key \"k\"");

    /* the same rules through qf_st_open name the path */
    unsigned char *bad = st_bytes("{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]}}", 6, &len);
    const char *path = tmp_path("gap.safetensors");
    spit(path, bad, len);
    char needle[300];
    snprintf(needle, sizeof needle, "%s: gap", path);
    CHECK_ERR(qf_st_open(path, &f), QF_ERR_FORMAT, needle);
    spit(path, bad, 4);
    snprintf(needle, sizeof needle, "%s: file is 4 bytes", path);
    CHECK_ERR(qf_st_open(path, &f), QF_ERR_FORMAT, needle);
    spit(path, bad, 0);
    CHECK_ERR(qf_st_open(path, &f), QF_ERR_FORMAT, "file is 0 bytes");
    free(bad);
    free(good);
    CHECK_ERR(qf_st_open_memory(NULL, 0, NULL, &f), QF_ERR_FORMAT, "<memory>: file is 0 bytes");
    CHECK_ERR(qf_st_open_memory(NULL, 10, "x", &f), QF_ERR_ARG, "buffer is NULL");
    CHECK_ERR(qf_st_open(NULL, &f), QF_ERR_ARG, "path is NULL");
}

/* ---- npy ---------------------------------------------------------------------------------- */

static void test_npy_read(void) {
    qf_npy a;
    /* np.arange(6, dtype='<f4').reshape(2,3) / 4 - 0.5, in formats 1.0, 2.0, 3.0 */
    const char *v[3] = {"tests/c/data/f4_2x3.npy", "tests/c/data/f4_2x3_v2.npy", "tests/c/data/f4_2x3_v3.npy"};
    for (int k = 0; k < 3; k++) {
        CHECK_OK(qf_npy_read(v[k], &a));
        CHECK(a.dtype == QF_F32 && a.ndim == 2 && a.shape[0] == 2 && a.shape[1] == 3 && a.nbytes == 24);
        if (a.data && a.nbytes == 24)
            for (int i = 0; i < 6; i++) CHECK(((float *)a.data)[i] == i / 4.0f - 0.5f);
        qf_npy_free(&a);
    }
    CHECK_OK(qf_npy_read("tests/c/data/f8_3.npy", &a));
    CHECK(a.dtype == QF_F64 && a.ndim == 1 && a.shape[0] == 3);
    if (a.data) CHECK(((double *)a.data)[0] == 1.5 && ((double *)a.data)[1] == -2.25 && ((double *)a.data)[2] == 1e300);
    qf_npy_free(&a);
    CHECK_OK(qf_npy_read("tests/c/data/f2_2x2.npy", &a));
    CHECK(a.dtype == QF_F16 && a.ndim == 2 && a.nbytes == 8);
    if (a.data) {
        float f[4];
        CHECK_OK(qf_to_f32(QF_F16, a.data, f, 4));
        CHECK(f[0] == 1 && f[1] == 65504 && f[2] == -0.5f && f[3] == ldexpf(1, -24)); /* numpy rounds 6e-8 to 2^-24 */
    }
    qf_npy_free(&a);
    CHECK_OK(qf_npy_read("tests/c/data/i8_2.npy", &a));
    CHECK(a.dtype == QF_I64 && a.data && ((int64_t *)a.data)[0] == -(INT64_C(1) << 62) && ((int64_t *)a.data)[1] == 7);
    qf_npy_free(&a);
    CHECK_OK(qf_npy_read("tests/c/data/i4_2.npy", &a));
    CHECK(a.dtype == QF_I32 && a.data && ((int32_t *)a.data)[0] == -5 && ((int32_t *)a.data)[1] == INT32_MAX);
    qf_npy_free(&a);
    CHECK_OK(qf_npy_read("tests/c/data/i2_2.npy", &a));
    CHECK(a.dtype == QF_I16 && a.data && ((int16_t *)a.data)[0] == -300 && ((int16_t *)a.data)[1] == 32767);
    qf_npy_free(&a);
    CHECK_OK(qf_npy_read("tests/c/data/i1_3.npy", &a));
    CHECK(a.dtype == QF_I8 && a.nbytes == 3 && a.data && ((int8_t *)a.data)[0] == -128 && ((int8_t *)a.data)[2] == 127);
    qf_npy_free(&a);
    CHECK_OK(qf_npy_read("tests/c/data/u1_1x4.npy", &a));
    CHECK(a.dtype == QF_U8 && a.ndim == 2 && a.shape[0] == 1 && a.shape[1] == 4 && a.data &&
          memcmp(a.data, "\x00\x01\xc8\xff", 4) == 0);
    qf_npy_free(&a);
    CHECK_OK(qf_npy_read("tests/c/data/b1_3.npy", &a));
    CHECK(a.dtype == QF_BOOL && a.nbytes == 3 && a.data && memcmp(a.data, "\x01\x00\x01", 3) == 0);
    qf_npy_free(&a);
    CHECK_OK(qf_npy_read("tests/c/data/f4_scalar.npy", &a));
    CHECK(a.dtype == QF_F32 && a.ndim == 0 && a.nbytes == 4 && a.data && ((float *)a.data)[0] == 3.5f);
    qf_npy_free(&a);
    CHECK_OK(qf_npy_read("tests/c/data/f4_0x3.npy", &a));
    CHECK(a.ndim == 2 && a.shape[0] == 0 && a.shape[1] == 3 && a.nbytes == 0 && a.data != NULL);
    qf_npy_free(&a);
    qf_npy_free(&a); /* twice is harmless */

    CHECK_ERR(qf_npy_read("tests/c/data/f4_big_endian.npy", &a), QF_ERR_DTYPE,
              "f4_big_endian.npy: npy: big-endian dtype '>f4' is not supported");
    CHECK(a.data == NULL);
    CHECK_ERR(qf_npy_read("tests/c/data/f4_fortran.npy", &a), QF_ERR_UNSUPPORTED, "f4_fortran.npy: npy: fortran_order True");
    CHECK_ERR(qf_npy_read("tests/c/data/object.npy", &a), QF_ERR_DTYPE, "object.npy: npy: object dtype '|O'");
    CHECK_ERR(qf_npy_read("tests/c/data/missing.npy", &a), QF_ERR_IO, "No such file or directory");
}

/* npy bytes with the given header text (version 1.0) and `data_len` zero bytes of data. */
static unsigned char *npy_bytes(const char *header, size_t data_len, size_t *len) {
    size_t h = strlen(header);
    unsigned char *b = calloc(1, 10 + h + data_len + 1);
    memcpy(b, "\x93NUMPY\x01\x00", 8);
    b[8] = (unsigned char)(h & 0xff);
    b[9] = (unsigned char)(h >> 8);
    memcpy(b + 10, header, h);
    *len = 10 + h + data_len;
    return b;
}

#define NPY_BAD(header, data_len, want, needle)                                                 \
    do {                                                                                        \
        size_t len_;                                                                            \
        unsigned char *b_ = npy_bytes(header, data_len, &len_);                                 \
        qf_npy a_;                                                                              \
        CHECK_ERR(qf_npy_parse(b_, len_, "bad.npy", &a_), want, needle);                        \
        CHECK(a_.data == NULL);                                                                 \
        free(b_);                                                                               \
    } while (0)

static void test_npy_malformed(void) {
    size_t len;
    qf_npy a;
    unsigned char *ok = npy_bytes("{'descr': '<i2', 'fortran_order': False, 'shape': (3,), }\n", 6, &len);
    CHECK_OK(qf_npy_parse(ok, len, "ok.npy", &a));
    CHECK(a.dtype == QF_I16 && a.ndim == 1 && a.shape[0] == 3);
    qf_npy_free(&a);
    CHECK_ERR(qf_npy_parse(ok, len - 1, "ok.npy", &a), QF_ERR_FORMAT, "ok.npy: npy data truncated: shape needs 6 bytes, file has 5");
    CHECK_ERR(qf_npy_parse(ok, 9, "ok.npy", &a), QF_ERR_FORMAT, "not an npy file");
    CHECK_ERR(qf_npy_parse(ok, 40, "ok.npy", &a), QF_ERR_FORMAT, "header length 58 exceeds the 30 bytes that follow (truncated)");
    ok[0] = 'X';
    CHECK_ERR(qf_npy_parse(ok, len, "ok.npy", &a), QF_ERR_FORMAT, "missing the \\x93NUMPY magic");
    ok[0] = 0x93;
    ok[6] = 4;
    CHECK_ERR(qf_npy_parse(ok, len, "ok.npy", &a), QF_ERR_FORMAT, "npy format version 4.0 is not supported");
    free(ok);
    /* mixed quoting, Python 2 long ints and extra spaces are accepted */
    ok = npy_bytes("{ \"shape\" : ( 2L , 1 ) , 'fortran_order':False,'descr':'|u1'}", 2, &len);
    CHECK_OK(qf_npy_parse(ok, len, "ok2.npy", &a));
    CHECK(a.dtype == QF_U8 && a.ndim == 2 && a.shape[0] == 2 && a.shape[1] == 1);
    qf_npy_free(&a);
    free(ok);

    NPY_BAD("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }\n", 12, QF_ERR_FORMAT, "bad.npy: npy file has 4 trailing bytes");
    NPY_BAD("{'descr': '<f4', 'fortran_order': False, 'shape': (2, -3), }\n", 0, QF_ERR_FORMAT, "bad.npy: npy header: shape[1] is not a non-negative integer");
    NPY_BAD("{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999,), }\n", 0, QF_ERR_FORMAT, "shape[0] overflows int64");
    NPY_BAD("{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296, 4294967296), }\n", 0, QF_ERR_FORMAT,
            "bad.npy: npy shape x dtype size overflows");
    NPY_BAD("{'descr': '<f4', 'fortran_order': False, 'shape': (1,1,1,1,1,1,1,1,1), }\n", 4, QF_ERR_FORMAT, "more than QF_MAX_DIMS = 8");
    NPY_BAD("{'descr': '<f4', 'fortran_order': False, 'shape': [2], }\n", 8, QF_ERR_FORMAT, "'shape' is not a tuple");
    NPY_BAD("{'descr': '<f4', 'fortran_order': False }\n", 0, QF_ERR_FORMAT, "bad.npy: npy header lacks key 'shape'");
    NPY_BAD("{'descr': '<f4', 'fortran_order': 0, 'shape': (1,)}\n", 4, QF_ERR_FORMAT, "'fortran_order' is not True or False");
    NPY_BAD("{'descr': '<f4', 'fortran_order': True, 'shape': (1,)}\n", 4, QF_ERR_UNSUPPORTED, "fortran_order True");
    NPY_BAD("{'descr': '>f8', 'fortran_order': False, 'shape': (1,)}\n", 8, QF_ERR_DTYPE, "bad.npy: npy: big-endian dtype '>f8'");
    NPY_BAD("{'descr': '<c8', 'fortran_order': False, 'shape': (1,)}\n", 8, QF_ERR_DTYPE, "dtype '<c8' is not supported");
    NPY_BAD("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1,)}\n", 4, QF_ERR_DTYPE, "structured dtypes");
    NPY_BAD("{'descr': '|O', 'fortran_order': False, 'shape': (1,)}\n", 8, QF_ERR_DTYPE, "object dtype");
    NPY_BAD("{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (1,)}\n", 4, QF_ERR_FORMAT, "key 'descr' appears twice");
    NPY_BAD("{'descr': '<f4', 'fortran_order': False, 'shape': (1,), 'extra': 1}\n", 4, QF_ERR_FORMAT, "unexpected key 'extra'");
    NPY_BAD("{'descr': '<f4', 'fortran_order': False, 'shape': (1,)} x\n", 4, QF_ERR_FORMAT, "unexpected text after the dict");
    NPY_BAD("{'descr': '<f4", 4, QF_ERR_FORMAT, "bad.npy: npy header: unterminated string in 'descr'");
    NPY_BAD("{'descr': '<f\\4', 'fortran_order': False, 'shape': (1,)}\n", 4, QF_ERR_FORMAT, "escapes");
    NPY_BAD("'descr'\n", 4, QF_ERR_FORMAT, "not a Python dict");
    NPY_BAD("{'descr': '<f4'", 4, QF_ERR_FORMAT, "expected ',' or '}'");
}

static void test_npy_write(void) {
    /* the same arrays as tests/c/data: our bytes must equal numpy's */
    float f[6];
    for (int i = 0; i < 6; i++) f[i] = i / 4.0f - 0.5f;
    const struct { const char *file; qf_dtype dt; int ndim; int64_t shape[2]; const void *data; } cases[] = {
        {"f4_2x3.npy", QF_F32, 2, {2, 3}, f},
        {"f4_scalar.npy", QF_F32, 0, {0}, (float[]){3.5f}},
        {"f4_0x3.npy", QF_F32, 2, {0, 3}, NULL},
        {"f8_3.npy", QF_F64, 1, {3}, (double[]){1.5, -2.25, 1e300}},
        {"i8_2.npy", QF_I64, 1, {2}, (int64_t[]){-(INT64_C(1) << 62), 7}},
        {"i4_2.npy", QF_I32, 1, {2}, (int32_t[]){-5, INT32_MAX}},
        {"i2_2.npy", QF_I16, 1, {2}, (int16_t[]){-300, 32767}},
        {"i1_3.npy", QF_I8, 1, {3}, (int8_t[]){-128, 0, 127}},
        {"u1_1x4.npy", QF_U8, 2, {1, 4}, (uint8_t[]){0, 1, 200, 255}},
        {"b1_3.npy", QF_BOOL, 1, {3}, (uint8_t[]){1, 0, 1}},
        {"f2_2x2.npy", QF_F16, 2, {2, 2}, (uint16_t[]){0x3c00, 0x7bff, 0xb800, 0x0001}},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char ref[128];
        snprintf(ref, sizeof ref, "tests/c/data/%s", cases[i].file);
        const char *out = tmp_path(cases[i].file);
        CHECK_OK(qf_npy_write(out, cases[i].dt, cases[i].ndim, cases[i].shape, cases[i].data));
        size_t la = 0, lb = 0;
        unsigned char *a = slurp(out, &la), *b = slurp(ref, &lb);
        int same = a && b && la == lb && memcmp(a, b, la) == 0;
        if (!same) fprintf(stderr, "npy write %s differs from numpy's (%zu vs %zu bytes)\n", cases[i].file, la, lb);
        CHECK(same);
        qf_npy r;
        CHECK_OK(qf_npy_read(out, &r)); /* and it reads back */
        CHECK(r.dtype == cases[i].dt && r.ndim == cases[i].ndim);
        qf_npy_free(&r);
        free(a);
        free(b);
    }
    /* a large first dimension still fits the 64-byte alignment */
    int64_t huge[3] = {0, INT64_C(123456789012345), 2};
    CHECK_OK(qf_npy_write(tmp_path("h.npy"), QF_U8, 3, huge, NULL));
    size_t l = 0;
    unsigned char *h = slurp(tmp_path("h.npy"), &l);
    CHECK(h && l % 64 == 0 && h[l - 1] == '\n');
    free(h);
    int64_t s1[1] = {2};
    CHECK_ERR(qf_npy_write(tmp_path("x.npy"), QF_BF16, 1, s1, f), QF_ERR_DTYPE, "npy cannot store dtype BF16");
    CHECK_ERR(qf_npy_write(tmp_path("x.npy"), QF_F32, 1, s1, NULL), QF_ERR_ARG, "data is NULL for 8 bytes");
    int64_t neg[1] = {-1};
    CHECK_ERR(qf_npy_write(tmp_path("x.npy"), QF_F32, 1, neg, f), QF_ERR_SHAPE, "shape[0] = -1 is negative");
    CHECK_ERR(qf_npy_write(tmp_path("x.npy"), QF_F32, 9, huge, f), QF_ERR_SHAPE, "ndim 9");
    CHECK_ERR(qf_npy_write("/nonexistent-dir/x.npy", QF_F32, 1, s1, f), QF_ERR_IO, "No such file or directory");
}

/* ---- config ------------------------------------------------------------------------------- */

static const char *config_text =
    "{\n"
    "  \"model_type\": \"blip-2\",\n"
    "  \"num_query_tokens\": 32,\n"
    "  \"initializer_factor\": 1.0,\n"
    "  \"initializer_range\": 0.02,\n"
    "  \"use_decoder_only_language_model\": true,\n"
    "  \"tie_word_embeddings\": false,\n"
    "  \"big\": 9007199254740992,\n"
    "  \"neg\": -3,\n"
    "  \"ratio\": 2.5,\n"
    "  \"nothing\": null,\n"
    "  \"list\": [1, 2],\n"
    "  \"a.b\": 7,\n"
    "  \"qformer_config\": {\"hidden_size\": 768, \"num_attention_heads\": 12,\n"
    "                      \"layer_norm_eps\": 1e-12, \"cross_attention_frequency\": 2,\n"
    "                      \"deep\": {\"x\": {\"y\": \"z\"}}},\n"
    "  \"text_config\": {\"hidden_size\": 2560, \"architectures\": [\"OPTForCausalLM\"]}\n"
    "}\n";

static void test_config(void) {
    qf_config *c = NULL;
    CHECK_OK(qf_config_parse(config_text, strlen(config_text), "blip2.json", &c));
    if (!c) return;
    int64_t i;
    double d;
    int b;
    const char *s;
    CHECK_OK(qf_config_int(c, "num_query_tokens", &i)); CHECK(i == 32);
    CHECK_OK(qf_config_int(c, "qformer_config.hidden_size", &i)); CHECK(i == 768);
    CHECK_OK(qf_config_int(c, "text_config.hidden_size", &i)); CHECK(i == 2560);
    CHECK_OK(qf_config_int(c, "neg", &i)); CHECK(i == -3);
    CHECK_OK(qf_config_int(c, "big", &i)); CHECK(i == INT64_C(9007199254740992));
    CHECK_OK(qf_config_int(c, "initializer_factor", &i)); CHECK(i == 1); /* integral number */
    CHECK_OK(qf_config_int(c, "a.b", &i)); CHECK(i == 7);                 /* literal dotted key */
    CHECK_OK(qf_config_float(c, "qformer_config.layer_norm_eps", &d)); CHECK(d == 1e-12);
    CHECK_OK(qf_config_float(c, "num_query_tokens", &d)); CHECK(d == 32.0);
    CHECK_OK(qf_config_bool(c, "use_decoder_only_language_model", &b)); CHECK(b == 1);
    CHECK_OK(qf_config_bool(c, "tie_word_embeddings", &b)); CHECK(b == 0);
    CHECK_OK(qf_config_string(c, "model_type", &s)); CHECK(s && strcmp(s, "blip-2") == 0);
    CHECK_OK(qf_config_string(c, "qformer_config.deep.x.y", &s)); CHECK(s && strcmp(s, "z") == 0);
    CHECK(qf_config_has(c, "qformer_config.deep.x"));
    CHECK(qf_config_has(c, "nothing"));
    CHECK(!qf_config_has(c, "qformer_config.absent"));
    CHECK(!qf_config_has(c, "model_type.x"));
    CHECK(!qf_config_has(c, ""));
    CHECK_OK(qf_config_int_or(c, "vision_config.hidden_size", 1408, &i)); CHECK(i == 1408);
    CHECK_OK(qf_config_int_or(c, "nothing", 5, &i)); CHECK(i == 5); /* null = use the default */
    CHECK_OK(qf_config_int_or(c, "qformer_config.num_attention_heads", 5, &i)); CHECK(i == 12);
    CHECK_OK(qf_config_float_or(c, "dropout", 0.1, &d)); CHECK(d == 0.1);
    CHECK_OK(qf_config_float_or(c, "ratio", 0.1, &d)); CHECK(d == 2.5);

    CHECK_ERR(qf_config_int(c, "vision_config.hidden_size", &i), QF_ERR_NOT_FOUND, "blip2.json: key \"vision_config.hidden_size\" not found");
    CHECK_ERR(qf_config_int(c, "ratio", &i), QF_ERR_FORMAT, "blip2.json: key \"ratio\" = 2.5 is not an integer");
    CHECK_ERR(qf_config_int(c, "model_type", &i), QF_ERR_FORMAT, "blip2.json: key \"model_type\" is a string, expected an integer");
    CHECK_ERR(qf_config_int(c, "nothing", &i), QF_ERR_FORMAT, "key \"nothing\" is null");
    CHECK_ERR(qf_config_int_or(c, "model_type", 3, &i), QF_ERR_FORMAT, "key \"model_type\" is a string");
    CHECK_ERR(qf_config_float(c, "tie_word_embeddings", &d), QF_ERR_FORMAT, "key \"tie_word_embeddings\" is a boolean, expected a number");
    CHECK_ERR(qf_config_float_or(c, "list", 1, &d), QF_ERR_FORMAT, "key \"list\" is an array");
    CHECK_ERR(qf_config_bool(c, "num_query_tokens", &b), QF_ERR_FORMAT, "key \"num_query_tokens\" is a number, expected true or false");
    CHECK_ERR(qf_config_bool(c, "missing", &b), QF_ERR_NOT_FOUND, "key \"missing\" not found");
    CHECK_ERR(qf_config_string(c, "text_config", &s), QF_ERR_FORMAT, "key \"text_config\" is an object, expected a string");
    CHECK_ERR(qf_config_string(c, NULL, &s), QF_ERR_ARG, "NULL");
    qf_config_free(c);

    /* from a file; then malformed text */
    const char *path = tmp_path("config.json");
    spit(path, config_text, strlen(config_text));
    c = NULL;
    CHECK_OK(qf_config_load(path, &c));
    char needle[300];
    snprintf(needle, sizeof needle, "%s: key \"x\" not found", path);
    CHECK_ERR(qf_config_int(c, "x", &i), QF_ERR_NOT_FOUND, needle);
    qf_config_free(c);
    qf_config_free(NULL);
    spit(path, "{\"a\": 1,}", 9);
    snprintf(needle, sizeof needle, "%s: config is not valid JSON", path);
    CHECK_ERR(qf_config_load(path, &c), QF_ERR_FORMAT, needle);
    CHECK(c == NULL);
    CHECK_ERR(qf_config_load(tmp_path("absent.json"), &c), QF_ERR_IO, "No such file or directory");
    CHECK_ERR(qf_config_parse("[1]", 3, "arr.json", &c), QF_ERR_FORMAT, "arr.json: config is not a JSON object");
    CHECK_ERR(qf_config_parse("{} {}", 5, "two.json", &c), QF_ERR_FORMAT, "two.json: config is not valid JSON (trailing text");
    CHECK_ERR(qf_config_parse("", 0, "empty.json", &c), QF_ERR_FORMAT, "empty.json: config is not valid JSON");
    CHECK_ERR(qf_config_parse("{\"a\": 1}", 4, "cut.json", &c), QF_ERR_FORMAT, "cut.json: config is not valid JSON");
    /* length is honoured: the text need not be NUL-terminated */
    char nonul[8] = {'{', '"', 'k', '"', ':', '5', '}', 'x'};
    CHECK_OK(qf_config_parse(nonul, 7, "n.json", &c));
    CHECK_OK(qf_config_int(c, "k", &i)); CHECK(i == 5);
    qf_config_free(c);
}

int main(void) {
    strcpy(tmpdir, "/tmp/qfuse-test-io-XXXXXX");
    if (!mkdtemp(tmpdir)) { perror("mkdtemp"); return 2; }
    test_st_fixtures();
    test_st_roundtrip();
    test_st_malformed();
    test_npy_read();
    test_npy_malformed();
    test_npy_write();
    test_config();
    /* clean up the temporary directory */
    DIR *d = opendir(tmpdir);
    for (struct dirent *e; d && (e = readdir(d));)
        if (e->d_name[0] != '.') unlink(tmp_path(e->d_name));
    if (d) closedir(d);
    rmdir(tmpdir);
    TEST_MAIN_END("test_io");
}
