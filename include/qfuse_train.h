/* qfuse_train.h - training: the AdamW optimizer and its resumable state (included by qfuse.h;
 * do not include it alone). One source file per optimizer in src/train/.
 *
 *   qf_adamw_config c = qf_adamw_defaults();     // torch.optim.AdamW's defaults
 *   c.lr = 1e-4;
 *   qf_adamw *opt;  qf_adamw_new(&c, &opt);
 *   for (step...) {
 *       qf_qformer_zero_grad(m); qf_qformer_forward(...); qf_qformer_backward(...);
 *       qf_param ps[N]; for (i...) qf_qformer_param(m, i, &ps[i]);   // any list, any order
 *       qf_adamw_step(opt, ps, N);
 *   }
 *   qf_adamw_save(opt, "opt.safetensors");       // later: qf_adamw_load("opt.safetensors", &opt)
 *
 * SEMANTICS: torch.optim.AdamW (single-tensor path, maximize=False), per parameter with a
 * gradient, with t its own step count after the increment:
 *   p = p * (1 - lr*wd);  m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g*g
 *   amsgrad: vmax = max(vmax, v), used for v below
 *   p = p - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
 * Scalars are computed in double and rounded to float32 once, as torch does with Python floats;
 * the element arithmetic is float32 in torch's order (the m and v updates are fused multiply-adds,
 * as torch's vectorized add_ / addcmul_ are). Every ISA path gives the same bits.
 *
 * STATE is kept per parameter NAME (qf_param.name), so the caller may pass any list of views each
 * step. A parameter whose grad is NULL (a frozen group) is skipped: its value and its state are left
 * as they are, as torch skips a parameter whose .grad is None. The first step of a parameter
 * allocates its state; later steps allocate nothing.
 */
#ifndef QFUSE_TRAIN_H
#define QFUSE_TRAIN_H

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    double lr;            /* >= 0                                                            */
    double beta1, beta2;  /* each in [0, 1)                                                  */
    double eps;           /* >= 0                                                            */
    double weight_decay;  /* >= 0 (decoupled: p *= 1 - lr*weight_decay)                     */
    int amsgrad;          /* 0 or 1                                                          */
} qf_adamw_config;

typedef struct qf_adamw qf_adamw;

/* lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 1e-2, amsgrad 0 (torch's defaults). */
qf_adamw_config qf_adamw_defaults(void);
/* QF_ERR_ARG naming the field when c breaks a rule above (NaN included). */
qf_status qf_adamw_new(const qf_adamw_config *c, qf_adamw **out);
void qf_adamw_free(qf_adamw *opt);
qf_status qf_adamw_get_config(const qf_adamw *opt, qf_adamw_config *out);
/* Changes lr for the next steps (a schedule); the moments are kept. */
qf_status qf_adamw_set_lr(qf_adamw *opt, double lr);

/* One optimizer step over params[0..n). Everything is checked before anything changes; on an
 * error no parameter and no state is updated:
 *   QF_ERR_ARG       a NULL name or data, ndim outside 0..4, a negative dim, a name twice
 *   QF_ERR_SHAPE     a parameter's shape differs from its saved/earlier state's
 *   QF_ERR_NONFINITE a NaN/Inf gradient element (the message names the parameter and the index)
 * Parameters with grad NULL are skipped. data and grad must not overlap. */
qf_status qf_adamw_step(qf_adamw *opt, const qf_param *params, int n);

/* Step count of a parameter's state (0: none yet). */
int64_t qf_adamw_param_step(const qf_adamw *opt, const char *name);
/* Number of parameters with state. */
int qf_adamw_num_states(const qf_adamw *opt);

/* Writes the whole optimizer state atomically (qf_st_write) as safetensors: per parameter
 * "<name>.exp_avg", "<name>.exp_avg_sq" (and "<name>.max_exp_avg_sq" with amsgrad) F32 of the
 * parameter's shape, "<name>.step" I64 scalar (shape [], [1] also read); the hyperparameters in __metadata__
 * ("format" = "qfuse.adamw", "version" = "1", lr, beta1, beta2, eps, weight_decay as %.17g,
 * amsgrad "0"/"1"). Resuming from it reproduces an uninterrupted run bit for bit. */
qf_status qf_adamw_save(const qf_adamw *opt, const char *path);
/* Reads a file written by qf_adamw_save into a new optimizer. Every rule is checked (metadata
 * present and valid, every parameter's tensors present with F32 dtype and one shape, steps >= 1,
 * moments finite and v >= 0, no other tensor); errors name the file, the parameter and the rule.
 * Shapes are checked against the parameters at the next qf_adamw_step (QF_ERR_SHAPE). */
qf_status qf_adamw_load(const char *path, qf_adamw **out);

#ifdef __cplusplus
}
#endif
#endif /* QFUSE_TRAIN_H */
