/**
 * Token selection from logits: greedy, or temperature + top-k + top-p with a seeded PRNG (same seed and params ->
 * same tokens), and log-probabilities of the model distribution for `logprobs`.
 */

/** mulberry32: small, fast, and fully determined by its 32-bit seed. */
export class Prng {
  private s: number;
  constructor(seed: number) {
    this.s = seed >>> 0;
  }
  /** uniform in [0, 1) */
  next(): number {
    let t = (this.s = (this.s + 0x6d2b79f5) >>> 0);
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }
}

export function randomSeed(): number {
  const a = new Uint32Array(1);
  crypto.getRandomValues(a);
  return a[0];
}

/** index of the largest logit; ties go to the lower index */
export function argmax(logits: ArrayLike<number>): number {
  let best = 0;
  for (let i = 1; i < logits.length; i++) if (logits[i] > logits[best]) best = i;
  return best;
}

export interface SamplingOptions {
  temperature: number; // 0 = greedy
  topP: number; // 1 = off
  topK: number; // 0 = off
}

/** Indices of the k largest logits, descending (ties by index), without sorting the whole vocabulary. */
function topKIndices(logits: Float32Array, k: number): number[] {
  const best: number[] = [];
  const before = (a: number, b: number) => logits[a] > logits[b] || (logits[a] === logits[b] && a < b);
  for (let i = 0; i < logits.length; i++) {
    if (best.length === k && !before(i, best[k - 1])) continue;
    let j = best.length === k ? k - 1 : best.length;
    while (j > 0 && before(i, best[j - 1])) j--;
    best.splice(j, 0, i);
    if (best.length > k) best.pop();
  }
  return best;
}

/**
 * Picks the next token. Candidates: the whole vocabulary in index order when neither top-k nor top-p filters;
 * otherwise ordered by logit (ties by index), so results never depend on sort stability.
 */
export function sampleToken(logits: Float32Array, o: SamplingOptions, rng: Prng): number {
  if (o.temperature <= 0) return argmax(logits);
  const V = logits.length;
  let idx: number[];
  if (o.topK > 0 && o.topK < V) idx = topKIndices(logits, o.topK);
  else if (o.topP < 1) {
    idx = Array.from({ length: V }, (_, i) => i);
    idx.sort((a, b) => logits[b] - logits[a] || a - b);
  } else idx = Array.from({ length: V }, (_, i) => i);
  const inv = 1 / o.temperature;
  let m = -Infinity;
  for (const i of idx) m = Math.max(m, logits[i] * inv);
  const p = idx.map((i) => Math.exp(logits[i] * inv - m));
  let total = p.reduce((a, b) => a + b, 0);
  if (o.topP < 1) {
    let cum = 0;
    let keep = p.length;
    for (let j = 0; j < p.length; j++) {
      cum += p[j] / total;
      if (cum >= o.topP) { keep = j + 1; break; }
    }
    idx = idx.slice(0, keep);
    p.length = keep;
    total = p.reduce((a, b) => a + b, 0);
  }
  let u = rng.next() * total;
  for (let j = 0; j < p.length; j++) {
    u -= p[j];
    if (u < 0) return idx[j];
  }
  return idx[p.length - 1];
}

/** log-softmax of the raw logits at `id`, plus the `top` most likely tokens (descending, ties by index). */
export function logprobsOf(logits: Float32Array, id: number, top: number): { logprob: number; top: [number, number][] } {
  let m = -Infinity;
  for (let i = 0; i < logits.length; i++) if (logits[i] > m) m = logits[i];
  let s = 0;
  for (let i = 0; i < logits.length; i++) s += Math.exp(logits[i] - m);
  const lse = m + Math.log(s);
  const best: [number, number][] = [];
  if (top > 0) {
    // partial selection: keep the `top` largest in a small sorted list
    for (let i = 0; i < logits.length; i++) {
      const v = logits[i];
      if (best.length < top || v > best[best.length - 1][1]) {
        let j = best.length;
        while (j > 0 && best[j - 1][1] < v) j--;
        best.splice(j, 0, [i, v]);
        if (best.length > top) best.pop();
      }
    }
  }
  return { logprob: logits[id] - lse, top: best.map(([i, v]) => [i, v - lse]) };
}
