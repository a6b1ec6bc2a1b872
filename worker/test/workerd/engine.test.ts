/**
 * The WASM engine inside workerd (vitest pool): the kernel imported as a precompiled module, the tiny checkpoint as
 * Data/JSON modules. f32 golden parity, int8 golden greedy ids within the int8 logit bound (docs/edge-engine.md),
 * streaming generation, and the 128 MB budget.
 */
import { describe, expect, it } from 'vitest';

import kernelModule from '../../../wasm/build/ringlinear.wasm';
import manifest from '../../../test/golden/tiny.json';
import goldenBytes from '../../../test/golden/tiny.safetensors';
import config from '../../../test/fixtures/tiny/config.json';
import generationConfig from '../../../test/fixtures/tiny/generation_config.json';
import tokenizer from '../../../test/fixtures/tiny/tokenizer.json';
import tokenizerConfig from '../../../test/fixtures/tiny/tokenizer_config.json';
import weights from '../../../test/fixtures/tiny/model.safetensors';
import { checkGolden, type GoldenManifest } from '../../src/engine/golden';
import { INT8_LOGIT_REL } from '../../src/engine/limits';
import { EngineBudgetError, type GenerateEvent } from '../../src/engine/types';
import { createWasmEngine, ISOLATE_MEMORY_BYTES } from '../../src/engine/wasm-engine';

const golden = manifest as unknown as GoldenManifest;

function engine(quant: 'f32' | 'int8', w: ArrayBuffer | Uint8Array = weights, memoryBudgetBytes?: number) {
  return createWasmEngine({
    module: kernelModule,
    quant,
    files: { config, tokenizer, tokenizerConfig, generationConfig, weights: w },
    ...(memoryBudgetBytes ? { memoryBudgetBytes } : {}),
  });
}

describe('WASM engine in workerd', () => {
  it('runs inside the Workers runtime', () => {
    expect(navigator.userAgent).toBe('Cloudflare-Workers');
  });

  it('f32 matches the golden logits, states and greedy ids', async () => {
    const e = await engine('f32');
    const tol = golden.tolerances.f32;
    for (const r of checkGolden(e, goldenBytes, golden)) {
      expect(r.promptLogitsRel, r.name).toBeLessThanOrEqual(tol.logits_rel);
      expect(r.decodeLogitsRel, r.name).toBeLessThanOrEqual(tol.logits_rel);
      expect(r.stateRel, r.name).toBeLessThanOrEqual(tol.state_rel);
      expect(r.greedyIds, r.name).toEqual(r.goldenGreedyIds);
    }
    e.destroy();
  });

  it('int8 gives the golden greedy ids on the golden prompts within the logit bound', async () => {
    const i8 = await engine('int8');
    for (const r of checkGolden(i8, goldenBytes, golden)) {
      expect(r.greedyIds, r.name).toEqual(r.goldenGreedyIds);
      expect(Math.max(r.promptLogitsRel, r.decodeLogitsRel), r.name).toBeLessThanOrEqual(INT8_LOGIT_REL);
    }
    i8.destroy();
  });

  it('streams a chat completion and stays inside the 128 MB budget', async () => {
    const e = await engine('int8');
    const prompt = e.encode(e.applyChatTemplate([{ role: 'user', content: 'Hello there' }]));
    const events: GenerateEvent[] = [];
    for await (const ev of e.generate(prompt, { maxTokens: 12, temperature: 0.8, topP: 0.9, topK: 40, seed: 3, stop: [] }))
      events.push(ev);
    const done = events[events.length - 1];
    expect(done.type).toBe('done');
    if (done.type === 'done') expect(done.promptTokens).toBe(prompt.length);
    expect(e.baseBytes + e.requestBytes(prompt.length + 12)).toBeLessThanOrEqual(ISOLATE_MEMORY_BYTES);
    expect(e.wasmMemoryBytes).toBeLessThanOrEqual(ISOLATE_MEMORY_BYTES);
    e.destroy();
  });

  it('refuses a request that would exceed the budget before doing any work', async () => {
    const e = await engine('f32');
    const tooLong = e.info.maxContext + 1;
    expect(() => e.generate([5, 6, 7], { maxTokens: tooLong, temperature: 0, topP: 1, topK: 0, stop: [] })).toThrow(EngineBudgetError);
    e.destroy();
  });
});
