/**
 * The WASM engine's behaviour under Node: the C kernel tests (wasm SIMD128 and native), checkpoint errors, sharded
 * loading, sampling and seeds, stop strings, cancellation, logprobs, UTF-8-safe streaming, yielding, and the memory
 * budget. Needs `bash tools/build-wasm.sh` and `bash tools/fixtures.sh` first.
 */
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';

import { ConfigError } from '../../src/engine/config';
import { CheckpointError, readSafetensors } from '../../src/engine/safetensors';
import { logprobsOf, Prng, sampleToken } from '../../src/engine/sampling';
import { IncrementalDetokenizer, StopCutter, TextCodec } from '../../src/engine/text';
import { EngineBudgetError, type GenerateEvent, type GenerateParams } from '../../src/engine/types';
import { createWasmEngine, ISOLATE_MEMORY_BYTES, JS_RESERVE_BYTES, type WasmEngineOptions } from '../../src/engine/wasm-engine';

const ROOT = new URL('../../../', import.meta.url).pathname;
const read = (p: string) => readFileSync(ROOT + p);
const kernelModule = new (WebAssembly.Module as unknown as new (b: Uint8Array) => WebAssembly.Module)(read('wasm/build/ringlinear.wasm'));
const DIR = 'test/fixtures/tiny/';
const files = () => ({
  config: read(DIR + 'config.json').toString(),
  tokenizer: read(DIR + 'tokenizer.json').toString(),
  tokenizerConfig: read(DIR + 'tokenizer_config.json').toString(),
  generationConfig: read(DIR + 'generation_config.json').toString(),
  weights: new Uint8Array(read(DIR + 'model.safetensors')) as WasmEngineOptions['files']['weights'],
});
const make = (o: Partial<WasmEngineOptions> = {}) => createWasmEngine({ module: kernelModule, files: files(), ...o });
const params = (o: Partial<GenerateParams> = {}): GenerateParams => ({ maxTokens: 16, temperature: 0, topP: 1, topK: 0, stop: [], ...o });

async function collect(it: AsyncIterable<GenerateEvent>): Promise<{ text: string; events: GenerateEvent[] }> {
  const events: GenerateEvent[] = [];
  let text = '';
  for await (const e of it) {
    events.push(e);
    if (e.type === 'text') text += e.text;
  }
  return { text, events };
}

/** Rebuilds a safetensors file from selected tensors (raw bytes kept), optionally with a changed shape. */
function rebuild(bytes: Uint8Array, keep: (name: string) => boolean, reshape: Record<string, number[]> = {}): Uint8Array {
  const t = readSafetensors(bytes);
  const header: Record<string, unknown> = {};
  const parts: Uint8Array[] = [];
  let off = 0;
  for (const [name, info] of t) {
    if (!keep(name)) continue;
    header[name] = { dtype: info.dtype, shape: reshape[name] ?? info.shape, data_offsets: [off, off + info.bytes.byteLength] };
    parts.push(info.bytes);
    off += info.bytes.byteLength;
  }
  const json = JSON.stringify(header);
  const hj = new TextEncoder().encode(json + ' '.repeat((8 - (json.length % 8)) % 8));
  const out = new Uint8Array(8 + hj.length + off);
  new DataView(out.buffer).setBigUint64(0, BigInt(hj.length), true);
  out.set(hj, 8);
  let o = 8 + hj.length;
  for (const p of parts) (out.set(p, o), (o += p.byteLength));
  return out;
}

describe('C kernels', () => {
  it('wasm SIMD128 kernels match their scalar twins and the algorithm checks pass (node)', () => {
    const out = execFileSync('node', [ROOT + 'wasm/build/test_kernels.js']).toString();
    expect(out).toMatch(/^ok: \d+ checks, 0 failed/m);
  });
  it('the native build passes the same algorithm checks', () => {
    const out = execFileSync(ROOT + 'wasm/build/native/test_kernels').toString();
    expect(out).toMatch(/^ok: \d+ checks, 0 failed/m);
  });
});

