/**
 * Teacher-forced negative log-likelihood and perplexity from an engine's logits, for comparing engines on the same
 * held-out text (test/golden/default-heldout.json, docs/model-card.md "Cross-engine perplexity").
 *
 * Convention of the reference (gpu-backend/ringlinear/train/evaluate.py): one sequence from an empty state;
 * nll[i] = -log softmax(logits[i])[ids[i + 1]] for i = 0 .. T-2, in nats; perplexity = exp(mean nll).
 * Everything here is float64 so the reduction adds no error of its own next to the f32 engines.
 */

/**
 * Agreement bounds with the CPU reference (nats), asserted by worker/test/node/perplexity*.test.ts; measured values
 * and headroom in docs/model-card.md, "Cross-engine perplexity".
 * f32 engines (WASM f32, ORT-web fp32) differ from the fp32 PyTorch reference only in summation order and exp/log
 * rounding. int8 (per-channel int8 weights, per-token 14-bit activations) moves single tokens by up to ~0.2 nats
 * but almost cancels in the mean.
 */
export const NLL_BOUNDS = {
  f32: { meanAbs: 1e-4, tokenAbs: 1e-4 },
  int8: { meanAbs: 5e-3, tokenAbs: 0.5, meanTokenAbs: 0.05 },
} as const;

/** -log softmax(row)[target], by a max-shifted log-sum-exp (no overflow for any finite logits). */
export function tokenNll(row: ArrayLike<number>, target: number): number {
  if (!Number.isInteger(target) || target < 0 || target >= row.length) {
    throw new Error(`tokenNll: target id ${target} outside the logit row [0, ${row.length})`);
  }
  let max = -Infinity;
  for (let i = 0; i < row.length; i++) if (row[i] > max) max = row[i];
  let sum = 0;
  for (let i = 0; i < row.length; i++) sum += Math.exp(row[i] - max);
  const nll = max + Math.log(sum) - row[target];
  if (!Number.isFinite(nll)) throw new Error(`tokenNll: non-finite result (logits contain NaN or infinity)`);
  return nll;
}

/**
 * Per-token NLL of ids[1..T-1] given `rows[i]`, the logits after ids[0..i] (teacher-forced): T-1 values.
 * Takes either one logit row per position or a row-major [T, vocab] array with its vocabulary size.
 */
export function sequenceNll(ids: number[], rows: ArrayLike<number>[] | Float32Array, vocab?: number): Float64Array {
  const row = (i: number): ArrayLike<number> => {
    if (!(rows instanceof Float32Array)) return rows[i];
    if (!vocab) throw new Error('sequenceNll: a flat logit array needs its vocabulary size');
    return rows.subarray(i * vocab, (i + 1) * vocab);
  };
  const count = rows instanceof Float32Array ? rows.length / (vocab || 1) : rows.length;
  if (count < ids.length - 1) throw new Error(`sequenceNll: ${count} logit rows for ${ids.length} tokens (need ${ids.length - 1})`);
  const out = new Float64Array(Math.max(0, ids.length - 1));
  for (let i = 0; i + 1 < ids.length; i++) out[i] = tokenNll(row(i), ids[i + 1]);
  return out;
}

export interface NllComparison {
  tokens: number; // predicted tokens
  meanNll: number; // nats
  perplexity: number; // exp(meanNll)
  meanNllDiff: number; // meanNll - reference mean (signed)
  maxTokenDiff: number; // max_i |nll[i] - ref[i]|
  meanTokenDiff: number; // mean_i |nll[i] - ref[i]|
}

/** Our per-token NLL against a reference's (same tokens): mean, perplexity, and the differences. */
export function compareNll(nll: ArrayLike<number>, refNll: ArrayLike<number>, refMean?: number): NllComparison {
  if (nll.length !== refNll.length || nll.length === 0) {
    throw new Error(`compareNll: ${nll.length} values against ${refNll.length} reference values`);
  }
  let sum = 0;
  let refSum = 0;
  let maxTokenDiff = 0;
  let absSum = 0;
  for (let i = 0; i < nll.length; i++) {
    const d = Math.abs(nll[i] - refNll[i]);
    maxTokenDiff = Math.max(maxTokenDiff, d); // a NaN stays NaN and fails any bound
    absSum += d;
    sum += nll[i];
    refSum += refNll[i];
  }
  const meanNll = sum / nll.length;
  return {
    tokens: nll.length,
    meanNll,
    perplexity: Math.exp(meanNll),
    meanNllDiff: meanNll - (refMean ?? refSum / nll.length),
    maxTokenDiff,
    meanTokenDiff: absSum / nll.length,
  };
}
