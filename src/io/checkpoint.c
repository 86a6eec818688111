/* checkpoint.c - opens a Hugging Face checkpoint folder's weights as one qf_safetensors:
 * FOLDER/model.safetensors, or the shards FOLDER/model.safetensors.index.json lists (its
 * "weight_map" names the shard of each tensor). Shards are gathered into one safetensors image
 * in memory holding only the tensors `want` accepts (every tensor when want is NULL), in their
 * stored dtypes: peak memory during a sharded load is the wanted tensors' bytes twice (the
 * image and the model's own copy), once the image is closed only the model's.
 * Invariants: shard names are plain file names inside FOLDER; a tensor found in two shards is
 * taken from the first that lists it. */
#include "io_internal.h"
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Gathers the wanted tensors of every shard listed in index.json into one safetensors image in
 * memory (tensors keep their stored dtype). */
static qf_status open_sharded(const char *folder, const char *index_path, int (*want)(const char *name),
                               qf_safetensors **out) {
    const char *fn = "checkpoint";
    unsigned char *json = NULL;
    size_t len = 0;
    QF_TRY(qf_io_read_file(index_path, (size_t)64 << 20, "index", &json, &len));
    cJSON *root = cJSON_ParseWithLength((const char *)json, len);
    free(json);
    if (!root) return qf_fail(QF_ERR_FORMAT, "%s: %s is not valid JSON", fn, index_path);
    const cJSON *wm = cJSON_GetObjectItemCaseSensitive(root, "weight_map");
    qf_status s = QF_OK;
    if (!cJSON_IsObject(wm)) s = qf_fail(QF_ERR_FORMAT, "%s: %s has no \"weight_map\" object", fn, index_path);

    /* distinct shard files that hold a wanted tensor */
    enum { MAX_SHARDS = 256 };
    const char *shards[MAX_SHARDS];
    qf_safetensors *files[MAX_SHARDS] = {0};
    int ns = 0;
    const cJSON *it;
    if (s == QF_OK) {
        cJSON_ArrayForEach(it, wm) {
            if (!cJSON_IsString(it)) {
                s = qf_fail(QF_ERR_FORMAT, "%s: %s: weight_map entry \"%s\" is not a file name", fn, index_path,
                            it->string);
                break;
            }
            if ((want && !want(it->string))) continue;
            const char *fname = it->valuestring;
            if (strchr(fname, '/') || !strcmp(fname, "..")) {
                s = qf_fail(QF_ERR_FORMAT, "%s: %s: shard name \"%s\" is not a plain file name", fn, index_path, fname);
                break;
            }
            int k = 0;
            while (k < ns && strcmp(shards[k], fname)) k++;
            if (k == ns) {
                if (ns == MAX_SHARDS) {
                    s = qf_fail(QF_ERR_UNSUPPORTED, "%s: %s names more than %d shards", fn, index_path, MAX_SHARDS);
                    break;
                }
                shards[ns++] = fname;
            }
        }
    }
    for (int k = 0; k < ns && s == QF_OK; k++) {
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", folder, shards[k]);
        s = qf_st_open(path, &files[k]);
    }
    /* header + data of the merged image */
    cJSON *hdr = s == QF_OK ? cJSON_CreateObject() : NULL;
    if (s == QF_OK && !hdr) s = qf_fail(QF_ERR_NOMEM, "%s: cannot build the merged header", fn);
    size_t data_len = 0;
    for (int k = 0; k < ns && s == QF_OK; k++) {
        int n = qf_st_count(files[k]);
        for (int i = 0; i < n && s == QF_OK; i++) {
            qf_tensor_view tv;
            s = qf_st_get(files[k], i, &tv);
            if (s != QF_OK || (want && !want(tv.name)) || cJSON_GetObjectItemCaseSensitive(hdr, tv.name)) continue;
            cJSON *t = cJSON_CreateObject();
            cJSON *shape = cJSON_CreateArray();
            cJSON *offs = cJSON_CreateArray();
            if (!t || !shape || !offs) {
                cJSON_Delete(t);
                cJSON_Delete(shape);
                cJSON_Delete(offs);
                s = qf_fail(QF_ERR_NOMEM, "%s: cannot build the merged header", fn);
                break;
            }
            for (int d = 0; d < tv.ndim; d++) cJSON_AddItemToArray(shape, cJSON_CreateNumber((double)tv.shape[d]));
            cJSON_AddItemToArray(offs, cJSON_CreateNumber((double)data_len));
            cJSON_AddItemToArray(offs, cJSON_CreateNumber((double)(data_len + tv.nbytes)));
            cJSON_AddStringToObject(t, "dtype", qf_dtype_name(tv.dtype));
            cJSON_AddItemToObject(t, "shape", shape);
            cJSON_AddItemToObject(t, "data_offsets", offs);
            cJSON_AddItemToObject(hdr, tv.name, t);
            data_len += tv.nbytes;
        }
    }
    char *htxt = s == QF_OK ? cJSON_PrintUnformatted(hdr) : NULL;
    if (s == QF_OK && !htxt) s = qf_fail(QF_ERR_NOMEM, "%s: cannot print the merged header", fn);
    unsigned char *img = NULL;
    size_t img_len = 0;
    if (s == QF_OK) {
        size_t hl = strlen(htxt), hpad = qf_align_up(hl, 8);
        img_len = 8 + hpad + data_len;
        img = malloc(img_len ? img_len : 1);
        if (!img) {
            s = qf_fail(QF_ERR_NOMEM, "%s: cannot allocate %zu bytes for the merged shards", fn, img_len);
        } else {
            uint64_t h64 = hpad;
            for (int b = 0; b < 8; b++) img[b] = (unsigned char)(h64 >> (8 * b));
            memcpy(img + 8, htxt, hl);
            memset(img + 8 + hl, ' ', hpad - hl);
            /* data in the header's insertion order, the order offsets were given */
            size_t off = 8 + hpad;
            const cJSON *t;
            cJSON_ArrayForEach(t, hdr) {
                for (int k = 0; k < ns; k++) {
                    qf_tensor_view tv;
                    if (qf_st_find(files[k], t->string, &tv) == QF_OK) {
                        memcpy(img + off, tv.data, tv.nbytes);
                        off += tv.nbytes;
                        break;
                    }
                }
            }
            qf_clear_error();
        }
    }
    if (s == QF_OK) s = qf_st_open_memory(img, img_len, index_path, out);
    free(img);
    free(htxt);
    cJSON_Delete(hdr);
    for (int k = 0; k < ns; k++) qf_st_close(files[k]);
    cJSON_Delete(root);
    return s;
}

static int exists(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return 0;
    fclose(f);
    return 1;
}

qf_status qf_open_checkpoint(const char *folder, int (*want)(const char *name), qf_safetensors **out) {
    if (!folder || !out) return qf_fail(QF_ERR_ARG, "qf_open_checkpoint: NULL folder or out");
    *out = NULL;
    char path[4096];
    if (snprintf(path, sizeof path, "%s/model.safetensors", folder) >= (int)sizeof path)
        return qf_fail(QF_ERR_ARG, "checkpoint: folder path is too long");
    if (exists(path)) return qf_st_open(path, out);
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", folder);
    if (exists(path)) return open_sharded(folder, path, want, out);
    return qf_fail(QF_ERR_IO, "checkpoint: %s has neither model.safetensors nor model.safetensors.index.json", folder);
}