describe('checkpoint loading', () => {
  it('names a missing tensor', async () => {
    const w = rebuild(new Uint8Array(read(DIR + 'model.safetensors')), (n) => n !== 'model.layers.3.attention.dense.weight');
    await expect(make({ files: { ...files(), weights: w } })).rejects.toThrow(/model\.layers\.3\.attention\.dense\.weight: missing/);
  });
  it('names a mis-shaped tensor with both shapes', async () => {
    const w = rebuild(new Uint8Array(read(DIR + 'model.safetensors')), () => true, { 'model.layers.2.mlp.gate.weight': [8, 512] });
    const err = await make({ files: { ...files(), weights: w } }).catch((e) => e);
    expect(err).toBeInstanceOf(CheckpointError);
    expect(err.message).toMatch(/model\.layers\.2\.mlp\.gate\.weight: shape \[8,512\] .* expected \[16,256\]/);
  });
  it('names a bad config field', async () => {
    const cfg = JSON.parse(files().config);
    cfg.n_group = 3;
    const err = await make({ files: { ...files(), config: JSON.stringify(cfg) } }).catch((e) => e);
    expect(err).toBeInstanceOf(ConfigError);
    expect(err.message).toMatch(/n_group/);
  });
  it('loads a sharded checkpoint to the same logits', async () => {
    const all = new Uint8Array(read(DIR + 'model.safetensors'));
    const names = [...readSafetensors(all).keys()];
    const a = new Set(names.filter((_, i) => i % 2 === 0));
    const shards = { 'model-00001-of-00002.safetensors': rebuild(all, (n) => a.has(n)), 'model-00002-of-00002.safetensors': rebuild(all, (n) => !a.has(n)) };
    const index = { weight_map: Object.fromEntries(names.map((n) => [n, a.has(n) ? 'model-00001-of-00002.safetensors' : 'model-00002-of-00002.safetensors'])) };
    const sharded = await make({ files: { ...files(), weights: { index, shards } } });
    const single = await make();
    const ids = single.encode('sharded weights load the same');
    expect((await collect(sharded.generate(ids, params()))).text).toEqual((await collect(single.generate(ids, params()))).text);
    const s1 = sharded.runner.kernel.createSession(ids.length);
    const s2 = single.runner.kernel.createSession(ids.length);
    expect(sharded.runner.prefill(s1, ids)[0]).toEqual(single.runner.prefill(s2, ids)[0]);
  });
});

