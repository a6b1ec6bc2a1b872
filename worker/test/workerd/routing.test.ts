import { describe, expect, it } from 'vitest';
import { TestEngine } from './helpers/test-engine';
import { TestPod } from './helpers/test-pod';
import { harness, readSse } from './helpers/harness';

const LONG = 'long prompt '.repeat(10); // 120 tokens > EDGE_MAX_TOKENS
const vars = { EDGE_MAX_TOKENS: '64', BREAKER_THRESHOLD: '2', BREAKER_COOLDOWN_MS: '10000', POD_HEALTH_TTL_MS: '1000', POD_TIMEOUT_MS: '200', POD_IDLE_TIMEOUT_MS: '200' };

function setup(podCount = 1, opts: { maxContext?: number; podDelayMs?: number } = {}) {
  let clock = 1_000_000;
  const pods = Array.from({ length: podCount }, (_, i) => new TestPod(`http://pod-${i}.test:8000`, 'ring-test', 'test-pod-secret', opts.podDelayMs ?? 0));
  const engine = new TestEngine({ maxContext: opts.maxContext ?? 4096 });
  const h = harness({ engines: [engine], pods, vars, now: () => clock });
  return { h, pods, engine, advance: (ms: number) => (clock += ms) };
}

const completion = (prompt: string, extra: object = {}) => ({ model: 'ring-test', prompt, max_tokens: 8, temperature: 1, ...extra });

