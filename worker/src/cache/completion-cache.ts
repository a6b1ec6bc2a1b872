/**
 * Per-tenant completion cache on the Cache API. Only deterministic requests (temperature 0, or a seed) with
 * short prompts are cached. The Cache API only stores GET requests, so the key is a synthetic GET URL whose
 * path is SHA-256 of tenant, endpoint, model, normalised parameters and prompt: two tenants never share an
 * entry because the tenant id is part of what is hashed.
 */
import { sha256Hex } from '../auth/keys';
import type { CompletionResult, GenerationJob } from '../serve/job';

export const CACHE_STATUS_HEADER = 'x-cache-status';
export const SKIP_CACHE_HEADER = 'x-skip-cache';
export const CACHE_TTL_HEADER = 'x-cache-ttl';
const CACHE_NAME = 'ring-completions';
const KEY_ORIGIN = 'https://completion-cache.internal/v1/';

export interface CachedCompletion {
  result: CompletionResult;
  engine: string;
}

export function isDeterministic(job: GenerationJob): boolean {
  return job.params.temperature === 0 || job.params.seed !== undefined;
}

/** Parameters that change the answer, normalised so equivalent requests share an entry. */
function normalisedParams(job: GenerationJob) {
  const p = job.params;
  const greedy = p.temperature === 0; // sampling knobs and the seed do not matter for greedy decoding
  return {
    max_tokens: p.maxTokens,
    temperature: p.temperature,
    top_p: greedy ? null : p.topP,
    top_k: greedy ? null : p.topK,
    seed: greedy ? null : (p.seed ?? null),
    stop: [...new Set(p.stop)].sort(),
    n: job.n,
    logprobs: p.logprobs ?? null,
  };
}

export async function cacheKey(tenantId: string, job: GenerationJob): Promise<string> {
  const material = JSON.stringify({ v: 1, tenant: tenantId, kind: job.kind, model: job.model, params: normalisedParams(job), prompts: job.prompts });
  return `${KEY_ORIGIN}${await sha256Hex(material)}`;
}

export class CompletionCache {
  private cache: Promise<Cache> | null = null;

  private open(): Promise<Cache> | null {
    if (typeof caches === 'undefined') return null; // no Cache API in this runtime: the cache passes through
    this.cache ??= caches.open(CACHE_NAME);
    return this.cache;
  }

  async get(key: string): Promise<CachedCompletion | null> {
    const cache = await this.open();
    const hit = await cache?.match(key);
    return hit ? ((await hit.json()) as CachedCompletion) : null;
  }

  async put(key: string, value: CachedCompletion, ttlSeconds: number): Promise<void> {
    const cache = await this.open();
    await cache?.put(
      key,
      new Response(JSON.stringify(value), { headers: { 'content-type': 'application/json', 'cache-control': `max-age=${ttlSeconds}` } }),
    );
  }
}
