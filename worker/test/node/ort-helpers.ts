/**
 * Golden-vector checks for the ORT-web engine, shared by the Node and workerd tests (so it only takes bytes,
 * never reads files). Contract 2 of docs/architecture.md: per row max|ours - golden| <= rel * max|golden|.
 */
import { expect } from 'vitest';
import type { OrtStepModel } from '../../src/ort/step-model';

export interface GoldenTensor {
  dtype: string;
  shape: number[];
  data: Float32Array | Int32Array;
}

/** Reads a safetensors file (8-byte little-endian header length, JSON header, raw little-endian data). */
export function readSafetensors(bytes: Uint8Array): Record<string, GoldenTensor> {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const headerLen = Number(view.getBigUint64(0, true));
  const header = JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + headerLen))) as Record<
    string,
    { dtype: string; shape: number[]; data_offsets: [number, number] }
  >;
  const base = 8 + headerLen;
  const out: Record<string, GoldenTensor> = {};
  for (const [name, t] of Object.entries(header)) {
    if (name === '__metadata__') continue;
    const raw = bytes.slice(base + t.data_offsets[0], base + t.data_offsets[1]);
    if (t.dtype === 'F32') out[name] = { dtype: t.dtype, shape: t.shape, data: new Float32Array(raw.buffer) };
    else if (t.dtype === 'I32') out[name] = { dtype: t.dtype, shape: t.shape, data: new Int32Array(raw.buffer) };
    else throw new Error(`golden tensor ${name}: unexpected dtype ${t.dtype}`);
  }
  return out;
}

/** Largest per-row relative error of `ours` against `golden`, both row-major with rows of `width`. */
export function maxRowRelError(ours: Float32Array, golden: Float32Array, width: number): number {
  expect(ours.length).toBe(golden.length);
  let worst = 0;
  for (let r = 0; r < golden.length / width; r++) {
    let diff = 0;
    let scale = 0;
    for (let i = r * width; i < (r + 1) * width; i++) {
      diff = Math.max(diff, Math.abs(ours[i] - golden[i]));
      scale = Math.max(scale, Math.abs(golden[i]));
    }
    worst = Math.max(worst, diff / scale);
  }
  return worst;
}

export function argmax(row: Float32Array): number {
  let best = 0;
  for (let i = 1; i < row.length; i++) if (row[i] > row[best]) best = i;
  return best;
}

export interface GoldenReport {
  prompt: string;
  prefillRel: number;
  stateRel: number;
  decodeRel: number;
  greedy: number[];
}

/**
 * Runs one golden prompt: prefill (in chunks of `chunk` tokens), compares every position's logits and the final
 * linear states, then decodes the golden greedy continuation and compares each step's logits and argmax.
 */
export async function checkGoldenPrompt(
  model: OrtStepModel,
  golden: Record<string, GoldenTensor>,
  prompt: string,
  rel: number,
  chunk = 64,
): Promise<GoldenReport> {
  const V = model.meta.vocab_size;
  const ids = Array.from(golden[`${prompt}.input_ids`].data);
  const pre = await model.forward(ids, model.initialState(), { chunk });
  const prefillRel = maxRowRelError(pre.logits, golden[`${prompt}.logits`].data as Float32Array, V);
  let stateRel = 0;
  for (const l of model.meta.linear_layers) {
    const g = golden[`${prompt}.state.${l}`].data as Float32Array;
    const ours = pre.state.tensors[`state_${l}`].data as Float32Array;
    stateRel = Math.max(stateRel, maxRowRelError(ours, g, g.length));
  }
  const greedyGold = Array.from(golden[`${prompt}.greedy_ids`].data);
  const decodeGold = golden[`${prompt}.decode_logits`].data as Float32Array;
  const greedy = [argmax(pre.logits.subarray((ids.length - 1) * V))];
  let state = pre.state;
  let decodeRel = 0;
  for (let j = 0; j < greedyGold.length; j++) {
    const step = await model.forward([greedyGold[j]], state);
    decodeRel = Math.max(decodeRel, maxRowRelError(step.logits, decodeGold.subarray(j * V, (j + 1) * V), V));
    if (j + 1 < greedyGold.length) greedy.push(argmax(step.logits));
    state = step.state;
  }
  expect(prefillRel, `${prompt} prefill logits`).toBeLessThanOrEqual(rel);
  expect(stateRel, `${prompt} linear states`).toBeLessThanOrEqual(rel);
  expect(decodeRel, `${prompt} decode logits`).toBeLessThanOrEqual(rel);
  expect(greedy, `${prompt} greedy ids`).toEqual(greedyGold);
  return { prompt, prefillRel, stateRel, decodeRel, greedy };
}
