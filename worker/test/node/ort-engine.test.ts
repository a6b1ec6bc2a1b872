/**
 * The Engine over onnxruntime-web under Node: budgets (model and request), abort, logprobs, chat template.
 * Golden parity of the graph itself is in ort-golden.test.ts (and in workerd in ort-engine.test.ts there).
 */
import { readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import * as ort from 'onnxruntime-web/wasm';
import { beforeAll, describe, expect, it } from 'vitest';
import { EngineBudgetError, type GenerateEvent, type GenerateParams } from '../../src/engine/types';
import { ISOLATE_MEMORY_BYTES, JS_RESERVE_BYTES, ORT_HEAP_PER_MODEL_BYTE, type OrtEngine, createOrtEngine } from '../../src/ort/ort-engine';
import { ROOT, ensureOnnx } from './ort-node-helpers';

const read = (p: string) => readFileSync(resolve(ROOT, p));
const params = (o: Partial<GenerateParams> = {}): GenerateParams => ({ maxTokens: 8, temperature: 0, topP: 1, topK: 0, stop: [], ...o });

let modelBytes: Uint8Array;
const make = (budget: number) =>
  createOrtEngine({
    ort,
    model: modelBytes,
    meta: read('test/fixtures/onnx/tiny.json').toString(),
    tokenizer: read('test/fixtures/tiny/tokenizer.json').toString(),
    tokenizerConfig: read('test/fixtures/tiny/tokenizer_config.json').toString(),
    generationConfig: read('test/fixtures/tiny/generation_config.json').toString(),
    memoryBudgetBytes: budget,
  });

async function collect(it: AsyncIterable<GenerateEvent>): Promise<GenerateEvent[]> {
  const out: GenerateEvent[] = [];
  for await (const e of it) out.push(e);
  return out;
}

describe('OrtEngine under Node', () => {
  let engine: OrtEngine;
  beforeAll(async () => {
    modelBytes = new Uint8Array(readFileSync(ensureOnnx('tiny')));
    engine = await make(512 * 2 ** 20);
  });

  it('refuses the tiny fp32 model at the 128 MB isolate budget, naming the model', async () => {
    expect(ORT_HEAP_PER_MODEL_BYTE * modelBytes.byteLength + JS_RESERVE_BYTES).toBeGreaterThan(ISOLATE_MEMORY_BYTES);
    await expect(make(ISOLATE_MEMORY_BYTES)).rejects.toMatchObject({ name: 'EngineBudgetError', param: 'model' });
  });

  it('refuses a request whose state would exceed the budget, before any work', async () => {
    const tight = await make(engine.baseBytes + engine.requestBytes(64));
    expect(() => tight.generate([5, 6, 7], params({ maxTokens: 61 }))).not.toThrow();
    expect(() => tight.generate([5, 6, 7], params({ maxTokens: 200 }))).toThrow(EngineBudgetError);
    expect(() => tight.generate([tight.info.vocabSize], params())).toThrow(/outside the vocabulary/);
    expect(() => tight.generate([], params())).toThrow(/at least one token/);
    await tight.destroy();
  });

  it('counts running requests against the budget', async () => {
    const tight = await make(engine.baseBytes + engine.requestBytes(40) + engine.requestBytes(20));
    const first = tight.generate([5, 6, 7], params({ maxTokens: 30 }))[Symbol.asyncIterator]();
    await first.next(); // the first request now holds its state
    expect(() => tight.generate([5, 6, 7], params({ maxTokens: 30 }))).toThrow(EngineBudgetError);
    await first.return?.(undefined);
    expect(() => tight.generate([5, 6, 7], params({ maxTokens: 30 }))).not.toThrow();
    await tight.destroy();
  });

  it('stops at an abort and reports the tokens produced so far', async () => {
    const ctrl = new AbortController();
    const events: GenerateEvent[] = [];
    for await (const e of engine.generate(engine.encode('Hello, world!'), params({ maxTokens: 50 }), ctrl.signal)) {
      events.push(e);
      if (events.length === 3) ctrl.abort();
    }
    const done = events.at(-1);
    expect(done).toMatchObject({ type: 'done', finishReason: 'stop' });
    expect(done?.type === 'done' && done.completionTokens).toBeLessThan(50);
  });

  it('reports logprobs of the chosen token and sorted alternatives', async () => {
    const events = await collect(engine.generate(engine.encode('The ring turns'), params({ maxTokens: 3, logprobs: 3 })));
    const lps = events.flatMap((e) => (e.type === 'text' ? (e.logprobs ?? []) : []));
    expect(lps.length).toBe(3);
    for (const lp of lps) {
      expect(lp.logprob).toBeLessThanOrEqual(0);
      expect(lp.top.length).toBe(3);
      expect(lp.top[0].logprob).toBeGreaterThanOrEqual(lp.top[1].logprob);
      expect(lp.logprob).toBeCloseTo(lp.top[0].logprob, 5); // greedy picks the most likely token
    }
  });

  it('renders the chat template of tokenizer_config.json', () => {
    expect(engine.applyChatTemplate([{ role: 'user', content: 'hi' }])).toBe('<role>HUMAN</role>hi<|role_end|><role>ASSISTANT</role>');
    expect(engine.info).toMatchObject({ engine: 'ort-web', vocabSize: 4096, maxContext: 4096 });
  });
});
