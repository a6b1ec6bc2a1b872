import { describe, expect, it } from 'vitest';
import { TestEngine } from './helpers/test-engine';
import { harness, readSse } from './helpers/harness';

const completion = (extra: object = {}) => ({ model: 'ring-test', prompt: 'abcd', max_tokens: 6, temperature: 0, ...extra });

describe('per-tenant limits, held exactly under concurrency', () => {
  it('requests per minute', async () => {
    const h = harness();
    const t = await h.createTenant({ requestsPerMinute: 5 });
    const results = await Promise.all(
      Array.from({ length: 12 }, () => h.call('/v1/completions', { method: 'POST', headers: { ...t.auth, 'x-skip-cache': '1' }, json: completion() })),
    );
    const statuses = results.map((r) => r.status).sort();
    expect(statuses.filter((s) => s === 200)).toHaveLength(5);
    expect(statuses.filter((s) => s === 429)).toHaveLength(7);
    const limited = results.find((r) => r.status === 429)!;
    const retry = Number(limited.headers.get('retry-after'));
    expect(retry).toBeGreaterThanOrEqual(1);
    expect(retry).toBeLessThanOrEqual(60);
    const u = await h.usage(t.auth);
    expect(u.totals.requests).toBe(5);
  });

  it('tokens per minute: reservations of prompt + max_tokens, settled to actual use', async () => {
    const h = harness();
    const t = await h.createTenant({ tokensPerMinute: 50 }); // each request reserves 4 + 6 = 10
    const results = await Promise.all(
      Array.from({ length: 9 }, () => h.call('/v1/completions', { method: 'POST', headers: { ...t.auth, 'x-skip-cache': '1' }, json: completion() })),
    );
    expect(results.filter((r) => r.status === 200)).toHaveLength(5);
    const limited = results.filter((r) => r.status === 429);
    expect(limited).toHaveLength(4);
    expect(((await limited[0].json()) as any).error.code).toBe('rate_limit_tokens_per_minute');
    const u = await h.usage(t.auth);
    expect(u.current.tokens_last_minute).toBe(50);
    expect(u.totals.total_tokens).toBe(50);
    // A single request larger than the whole limit is refused outright.
    const big = await h.call('/v1/completions', { method: 'POST', headers: t.auth, json: completion({ max_tokens: 60 }) });
    expect(big.status).toBe(429);
    expect(((await big.json()) as any).error.message).toMatch(/Lower max_tokens/);
  });

  it('concurrent streams', async () => {
    // Streams of 30 tokens at 20 ms each stay open for about 600 ms: long enough for the checks below.
    const h = harness({ engines: [new TestEngine({ tokenDelayMs: 20 })] });
    const t = await h.createTenant({ concurrentStreams: 2 });
    const open = await Promise.all([1, 2].map(() => h.call('/v1/completions', { method: 'POST', headers: t.auth, json: completion({ max_tokens: 30, stream: true }) })));
    expect(open.map((r) => r.status)).toEqual([200, 200]);
    const third = await h.call('/v1/completions', { method: 'POST', headers: t.auth, json: completion({ max_tokens: 30, stream: true }) });
    expect(third.status).toBe(429);
    expect(((await third.json()) as any).error.code).toBe('rate_limit_concurrent_streams');
    // Non-streaming requests are not streams.
    expect((await h.call('/v1/completions', { method: 'POST', headers: t.auth, json: completion({ max_tokens: 1 }) })).status).toBe(200);
    await Promise.all(open.map(async (r) => (await readSse(r), await r.done())));
    expect((await h.usage(t.auth)).current.open_streams).toBe(0);
    const after = await h.call('/v1/completions', { method: 'POST', headers: t.auth, json: completion({ max_tokens: 2, stream: true }) });
    expect(after.status).toBe(200);
    await readSse(after);
  });

  it('monthly token quota', async () => {
    const h = harness();
    const t = await h.createTenant({ monthlyTokens: 30 });
    for (let i = 0; i < 3; i++) expect((await h.call('/v1/completions', { method: 'POST', headers: { ...t.auth, 'x-skip-cache': '1' }, json: completion() })).status).toBe(200);
    const res = await h.call('/v1/completions', { method: 'POST', headers: { ...t.auth, 'x-skip-cache': '1' }, json: completion() });
    expect(res.status).toBe(429);
    const err = ((await res.json()) as any).error;
    expect(err).toMatchObject({ type: 'insufficient_quota', code: 'insufficient_quota' });
    expect(Number(res.headers.get('retry-after'))).toBeGreaterThan(0);
    expect((await h.usage(t.auth)).totals.total_tokens).toBe(30);
  });
});

