/**
 * Checks an engine against the golden vectors (docs/architecture.md, contract 2): per-row relative logit error for
 * the prompt and the greedy decode, final linear states, greedy ids. Shared by the Node and workerd tests.
 */
import { readSafetensors, rowsToF32, type Bytes, type TensorInfo } from './safetensors';
import { argmax } from './sampling';
import type { WasmEngine } from './wasm-engine';

export interface GoldenManifest {
  prompts: { name: string; text: string; input_ids: number[]; greedy_ids: number[] }[];
  linear_layers: number[];
  tolerances: { f32: { logits_rel: number; state_rel: number } };
}

export interface PromptReport {
  name: string;
  promptLogitsRel: number; // max over rows of max|ours - golden| / max|golden|
  decodeLogitsRel: number;
  stateRel: number; // max over linear layers
  greedyIds: number[]; // argmax of our own logits, fed back (our greedy continuation)
  goldenGreedyIds: number[];
}

function tensorF32(t: TensorInfo): Float32Array {
  const n = t.shape.reduce((a, b) => a * b, 1);
  const out = new Float32Array(n);
  rowsToF32(t, 0, 1, n, out);
  return out;
}

function tensorI32(t: TensorInfo): number[] {
  const copy = t.bytes.slice();
  return Array.from(new Int32Array(copy.buffer, 0, copy.byteLength / 4));
}

/** max|a - b| / max|b| */
export function relError(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let err = 0;
  let mx = 0;
  for (let i = 0; i < b.length; i++) {
    const e = Math.abs(a[i] - b[i]);
    if (!(e <= err)) err = e; // NaN propagates as a failure
    mx = Math.max(mx, Math.abs(b[i]));
  }
  return err / (mx || 1);
}

export function checkGolden(engine: WasmEngine, goldenBytes: Bytes, manifest: GoldenManifest): PromptReport[] {
  const g = readSafetensors(goldenBytes, 'golden');
  const get = (name: string) => {
    const t = g.get(name);
    if (!t) throw new Error(`golden tensor ${name} missing`);
    return t;
  };
  const { runner, info } = engine;
  const kernel = runner.kernel;
  const V = info.vocabSize;
  return manifest.prompts.map((p) => {
    const ids = tensorI32(get(`${p.name}.input_ids`));
    const goldLogits = tensorF32(get(`${p.name}.logits`));
    const goldIds = tensorI32(get(`${p.name}.greedy_ids`));
    const goldDecode = tensorF32(get(`${p.name}.decode_logits`));
    const session = kernel.createSession(ids.length + goldIds.length + 1);
    try {
      const rows = runner.prefill(session, ids, true);
      let promptLogitsRel = 0;
      rows.forEach((r, t) => (promptLogitsRel = Math.max(promptLogitsRel, relError(r, goldLogits.subarray(t * V, (t + 1) * V)))));
      let stateRel = 0;
      manifest.linear_layers.forEach((layer, j) => {
        stateRel = Math.max(stateRel, relError(kernel.sessionState(session, j), tensorF32(get(`${p.name}.state.${layer}`))));
      });
      // Our greedy continuation; the decode logits are compared while feeding the golden ids, so one early
      // divergence cannot hide later errors.
      const greedyIds = [argmax(rows[rows.length - 1])];
      let decodeLogitsRel = 0;
      for (let j = 0; j < goldIds.length; j++) {
        const logits = runner.decode(session, goldIds[j]);
        decodeLogitsRel = Math.max(decodeLogitsRel, relError(logits, goldDecode.subarray(j * V, (j + 1) * V)));
        if (j + 1 < goldIds.length) greedyIds.push(argmax(logits));
      }
      return { name: p.name, promptLogitsRel, decodeLogitsRel, stateRel, greedyIds, goldenGreedyIds: goldIds };
    } finally {
      kernel.freeSession(session);
    }
  });
}

