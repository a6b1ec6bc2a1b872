/**
 * Opt-in, minutes long: held-out perplexity of models/default on the model card's evaluation set (the first
 * PPL_WINDOWS consecutive 512-token windows of .traindata/default/heldout.npy, each from an empty state, tokens
 * 2..512 predicted), by the WASM engine (f32, int8) and ORT-web, against the CPU reference's mean NLL in
 * docs/model-card/perplexity_cpu.json (same convention: gpu-backend/ringlinear/train/evaluate.py).
 *
 *   PPL_WINDOWS=64 npx vitest run --project node worker/test/node/perplexity-windows.test.ts
 *
 * Skipped unless PPL_WINDOWS is set: the held-out stream comes from `bash tools/data/prepare.sh` (git-ignored), and
 * 64 windows take minutes. The 256-token check that always runs is perplexity.test.ts. With fewer than 64 windows
 * there is no reference mean, so the figures are printed and only checked for being finite and between engines.
 * Needs test/fixtures/onnx/default.onnx (made by tools/test.sh or perplexity.test.ts).
 */
import { existsSync, readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import * as ort from 'onnxruntime-web/wasm';
import { describe, expect, it } from 'vitest';

import { NLL_BOUNDS, tokenNll } from '../../src/engine/perplexity';
import { createWasmEngine } from '../../src/engine/wasm-engine';
import { OrtStepModel, parseStepMeta } from '../../src/ort/step-model';

const ROOT = resolve(__dirname, '../../..');
const read = (p: string) => readFileSync(resolve(ROOT, p));
const WINDOWS = Number(process.env.PPL_WINDOWS ?? 0);
const SEQ = 512;
const MODEL = 'models/default/';

/** A 1-D little-endian uint16 .npy (what tools/data writes), as numbers. */
function readNpyUint16(bytes: Buffer): Uint16Array {
  if (bytes.subarray(0, 6).toString('latin1') !== '\x93NUMPY') throw new Error('heldout.npy: not a .npy file');
  const v1 = bytes[6] === 1;
  const hlen = v1 ? bytes.readUInt16LE(8) : bytes.readUInt32LE(8);
  const start = (v1 ? 10 : 12) + hlen;
  const header = bytes.subarray(v1 ? 10 : 12, start).toString('latin1');
  if (!/'descr':\s*'<u2'/.test(header) || !/'fortran_order':\s*False/.test(header) || !/'shape':\s*\(\d+,\)/.test(header)) {
    throw new Error(`heldout.npy: expected a 1-D '<u2' array, header ${header.trim()}`);
  }
  const n = Number(/'shape':\s*\((\d+),\)/.exec(header)![1]);
  const copy = bytes.subarray(start, start + 2 * n);
  return new Uint16Array(copy.buffer.slice(copy.byteOffset, copy.byteOffset + copy.byteLength));
}

function windows(): number[][] {
  const tokens = readNpyUint16(read('.traindata/default/heldout.npy'));
  if (tokens.length < WINDOWS * SEQ) throw new Error(`held-out stream has ${tokens.length} tokens, fewer than ${WINDOWS} windows`);
  return Array.from({ length: WINDOWS }, (_, w) => Array.from(tokens.subarray(w * SEQ, (w + 1) * SEQ)));
}

interface Figures {
  tokens: number;
  meanNll: number;
}

const reference = JSON.parse(read('docs/model-card/perplexity_cpu.json').toString()) as { windows: number; seq_len: number; mean_nll: number };
const results: Record<string, Figures> = {};

function check(engine: string, sum: number, tokens: number, kind: 'f32' | 'int8'): void {
  const meanNll = sum / tokens;
  results[engine] = { tokens, meanNll };
  const vsRef = WINDOWS === reference.windows && SEQ === reference.seq_len ? meanNll - reference.mean_nll : Number.NaN;
  console.log(`measure perplexity-windows ${engine}: windows ${WINDOWS} tokens ${tokens} mean NLL ${meanNll.toFixed(9)} ppl ${Math.exp(meanNll).toFixed(4)} diff vs CPU reference ${vsRef.toExponential(2)}`);
  expect(tokens).toBe(WINDOWS * (SEQ - 1));
  expect(Number.isFinite(meanNll)).toBe(true);
  if (!Number.isNaN(vsRef)) expect(Math.abs(vsRef), `${engine} mean NLL vs CPU reference`).toBeLessThanOrEqual(NLL_BOUNDS[kind].meanAbs);
}

describe.skipIf(!WINDOWS)(`held-out perplexity of models/default on ${WINDOWS} windows of ${SEQ}`, () => {
  const ws = WINDOWS ? windows() : [];

  for (const quant of ['f32', 'int8'] as const) {
    it(`WASM ${quant}`, async () => {
      const kernel = new (WebAssembly.Module as unknown as new (b: Uint8Array) => WebAssembly.Module)(read('wasm/build/ringlinear.wasm'));
      const engine = await createWasmEngine({
        module: kernel,
        quant,
        files: {
          config: read(MODEL + 'config.json').toString(),
          tokenizer: read(MODEL + 'tokenizer.json').toString(),
          tokenizerConfig: read(MODEL + 'tokenizer_config.json').toString(),
          generationConfig: read(MODEL + 'generation_config.json').toString(),
          weights: new Uint8Array(read(MODEL + 'model.safetensors')),
        },
      });
      const { runner } = engine;
      let sum = 0;
      let n = 0;
      for (const ids of ws) {
        const session = runner.kernel.createSession(SEQ);
        try {
          runner.prefill(session, ids, true).forEach((row, i) => {
            if (i + 1 < ids.length) (sum += tokenNll(row, ids[i + 1])), n++;
          });
        } finally {
          runner.kernel.freeSession(session);
        }
      }
      engine.destroy();
      check(`wasm-${quant}`, sum, n, quant);
    }, 1_800_000);
  }

  it('ORT-web fp32', async () => {
    const path = resolve(ROOT, 'test/fixtures/onnx/default.onnx');
    if (!existsSync(path)) throw new Error(`${path} missing: run tools/test.sh or worker/test/node/perplexity.test.ts first`);
    const meta = parseStepMeta(JSON.parse(readFileSync(path.replace(/\.onnx$/, '.json'), 'utf8')));
    const model = await OrtStepModel.create(ort, new Uint8Array(readFileSync(path)), meta);
    const V = meta.vocab_size;
    let sum = 0;
    let n = 0;
    for (const ids of ws) {
      const { logits } = await model.forward(ids, model.initialState(), { chunk: 64 });
      for (let i = 0; i + 1 < ids.length; i++) (sum += tokenNll(logits.subarray(i * V, (i + 1) * V), ids[i + 1])), n++;
    }
    check('ort-web-fp32', sum, n, 'f32');
    // the two f32 engines agree with each other as tightly as with the reference
    if (results['wasm-f32']) expect(Math.abs(results['wasm-f32'].meanNll - sum / n)).toBeLessThanOrEqual(NLL_BOUNDS.f32.meanAbs);
  }, 1_800_000);
});
