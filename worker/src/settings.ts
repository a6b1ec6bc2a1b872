/**
 * Runtime settings parsed from wrangler vars, checked once. A malformed value throws at startup
 * (a misconfiguration, not a request error).
 */
import type { TenantLimits } from './tenants/limits';

export interface Settings {
  maxBodyBytes: number;
  /** max_tokens when the request gives none. */
  defaultMaxTokens: number;
  /** Edge routing limit: prompt + max_tokens must fit this (and the engine's maxContext). */
  edgeMaxTokens: number;
  cache: { ttlSeconds: number; maxTtlSeconds: number; maxPromptTokens: number };
  pods: {
    urls: string[];
    secret: string;
    /** Model ids served only by pods (no edge engine). */
    models: string[];
    timeoutMs: number; // request sent -> response headers
    idleTimeoutMs: number; // gap between stream chunks before the stream counts as failed
    attempts: number; // pods tried before the first byte
    healthTtlMs: number;
    breakerThreshold: number; // consecutive failures that open the circuit
    breakerCooldownMs: number;
  };
  defaultLimits: TenantLimits;
}

function int(env: Record<string, unknown>, name: string, fallback: number, min = 0): number {
  const raw = env[name];
  if (raw === undefined || raw === '') return fallback;
  const value = Number(raw);
  if (!Number.isInteger(value) || value < min) throw new Error(`setting ${name} must be an integer >= ${min}, got '${String(raw)}'`);
  return value;
}

function list(raw: unknown): string[] {
  return typeof raw === 'string' ? raw.split(',').map((s) => s.trim()).filter(Boolean) : [];
}

export function readSettings(env: Record<string, unknown>): Settings {
  const urls = list(env.GPU_BACKENDS).map((u) => {
    let parsed: URL;
    try {
      parsed = new URL(u);
    } catch {
      throw new Error(`GPU_BACKENDS entry '${u}' is not a URL`);
    }
    return parsed.href.replace(/\/+$/, '');
  });
  return {
    maxBodyBytes: int(env, 'MAX_BODY_BYTES', 1_000_000, 1),
    defaultMaxTokens: int(env, 'DEFAULT_MAX_TOKENS', 128, 1),
    edgeMaxTokens: int(env, 'EDGE_MAX_TOKENS', 1024, 1),
    cache: {
      ttlSeconds: int(env, 'CACHE_TTL_SECONDS', 3600, 1),
      maxTtlSeconds: int(env, 'CACHE_MAX_TTL_SECONDS', 7 * 86400, 1),
      maxPromptTokens: int(env, 'CACHE_MAX_PROMPT_TOKENS', 512, 0),
    },
    pods: {
      urls,
      secret: typeof env.POD_SHARED_SECRET === 'string' ? env.POD_SHARED_SECRET : '',
      models: list(env.GPU_MODELS),
      timeoutMs: int(env, 'POD_TIMEOUT_MS', 30_000, 1),
      idleTimeoutMs: int(env, 'POD_IDLE_TIMEOUT_MS', 30_000, 1),
      attempts: int(env, 'POD_ATTEMPTS', 2, 1),
      healthTtlMs: int(env, 'POD_HEALTH_TTL_MS', 5_000, 0),
      breakerThreshold: int(env, 'BREAKER_THRESHOLD', 3, 1),
      breakerCooldownMs: int(env, 'BREAKER_COOLDOWN_MS', 15_000, 0),
    },
    defaultLimits: {
      requestsPerMinute: int(env, 'DEFAULT_RPM', 600, 0),
      tokensPerMinute: int(env, 'DEFAULT_TPM', 200_000, 0),
      concurrentStreams: int(env, 'DEFAULT_CONCURRENT_STREAMS', 8, 0),
      monthlyTokens: int(env, 'DEFAULT_MONTHLY_TOKENS', 10_000_000, 0),
    },
  };
}
