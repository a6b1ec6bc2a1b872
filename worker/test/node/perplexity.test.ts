/**
 * Cross-engine held-out perplexity of the trained default model (models/default), issue 7: the WASM engine (f32 and
 * int8) and ORT-web score the 256 held-out tokens of test/golden/default-heldout.json teacher-forced, and their
 * per-token NLL and mean must agree with the CPU reference's (written by `python -m ringlinear train golden`).
 * Bounds: NLL_BOUNDS (worker/src/engine/perplexity.ts; measured values and headroom in docs/model-card.md,
 * "Cross-engine perplexity"), each tighter than the file's own `tolerances`, which are asserted too.
 * Needs `bash tools/build-wasm.sh`; the ONNX export of models/default (test/fixtures/onnx/default.onnx,
 * git-ignored) is made by tools/test.sh before vitest, and here when missing or stale.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import * as ort from 'onnxruntime-web/wasm';
import { beforeAll, describe, expect, it } from 'vitest';

import { teacherForcedLogits } from '../../src/engine/golden';
import { compareNll, NLL_BOUNDS, type NllComparison, sequenceNll, tokenNll } from '../../src/engine/perplexity';
import { createWasmEngine } from '../../src/engine/wasm-engine';
import { OrtStepModel, parseStepMeta } from '../../src/ort/step-model';

const ROOT = resolve(__dirname, '../../..');
const read = (p: string) => readFileSync(resolve(ROOT, p));

interface Heldout {
  text: string;
  ids: number[];
  nll: number[];
  mean_nll: number;
  perplexity: number;
  tolerances: { f32_abs_per_token: number; int8_abs_mean_nll: number };
}
const heldout = JSON.parse(read('test/golden/default-heldout.json').toString()) as Heldout;

const MODEL = 'models/default/';
const files = () => ({
  config: read(MODEL + 'config.json').toString(),
  tokenizer: read(MODEL + 'tokenizer.json').toString(),
  tokenizerConfig: read(MODEL + 'tokenizer_config.json').toString(),
  generationConfig: read(MODEL + 'generation_config.json').toString(),
  weights: new Uint8Array(read(MODEL + 'model.safetensors')),
});

function report(engine: string, r: NllComparison): void {
  console.log(
    `measure perplexity ${engine}: tokens ${r.tokens} mean NLL ${r.meanNll.toFixed(6)} ppl ${r.perplexity.toFixed(4)} ` +
      `mean diff ${r.meanNllDiff.toExponential(2)} max token diff ${r.maxTokenDiff.toExponential(2)} mean |token diff| ${r.meanTokenDiff.toExponential(2)}`,
  );
}

function expectWithin(r: NllComparison, kind: 'f32' | 'int8'): void {
  const b = NLL_BOUNDS[kind];
  expect(r.tokens).toBe(heldout.ids.length - 1);
  expect(Math.abs(r.meanNllDiff), 'mean NLL vs reference').toBeLessThanOrEqual(b.meanAbs);
  expect(r.maxTokenDiff, 'worst per-token NLL vs reference').toBeLessThanOrEqual(b.tokenAbs);
  if ('meanTokenAbs' in b) expect(r.meanTokenDiff, 'mean |per-token diff|').toBeLessThanOrEqual(b.meanTokenAbs);
  // the file's own tolerances (the contract of `ringlinear train golden`)
  if (kind === 'f32') expect(r.maxTokenDiff).toBeLessThanOrEqual(heldout.tolerances.f32_abs_per_token);
  else expect(Math.abs(r.meanNllDiff)).toBeLessThanOrEqual(heldout.tolerances.int8_abs_mean_nll);
  // perplexity = exp(mean): its relative error is expm1(|mean diff|)
  expect(Math.abs(r.perplexity / heldout.perplexity - 1)).toBeLessThanOrEqual(Math.expm1(b.meanAbs) * 1.0001);
}

describe('teacher-forced NLL', () => {
  it('matches hand-computed values and stays finite for large logits', () => {
    expect(tokenNll([0, 0, 0, 0], 2)).toBeCloseTo(Math.log(4), 14);
    // p = e^2 / (e^2 + 1 + e^-1)
    expect(tokenNll([2, 0, -1], 0)).toBeCloseTo(-Math.log(Math.exp(2) / (Math.exp(2) + 1 + Math.exp(-1))), 14);
    expect(tokenNll([1000, 0], 1)).toBeCloseTo(1000, 9);
    expect(tokenNll([1000, 1000], 0)).toBeCloseTo(Math.log(2), 12);
    const flat = new Float32Array([0, 0, 5, 0, 1, 2]); // rows [0,0,5] then [0,1,2], vocab 3
    const nll = sequenceNll([7, 2, 1], flat, 3);
    expect(Array.from(nll)).toEqual([tokenNll([0, 0, 5], 2), tokenNll([0, 1, 2], 1)]);
    expect(Array.from(sequenceNll([7, 2, 1], [flat.subarray(0, 3), flat.subarray(3)]))).toEqual(Array.from(nll));
  });

  it('rejects bad input with a clear error', () => {
    expect(() => tokenNll([0, 1], 2)).toThrow(/target id 2 outside/);
    expect(() => tokenNll([0, Number.NaN], 0)).toThrow(/non-finite/);
    expect(() => sequenceNll([1, 2, 3], [new Float32Array(3)])).toThrow(/1 logit rows for 3 tokens/);
    expect(() => compareNll([1, 2], [1])).toThrow(/2 values against 1/);
    expect(compareNll([1, Number.NaN, 1], [1, 1, 1]).maxTokenDiff).toBeNaN();
  });

  it('the held-out file is self-consistent', () => {
    expect(heldout.ids.length).toBe(256);
    expect(heldout.nll.length).toBe(255);
    const mean = heldout.nll.reduce((a, b) => a + b, 0) / heldout.nll.length;
    expect(Math.abs(mean - heldout.mean_nll)).toBeLessThan(1e-6); // per-token values are rounded to 1e-6
    expect(heldout.perplexity).toBeCloseTo(Math.exp(heldout.mean_nll), 9);
  });
});

describe('held-out perplexity of models/default: WASM engine', () => {
  const kernel = new (WebAssembly.Module as unknown as new (b: Uint8Array) => WebAssembly.Module)(read('wasm/build/ringlinear.wasm'));

  it('tokenizes the held-out text to the reference ids', async () => {
    const engine = await createWasmEngine({ module: kernel, files: files(), quant: 'int8' });
    expect(engine.encode(heldout.text)).toEqual(heldout.ids);
    engine.destroy();
  });

  for (const quant of ['f32', 'int8'] as const) {
    it(`${quant}: per-token NLL and perplexity agree with the CPU reference`, async () => {
      const engine = await createWasmEngine({ module: kernel, files: files(), quant });
      const rows = teacherForcedLogits(engine, heldout.ids, []);
      engine.destroy();
      const r = compareNll(sequenceNll(heldout.ids, rows), heldout.nll, heldout.mean_nll);
      report(`wasm-${quant}`, r);
      expectWithin(r, quant);
    });
  }
});

/** test/fixtures/onnx/default.onnx, exported from models/default when missing or older than it / the exporter. */
function ensureDefaultOnnx(): string {
  const out = resolve(ROOT, 'test/fixtures/onnx/default.onnx');
  execFileSync(process.env.PYTHON ?? resolve(ROOT, '.venv/bin/python'), ['-m', 'ringlinear', 'export-onnx', '--model', MODEL, '--out', out, '--skip-existing'], {
    cwd: ROOT,
    stdio: 'ignore',
    env: { ...process.env, PYTHONPATH: resolve(ROOT, 'gpu-backend') },
  });
  if (!existsSync(out)) throw new Error(`export-onnx did not write ${out}`);
  return out;
}

describe('held-out perplexity of models/default: ORT-web', () => {
  let path = '';
  beforeAll(() => {
    path = ensureDefaultOnnx(); // in the hook: a fresh export takes 1-2 min (hookTimeout 180 s)
  });

  it('fp32: per-token NLL and perplexity agree with the CPU reference', async () => {
    const meta = parseStepMeta(JSON.parse(readFileSync(path.replace(/\.onnx$/, '.json'), 'utf8')));
    const model = await OrtStepModel.create(ort, new Uint8Array(readFileSync(path)), meta);
    const { logits } = await model.forward(heldout.ids, model.initialState(), { chunk: 64 });
    const r = compareNll(sequenceNll(heldout.ids, logits, meta.vocab_size), heldout.nll, heldout.mean_nll);
    report('ort-web-fp32', r);
    expectWithin(r, 'f32');
  });
});
