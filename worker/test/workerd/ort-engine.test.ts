/**
 * onnxruntime-web inside workerd (through the precompiled-module shim) running the exported step graph: golden
 * vectors within 1e-4 relative per row and the same greedy ids, then the Engine built on it.
 *
 * Needs test/fixtures/onnx/tiny.{onnx,json}, made before the run by
 * `.venv/bin/python -m ringlinear export-onnx --model test/fixtures/tiny --out test/fixtures/onnx/tiny.onnx --skip-existing`.
 */
import { beforeAll, describe, expect, it } from 'vitest';
import manifest from '../../../test/golden/tiny.json';
import goldenBytes from '../../../test/golden/tiny.safetensors';
import metaJson from '../../../test/fixtures/onnx/tiny.json';
import modelBytes from '../../../test/fixtures/onnx/tiny.onnx';
import tokenizerJson from '../../../test/fixtures/tiny/tokenizer.json';
import tokenizerConfig from '../../../test/fixtures/tiny/tokenizer_config.json';
import generationConfig from '../../../test/fixtures/tiny/generation_config.json';
import { EngineBudgetError, type GenerateEvent } from '../../src/engine/types';
import { type OrtEngine, createOrtEngine } from '../../src/ort/ort-engine';
import { OrtStepModel, parseStepMeta } from '../../src/ort/step-model';
import { ortForWorkerd } from '../../src/ort/workerd';
import { checkGoldenPrompt, readSafetensors } from '../node/ort-helpers';

const golden = readSafetensors(new Uint8Array(goldenBytes));
const rel = manifest.tolerances.f32.logits_rel;

async function collect(it: AsyncIterable<GenerateEvent>): Promise<GenerateEvent[]> {
  const out: GenerateEvent[] = [];
  for await (const e of it) out.push(e);
  return out;
}

describe('ORT-web in workerd: tiny', () => {
  let model: OrtStepModel;
  beforeAll(async () => {
    expect(navigator.userAgent).toBe('Cloudflare-Workers');
    model = await OrtStepModel.create(ortForWorkerd(), new Uint8Array(modelBytes), parseStepMeta(metaJson));
  });

  for (const p of manifest.prompts) {
    it(`${p.name}: prefill, states, decode and greedy ids match the golden vectors`, async () => {
      await checkGoldenPrompt(model, golden, p.name, rel, 16);
    });
  }
});

describe('OrtEngine in workerd', () => {
  let engine: OrtEngine;
  beforeAll(async () => {
    engine = await createOrtEngine({
      ort: ortForWorkerd(),
      model: modelBytes,
      meta: metaJson,
      tokenizer: tokenizerJson,
      tokenizerConfig,
      generationConfig,
      memoryBudgetBytes: 512 * 2 ** 20,
    });
  });

  it('tokenises like the golden manifest and greedy generation gives the golden continuation', async () => {
    for (const p of manifest.prompts) {
      expect(engine.encode(p.text)).toEqual(p.input_ids);
      const events = await collect(
        engine.generate(p.input_ids, { maxTokens: p.greedy_ids.length, temperature: 0, topP: 1, topK: 0, stop: [] }),
      );
      const done = events.at(-1);
      const text = events.map((e) => (e.type === 'text' ? e.text : '')).join('');
      const eosAt = p.greedy_ids.findIndex((id) => [0, 2].includes(id));
      const expectedIds = eosAt >= 0 ? p.greedy_ids.slice(0, eosAt) : p.greedy_ids;
      expect(text).toBe(engine.decode(expectedIds));
      expect(done).toMatchObject({ type: 'done', promptTokens: p.input_ids.length });
    }
  });

  it('seeded sampling is reproducible and stop strings cut the text', async () => {
    const ids = manifest.prompts[1].input_ids;
    const params = { maxTokens: 6, temperature: 0.8, topP: 0.9, topK: 50, seed: 7, stop: [] };
    const a = await collect(engine.generate(ids, params));
    const b = await collect(engine.generate(ids, params));
    expect(a).toEqual(b);
    const full = a.map((e) => (e.type === 'text' ? e.text : '')).join('');
    expect(full.length).toBeGreaterThanOrEqual(4);
    const stop = full.slice(2, 4);
    const cut = await collect(engine.generate(ids, { ...params, stop: [stop] }));
    const text = cut.map((e) => (e.type === 'text' ? e.text : '')).join('');
    expect(text).toBe(full.slice(0, full.indexOf(stop)));
    expect(cut.at(-1)).toMatchObject({ type: 'done', finishReason: 'stop' });
  });

  it('refuses a request over the context before any work', () => {
    const ids = manifest.prompts[0].input_ids;
    const params = { maxTokens: engine.info.maxContext, temperature: 0, topP: 1, topK: 0, stop: [] };
    expect(() => engine.generate(ids, params)).toThrow(EngineBudgetError);
  });

  it('refuses a model that cannot fit the memory budget', async () => {
    const small = createOrtEngine({ ort: ortForWorkerd(), model: modelBytes, meta: metaJson, tokenizer: tokenizerJson, memoryBudgetBytes: 64 * 2 ** 20 });
    await expect(small).rejects.toThrow(EngineBudgetError);
  });
});