describe('exact metering', () => {
  it('meters prompt and completion tokens of concurrent mixed requests exactly', async () => {
    const engine = new TestEngine({ tokenDelayMs: 1 });
    const h = harness({ engines: [engine] });
    const t = await h.createTenant();
    const jobs = Array.from({ length: 16 }, (_, i) => ({
      path: i % 2 ? '/v1/completions' : '/v1/chat/completions',
      json: i % 2
        ? { model: 'ring-test', prompt: `prompt number ${i}`, max_tokens: 1 + (i % 5), temperature: 1, stream: i % 4 === 1, stream_options: i % 4 === 1 ? { include_usage: true } : undefined }
        : { model: 'ring-test', messages: [{ role: 'user', content: `message ${i}` }], max_tokens: 2 + (i % 3), n: 1 + (i % 3 === 0 ? 1 : 0), temperature: 1, stream: i % 4 === 2, stream_options: i % 4 === 2 ? { include_usage: true } : undefined },
    }));
    const answers = await Promise.all(
      jobs.map(async (j) => {
        const res = await h.call(j.path, { method: 'POST', headers: t.auth, json: j.json });
        expect(res.status).toBe(200);
        const usage = j.json.stream ? (await readSse(res)).at(-2).usage : ((await res.json()) as any).usage;
        await res.done();
        return usage as { prompt_tokens: number; completion_tokens: number };
      }),
    );
    const u = await h.usage(t.auth);
    const sum = (f: 'prompt_tokens' | 'completion_tokens') => answers.reduce((s, a) => s + a[f], 0);
    expect(u.totals).toMatchObject({ requests: 16, prompt_tokens: sum('prompt_tokens'), completion_tokens: sum('completion_tokens') });
    expect(u.by_model).toEqual([expect.objectContaining({ model: 'ring-test', engine: 'edge:wasm-f32', requests: 16 })]);
  });

  it('meters a stream the client aborts: the tokens produced until the abort', async () => {
    const engine = new TestEngine({ tokenDelayMs: 10 });
    const h = harness({ engines: [engine] });
    const t = await h.createTenant();
    const res = await h.call('/v1/completions', { method: 'POST', headers: t.auth, json: completion({ max_tokens: 200, stream: true, temperature: 1 }) });
    const reader = res.body!.getReader();
    for (let i = 0; i < 3; i++) await reader.read();
    await reader.cancel();
    await res.done();
    const u = await h.usage(t.auth);
    expect(engine.lastProduced).toBeGreaterThanOrEqual(3);
    expect(engine.lastProduced).toBeLessThan(200);
    expect(u.totals).toMatchObject({ requests: 1, prompt_tokens: 4, completion_tokens: engine.lastProduced });
    expect(u.current.open_streams).toBe(0);
  });

  it('never charges rejected requests', async () => {
    const h = harness({ engines: [new TestEngine({ maxContext: 32 })] });
    const t = await h.createTenant({}, ['ring-test']);
    await h.call('/v1/completions', { method: 'POST', headers: t.auth, json: { model: 'ring-test', prompt: 'x'.repeat(40) } }); // 400 context
    await h.call('/v1/completions', { method: 'POST', headers: t.auth, json: { model: 'nope', prompt: 'x' } }); // 404
    await h.call('/v1/completions', { method: 'POST', headers: t.auth, json: { model: 'ring-test', prompt: 'x', temperature: 9 } }); // 400
    const u = await h.usage(t.auth);
    expect(u.totals).toMatchObject({ requests: 0, prompt_tokens: 0, completion_tokens: 0 });
    expect(u.current.requests_last_minute).toBe(0);
  });
});
