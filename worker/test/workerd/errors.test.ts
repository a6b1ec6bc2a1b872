import { describe, expect, it } from 'vitest';
import { TestEngine } from './helpers/test-engine';
import { TestPod } from './helpers/test-pod';
import { harness } from './helpers/harness';

async function expectError(res: Response, status: number, code: string | null, param?: string | null) {
  expect(res.status).toBe(status);
  const body = (await res.json()) as any;
  expect(Object.keys(body)).toEqual(['error']);
  expect(Object.keys(body.error).sort()).toEqual(['code', 'message', 'param', 'type']);
  expect(body.error.code).toBe(code);
  if (param !== undefined) expect(body.error.param).toBe(param);
  expect(body.error.message.length).toBeGreaterThan(5);
  return body.error;
}

const chat = (extra: object = {}) => ({ model: 'ring-test', messages: [{ role: 'user', content: 'hi' }], max_tokens: 2, ...extra });

describe('errors in the OpenAI shape', () => {
  it('400 for schema violations, naming the field', async () => {
    const h = harness();
    const t = await h.createTenant();
    const cases: [object, string][] = [
      [{ model: 'ring-test' }, 'messages'],
      [chat({ temperature: 3 }), 'temperature'],
      [chat({ top_p: 0 }), 'top_p'],
      [chat({ max_tokens: 0 }), 'max_tokens'],
      [chat({ n: 0 }), 'n'],
      [chat({ stop: ['a', 'b', 'c', 'd', 'e'] }), 'stop'],
      [chat({ top_logprobs: 3 }), 'top_logprobs'],
      [chat({ messages: [{ role: 'wizard', content: 'x' }] }), 'messages.0.role'],
      [chat({ seed: 1.5 }), 'seed'],
    ];
    for (const [json, param] of cases) {
      const err = await expectError(await h.call('/v1/chat/completions', { method: 'POST', headers: t.auth, json }), 400, 'invalid_request', param);
      expect(err.type).toBe('invalid_request_error');
    }
    await expectError(await h.call('/v1/completions', { method: 'POST', headers: t.auth, json: { model: 'ring-test', prompt: 'x', logprobs: 6 } }), 400, 'invalid_request', 'logprobs');
  });

  it('400 for a malformed JSON body and for a bad cache TTL header', async () => {
    const h = harness();
    const t = await h.createTenant();
    const res = await h.call('/v1/chat/completions', { method: 'POST', headers: { ...t.auth, 'content-type': 'application/json' }, body: '{"model": ' });
    await expectError(res, 400, 'invalid_request');
    await expectError(await h.call('/v1/chat/completions', { method: 'POST', headers: { ...t.auth, 'x-cache-ttl': '-5' }, json: chat({ temperature: 0 }) }), 400, 'invalid_header', 'x-cache-ttl');
  });

  it('400 context_length_exceeded when the edge cannot fit and no pod is configured', async () => {
    const h = harness({ engines: [new TestEngine({ maxContext: 64 })] });
    const t = await h.createTenant();
    await expectError(await h.call('/v1/completions', { method: 'POST', headers: t.auth, json: { model: 'ring-test', prompt: 'x'.repeat(60), max_tokens: 10 } }), 400, 'context_length_exceeded', 'max_tokens');
    expect((await h.usage(t.auth)).totals.requests).toBe(0);
  });

  it('401 for a missing, malformed, unknown or wrong key', async () => {
    const h = harness();
    const t = await h.createTenant();
    await expectError(await h.call('/v1/models'), 401, 'missing_api_key');
    await expectError(await h.call('/v1/models', { headers: { authorization: 'Bearer nonsense' } }), 401, 'invalid_api_key');
    const wrongSecret = t.key.slice(0, -3) + (t.key.endsWith('aaa') ? 'bbb' : 'aaa');
    await expectError(await h.call('/v1/models', { headers: { authorization: `Bearer ${wrongSecret}` } }), 401, 'invalid_api_key');
    const otherTenant = t.key.replace(`rk_${t.id}_`, 'rk_nobody_');
    await expectError(await h.call('/v1/models', { headers: { authorization: `Bearer ${otherTenant}` } }), 401, 'invalid_api_key');
    // A key is checked before the body.
    await expectError(await h.call('/v1/chat/completions', { method: 'POST', headers: { authorization: `Bearer ${wrongSecret}` }, json: {} }), 401, 'invalid_api_key');
  });

  it('403 for a model outside the key scope, 404 for an unknown model', async () => {
    const h = harness({ engines: [new TestEngine(), new TestEngine({ id: 'ring-other' })] });
    const t = await h.createTenant({}, ['ring-other']);
    await expectError(await h.call('/v1/chat/completions', { method: 'POST', headers: t.auth, json: chat() }), 403, 'model_not_allowed', 'model');
    await expectError(await h.call('/v1/chat/completions', { method: 'POST', headers: t.auth, json: chat({ model: 'gpt-4' }) }), 404, 'model_not_found', 'model');
    const ok = await h.call('/v1/chat/completions', { method: 'POST', headers: t.auth, json: chat({ model: 'ring-other' }) });
    expect(ok.status).toBe(200);
    const models = (await (await h.call('/v1/models', { headers: t.auth })).json()) as any;
    expect(models.data.map((m: any) => m.id)).toEqual(['ring-other']);
  });

  it('413 for a body over the limit', async () => {
    const h = harness({ vars: { MAX_BODY_BYTES: '2000' } });
    const t = await h.createTenant();
    const res = await h.call('/v1/completions', { method: 'POST', headers: t.auth, json: { model: 'ring-test', prompt: 'x'.repeat(3000) } });
    await expectError(res, 413, 'request_too_large');
  });

  it('429 with Retry-After for limits (detailed in limits.test.ts)', async () => {
    const h = harness();
    const t = await h.createTenant({ requestsPerMinute: 1 });
    expect((await h.call('/v1/chat/completions', { method: 'POST', headers: t.auth, json: chat() })).status).toBe(200);
    const res = await h.call('/v1/chat/completions', { method: 'POST', headers: t.auth, json: chat() });
    const err = await expectError(res, 429, 'rate_limit_requests_per_minute');
    expect(err.type).toBe('rate_limit_error');
    expect(Number(res.headers.get('retry-after'))).toBeGreaterThanOrEqual(1);
  });

  it('503 with Retry-After when no engine can serve', async () => {
    const pod = new TestPod('http://pod-a.test');
    pod.state = 'down';
    const h = harness({ engines: [new TestEngine({ maxContext: 64 })], pods: [pod] });
    const t = await h.createTenant();
    const res = await h.call('/v1/completions', { method: 'POST', headers: t.auth, json: { model: 'ring-test', prompt: 'x'.repeat(100), max_tokens: 4 } });
    await expectError(res, 503, 'no_engine_available');
    expect(Number(res.headers.get('retry-after'))).toBeGreaterThanOrEqual(1);
    expect((await h.usage(t.auth)).totals).toMatchObject({ requests: 0, prompt_tokens: 0, completion_tokens: 0 });
  });

  it('404 in the OpenAI shape for unknown paths', async () => {
    const h = harness();
    await expectError(await h.call('/v2/nothing'), 404, 'not_found');
  });
});