describe('generation', () => {
  it('is reproducible with a seed and varies across seeds', async () => {
    const e = await make();
    const ids = e.encode('The ring turns');
    const run = (seed: number) => collect(e.generate(ids, params({ temperature: 1, topP: 0.95, topK: 50, seed, maxTokens: 24 })));
    const a = await run(1);
    expect((await run(1)).text).toEqual(a.text);
    const others = await Promise.all([2, 3, 4].map(run));
    expect(others.some((o) => o.text !== a.text)).toBe(true);
  });

  it('top_k = 1 and a tiny top_p are greedy', async () => {
    const e = await make();
    const ids = e.encode('Hello, world!');
    const greedy = (await collect(e.generate(ids, params()))).text;
    expect((await collect(e.generate(ids, params({ temperature: 1.3, topK: 1, seed: 9 })))).text).toEqual(greedy);
    expect((await collect(e.generate(ids, params({ temperature: 0.7, topP: 1e-6, seed: 9 })))).text).toEqual(greedy);
  });

  it('cuts the text before the first stop string and finishes with stop', async () => {
    const e = await make();
    const ids = e.encode('Experts are chosen by a router');
    const full = (await collect(e.generate(ids, params({ maxTokens: 24 })))).text;
    const stop = full.slice(6, 9);
    const r = await collect(e.generate(ids, params({ maxTokens: 24, stop: ['zzzz-not-there', stop] })));
    expect(r.text).toEqual(full.slice(0, full.indexOf(stop)));
    expect(r.events[r.events.length - 1]).toMatchObject({ type: 'done', finishReason: 'stop' });
  });

  it('reports length and token counts', async () => {
    const e = await make();
    const ids = e.encode('Count these tokens');
    const r = await collect(e.generate(ids, params({ maxTokens: 5 })));
    const done = r.events[r.events.length - 1];
    expect(done).toMatchObject({ type: 'done', promptTokens: ids.length });
    if (done.type === 'done' && done.finishReason === 'length') expect(done.completionTokens).toBe(5);
  });

  it('stops on abort and counts the tokens produced so far', async () => {
    const e = await make();
    const ac = new AbortController();
    const events: GenerateEvent[] = [];
    for await (const ev of e.generate(e.encode('abort me'), params({ maxTokens: 200, temperature: 1, seed: 5 }), ac.signal)) {
      events.push(ev);
      if (ev.type === 'text' && ev.text) ac.abort();
    }
    const done = events[events.length - 1];
    expect(done.type).toBe('done');
    if (done.type === 'done') {
      expect(done.finishReason).toBe('stop');
      expect(done.completionTokens).toBeLessThan(200);
    }
  });

  it('gives logprobs: the chosen token and the top alternatives, greedy = top[0]', async () => {
    const e = await make();
    const r = await collect(e.generate(e.encode('log probabilities'), params({ maxTokens: 6, logprobs: 3 })));
    const lps = r.events.flatMap((ev) => (ev.type === 'text' ? (ev.logprobs ?? []) : []));
    expect(lps.length).toBeGreaterThan(0);
    for (const lp of lps) {
      expect(lp.top).toHaveLength(3);
      expect(lp.logprob).toBeLessThanOrEqual(0);
      expect(lp.logprob).toBeCloseTo(lp.top[0].logprob, 5);
      expect(lp.top[0].logprob).toBeGreaterThanOrEqual(lp.top[1].logprob);
    }
  });

  it('yields between tokens so two requests interleave', async () => {
    const e = await make();
    const order: string[] = [];
    const run = async (tag: string) => {
      for await (const ev of e.generate(e.encode(`request ${tag}`), params({ maxTokens: 6, temperature: 1, seed: 1 })))
        if (ev.type === 'text') order.push(tag);
    };
    await Promise.all([run('a'), run('b')]);
    const firstB = order.indexOf('b');
    expect(firstB).toBeGreaterThan(-1);
    expect(order.lastIndexOf('a')).toBeGreaterThan(firstB);
  });

  it('rejects token ids outside the vocabulary before any work', async () => {
    const e = await make();
    expect(() => e.generate([1, 99999], params())).toThrow(RangeError);
    expect(() => e.generate([], params())).toThrow(RangeError);
  });
});

describe('sampling', () => {
  const logits = new Float32Array([0, Math.log(2), Math.log(4)]); // probabilities 1/7, 2/7, 4/7
  const draw = (o: { temperature: number; topP: number; topK: number }, n = 20000) => {
    const rng = new Prng(42);
    const counts = [0, 0, 0];
    for (let i = 0; i < n; i++) counts[sampleToken(logits, o, rng)]++;
    return counts.map((c) => c / n);
  };
  it('samples the softmax distribution', () => {
    const f = draw({ temperature: 1, topP: 1, topK: 0 });
    [1 / 7, 2 / 7, 4 / 7].forEach((p, i) => expect(Math.abs(f[i] - p)).toBeLessThan(0.015));
  });
  it('temperature sharpens, top-k and top-p cut the tail', () => {
    const cold = draw({ temperature: 0.5, topP: 1, topK: 0 }); // probabilities 1/21, 4/21, 16/21
    expect(Math.abs(cold[2] - 16 / 21)).toBeLessThan(0.015);
    expect(draw({ temperature: 1, topP: 1, topK: 2 })[0]).toBe(0);
    expect(draw({ temperature: 1, topP: 0.5, topK: 0 })).toEqual([0, 0, 1]);
  });
  it('logprobs are a normalised log-softmax', () => {
    const r = logprobsOf(logits, 1, 3);
    expect(r.logprob).toBeCloseTo(Math.log(2 / 7), 6);
    expect(r.top.map(([i]) => i)).toEqual([2, 1, 0]);
    expect(r.top.reduce((a, [, lp]) => a + Math.exp(lp), 0)).toBeCloseTo(1, 6);
  });
});

