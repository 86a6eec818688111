/* fuzz_config.c - libFuzzer target for the config.json parser and its getters.
 * Any input must either be rejected with a message or yield a config on which every getter
 * returns a status (never crashes), with typed results consistent with qf_config_has. */
#include "qfuse.h"
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    qf_config *c = NULL;
    if (qf_config_parse((const char *)data, size, "fuzz", &c) != QF_OK) {
        if (c || !qf_last_error()[0]) abort();
        return 0;
    }
    static const char *keys[] = {"hidden_size", "text_config.hidden_size", "a", "a.b", "a.b.c",
                                 "model_type", "qformer_config.num_attention_heads", "x.y", "", "."};
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
        int64_t iv;
        double dv;
        int bv;
        const char *sv;
        int has = qf_config_has(c, keys[i]);
        qf_status s = qf_config_int(c, keys[i], &iv);
        if ((s == QF_ERR_NOT_FOUND) == has) abort();
        (void)qf_config_float(c, keys[i], &dv);
        (void)qf_config_bool(c, keys[i], &bv);
        if (qf_config_string(c, keys[i], &sv) == QF_OK && !sv) abort();
        (void)qf_config_int_or(c, keys[i], 3, &iv);
        (void)qf_config_float_or(c, keys[i], 0.5, &dv);
    }
    qf_config_free(c);
    return 0;
}
