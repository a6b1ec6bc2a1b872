/**
 * The path of one chat/text completion after validation and authentication:
 *   model (404) -> key scope (403) -> cache lookup -> routing (edge or pods) -> admission (429)
 *   -> generation -> metering -> cache store.
 * A request is admitted (and its lease opened) only once an engine is chosen, and a lease that produced
 * nothing is released uncharged.
 */
import type { Context } from 'hono';
import {
  CACHE_STATUS_HEADER,
  CACHE_TTL_HEADER,
  type CachedCompletion,
  SKIP_CACHE_HEADER,
  cacheKey,
  isDeterministic,
} from '../cache/completion-cache';
import type { AppDeps, AppEnv } from '../context';
import { EngineBudgetError, type Engine } from '../engine/types';
import { ApiError, badRequest, modelNotAllowed, noEngine } from '../errors';
import { affinityKey } from '../routing/rendezvous';
import { tenantStub } from '../auth/middleware';
import type { Pod } from '../routing/pod-pool';
import type { Metering } from '../tenants/limits';
import { runOnEdge } from './edge';
import { ChunkWriter, formatResponse, resultEvents } from './format';
import { ChoiceCollector, type CompletionResult, type GenerationJob, type OutEvent, type TokenUsage, completionId, usageOf } from './job';
import { callPods, pipePodStream, podResultOf } from './pod';
import { sseResponse, type SseSink } from './sse';

export const ENGINE_HEADER = 'x-engine';

type Ctx = Context<AppEnv>;

interface CachePlan {
  key: string | null; // null: not cached
  ttl: number;
  status: 'MISS' | 'BYPASS';
}

function cacheTtl(c: Ctx, deps: AppDeps): number {
  const raw = c.req.header(CACHE_TTL_HEADER);
  if (raw === undefined) return deps.settings.cache.ttlSeconds;
  const ttl = Number(raw);
  if (!Number.isInteger(ttl) || ttl < 1 || ttl > deps.settings.cache.maxTtlSeconds) {
    throw badRequest(`Header ${CACHE_TTL_HEADER} must be an integer number of seconds from 1 to ${deps.settings.cache.maxTtlSeconds}.`, CACHE_TTL_HEADER, 'invalid_header');
  }
  return ttl;
}

async function planCache(c: Ctx, deps: AppDeps, job: GenerationJob, tenantId: string): Promise<CachePlan> {
  const ttl = cacheTtl(c, deps);
  const skip = /^(1|true|yes)$/i.test(c.req.header(SKIP_CACHE_HEADER) ?? '');
  const cacheable = !skip && job.promptIds !== null && isDeterministic(job) && job.promptTokens <= deps.settings.cache.maxPromptTokens;
  return cacheable ? { key: await cacheKey(tenantId, job), ttl, status: 'MISS' } : { key: null, ttl, status: 'BYPASS' };
}

function rateLimited(kind: string, message: string, retryAfterMs: number): ApiError {
  const quota = kind === 'monthly_quota';
  return new ApiError({
    status: 429,
    type: quota ? 'insufficient_quota' : 'rate_limit_error',
    code: quota ? 'insufficient_quota' : `rate_limit_${kind}`,
    message,
    retryAfter: retryAfterMs / 1000,
  });
}

