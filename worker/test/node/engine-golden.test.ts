/**
 * The WASM engine against the golden vectors of every fixture variant, under Node.
 * f32: prompt logits, decode logits and linear states within the manifest's tolerance, identical greedy ids.
 * int8: see docs/edge-engine.md §int8 — the fixtures' random weights (std 1/sqrt(fan_in)) make the model chaotic, so
 * int8 is checked on the same fixture with projections scaled by WELL_CONDITIONED_GAIN: against the f32 path on
 * the same int8-rounded weights (INT8_KERNEL_REL), and for greedy ids + the logit bound (INT8_LOGIT_REL) against f32. Needs `bash tools/build-wasm.sh` and `bash tools/fixtures.sh` first.
 */
import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';

import { checkGolden, compareEngines, type GoldenManifest, greedyIds, transformCheckpoint } from '../../src/engine/golden';
import { INT8_KERNEL_REL, INT8_LOGIT_REL, WELL_CONDITIONED_GAIN } from '../../src/engine/limits';
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
    const gain = WELL_CONDITIONED_GAIN;
    const int8 = await loadFixture(variant, 'int8', transformCheckpoint(weights(), { gain }));
    const rounded = await loadFixture(variant, 'f32', transformCheckpoint(weights(), { gain, fakeQuantInt8: true }));
    const err = compareEngines(int8, rounded, manifest);
    console.log(`measure ${variant} int8-vs-rounded-f32 ${err.toExponential(3)}`);
    expect(err).toBeLessThanOrEqual(INT8_KERNEL_REL);
    int8.destroy();
    rounded.destroy();
  });

  it('int8 gives the f32 greedy ids on the golden prompts (well-conditioned weights) within the logit bound', async () => {
    const scaled = transformCheckpoint(weights(), { gain: WELL_CONDITIONED_GAIN });
    const int8 = await loadFixture(variant, 'int8', scaled);
    const f32 = await loadFixture(variant, 'f32', scaled);
    for (const p of manifest.prompts)
      expect(greedyIds(int8, p.input_ids, p.greedy_ids.length), p.name).toEqual(greedyIds(f32, p.input_ids, p.greedy_ids.length));
    const err = compareEngines(int8, f32, manifest);
    console.log(`measure ${variant} int8-vs-f32 ${err.toExponential(3)}`);
    expect(err).toBeLessThanOrEqual(INT8_LOGIT_REL);
    int8.destroy();
    f32.destroy();
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
