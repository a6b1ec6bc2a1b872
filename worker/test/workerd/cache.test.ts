import { describe, expect, it } from 'vitest';
import { TestEngine } from './helpers/test-engine';
import { harness, readSse } from './helpers/harness';

const req = (extra: object = {}) => ({ model: 'ring-test', messages: [{ role: 'user', content: 'cache me' }], max_tokens: 5, temperature: 0, ...extra });

function setup(vars: Record<string, string> = {}) {
  const engine = new TestEngine();
  const h = harness({ engines: [engine], vars });
  const ask = async (auth: Record<string, string>, json: object, headers: Record<string, string> = {}) => {
    const res = await h.call('/v1/chat/completions', { method: 'POST', headers: { ...auth, ...headers }, json });
    expect(res.status).toBe(200);
    const status = res.headers.get('x-cache-status');
    const engineHeader = res.headers.get('x-engine');
    const body = (json as any).stream ? await readSse(res) : await res.json();
    await res.done();
    return { status, engine: engineHeader, body: body as any };
  };
  return { engine, h, ask };
}

describe('completion cache', () => {
  it('caches deterministic completions per tenant: MISS, then HIT without running the engine', async () => {
    const { engine, h, ask } = setup();
    const t = await h.createTenant();
    const first = await ask(t.auth, req());
    expect(first.status).toBe('MISS');
    const calls = engine.generateCalls;
    const second = await ask(t.auth, req());
    expect(second).toMatchObject({ status: 'HIT', engine: 'cache' });
    expect(engine.generateCalls).toBe(calls);
    expect(second.body.choices).toEqual(first.body.choices);
    expect(second.body.id).not.toBe(first.body.id);
    const u = await h.usage(t.auth);
    // The hit is metered as a hit; only the first request is charged.
    expect(u.totals).toMatchObject({ requests: 2, cache_hits: 1, cached_tokens: first.body.usage.total_tokens, total_tokens: first.body.usage.total_tokens });
    expect(u.by_model.find((r: any) => r.engine === 'cache')).toMatchObject({ cache_hits: 1, prompt_tokens: 0, completion_tokens: 0 });
  });

  it('replays a cached answer as SSE, and caches a streamed answer', async () => {
    const { h, ask } = setup();
    const t = await h.createTenant();
    const plain = await ask(t.auth, req());
    const streamed = await ask(t.auth, req({ stream: true, stream_options: { include_usage: true } }));
    expect(streamed.status).toBe('HIT');
    expect(streamed.body.at(-1)).toBe('[DONE]');
    expect(streamed.body[0].choices[0].delta.role).toBe('assistant');
    const text = streamed.body.slice(0, -1).map((c: any) => c.choices[0]?.delta?.content ?? '').join('');
    expect(text).toBe(plain.body.choices[0].message.content);
    expect(streamed.body.at(-2).usage).toEqual(plain.body.usage);

    const other = req({ max_tokens: 4, stream: true });
    const miss = await ask(t.auth, other);
    expect(miss.status).toBe('MISS');
    const hit = await ask(t.auth, { ...other, stream: false });
    expect(hit.status).toBe('HIT');
    expect(hit.body.choices[0].message.content).toBe(miss.body.slice(0, -1).map((c: any) => c.choices[0]?.delta?.content ?? '').join(''));
  });

  it('is never shared across tenants', async () => {
    const { h, ask } = setup();
    const a = await h.createTenant();
    const b = await h.createTenant();
    expect((await ask(a.auth, req())).status).toBe('MISS');
    expect((await ask(a.auth, req())).status).toBe('HIT');
    expect((await ask(b.auth, req())).status).toBe('MISS');
    expect((await h.usage(b.auth)).totals.cache_hits).toBe(0);
  });

  it('caches seeded sampling, bypasses unseeded sampling', async () => {
    const { h, ask } = setup();
    const t = await h.createTenant();
    expect((await ask(t.auth, req({ temperature: 0.8, seed: 3 }))).status).toBe('MISS');
    expect((await ask(t.auth, req({ temperature: 0.8, seed: 3 }))).status).toBe('HIT');
    expect((await ask(t.auth, req({ temperature: 0.8, seed: 4 }))).status).toBe('MISS');
    expect((await ask(t.auth, req({ temperature: 0.8 }))).status).toBe('BYPASS');
    expect((await ask(t.auth, req({ temperature: 0.8 }))).status).toBe('BYPASS');
  });

  it('normalises parameters: greedy ignores seed and top_p; max_tokens and stop matter', async () => {
    const { h, ask } = setup();
    const t = await h.createTenant();
    await ask(t.auth, req());
    expect((await ask(t.auth, req({ seed: 99, top_p: 0.5, user: 'someone' }))).status).toBe('HIT');
    expect((await ask(t.auth, req({ max_tokens: 6 }))).status).toBe('MISS');
    await ask(t.auth, req({ stop: ['b', 'a'] }));
    expect((await ask(t.auth, req({ stop: ['a', 'b'] }))).status).toBe('HIT');
  });

  it('honours the skip header and bypasses long prompts', async () => {
    const { engine, h, ask } = setup({ CACHE_MAX_PROMPT_TOKENS: '40' });
    const t = await h.createTenant();
    await ask(t.auth, req());
    const calls = engine.generateCalls;
    expect((await ask(t.auth, req(), { 'x-skip-cache': 'true' })).status).toBe('BYPASS');
    expect(engine.generateCalls).toBe(calls + 1);
    const long = req({ messages: [{ role: 'user', content: 'x'.repeat(50) }] });
    expect((await ask(t.auth, long)).status).toBe('BYPASS');
    expect((await ask(t.auth, long)).status).toBe('BYPASS');
  });

  it('expires entries after the TTL given in x-cache-ttl', async () => {
    const { h, ask } = setup();
    const t = await h.createTenant();
    expect((await ask(t.auth, req(), { 'x-cache-ttl': '1' })).status).toBe('MISS');
    expect((await ask(t.auth, req())).status).toBe('HIT');
    await new Promise((r) => setTimeout(r, 2100));
    expect((await ask(t.auth, req())).status).toBe('MISS');
  });
});
