/**
 * Forwarding to GPU pods (Contract 3 of docs/architecture.md). Attempts go to pods in the pool's order and
 * are retried only while nothing has reached the client; a streamed answer is passed through event by event,
 * with the usage the pod reports (stream_options.include_usage is forced on) or, when the stream breaks or
 * the client leaves, the tokens actually delivered.
 */
import type { Fetcher, Pod, PodPool } from '../routing/pod-pool';
import { ChoiceCollector, type CompletionResult, type GenerationJob, type TokenUsage, usageOf } from './job';
import type { SseSink } from './sse';
import { sseEvents } from './sse';

export interface PodCallSettings {
  attempts: number;
  timeoutMs: number;
  idleTimeoutMs: number;
}

export type PodOutcome =
  | { kind: 'stream'; pod: Pod; response: Response; abort: AbortController }
  | { kind: 'json'; pod: Pod; body: Record<string, unknown>; status: number }
  /** The pod rejected the request itself (4xx): passed to the client unchanged, nothing charged. */
  | { kind: 'rejected'; pod: Pod; status: number; body: string }
  | { kind: 'unavailable' };

const encoder = new TextEncoder();

function podBody(job: GenerationJob): string {
  const body: Record<string, unknown> = { ...job.body, stream: job.stream };
  if (job.stream) body.stream_options = { include_usage: true };
  return JSON.stringify(body);
}

/** Tries pods in order until one answers; for non-stream requests the whole answer must arrive in time. */
export async function callPods(
  pool: PodPool,
  order: Pod[],
  job: GenerationJob,
  settings: PodCallSettings,
  fetcher: Fetcher,
  clientSignal?: AbortSignal,
): Promise<PodOutcome> {
  const path = job.kind === 'chat' ? '/v1/chat/completions' : '/v1/completions';
  const body = podBody(job);
  for (const pod of order.slice(0, settings.attempts)) {
    if (clientSignal?.aborted) break;
    const abort = new AbortController();
    const onClientAbort = () => abort.abort();
    clientSignal?.addEventListener('abort', onClientAbort);
    const timer = setTimeout(() => abort.abort(new Error('pod timeout')), settings.timeoutMs);
    let response: Response;
    try {
      response = await fetcher(`${pod.id}${path}`, {
        method: 'POST',
        headers: { 'content-type': 'application/json', authorization: `Bearer ${pool.secret}` },
        body,
        signal: abort.signal,
      });
    } catch {
      clearTimeout(timer);
      clientSignal?.removeEventListener('abort', onClientAbort);
      pool.recordFailure(pod, true);
      continue;
    }
    if (response.status >= 500 || response.status === 429) {
      clearTimeout(timer);
      clientSignal?.removeEventListener('abort', onClientAbort);
      await response.body?.cancel().catch(() => {});
      pool.recordFailure(pod);
      continue;
    }
    if (!response.ok) {
      clearTimeout(timer);
      clientSignal?.removeEventListener('abort', onClientAbort);
      return { kind: 'rejected', pod, status: response.status, body: await response.text() };
    }
    if (job.stream) {
      clearTimeout(timer); // from here the idle timeout of pipePodStream applies
      return { kind: 'stream', pod, response, abort };
    }
    try {
      const parsed = (await response.json()) as Record<string, unknown>;
      pool.recordSuccess(pod);
      return { kind: 'json', pod, body: parsed, status: response.status };
    } catch {
      pool.recordFailure(pod); // broken or late body: nothing reached the client yet, so the next pod may try
    } finally {
      clearTimeout(timer);
      clientSignal?.removeEventListener('abort', onClientAbort);
    }
  }
  return { kind: 'unavailable' };
}

/** Reads a pod's non-stream answer into the engine-neutral form (for the cache). */
export function podResultOf(job: GenerationJob, body: Record<string, unknown>): CompletionResult | null {
  const choices = body.choices as { index: number; text?: string; message?: { content?: string }; finish_reason?: string }[] | undefined;
  const usage = body.usage as TokenUsage | undefined;
  if (!Array.isArray(choices) || !usage) return null;
  return {
    id: String(body.id ?? ''),
    created: Number(body.created ?? Math.floor(Date.now() / 1000)),
    model: String(body.model ?? job.model),
    choices: choices.map((c) => ({
      index: c.index,
      text: (job.kind === 'chat' ? c.message?.content : c.text) ?? '',
      finishReason: c.finish_reason ?? 'stop',
      logprobs: null,
    })),
    usage,
  };
}

