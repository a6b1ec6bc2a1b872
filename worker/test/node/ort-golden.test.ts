/**
 * onnxruntime-web (single-threaded wasm SIMD) running the exported step graph under Node must match the golden
 * vectors: logits within 1e-4 relative per row, the same linear states, the same greedy ids. The .onnx files are
 * made by `python -m ringlinear export-onnx` (run here when missing or older than the checkpoint).
 */
import { readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import * as ort from 'onnxruntime-web/wasm';
import { beforeAll, describe, expect, it } from 'vitest';
import { OrtStepModel, parseStepMeta } from '../../src/ort/step-model';
import { argmax, checkGoldenPrompt, maxRowRelError, readSafetensors } from './ort-helpers';
import { ROOT, ensureOnnx } from './ort-node-helpers';

// tiny has three prompts (one of 66 tokens); tiny-h6 exercises the non-power-of-two head count.
const VARIANTS = ['tiny', 'tiny-h6'];

async function loadModel(variant: string): Promise<OrtStepModel> {
  const path = ensureOnnx(variant);
  const meta = parseStepMeta(JSON.parse(readFileSync(path.replace(/\.onnx$/, '.json'), 'utf8')));
  return OrtStepModel.create(ort, new Uint8Array(readFileSync(path)), meta);
}

for (const variant of VARIANTS) {
  describe(`ORT-web under Node: ${variant}`, () => {
    let model: OrtStepModel;
    const manifest = JSON.parse(readFileSync(resolve(ROOT, `test/golden/${variant}.json`), 'utf8'));
    const golden = readSafetensors(new Uint8Array(readFileSync(resolve(ROOT, `test/golden/${variant}.safetensors`))));
    const rel: number = manifest.tolerances.f32.logits_rel;

    beforeAll(async () => {
      model = await loadModel(variant);
    });

    for (const p of manifest.prompts as { name: string }[]) {
      it(`${p.name}: prefill, states, decode and greedy ids match the golden vectors`, async () => {
        await checkGoldenPrompt(model, golden, p.name, rel);
      });
    }

    it('prefill in small chunks and token by token gives the same logits as one chunk', async () => {
      const V = model.meta.vocab_size;
      const ids = Array.from(golden['p0.input_ids'].data);
      const whole = await model.forward(ids, model.initialState(), { chunk: 64 });
      for (const chunk of [1, 3]) {
        const parts = await model.forward(ids, model.initialState(), { chunk });
        expect(maxRowRelError(parts.logits, whole.logits, V)).toBeLessThanOrEqual(rel);
      }
      const last = await model.forward(ids, model.initialState(), { chunk: 3, lastOnly: true });
      expect(last.logits.length).toBe(V);
      expect(argmax(last.logits)).toBe(argmax(whole.logits.subarray((ids.length - 1) * V)));
    });

    it('refuses token ids outside the vocabulary and positions past the exported context', async () => {
      await expect(model.forward([model.meta.vocab_size], model.initialState())).rejects.toThrow(/outside the vocabulary/);
      await expect(model.forward([], model.initialState())).rejects.toThrow(/no tokens/);
      const late = { ...model.initialState(), pos: model.meta.max_context };
      await expect(model.forward([1], late)).rejects.toThrow(/exceed the exported context/);
    });
  });
}

it('rejects metadata that is not the exporter format', () => {
  expect(() => parseStepMeta({ format: 'other' })).toThrow(/ringlinear-onnx-step\/1/);
  expect(() => parseStepMeta({ format: 'ringlinear-onnx-step/1', vocab_size: 0 })).toThrow(/vocab_size/);
});
