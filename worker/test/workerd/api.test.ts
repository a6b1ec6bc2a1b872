import { describe, expect, it } from 'vitest';
import { TestEngine } from './helpers/test-engine';
import { harness, readSse } from './helpers/harness';

describe('OpenAI-compatible API', () => {
  it('serves /health without a key', async () => {
    const h = harness();
    const res = await h.call('/health');
    expect(res.status).toBe(200);
    expect(await res.json()).toMatchObject({ status: 'ok', engines: [{ model: 'ring-test', engine: 'wasm-f32' }] });
  });

  it('/health is 503 "degraded" when nothing can serve', async () => {
    const h = harness({ engines: [] });
    const res = await h.call('/health');
    expect(res.status).toBe(503);
    expect(await res.json()).toMatchObject({ status: 'degraded', engines: [], pods: [] });
  });

  it('reports usage for a given month and rejects a malformed month', async () => {
    const h = harness();
    const t = await h.createTenant();
    const past = (await (await h.call('/v1/usage?month=2001-01', { headers: t.auth })).json()) as any;
    expect(past).toMatchObject({ tenant: t.id, month: '2001-01', totals: { requests: 0 } });
    const bad = await h.call('/v1/usage?month=January', { headers: t.auth });
    expect(bad.status).toBe(400);
    expect(((await bad.json()) as any).error.param).toBe('month');
  });

  it('lists models', async () => {
    const h = harness();
    const t = await h.createTenant();
    const res = await h.call('/v1/models', { headers: t.auth });
    expect(res.status).toBe(200);
    const body = (await res.json()) as any;
    expect(body.object).toBe('list');
    expect(body.data).toEqual([expect.objectContaining({ id: 'ring-test', object: 'model', engines: ['edge:wasm-f32'], max_context: 4096 })]);
  });

  it('answers a chat completion with the chat template, usage and engine header', async () => {
    const engine = new TestEngine();
    const h = harness({ engines: [engine] });
    const t = await h.createTenant();
    const messages = [{ role: 'system', content: 'be brief' }, { role: 'user', content: 'hello' }];
    const res = await h.call('/v1/chat/completions', { method: 'POST', headers: t.auth, json: { model: 'ring-test', messages, max_tokens: 5, temperature: 0 } });
    expect(res.status).toBe(200);
    expect(res.headers.get('x-engine')).toBe('edge:wasm-f32');
    const body = (await res.json()) as any;
    const promptTokens = engine.encode(engine.applyChatTemplate(messages)).length;
    expect(body).toMatchObject({ object: 'chat.completion', model: 'ring-test', usage: { prompt_tokens: promptTokens, completion_tokens: 5, total_tokens: promptTokens + 5 } });
    expect(body.id).toMatch(/^chatcmpl-/);
    expect(body.choices).toHaveLength(1);
    expect(body.choices[0]).toMatchObject({ index: 0, finish_reason: 'length', logprobs: null, message: { role: 'assistant' } });
    expect(body.choices[0].message.content.trim().split(' ')).toHaveLength(5);
  });

  it('answers a text completion; max_completion_tokens wins over max_tokens in chat', async () => {
    const h = harness();
    const t = await h.createTenant();
    const res = await h.call('/v1/completions', { method: 'POST', headers: t.auth, json: { model: 'ring-test', prompt: 'Once', max_tokens: 3, temperature: 0 } });
    const body = (await res.json()) as any;
    expect(body).toMatchObject({ object: 'text_completion', usage: { prompt_tokens: 4, completion_tokens: 3 } });
    expect(body.id).toMatch(/^cmpl-/);
    const chat = await h.call('/v1/chat/completions', {
      method: 'POST', headers: t.auth,
      json: { model: 'ring-test', messages: [{ role: 'user', content: 'x' }], max_tokens: 9, max_completion_tokens: 2 },
    });
    expect(((await chat.json()) as any).usage.completion_tokens).toBe(2);
  });

  it('greedy decoding is deterministic and seeded sampling repeats with the same seed', async () => {
    const h = harness();
    const t = await h.createTenant();
    const ask = async (extra: object) =>
      ((await (await h.call('/v1/completions', { method: 'POST', headers: { ...t.auth, 'x-skip-cache': 'true' }, json: { model: 'ring-test', prompt: 'seed test', max_tokens: 12, ...extra } })).json()) as any).choices[0].text;
    expect(await ask({ temperature: 0 })).toBe(await ask({ temperature: 0 }));
    expect(await ask({ seed: 7, temperature: 1.5 })).toBe(await ask({ seed: 7, temperature: 1.5 }));
    const seeds = new Set(await Promise.all([1, 2, 3, 4, 5, 6].map((seed) => ask({ seed, temperature: 2 }))));
    expect(seeds.size).toBeGreaterThan(1);
  });

  it('cuts at stop strings (string or list) with finish_reason stop', async () => {
    const h = harness();
    const t = await h.createTenant();
    const full = ((await (await h.call('/v1/completions', { method: 'POST', headers: t.auth, json: { model: 'ring-test', prompt: 'p', max_tokens: 8, temperature: 0 } })).json()) as any).choices[0].text as string;
    const words = full.trim().split(' ');
    const stopWord = words[2];
    for (const stop of [stopWord, ['zzz', stopWord]]) {
      const body = (await (await h.call('/v1/completions', { method: 'POST', headers: { ...t.auth, 'x-skip-cache': '1' }, json: { model: 'ring-test', prompt: 'p', max_tokens: 8, temperature: 0, stop } })).json()) as any;
      expect(body.choices[0].finish_reason).toBe('stop');
      expect(body.choices[0].text).toBe(full.slice(0, full.indexOf(stopWord)));
    }
  });

  it('returns n choices and logprobs in the chat and legacy shapes', async () => {
    const h = harness();
    const t = await h.createTenant();
    const chat = (await (await h.call('/v1/chat/completions', {
      method: 'POST', headers: t.auth,
      json: { model: 'ring-test', messages: [{ role: 'user', content: 'hi' }], max_tokens: 3, n: 3, seed: 11, temperature: 1, logprobs: true, top_logprobs: 2 },
    })).json()) as any;
    expect(chat.choices.map((c: any) => c.index)).toEqual([0, 1, 2]);
    expect(chat.usage.completion_tokens).toBe(9);
    const lp = chat.choices[0].logprobs.content;
    expect(lp).toHaveLength(3);
    expect(lp[0]).toMatchObject({ token: expect.any(String), logprob: expect.any(Number), bytes: expect.any(Array) });
    expect(lp[0].top_logprobs).toHaveLength(2);
    expect(lp[0].logprob).toBeLessThanOrEqual(0);
    const legacy = (await (await h.call('/v1/completions', { method: 'POST', headers: t.auth, json: { model: 'ring-test', prompt: 'q', max_tokens: 2, temperature: 0, logprobs: 3 } })).json()) as any;
    const l = legacy.choices[0].logprobs;
    expect(l.tokens).toHaveLength(2);
    expect(l.token_logprobs).toHaveLength(2);
    expect(Object.keys(l.top_logprobs[0])).toHaveLength(3);
    expect(l.text_offset[0]).toBe(0);
    expect(l.text_offset[1]).toBe(l.tokens[0].length);
  });

  it('streams chat chunks ending with [DONE], usage only when asked', async () => {
    const h = harness();
    const t = await h.createTenant();
    const json = { model: 'ring-test', messages: [{ role: 'user', content: 'stream' }], max_tokens: 4, temperature: 0, stream: true };
    const res = await h.call('/v1/chat/completions', { method: 'POST', headers: t.auth, json });
    expect(res.headers.get('content-type')).toContain('text/event-stream');
    const events = await readSse(res);
    expect(events.at(-1)).toBe('[DONE]');
    const chunks = events.slice(0, -1);
    expect(chunks[0].choices[0].delta).toEqual({ role: 'assistant', content: '' });
    expect(chunks.every((c) => c.object === 'chat.completion.chunk' && c.id === chunks[0].id)).toBe(true);
    expect(chunks.at(-1).choices[0].finish_reason).toBe('length');
    expect(chunks.some((c) => 'usage' in c)).toBe(false);
    const text = chunks.map((c) => c.choices[0]?.delta?.content ?? '').join('');
    expect(text.trim().split(' ')).toHaveLength(4);

    const withUsage = await readSse(await h.call('/v1/chat/completions', { method: 'POST', headers: { ...t.auth, 'x-skip-cache': '1' }, json: { ...json, stream_options: { include_usage: true } } }));
    const last = withUsage.at(-2);
    expect(last.choices).toEqual([]);
    expect(last.usage).toMatchObject({ completion_tokens: 4 });
    expect(withUsage.slice(0, -2).every((c) => c.usage === null)).toBe(true);
  });

  it('streams text completions', async () => {
    const h = harness();
    const t = await h.createTenant();
    const events = await readSse(await h.call('/v1/completions', { method: 'POST', headers: t.auth, json: { model: 'ring-test', prompt: 'a', max_tokens: 3, temperature: 0, stream: true, stream_options: { include_usage: true } } }));
    expect(events.at(-1)).toBe('[DONE]');
    expect(events[0].object).toBe('text_completion');
    expect(events.at(-2).usage.completion_tokens).toBe(3);
  });

  it('serves an OpenAPI document built from the request schemas', async () => {
    const h = harness();
    const doc = (await (await h.call('/openapi.json')).json()) as any;
    expect(doc.openapi).toBe('3.1.0');
    expect(Object.keys(doc.paths)).toEqual(expect.arrayContaining(['/v1/chat/completions', '/v1/completions', '/v1/models', '/v1/usage']));
    const schema = doc.components.schemas.ChatCompletionRequest;
    expect(schema.required).toEqual(expect.arrayContaining(['model', 'messages']));
    expect(schema.properties.stop).toBeDefined();
  });
});