export async function serveGeneration(c: Ctx, deps: AppDeps, job: GenerationJob, edge: Engine | null): Promise<Response> {
  const auth = c.get('auth');
  const tenant = tenantStub(c.env, auth.tenantId);
  const waitUntil = (p: Promise<unknown>) => c.executionCtx.waitUntil(p);
  const cache = await planCache(c, deps, job, auth.tenantId);

  // ---- cache hit: replayed, metered as a hit, never charged as tokens
  if (cache.key) {
    const hit = await deps.cache.get(cache.key);
    if (hit) {
      const admitted = await tenant.admitHit(
        { model: job.model, stream: false, reserveTokens: 0 },
        { model: job.model, engine: 'cache', promptTokens: hit.result.usage.prompt_tokens, completionTokens: hit.result.usage.completion_tokens },
      );
      if (!admitted.ok) throw rateLimited(admitted.kind, admitted.message, admitted.retryAfterMs);
      const result: CompletionResult = { ...hit.result, id: completionId(job.kind), created: Math.floor(Date.now() / 1000) };
      const headers = { [CACHE_STATUS_HEADER]: 'HIT', [ENGINE_HEADER]: 'cache' };
      if (!job.stream) return c.json(formatResponse(job.kind, result), 200, headers);
      return sseResponse(
        async (sink) => {
          emitAll(sink, new ChunkWriter(job.kind, result, job.includeUsage), resultEvents(result), job.includeUsage ? result.usage : null);
        },
        waitUntil,
        headers,
      );
    }
  }

  if (job.promptIds?.some((ids) => ids.length === 0)) throw badRequest('The prompt is empty.', job.kind === 'chat' ? 'messages' : 'prompt', 'empty_prompt');

  // ---- routing: the edge when the request is within the edge limit; otherwise pods, with the edge as the
  // fallback while the request fits the engine's own context.
  const longest = job.promptIds ? Math.max(...job.promptIds.map((ids) => ids.length)) : Infinity;
  const need = longest + job.params.maxTokens;
  const edgeLimit = edge ? Math.min(deps.settings.edgeMaxTokens, edge.info.maxContext) : 0;
  const preferEdge = edge !== null && need <= edgeLimit;
  const edgeCanServe = edge !== null && need <= edge.info.maxContext;
  const podsConfigured = deps.pool !== null && deps.pool.pods.length > 0;
  const key = affinityKey(job.promptIds?.[0] ?? null, job.prompts[0]);
  let pods: Pod[] = [];
  if (!preferEdge) {
    if (!podsConfigured && !edgeCanServe) {
      throw badRequest(
        `This request needs ${longest} prompt tokens + max_tokens ${job.params.maxTokens}, more than the ${edge ? edge.info.maxContext : 0} tokens '${job.model}' accepts in the worker, and no GPU pod is configured. Shorten the prompt or lower max_tokens.`,
        'max_tokens',
        'context_length_exceeded',
      );
    }
    if (podsConfigured) pods = await deps.pool!.candidates(job.model, key);
    if (pods.length === 0 && !edgeCanServe) {
      throw noEngine(`No GPU pod is available for '${job.model}' and the request does not fit the edge engine.`, deps.pool?.retryAfterSeconds() ?? 5);
    }
  }

  // ---- admission
  const reserveTokens = job.promptTokens + job.prompts.length * job.n * job.params.maxTokens;
  const admitted = await tenant.admit({ model: job.model, stream: job.stream, reserveTokens });
  if (!admitted.ok) throw rateLimited(admitted.kind, admitted.message, admitted.retryAfterMs);
  const leaseId = admitted.leaseId;
  const meter = (engine: string, usage: TokenUsage) =>
    tenant.settle(leaseId, { model: job.model, engine, promptTokens: usage.prompt_tokens, completionTokens: usage.completion_tokens } satisfies Metering);
  const store = (result: CompletionResult, engine: string) => {
    if (cache.key) waitUntil(deps.cache.put(cache.key, { result, engine } satisfies CachedCompletion, cache.ttl));
  };

  try {
    let edgeRefused = false;
    if (preferEdge || pods.length === 0) {
      const served = await serveOnEdge(c, job, edge!, meter, store, cache.status, waitUntil);
      if (served) return served;
      // The engine refused the budget before doing any work: a pod may still take it.
      edgeRefused = true;
      if (podsConfigured && pods.length === 0) pods = await deps.pool!.candidates(job.model, key);
    }
    const served = await serveOnPods(c, deps, job, pods, meter, store, cache.status, waitUntil);
    if (served) return served;
    // Every pod failed before the first byte: fall back to the edge when the request fits there.
    if (edgeCanServe && !edgeRefused) {
      const fallback = await serveOnEdge(c, job, edge!, meter, store, cache.status, waitUntil);
      if (fallback) return fallback;
    }
    if (edgeRefused && !podsConfigured) {
      // Within the engine's context but over its memory budget next to the requests already running.
      throw noEngine('The edge engine is at its memory budget with the requests already running; retry shortly.', 1);
    }
    throw noEngine(`The GPU pods for '${job.model}' are unavailable and the request does not fit the edge engine.`, deps.pool?.retryAfterSeconds() ?? 5);
  } catch (err) {
    waitUntil(tenant.release(leaseId));
    throw err;
  }
}

function emitAll(sink: SseSink, writer: ChunkWriter, events: OutEvent[], usage: TokenUsage | null) {
  for (const ev of events) for (const chunk of writer.chunks(ev)) sink.send(chunk);
  if (usage) sink.send(writer.usageChunk(usage));
  sink.send('[DONE]');
}

type Meter = (engine: string, usage: TokenUsage) => Promise<void>;
type Store = (result: CompletionResult, engine: string) => void;