/** Logits of every prompt position, then after feeding each of `follow` (teacher forcing), as rows. */
export function teacherForcedLogits(engine: WasmEngine, ids: number[], follow: number[]): Float32Array[] {
  const { runner } = engine;
  const session = runner.kernel.createSession(ids.length + follow.length);
  try {
    const rows = runner.prefill(session, ids, true);
    for (const id of follow) rows.push(runner.decode(session, id));
    return rows;
  } finally {
    runner.kernel.freeSession(session);
  }
}

/** Max per-row relative error of engine `a` against engine `b` over the golden prompts (teacher-forced). */
export function compareEngines(a: WasmEngine, b: WasmEngine, manifest: GoldenManifest): number {
  let worst = 0;
  for (const p of manifest.prompts) {
    const ra = teacherForcedLogits(a, p.input_ids, p.greedy_ids);
    const rb = teacherForcedLogits(b, p.input_ids, p.greedy_ids);
    ra.forEach((r, i) => (worst = Math.max(worst, relError(r, rb[i]))));
  }
  return worst;
}

/** Greedy continuation of `n` tokens after a prompt, from the engine's own argmax. */
export function greedyIds(engine: WasmEngine, ids: number[], n: number): number[] {
  const { runner } = engine;
  const session = runner.kernel.createSession(ids.length + n);
  try {
    const rows = runner.prefill(session, ids);
    const out = [argmax(rows[0])];
    while (out.length < n) out.push(argmax(runner.decode(session, out[out.length - 1])));
    return out;
  } finally {
    runner.kernel.freeSession(session);
  }
}

const f = Math.fround;

/** The C kernel's int8 row quantisation (quant.c), done in JS and dequantised: a reference twin for tests. */
export function fakeQuantRowsInt8(a: Float32Array, rows: number, cols: number): void {
  for (let r = 0; r < rows; r++) {
    const row = a.subarray(r * cols, (r + 1) * cols);
    let m = 0;
    for (let i = 0; i < cols; i++) m = Math.max(m, Math.abs(row[i]));
    const s = f(m / 127);
    const inv = m > 0 ? f(127 / m) : 0;
    for (let i = 0; i < cols; i++) {
      const v = f(row[i] * inv);
      const q = Math.max(-127, Math.min(127, Math.trunc(v < 0 ? f(v - 0.5) : f(v + 0.5))));
      row[i] = f(q * s);
    }
  }
}

/**
 * Rewrites a checkpoint as f32 safetensors, optionally scaling every projection matrix (not embeddings, lm_head or
 * router) by `gain` and/or replacing every int8-stored matrix by its int8 round trip.
 */
export function transformCheckpoint(bytes: Bytes, opts: { gain?: number; fakeQuantInt8?: boolean }): Uint8Array {
  const tensors = readSafetensors(bytes);
  const header: Record<string, unknown> = {};
  const parts: Uint8Array[] = [];
  let off = 0;
  for (const [name, t] of tensors) {
    const a = tensorF32(t);
    const isRouter = name.endsWith('.mlp.gate.weight');
    const isMatrix = t.shape.length === 2;
    if (isMatrix && !isRouter && name !== 'model.word_embeddings.weight' && name !== 'lm_head.weight' && opts.gain)
      for (let i = 0; i < a.length; i++) a[i] *= opts.gain;
    if (isMatrix && !isRouter && opts.fakeQuantInt8) fakeQuantRowsInt8(a, t.shape[0], t.shape[1]);
    header[name] = { dtype: 'F32', shape: t.shape, data_offsets: [off, off + a.byteLength] };
    parts.push(new Uint8Array(a.buffer));
    off += a.byteLength;
  }
  const json = JSON.stringify(header);
  const hj = new TextEncoder().encode(json + ' '.repeat((8 - (json.length % 8)) % 8));
  const out = new Uint8Array(8 + hj.length + off);
  new DataView(out.buffer).setBigUint64(0, BigInt(hj.length), true);
  out.set(hj, 8);
  let o = 8 + hj.length;
  for (const p of parts) {
    out.set(p, o);
    o += p.byteLength;
  }
  return out;
}
