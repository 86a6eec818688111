/* models_internal.h - helpers the models in src/models share (not installed). */
#ifndef QF_MODELS_INTERNAL_H
#define QF_MODELS_INTERNAL_H

#include "internal.h"

/* The names of every parameter of qf, in qf_qformer_param order, each with `prefix` in front
 * ("qformer.", "multi_Qformer."): how a model that embeds a Q-Former reports the checkpoint's
 * own names. *names is one allocation (the pointer array followed by the strings): free() it
 * once. fn names the caller in messages. */
qf_status qf_model_prefixed_qformer_names(qf_qformer *qf, const char *prefix, const char *fn, char ***names);

#endif
