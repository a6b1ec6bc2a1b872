/**
 * The WASM engine against the golden vectors of every fixture variant, under Node.
 * f32: prompt logits, decode logits and linear states within the manifest's tolerance, identical greedy ids.
 * int8: the golden greedy ids exactly and the golden logits within INT8_LOGIT_REL (the fixtures draw projections
 * with std 0.3/sqrt(fan_in), a well-conditioned model: see docs/edge-engine.md §int8); against the f32 path on the
 * same int8-rounded weights (INT8_KERNEL_REL); and on the trained default model (models/default) for greedy ids +
 * INT8_DEFAULT_MODEL_REL against f32. Needs `bash tools/build-wasm.sh` and `bash tools/fixtures.sh` first.
 */
import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';

import { checkGolden, compareEngines, type GoldenManifest, greedyIds, relError, teacherForcedLogits, transformCheckpoint } from '../../src/engine/golden';
import { INT8_DEFAULT_MODEL_REL, INT8_KERNEL_REL, INT8_LOGIT_REL } from '../../src/engine/limits';
import { createWasmEngine, type WasmEngine } from '../../src/engine/wasm-engine';

const ROOT = new URL('../../../', import.meta.url).pathname;
const read = (p: string) => readFileSync(ROOT + p);
const kernelModule = new (WebAssembly.Module as unknown as new (b: Uint8Array) => WebAssembly.Module)(read('wasm/build/ringlinear.wasm'));

function loadFixture(variant: string, quant: 'f32' | 'int8', weights?: Uint8Array): Promise<WasmEngine> {
  const dir = `test/fixtures/${variant}/`;
  return createWasmEngine({
    module: kernelModule,
    quant,
    files: {
      config: read(dir + 'config.json').toString(),
      tokenizer: read(dir + 'tokenizer.json').toString(),
      tokenizerConfig: read(dir + 'tokenizer_config.json').toString(),
      generationConfig: read(dir + 'generation_config.json').toString(),
      weights: weights ?? new Uint8Array(read(dir + 'model.safetensors')),
    },
  });
}

const VARIANTS = ['tiny', 'tiny-h6', 'tiny-tail', 'tiny-hfslope'];

describe.each(VARIANTS)('golden %s', (variant) => {
  const manifest = JSON.parse(read(`test/golden/${variant}.json`).toString()) as GoldenManifest;
  const golden = new Uint8Array(read(`test/golden/${variant}.safetensors`));
  const weights = () => new Uint8Array(read(`test/fixtures/${variant}/model.safetensors`));

  it('f32 matches prompt logits, decode logits, linear states and greedy ids', async () => {
    const engine = await loadFixture(variant, 'f32');
    const tol = manifest.tolerances.f32;
    for (const r of checkGolden(engine, golden, manifest)) {
      console.log(`measure ${variant} ${r.name} f32 prompt ${r.promptLogitsRel.toExponential(3)} decode ${r.decodeLogitsRel.toExponential(3)} state ${r.stateRel.toExponential(3)}`);
      expect(r.promptLogitsRel, `${r.name} prompt logits`).toBeLessThanOrEqual(tol.logits_rel);
      expect(r.decodeLogitsRel, `${r.name} decode logits`).toBeLessThanOrEqual(tol.logits_rel);
      expect(r.stateRel, `${r.name} states`).toBeLessThanOrEqual(tol.state_rel);
      expect(r.greedyIds, `${r.name} greedy ids`).toEqual(r.goldenGreedyIds);
    }
    engine.destroy();
  });

  it('int8 kernels match the f32 path on the same int8-rounded weights', async () => {
    const int8 = await loadFixture(variant, 'int8');
    const rounded = await loadFixture(variant, 'f32', transformCheckpoint(weights(), { fakeQuantInt8: true }));
    const err = compareEngines(int8, rounded, manifest);
    console.log(`measure ${variant} int8-vs-rounded-f32 ${err.toExponential(3)}`);
    expect(err).toBeLessThanOrEqual(INT8_KERNEL_REL);
    int8.destroy();
    rounded.destroy();
  });

  it('int8 gives the golden greedy ids on the golden prompts, logits within the int8 bound', async () => {
    const int8 = await loadFixture(variant, 'int8');
    for (const r of checkGolden(int8, golden, manifest)) {
      console.log(`measure ${variant} ${r.name} int8-vs-golden prompt ${r.promptLogitsRel.toExponential(3)} decode ${r.decodeLogitsRel.toExponential(3)}`);
      expect(r.greedyIds, `${r.name} greedy ids`).toEqual(r.goldenGreedyIds);
      expect(Math.max(r.promptLogitsRel, r.decodeLogitsRel), `${r.name} logits`).toBeLessThanOrEqual(INT8_LOGIT_REL);
    }
    int8.destroy();
  });

  it('tokenizer and generate() at temperature 0 reproduce the golden ids and text', async () => {
    const engine = await loadFixture(variant, 'f32');
    const gen = JSON.parse(read(`test/fixtures/${variant}/generation_config.json`).toString());
    const eos = new Set<number>([gen.eos_token_id].flat());
    for (const p of manifest.prompts) {
      expect(engine.encode(p.text)).toEqual(p.input_ids);
      let text = '';
      for await (const ev of engine.generate(p.input_ids, { maxTokens: p.greedy_ids.length, temperature: 0, topP: 1, topK: 0, stop: [] }))
        if (ev.type === 'text') text += ev.text;
      const stopAt = p.greedy_ids.findIndex((i) => eos.has(i));
      expect(text).toEqual(engine.decode(stopAt < 0 ? p.greedy_ids : p.greedy_ids.slice(0, stopAt)));
    }
    engine.destroy();
  });
});

describe('trained default model (models/default)', () => {
  it('int8 gives the f32 greedy continuation within the logit bound', async () => {
    const dir = 'models/default/';
    const files = {
      config: read(dir + 'config.json').toString(),
      tokenizer: read(dir + 'tokenizer.json').toString(),
      tokenizerConfig: read(dir + 'tokenizer_config.json').toString(),
      generationConfig: read(dir + 'generation_config.json').toString(),
      weights: new Uint8Array(read(dir + 'model.safetensors')),
    };
    const f32 = await createWasmEngine({ module: kernelModule, files, quant: 'f32' });
    const int8 = await createWasmEngine({ module: kernelModule, files, quant: 'int8' });
    const prompts = ['The ring turns and the river runs.', 'Hello, world! How are you today?', 'Once upon a time', 'The quick brown fox'];
    for (const text of prompts) {
      const ids = f32.encode(text);
      const ref = greedyIds(f32, ids, 16);
      expect(greedyIds(int8, ids, 16), text).toEqual(ref);
      const a = teacherForcedLogits(int8, ids, ref);
      const b = teacherForcedLogits(f32, ids, ref);
      const err = Math.max(...a.map((r, i) => relError(r, b[i])));
      console.log(`measure default-model int8-vs-f32 ${JSON.stringify(text)} ${err.toExponential(3)}`);
      expect(err, text).toBeLessThanOrEqual(INT8_DEFAULT_MODEL_REL);
    }
    f32.destroy();
    int8.destroy();
  });
});
