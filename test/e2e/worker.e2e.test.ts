// End to end: `wrangler dev` (the real worker with the embedded WASM engine) in front of a real gpu-backend pod on
// CPU, driven with the official openai client. Skips, saying why, when the pod server or the wasm build is absent.
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
// @ts-expect-error plain JS helper shared with bench/
import { DEV_KEY, ROOT, freePort, podMissing, startPod, startWorker, workerMissing } from './processes.mjs';

const MODEL = 'ring-default';
const SECRET = 'e2e-pod-secret';
const EDGE_MAX_TOKENS = 48;
const LONG_PROMPT = 'The quick brown fox jumps over the lazy dog. '.repeat(12); // ~120 tokens: over the edge limit
const run = promisify(execFile);
const missing = workerMissing() ?? podMissing();
if (missing) console.warn(`[e2e] skipped: ${missing}`);

describe.skipIf(missing !== null)('worker + pod end to end (openai client)', () => {
  let pod: any;
  let worker: any;
  let client: OpenAI;

  beforeAll(async () => {
    const [podPort, workerPort] = await Promise.all([freePort(), freePort()]);
    pod = await startPod({ port: podPort, secret: SECRET, servedName: MODEL });
    worker = await startWorker({
      port: workerPort,
      vars: { GPU_BACKENDS: pod.url, POD_SHARED_SECRET: SECRET, EDGE_MAX_TOKENS: String(EDGE_MAX_TOKENS), POD_HEALTH_TTL_MS: '500', POD_TIMEOUT_MS: '20000', POD_IDLE_TIMEOUT_MS: '5000' },
    });
    client = new OpenAI({ apiKey: DEV_KEY, baseURL: `${worker.url}/v1`, maxRetries: 0 });
  }, 360_000);

  afterAll(async () => {
    await Promise.all([worker?.stop(), pod?.stop()]);
  });

  it('lists the model with both engines', async () => {
    const models = await client.models.list();
    const ids = models.data.map((m) => m.id);
    expect(ids).toContain(MODEL);
  });

  it('chat on the edge, not streamed', async () => {
    const { data, response } = await client.chat.completions
      .create({ model: MODEL, messages: [{ role: 'user', content: 'Hello!' }], max_tokens: 8, temperature: 0 }, { headers: { 'x-skip-cache': '1' } })
      .withResponse();
    expect(response.headers.get('x-engine')).toMatch(/^edge:wasm-/);
    expect(data.object).toBe('chat.completion');
    expect(data.choices[0].message.role).toBe('assistant');
    expect(data.usage!.completion_tokens).toBeGreaterThan(0);
  });

  it('completions on the edge, streamed with usage', async () => {
    const { data: stream, response } = await client.completions
      .create({ model: MODEL, prompt: 'Once upon a time', max_tokens: 6, temperature: 0, stream: true, stream_options: { include_usage: true } })
      .withResponse();
    expect(response.headers.get('x-engine')).toMatch(/^edge:/);
    let text = '';
    let usage: any = null;
    for await (const chunk of stream) {
      text += chunk.choices[0]?.text ?? '';
      if (chunk.usage) usage = chunk.usage;
    }
    expect(usage.completion_tokens).toBeGreaterThan(0);
    expect(usage.completion_tokens).toBeLessThanOrEqual(6);
    expect(typeof text).toBe('string');
  });

  it('a cached deterministic completion answers HIT the second time', async () => {
    const req = { model: MODEL, prompt: `cache probe ${Date.now()}`, max_tokens: 5, temperature: 0 };
    const first = await client.completions.create(req).withResponse();
    const second = await client.completions.create(req).withResponse();
    expect(first.response.headers.get('x-cache-status')).toBe('MISS');
    expect(second.response.headers.get('x-cache-status')).toBe('HIT');
    expect(second.data.choices[0].text).toBe(first.data.choices[0].text);
  });

  it('routes a long prompt to the pod, streamed and not', async () => {
    const plain = await client.chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: LONG_PROMPT }], max_tokens: 8, temperature: 0 }).withResponse();
    expect(plain.response.headers.get('x-engine')).toBe('pod:0');
    expect(plain.data.usage!.prompt_tokens).toBeGreaterThan(EDGE_MAX_TOKENS);
    const { data: stream, response } = await client.completions
      .create({ model: MODEL, prompt: LONG_PROMPT, max_tokens: 8, temperature: 0, stream: true, stream_options: { include_usage: true } })
      .withResponse();
    expect(response.headers.get('x-engine')).toBe('pod:0');
    let usage: any = null;
    let chunks = 0;
    for await (const chunk of stream) {
      chunks++;
      if (chunk.usage) usage = chunk.usage;
    }
    expect(chunks).toBeGreaterThan(1);
    expect(usage.completion_tokens).toBe(8);
    const report: any = await (await fetch(`${worker.url}/v1/usage`, { headers: { authorization: `Bearer ${DEV_KEY}` } })).json();
    expect(report.by_model.find((r: any) => r.engine === 'pod').requests).toBeGreaterThanOrEqual(2);
  });

  it('admin CLI: a new tenant key works until it is revoked', async () => {
    const cli = (...args: string[]) => run('node', ['tools/admin.mjs', '--url', worker.url, ...args], { cwd: ROOT });
    const tenant = `e2e-${Date.now()}`;
    await cli('tenants', 'create', tenant, '--rpm', '100');
    const created = JSON.parse((await cli('keys', 'create', tenant, '--models', MODEL)).stdout);
    const own = new OpenAI({ apiKey: created.key, baseURL: `${worker.url}/v1`, maxRetries: 0 });
    expect((await own.models.list()).data.map((m) => m.id)).toEqual([MODEL]);
    await cli('keys', 'revoke', tenant, created.id);
    await expect(own.models.list()).rejects.toBeInstanceOf(OpenAI.AuthenticationError);
    const usage = JSON.parse((await cli('usage', tenant)).stdout);
    expect(usage.tenant).toBe(tenant);
  });

  it('a client that aborts a pod stream is metered for what it got, and its stream slot is freed', async () => {
    const usage = async () => (await (await fetch(`${worker.url}/v1/usage`, { headers: { authorization: `Bearer ${DEV_KEY}` } })).json()) as any;
    const podTokens = (r: any) => r.by_model.filter((x: any) => x.engine === 'pod').reduce((s: number, x: any) => s + x.completion_tokens, 0);
    const before = podTokens(await usage());
    const abort = new AbortController();
    const stream = await client.completions.create(
      { model: MODEL, prompt: LONG_PROMPT, max_tokens: 1500, temperature: 0.7, seed: 2, stream: true },
      { signal: abort.signal, headers: { 'x-skip-cache': '1' } },
    );
    let received = 0;
    try {
      for await (const _ of stream) if (++received === 3) abort.abort();
    } catch {
      // the client may end the iteration with an abort error or silently, depending on timing
    }
    expect(received).toBeGreaterThanOrEqual(3);
    expect(received).toBeLessThan(50);
    let report: any;
    for (let i = 0; i < 40; i++) {
      report = await usage();
      if (report.current.open_streams === 0 && podTokens(report) > before) break;
      await new Promise((r) => setTimeout(r, 250));
    }
    expect(report.current.open_streams).toBe(0);
    expect(podTokens(report) - before).toBeGreaterThanOrEqual(2);
    expect(podTokens(report) - before).toBeLessThan(1500);
  });

  it('when the pod stops: a stream breaks with an error event, then long prompts fall back to the edge', async () => {
    const { data: stream, response } = await client.completions
      .create({ model: MODEL, prompt: LONG_PROMPT, max_tokens: 2000, temperature: 0.7, seed: 1, stream: true }, { headers: { 'x-skip-cache': '1' } })
      .withResponse();
    expect(response.headers.get('x-engine')).toBe('pod:0');
    let received = 0;
    const consume = (async () => {
      for await (const chunk of stream) {
        received++;
        if (received === 3) void pod.stop('SIGKILL');
      }
    })();
    await expect(consume).rejects.toThrow(/GPU pod failed/);
    expect(received).toBeGreaterThanOrEqual(3);
    // What was delivered is metered for the pod.
    const report: any = await (await fetch(`${worker.url}/v1/usage`, { headers: { authorization: `Bearer ${DEV_KEY}` } })).json();
    expect(report.current.open_streams).toBe(0);

    const fallback = await client.completions.create({ model: MODEL, prompt: LONG_PROMPT, max_tokens: 8, temperature: 0 }, { headers: { 'x-skip-cache': '1' } }).withResponse();
    expect(fallback.response.headers.get('x-engine')).toMatch(/^edge:wasm-/);
    expect(fallback.data.usage!.prompt_tokens).toBeGreaterThan(EDGE_MAX_TOKENS);

    // Longer than the edge engine accepts and no pod: 503 with Retry-After.
    const huge = 'word '.repeat(6000);
    const err = await client.completions.create({ model: MODEL, prompt: huge, max_tokens: 4 }).catch((e) => e);
    expect(err).toBeInstanceOf(OpenAI.APIError);
    expect(err.status).toBe(503);
    expect(Number(err.headers.get('retry-after'))).toBeGreaterThanOrEqual(1);
  });
});