/** Serves on the in-worker engine; null when the engine refused the budget before any work. */
async function serveOnEdge(
  c: Ctx,
  job: GenerationJob,
  engine: Engine,
  meter: Meter,
  store: Store,
  cacheStatus: string,
  waitUntil: (p: Promise<unknown>) => void,
): Promise<Response | null> {
  const engineName = `edge:${engine.info.engine}`;
  const headers = { [ENGINE_HEADER]: engineName, [CACHE_STATUS_HEADER]: cacheStatus };
  const abort = new AbortController();
  // A client that disconnects stops the engine (streams: through the response body's cancel, below).
  c.req.raw.signal?.addEventListener('abort', () => abort.abort());
  const gen = runOnEdge(engine, job, abort.signal);
  const wantLogprobs = job.params.logprobs !== undefined;
  const collector = new ChoiceCollector(wantLogprobs);
  // Pull the first event here: a budget refusal surfaces before any byte is sent.
  let first: IteratorResult<OutEvent, TokenUsage>;
  try {
    first = await gen.next();
  } catch (err) {
    if (err instanceof EngineBudgetError) return null;
    throw err;
  }
  const base = { id: completionId(job.kind), created: Math.floor(Date.now() / 1000), model: job.model };
  // Tokens delivered if the engine throws midway (its own count is lost with the exception).
  const fallbackUsage = () => usageOf(job.promptTokens, collector.result().reduce((s, ch) => s + engine.encode(ch.text).length, 0));

  if (!job.stream) {
    let step = first;
    let usage: TokenUsage;
    try {
      while (!step.done) {
        collector.add(step.value);
        step = await gen.next();
      }
      usage = step.value;
    } catch (err) {
      waitUntil(meter(engineName, fallbackUsage()));
      throw err;
    }
    await meter(engineName, usage);
    const result: CompletionResult = { ...base, choices: collector.result(), usage };
    store(result, engineName);
    return c.json(formatResponse(job.kind, result), 200, headers);
  }

  return sseResponse(
    async (sink, signal) => {
      signal.addEventListener('abort', () => abort.abort());
      const writer = new ChunkWriter(job.kind, base, job.includeUsage);
      let step = first;
      let usage: TokenUsage;
      try {
        while (!step.done) {
          collector.add(step.value);
          for (const chunk of writer.chunks(step.value)) sink.send(chunk);
          step = await gen.next();
        }
        usage = step.value;
      } catch (err) {
        await meter(engineName, fallbackUsage());
        throw err;
      }
      await meter(engineName, usage);
      if (signal.aborted) return;
      if (job.includeUsage) sink.send(writer.usageChunk(usage));
      sink.send('[DONE]');
      store({ ...base, choices: collector.result(), usage }, engineName);
    },
    waitUntil,
    headers,
  );
}

/** Serves on the pods in order; null when every attempt failed before the first byte. */
async function serveOnPods(
  c: Ctx,
  deps: AppDeps,
  job: GenerationJob,
  pods: Pod[],
  meter: Meter,
  store: Store,
  cacheStatus: string,
  waitUntil: (p: Promise<unknown>) => void,
): Promise<Response | null> {
  if (!deps.pool || pods.length === 0) return null;
  const pool = deps.pool;
  const callSettings = deps.settings.pods;
  const outcome = await callPods(pool, pods, job, callSettings, deps.fetcher, c.req.raw.signal);
  if (outcome.kind === 'unavailable') return null;
  const engineName = 'pod';
  const headers = { [ENGINE_HEADER]: `pod:${outcome.pod.index}`, [CACHE_STATUS_HEADER]: cacheStatus };
  const edge = deps.engines.find((e) => e.info.id === job.model) ?? null;

  if (outcome.kind === 'rejected') {
    // The pod found the request invalid: nothing generated, the lease is released by the caller.
    throw new PodRejection(outcome.status, outcome.body);
  }
  if (outcome.kind === 'json') {
    const result = podResultOf(job, outcome.body);
    const usage = result?.usage ?? usageOf(job.promptTokens, 0);
    await meter(engineName, usage);
    if (result && job.params.logprobs === undefined) store(result, engineName);
    return c.json(outcome.body, 200, headers);
  }
  return sseResponse(
    async (sink, signal) => {
      const piped = await pipePodStream(job, outcome, sink, signal, callSettings, pool, edge ? (t) => edge.encode(t).length : null);
      await meter(engineName, piped.usage);
      if (piped.result && job.params.logprobs === undefined) store(piped.result, engineName);
    },
    waitUntil,
    headers,
  );
}

/** A pod's own 4xx answer, passed to the client unchanged. */
export class PodRejection extends ApiError {
  constructor(
    status: number,
    readonly rawBody: string,
  ) {
    super({ status: (status as ApiError['status']) ?? 400, type: 'invalid_request_error', message: 'Rejected by the GPU pod.', code: 'pod_rejected' });
  }

  override toResponse(): Response {
    return new Response(this.rawBody, { status: this.status, headers: { 'content-type': 'application/json' } });
  }
}
