/**
 * A stand-in GPU pod for tests inside workerd, speaking Contract 3 (docs/architecture.md) over a TestEngine,
 * with switches for the failures the worker must survive: unreachable, unhealthy, 5xx, hanging, and a
 * stream that breaks after some chunks. Reached through the fetcher injected into createApp.
 */
import { TestEngine } from './test-engine';

/** hang: /health answers, generation requests never do (an overloaded pod). */
export type PodState = 'up' | 'down' | 'unhealthy' | 'error500' | 'hang';

export interface PodRequestLog {
  path: string;
  auth: string | null;
  body: Record<string, any> | null;
}

export class TestPod {
  state: PodState = 'up';
  /** When set, streams break (the body errors) after this many chunks. */
  failAfterChunks: number | null = null;
  queueDepth = 0;
  requests: PodRequestLog[] = [];
  readonly engine: TestEngine;

  constructor(
    readonly url: string,
    readonly model = 'ring-test',
    readonly secret = 'test-pod-secret',
    tokenDelayMs = 0,
  ) {
    this.engine = new TestEngine({ id: model, tokenDelayMs });
  }

  get generationRequests() {
    return this.requests.filter((r) => r.path !== '/health');
  }

  async handle(req: Request): Promise<Response> {
    const path = new URL(req.url).pathname;
    const body = req.method === 'POST' ? ((await req.json()) as Record<string, any>) : null;
    this.requests.push({ path, auth: req.headers.get('authorization'), body });
    if (this.state === 'down') throw new TypeError('fetch failed: connection refused');
    if (this.state === 'hang' && path !== '/health') {
      await new Promise<never>((_, reject) => req.signal.addEventListener('abort', () => reject(new DOMException('aborted', 'AbortError'))));
    }
    if (req.headers.get('authorization') !== `Bearer ${this.secret}`) return error(401, 'bad pod secret');
    if (path === '/health') {
      return this.state === 'unhealthy'
        ? Response.json({ status: 'loading' }, { status: 503 })
        : Response.json({ status: 'ok', model: this.model, queue_depth: this.queueDepth, running: 0 });
    }
    if (this.state === 'error500') return error(500, 'pod exploded');
    if (this.state === 'unhealthy') return error(503, 'not ready');
    if (path !== '/v1/completions' && path !== '/v1/chat/completions') return error(404, 'no route');
    if (body?.model !== this.model) return error(404, `model ${body?.model} not served`);
    const chat = path === '/v1/chat/completions';
    const prompt = chat ? this.engine.applyChatTemplate(body.messages) : String(body.prompt);
    const ids = this.engine.encode(prompt);
    const params = {
      maxTokens: body.max_completion_tokens ?? body.max_tokens ?? 16,
      temperature: body.temperature ?? 1,
      topP: body.top_p ?? 1,
      topK: body.top_k ?? 0,
      ...(body.seed != null ? { seed: body.seed } : {}),
      stop: body.stop == null ? [] : typeof body.stop === 'string' ? [body.stop] : body.stop,
    };
    const id = 'pod-cmpl-1';
    const created = 1_700_000_000;
    if (!body.stream) {
      let text = '';
      let usage = { prompt_tokens: 0, completion_tokens: 0, total_tokens: 0 };
      let finish = 'length';
      for await (const ev of this.engine.generate(ids, params, req.signal)) {
        if (ev.type === 'text') text += ev.text;
        else {
          usage = { prompt_tokens: ev.promptTokens, completion_tokens: ev.completionTokens, total_tokens: ev.promptTokens + ev.completionTokens };
          finish = ev.finishReason;
        }
      }
      const choice = chat ? { index: 0, message: { role: 'assistant', content: text }, logprobs: null, finish_reason: finish } : { index: 0, text, logprobs: null, finish_reason: finish };
      return Response.json({ id, object: chat ? 'chat.completion' : 'text_completion', created, model: this.model, choices: [choice], usage });
    }
    const includeUsage = body.stream_options?.include_usage === true;
    const engine = this.engine;
    const failAfter = this.failAfterChunks;
    const enc = new TextEncoder();
    const object = chat ? 'chat.completion.chunk' : 'text_completion';
    const stream = new ReadableStream<Uint8Array>({
      async start(controller) {
        let sent = 0;
        const send = (data: unknown) => {
          if (failAfter !== null && sent >= failAfter) throw new Error('pod crashed mid-stream');
          controller.enqueue(enc.encode(`data: ${JSON.stringify(data)}\n\n`));
          sent++;
        };
        try {
          if (chat) send({ id, object, created, model: body.model, choices: [{ index: 0, delta: { role: 'assistant', content: '' }, finish_reason: null }] });
          for await (const ev of engine.generate(ids, params, req.signal)) {
            if (ev.type === 'text') {
              send({ id, object, created, model: body.model, choices: [chat ? { index: 0, delta: { content: ev.text }, finish_reason: null } : { index: 0, text: ev.text, finish_reason: null }] });
            } else {
              send({ id, object, created, model: body.model, choices: [chat ? { index: 0, delta: {}, finish_reason: ev.finishReason } : { index: 0, text: '', finish_reason: ev.finishReason }] });
              if (includeUsage) send({ id, object, created, model: body.model, choices: [], usage: { prompt_tokens: ev.promptTokens, completion_tokens: ev.completionTokens, total_tokens: ev.promptTokens + ev.completionTokens } });
            }
          }
          controller.enqueue(enc.encode('data: [DONE]\n\n'));
          controller.close();
        } catch (err) {
          controller.error(err);
        }
      },
    });
    return new Response(stream, { headers: { 'content-type': 'text/event-stream' } });
  }
}

function error(status: number, message: string) {
  return Response.json({ error: { message, type: 'server_error', param: null, code: null } }, { status });
}

/** A fetcher that routes requests to test pods by origin. */
export function podFetcher(pods: TestPod[]) {
  return async (input: Request | string, init?: RequestInit): Promise<Response> => {
    const req = new Request(input, init);
    const pod = pods.find((p) => req.url.startsWith(p.url));
    if (!pod) throw new TypeError(`fetch failed: no route to ${req.url}`);
    return pod.handle(req);
  };
}