export interface PipeResult {
  usage: TokenUsage;
  /** The stream broke (error event, timeout, truncation); an error event was sent to the client. */
  failed: boolean;
  /** The client left before the end. */
  aborted: boolean;
  /** The complete answer, when the stream finished normally. */
  result: CompletionResult | null;
}

class IdleTimeout extends Error {}

/** Passes a pod's SSE stream to the client; returns the usage to meter. */
export async function pipePodStream(
  job: GenerationJob,
  outcome: Extract<PodOutcome, { kind: 'stream' }>,
  sink: SseSink,
  signal: AbortSignal,
  settings: PodCallSettings,
  pool: PodPool,
  countTokens: ((text: string) => number) | null,
): Promise<PipeResult> {
  const reader = outcome.response.body!.getReader();
  const collector = new ChoiceCollector(false);
  const contentChunks = new Map<number, number>();
  let reported: TokenUsage | null = null;
  let sawDone = false;
  let failed = false;
  let meta = { id: '', created: 0, model: job.model };
  const onAbort = () => {
    outcome.abort.abort();
    reader.cancel().catch(() => {});
  };
  signal.addEventListener('abort', onAbort);

  const readChunk = (r: ReadableStreamDefaultReader<Uint8Array>) =>
    new Promise<ReadableStreamReadResult<Uint8Array>>((resolve, reject) => {
      const timer = setTimeout(() => reject(new IdleTimeout()), settings.idleTimeoutMs);
      r.read().then(
        (v) => (clearTimeout(timer), resolve(v)),
        (e) => (clearTimeout(timer), reject(e)),
      );
    });

  try {
    for await (const ev of sseEvents(reader, readChunk)) {
      if (signal.aborted) break;
      if (ev.data === null) continue;
      if (ev.data === '[DONE]') {
        sawDone = true;
        sink.send('[DONE]');
        break;
      }
      let chunk: Record<string, any>;
      try {
        chunk = JSON.parse(ev.data);
      } catch {
        failed = true;
        break;
      }
      if (chunk.error) {
        sink.raw(encoder.encode(`${ev.raw}\n\n`));
        failed = true;
        break;
      }
      if (chunk.usage) reported = chunk.usage as TokenUsage;
      const choices = Array.isArray(chunk.choices) ? chunk.choices : [];
      if (choices.length === 0 && chunk.usage && !job.includeUsage) continue; // usage was forced on for metering only
      meta = { id: String(chunk.id ?? meta.id), created: Number(chunk.created ?? meta.created), model: String(chunk.model ?? meta.model) };
      sink.raw(encoder.encode(`${ev.raw}\n\n`));
      for (const c of choices) {
        const text: string | undefined = job.kind === 'chat' ? c.delta?.content : c.text;
        if (text) {
          collector.add({ type: 'delta', index: c.index, text });
          contentChunks.set(c.index, (contentChunks.get(c.index) ?? 0) + 1);
        }
        if (c.finish_reason) collector.add({ type: 'finish', index: c.index, reason: c.finish_reason });
      }
    }
    if (!sawDone && !signal.aborted) failed = true;
  } catch {
    if (!signal.aborted) failed = true;
  } finally {
    signal.removeEventListener('abort', onAbort);
  }

  const aborted = signal.aborted && !sawDone;
  if (failed) {
    outcome.abort.abort();
    reader.cancel().catch(() => {});
    pool.recordFailure(outcome.pod);
    sink.send({
      error: {
        message: 'The GPU pod failed in the middle of the answer; the text above is incomplete.',
        type: 'server_error',
        param: null,
        code: 'upstream_stream_failed',
      },
    });
  } else if (!aborted) {
    pool.recordSuccess(outcome.pod);
  }

  let usage = reported;
  if (!usage || failed || aborted) {
    // Meter what was delivered: count the delivered text with the model's tokenizer when the worker holds
    // it, else one token per content chunk (pods send one token per chunk).
    const choices = collector.result();
    const completion = countTokens
      ? choices.reduce((s, c) => s + (c.text ? countTokens(c.text) : 0), 0)
      : [...contentChunks.values()].reduce((s, v) => s + v, 0);
    usage = usageOf(reported?.prompt_tokens ?? job.promptTokens, completion);
  }
  const complete = !failed && !aborted && sawDone;
  return {
    usage,
    failed,
    aborted,
    result: complete ? { ...meta, choices: collector.result(), usage } : null,
  };
}
