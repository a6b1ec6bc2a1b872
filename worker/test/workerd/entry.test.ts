// The production entry (worker/src/index.ts) with the real embedded WASM engine, inside workerd.
import { env, exports } from 'cloudflare:workers';
import { describe, expect, it } from 'vitest';
import type { Env } from '../../src/env';

const devKey = (env as unknown as Env).DEV_API_KEY!;
const worker = (exports as unknown as { default: Fetcher }).default;
const auth = { authorization: `Bearer ${devKey}`, 'content-type': 'application/json' };

describe('production entry with the embedded engine', () => {
  it('loads the engine and reports it on /health', { timeout: 120_000 }, async () => {
    const res = await worker.fetch('http://worker.test/health');
    expect(res.status).toBe(200);
    const body = (await res.json()) as any;
    expect(body.engines).toEqual([expect.objectContaining({ model: 'ring-default', engine: expect.stringMatching(/^wasm-/) })]);
    expect(body.engines[0].max_context).toBeGreaterThan(64);
  });

  it('answers chat with the model chat template, deterministically at temperature 0', { timeout: 60_000 }, async () => {
    const json = { model: 'ring-default', messages: [{ role: 'user', content: 'Hello' }], max_tokens: 8, temperature: 0 };
    const ask = async () => {
      const res = await worker.fetch('http://worker.test/v1/chat/completions', { method: 'POST', headers: { ...auth, 'x-skip-cache': '1' }, body: JSON.stringify(json) });
      expect(res.status).toBe(200);
      expect(res.headers.get('x-engine')).toMatch(/^edge:wasm-/);
      return (await res.json()) as any;
    };
    const a = await ask();
    const b = await ask();
    expect(a.choices[0].message.content).toBe(b.choices[0].message.content);
    expect(a.usage.completion_tokens).toBeGreaterThan(0);
    expect(a.usage.completion_tokens).toBeLessThanOrEqual(8);
    expect(a.usage.prompt_tokens).toBeGreaterThan(1);
  });

  it('streams a completion and meters it for the dev tenant', { timeout: 60_000 }, async () => {
    const before = (await (await worker.fetch('http://worker.test/v1/usage', { headers: auth })).json()) as any;
    const res = await worker.fetch('http://worker.test/v1/completions', {
      method: 'POST',
      headers: auth,
      body: JSON.stringify({ model: 'ring-default', prompt: 'Once upon a time', max_tokens: 6, seed: 5, temperature: 0.8, stream: true, stream_options: { include_usage: true } }),
    });
    const events = (await res.text()).split('\n\n').filter(Boolean);
    expect(events.at(-1)).toBe('data: [DONE]');
    const usage = JSON.parse(events.at(-2)!.slice(6)).usage;
    await new Promise((r) => setTimeout(r, 100)); // settle runs in waitUntil
    const after = (await (await worker.fetch('http://worker.test/v1/usage', { headers: auth })).json()) as any;
    expect(after.totals.completion_tokens - before.totals.completion_tokens).toBe(usage.completion_tokens);
    expect(after.totals.prompt_tokens - before.totals.prompt_tokens).toBe(usage.prompt_tokens);
  });
});