describe('text', () => {
  it('streams multi-byte characters without splitting them', () => {
    const codec = new TextCodec(files().tokenizer, files().tokenizerConfig);
    const text = 'héllo wörld — 世界 🎉 ok';
    const ids = codec.encode(text);
    const d = new IncrementalDetokenizer(codec);
    const pieces = ids.map((id) => d.push(id));
    pieces.push(d.flush());
    for (const p of pieces) expect(p).not.toContain('\uFFFD');
    expect(pieces.join('')).toEqual(codec.decode(ids));
  });

  it('holds back a stop string split across pieces', () => {
    const c = new StopCutter(['STOP']);
    expect(c.push('abc ST')).toEqual({ text: 'abc ', stopped: false });
    expect(c.push('O')).toEqual({ text: '', stopped: false });
    expect(c.push('P and more')).toEqual({ text: '', stopped: true });
    const d = new StopCutter(['STOP']);
    d.push('abc ST');
    expect(d.push('ill')).toEqual({ text: 'STill', stopped: false });
  });

  it('renders the chat template', async () => {
    const e = await make();
    expect(e.applyChatTemplate([{ role: 'user', content: 'hi' }])).toBe('<role>HUMAN</role>hi<|role_end|><role>ASSISTANT</role>');
  });
});

describe('memory budget (128 MB isolate)', () => {
  it('fits the tiny model with a full-context request in f32 and int8', async () => {
    for (const quant of ['f32', 'int8'] as const) {
      const e = await make({ quant });
      expect(e.budgetBytes).toBe(ISOLATE_MEMORY_BYTES);
      expect(e.baseBytes + e.requestBytes(e.info.maxContext)).toBeLessThanOrEqual(ISOLATE_MEMORY_BYTES);
      await collect(e.generate(e.encode('fill the budget'), params({ maxTokens: 8 })));
      expect(e.wasmMemoryBytes + JS_RESERVE_BYTES).toBeLessThanOrEqual(ISOLATE_MEMORY_BYTES);
    }
  });

  it('int8 weights take about a quarter of f32', async () => {
    const f = await make({ quant: 'f32' });
    const q = await make({ quant: 'int8' });
    expect(q.baseBytes - JS_RESERVE_BYTES).toBeLessThan(0.3 * (f.baseBytes - JS_RESERVE_BYTES));
  });

  it('refuses a model that cannot fit', async () => {
    const err = await make({ quant: 'f32', memoryBudgetBytes: 32 * 2 ** 20 }).catch((e) => e);
    expect(err).toBeInstanceOf(EngineBudgetError);
    expect(err.param).toBe('model');
  });

  it('refuses a request beyond the context that fits, and a concurrent one beyond the budget', async () => {
    const probe = await make({ quant: 'int8' });
    const positions = 64;
    // room for exactly one request of 64 positions next to the model
    const budget = probe.baseBytes + probe.requestBytes(positions) + probe.requestBytes(8) / 2;
    const e = await make({ quant: 'int8', memoryBudgetBytes: budget });
    expect(() => e.generate([5, 6], params({ maxTokens: e.info.maxContext }))).toThrow(EngineBudgetError);
    const first = e.generate([5, 6, 7, 8], params({ maxTokens: positions - 4 }))[Symbol.asyncIterator]();
    await first.next(); // the first request now holds its state
    // a second one is refused at the call, before any work, while the first holds its state
    expect(() => e.generate([5, 6, 7, 8], params({ maxTokens: positions - 4 }))).toThrow(EngineBudgetError);
    while (!(await first.next()).done);
    // released: the same request runs now
    expect((await collect(e.generate([5, 6, 7, 8], params({ maxTokens: positions - 4 })))).events.at(-1)?.type).toBe('done');
  });
});