describe('routing between the edge engine and GPU pods', () => {
  it('serves short prompts on the edge and long ones on a pod, with the pod secret and the engine header', async () => {
    const { h, pods } = setup();
    const t = await h.createTenant();
    const short = await h.call('/v1/completions', { method: 'POST', headers: t.auth, json: completion('hi') });
    expect(short.headers.get('x-engine')).toBe('edge:wasm-f32');
    expect(pods[0].generationRequests).toHaveLength(0);
    const long = await h.call('/v1/completions', { method: 'POST', headers: t.auth, json: completion(LONG, { user: 'u1' }) });
    expect(long.status).toBe(200);
    expect(long.headers.get('x-engine')).toBe('pod:0');
    const body = (await long.json()) as any;
    expect(body.usage).toMatchObject({ prompt_tokens: 120, completion_tokens: 8 });
    const sent = pods[0].generationRequests[0];
    expect(sent.path).toBe('/v1/completions');
    expect(sent.auth).toBe('Bearer test-pod-secret');
    expect(sent.body).toMatchObject({ model: 'ring-test', prompt: LONG, max_tokens: 8, user: 'u1', stream: false });
    const u = await h.usage(t.auth);
    expect(u.by_model.find((r: any) => r.engine === 'pod')).toMatchObject({ requests: 1, prompt_tokens: 120, completion_tokens: 8 });
    const models = (await (await h.call('/v1/models', { headers: t.auth })).json()) as any;
    expect(models.data).toEqual([expect.objectContaining({ id: 'ring-test', engines: ['edge:wasm-f32', 'pod'] })]);
  });

  it('routes chat by the rendered template length and streams the pod through', async () => {
    const { h, pods } = setup();
    const t = await h.createTenant();
    const res = await h.call('/v1/chat/completions', { method: 'POST', headers: t.auth, json: { model: 'ring-test', messages: [{ role: 'user', content: LONG }], max_tokens: 5, stream: true } });
    expect(res.headers.get('x-engine')).toBe('pod:0');
    const events = await readSse(res);
    await res.done();
    expect(events.at(-1)).toBe('[DONE]');
    // include_usage was forced on towards the pod, but the client did not ask for the usage chunk.
    expect(pods[0].generationRequests[0].body!.stream_options).toEqual({ include_usage: true });
    expect(events.some((e) => e !== '[DONE]' && e.choices.length === 0)).toBe(false);
    const u = await h.usage(t.auth);
    expect(u.totals.completion_tokens).toBe(5);
    expect(u.totals.prompt_tokens).toBe(new TestEngine().encode(new TestEngine().applyChatTemplate([{ role: 'user', content: LONG }])).length);
  });

  it('keeps prompts with the same leading tokens on the same pod and spreads different ones', async () => {
    const { h, pods } = setup(3);
    const t = await h.createTenant();
    const served = async (prompt: string) => (await h.call('/v1/completions', { method: 'POST', headers: t.auth, json: completion(prompt, { max_tokens: 1 }) })).headers.get('x-engine');
    const prefix = (i: number) => `${i} shared system prompt for the affinity check `.repeat(3);
    const first = await Promise.all(Array.from({ length: 12 }, (_, i) => served(prefix(i) + 'tail A')));
    const again = await Promise.all(Array.from({ length: 12 }, (_, i) => served(prefix(i) + 'different tail B')));
    expect(again).toEqual(first); // affinity: the first 32 tokens decide
    expect(new Set(first).size).toBeGreaterThanOrEqual(2); // spread
    // Take one pod out (unhealthy): only its prompts move.
    const victim = first[0]!;
    pods[Number(victim.split(':')[1])].state = 'unhealthy';
    await h.deps.pool!.refresh(true);
    const moved = await Promise.all(Array.from({ length: 12 }, (_, i) => served(prefix(i) + 'tail A')));
    moved.forEach((pod, i) => (first[i] === victim ? expect(pod).not.toBe(victim) : expect(pod).toBe(first[i])));
  });

  it('demotes a pod whose queue is much longer than the others', async () => {
    const { h, pods } = setup(2);
    const t = await h.createTenant();
    const prompt = LONG;
    const home = (await h.call('/v1/completions', { method: 'POST', headers: t.auth, json: completion(prompt) })).headers.get('x-engine')!;
    pods[Number(home.split(':')[1])].queueDepth = 50;
    await h.deps.pool!.refresh(true);
    expect((await h.call('/v1/completions', { method: 'POST', headers: t.auth, json: completion(prompt) })).headers.get('x-engine')).not.toBe(home);
  });

  it('retries another pod before the first byte, and opens the circuit of a failing pod', async () => {
    const { h, pods, advance } = setup(2);
    const t = await h.createTenant();
    // Find a prompt whose preferred pod is pod 0.
    let prompt = '';
    for (let i = 0; !prompt; i++) {
      const p = `${i} `.repeat(40);
      if ((await h.deps.pool!.candidates('ring-test', new TestEngine().encode(p).slice(0, 32).join(',')))[0].index === 0) prompt = p;
    }
    pods[0].state = 'error500';
    for (let i = 0; i < 2; i++) {
      const res = await h.call('/v1/completions', { method: 'POST', headers: t.auth, json: completion(prompt) });
      expect(res.status).toBe(200);
      expect(res.headers.get('x-engine')).toBe('pod:1');
    }
    expect(pods[0].generationRequests).toHaveLength(2);
    // Threshold reached: pod 0 is no longer tried.
    await h.call('/v1/completions', { method: 'POST', headers: t.auth, json: completion(prompt) });
    expect(pods[0].generationRequests).toHaveLength(2);
    expect((await (await h.call('/health')).json() as any).pods[0].circuit).toBe('open');
    // After the cooldown a trial request goes through and closes it.
    pods[0].state = 'up';
    advance(10_001);
    const trial = await h.call('/v1/completions', { method: 'POST', headers: t.auth, json: completion(prompt) });
    expect(trial.headers.get('x-engine')).toBe('pod:0');
    expect((await (await h.call('/health')).json() as any).pods[0].circuit).toBe('closed');
  });

  it('times out a hanging pod and falls back to the edge when the request fits there', async () => {
    const { h, pods } = setup(1);
    const t = await h.createTenant();
    pods[0].state = 'hang';
    const res = await h.call('/v1/completions', { method: 'POST', headers: t.auth, json: completion(LONG) });
    expect(res.status).toBe(200);
    expect(res.headers.get('x-engine')).toBe('edge:wasm-f32');
    expect(pods[0].generationRequests).toHaveLength(1);
  });

  it('serves on the edge while every pod is down; 503 when the request does not fit the edge', async () => {
    const { h, pods } = setup(2, { maxContext: 200 });
    const t = await h.createTenant();
    pods.forEach((p) => (p.state = 'down'));
    const fits = await h.call('/v1/completions', { method: 'POST', headers: t.auth, json: completion(LONG, { stream: true }) });
    expect(fits.headers.get('x-engine')).toBe('edge:wasm-f32');
    expect((await readSse(fits)).at(-1)).toBe('[DONE]');
    const tooLong = await h.call('/v1/completions', { method: 'POST', headers: t.auth, json: completion(LONG.repeat(2)) });
    expect(tooLong.status).toBe(503);
    expect(tooLong.headers.get('retry-after')).not.toBeNull();
  });

  it('ends a stream that breaks mid-way with an error event and meters what was delivered', async () => {
    const { h, pods, engine } = setup(2, { maxContext: 100 });
    const t = await h.createTenant();
    pods.forEach((p) => (p.failAfterChunks = 4));
    const res = await h.call('/v1/completions', { method: 'POST', headers: t.auth, json: completion(LONG, { max_tokens: 20, stream: true, stream_options: { include_usage: true } }) });
    expect(res.headers.get('x-engine')).toMatch(/^pod:[01]$/);
    const events = await readSse(res);
    await res.done();
    expect(events).not.toContain('[DONE]');
    expect(events.at(-1).error).toMatchObject({ type: 'server_error', code: 'upstream_stream_failed' });
    const delivered = events.slice(0, -1).map((e) => e.choices[0].text).join('');
    expect(events.length - 1).toBe(4);
    const u = await h.usage(t.auth);
    expect(u.totals).toMatchObject({ requests: 1, prompt_tokens: 120, completion_tokens: engine.encode(delivered).length });
    expect(u.current.open_streams).toBe(0);
    // After the first byte there is no retry: the other pod never saw the request.
    expect(pods[0].generationRequests.length + pods[1].generationRequests.length).toBe(1);
  });

  it('meters a pod stream the client aborts', async () => {
    const { h, pods, engine } = setup(1, { podDelayMs: 10 });
    const t = await h.createTenant();
    const res = await h.call('/v1/completions', { method: 'POST', headers: t.auth, json: completion(LONG, { max_tokens: 200, stream: true }) });
    const reader = res.body!.getReader();
    const dec = new TextDecoder();
    let text = '';
    for (let i = 0; i < 3; i++) text += dec.decode((await reader.read()).value);
    await reader.cancel();
    await res.done();
    const delivered = text.split('\n\n').filter((e) => e.startsWith('data: {')).map((e) => JSON.parse(e.slice(6)).choices[0].text).join('');
    const u = await h.usage(t.auth);
    expect(u.totals.prompt_tokens).toBe(120);
    expect(u.totals.completion_tokens).toBe(engine.encode(delivered).length);
    expect(u.totals.completion_tokens).toBeGreaterThan(0);
    // The pod stopped generating too.
    await new Promise((r) => setTimeout(r, 50));
    expect(pods[0].engine.lastProduced).toBeLessThan(200);
  });

  it("passes a pod's own 4xx answer through without charging", async () => {
    const { h, pods } = setup(1);
    pods[0].handle = async () => Response.json({ error: { message: 'bad stop', type: 'invalid_request_error', param: 'stop', code: null } }, { status: 400 });
    pods[0].handle = ((orig) => async (req: Request) => (new URL(req.url).pathname === '/health' ? Response.json({ status: 'ok', model: 'ring-test', queue_depth: 0 }) : orig(req)))(pods[0].handle);
    const t = await h.createTenant();
    const res = await h.call('/v1/completions', { method: 'POST', headers: t.auth, json: completion(LONG) });
    expect(res.status).toBe(400);
    expect(((await res.json()) as any).error.param).toBe('stop');
    await res.done();
    expect((await h.usage(t.auth)).totals.requests).toBe(0);
  });
});
