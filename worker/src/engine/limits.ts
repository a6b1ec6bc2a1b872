/**
 * Accuracy bounds of the int8 path (per-output-channel int8 weights, per-token 14-bit activations), as per-row
 * relative logit errors max|a - b| / max|b| over the golden prompts (teacher-forced). Measured values are in
 * docs/edge-engine.md; each bound leaves headroom over the worst measured row.
 */

/** int8 engine vs f32 engine on the same int8-rounded weights: only activation rounding and sum order differ. */
export const INT8_KERNEL_REL = 1e-3;

/**
 * int8 engine vs the golden vectors of the tiny fixtures. Those draw projections with std 0.3/sqrt(fan_in)
 * (make_tiny.py): at 1/sqrt(fan_in) the random model is chaotic and int8 rounding alone changes its greedy ids.
 */
export const INT8_LOGIT_REL = 6e-2;

/** int8 vs f32 on the trained default model (models/default), golden-free: per-row relative logit error. */
export const INT8_DEFAULT_MODEL_REL = 0.25;
