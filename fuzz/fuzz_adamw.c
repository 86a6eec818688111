/* fuzz_adamw.c - libFuzzer target for the optimizer-state reader (qf_adamw_load,
 * src/train/adamw.c): the input is written to a private file and loaded. It must either be
 * rejected with a message (and no optimizer) or give an optimizer that saves back to a file which
 * loads again with the same number of parameter states. */
#include "qfuse.h"
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static char dir[64], in_path[96], out_path[96];

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!dir[0]) {
        snprintf(dir, sizeof dir, "/tmp/qfuse-fuzz-adamw-XXXXXX");
        if (!mkdtemp(dir)) abort();
        snprintf(in_path, sizeof in_path, "%s/in.safetensors", dir);
        snprintf(out_path, sizeof out_path, "%s/out.safetensors", dir);
    }
    FILE *f = fopen(in_path, "wb");
    if (!f || (size && fwrite(data, 1, size, f) != size)) abort();
    fclose(f);
    qf_adamw *opt = NULL;
    if (qf_adamw_load(in_path, &opt) != QF_OK) {
        if (opt || !qf_last_error()[0]) abort();
        return 0;
    }
    if (qf_adamw_save(opt, out_path) != QF_OK) abort();
    qf_adamw *again = NULL;
    if (qf_adamw_load(out_path, &again) != QF_OK) abort();
    if (qf_adamw_num_states(again) != qf_adamw_num_states(opt)) abort();
    qf_adamw_free(again);
    qf_adamw_free(opt);
    return 0;
}
