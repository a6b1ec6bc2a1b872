/** Per-tenant limits and the admission/metering records exchanged with the tenant's Durable Object. */

/** 0 means "no limit" for every field. */
export interface TenantLimits {
  requestsPerMinute: number;
  tokensPerMinute: number;
  concurrentStreams: number;
  monthlyTokens: number;
}

export interface AdmitRequest {
  model: string;
  stream: boolean;
  /** Tokens the request may consume (prompt + n * max_tokens); held against tokens/min and the quota until settled. */
  reserveTokens: number;
}

export type LimitKind = 'requests_per_minute' | 'tokens_per_minute' | 'concurrent_streams' | 'monthly_quota';

export type AdmitResult =
  | { ok: true; leaseId: string }
  | { ok: false; kind: LimitKind; message: string; retryAfterMs: number };

/** What one request consumed, per model and engine ('edge:<kind>', 'pod', or 'cache' for a hit). */
export interface Metering {
  model: string;
  engine: string;
  promptTokens: number;
  completionTokens: number;
  cacheHit?: boolean;
}

export interface UsageRow {
  model: string;
  engine: string;
  requests: number;
  prompt_tokens: number;
  completion_tokens: number;
  cache_hits: number;
  /** Tokens served from the cache (prompt + completion of the cached answer); not charged. */
  cached_tokens: number;
}

export interface UsageReport {
  tenant: string;
  month: string;
  totals: Omit<UsageRow, 'model' | 'engine'> & { total_tokens: number };
  by_model: UsageRow[];
  limits: TenantLimits;
  current: { requests_last_minute: number; tokens_last_minute: number; open_streams: number };
}

export interface KeyRecord {
  id: string;
  prefix: string;
  name: string | null;
  /** null: every model. */
  models: string[] | null;
  created_at: number;
  revoked_at: number | null;
}

export type AuthResult = { ok: true; tenantId: string; keyId: string; models: string[] | null } | { ok: false; reason: 'unknown' | 'revoked' };

export const LIMIT_FIELDS = ['requestsPerMinute', 'tokensPerMinute', 'concurrentStreams', 'monthlyTokens'] as const;

export function monthOf(ms: number): string {
  return new Date(ms).toISOString().slice(0, 7);
}

export function msToNextMonth(ms: number): number {
  const d = new Date(ms);
  return Date.UTC(d.getUTCFullYear(), d.getUTCMonth() + 1, 1) - ms;
}
