/**
 * One Durable Object per tenant: its keys (hashes only), its limits and its usage ledger. A Durable Object
 * runs one request at a time and its SQLite storage is synchronous, so every check-and-update below is
 * atomic: limits hold exactly under concurrent requests, and a revoked key fails from the next call on.
 *
 * Admission reserves the tokens a request may use (prompt + n * max_tokens) against tokens/min and the
 * monthly quota; settling replaces the reservation by what was actually used. Leases of requests whose
 * worker vanished expire after LEASE_TTL_MS.
 */
import { DurableObject } from 'cloudflare:workers';
import { constantTimeEqual } from '../auth/keys';
import {
  type AdmitRequest,
  type AdmitResult,
  type AuthResult,
  type KeyRecord,
  type Metering,
  type TenantLimits,
  type UsageReport,
  type UsageRow,
  monthOf,
  msToNextMonth,
} from './limits';

const WINDOW_MS = 60_000;
const LEASE_TTL_MS = 15 * 60_000;
/** Compared against when a key id is unknown, so unknown and wrong keys take the same time. */
const DUMMY_HASH = '0'.repeat(64);

export class TenantLimiter extends DurableObject {
  private sql: SqlStorage;

  constructor(ctx: DurableObjectState, env: unknown) {
    super(ctx, env as never);
    this.sql = ctx.storage.sql;
    this.sql.exec(`
      CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
      CREATE TABLE IF NOT EXISTS keys (id TEXT PRIMARY KEY, prefix TEXT NOT NULL, hash TEXT NOT NULL, name TEXT,
        models TEXT, created_at INTEGER NOT NULL, revoked_at INTEGER);
      CREATE TABLE IF NOT EXISTS leases (id TEXT PRIMARY KEY, stream INTEGER NOT NULL, reserved INTEGER NOT NULL,
        expires INTEGER NOT NULL);
      CREATE TABLE IF NOT EXISTS window (id TEXT PRIMARY KEY, ts INTEGER NOT NULL, requests INTEGER NOT NULL,
        tokens INTEGER NOT NULL);
      CREATE INDEX IF NOT EXISTS window_ts ON window (ts);
      CREATE TABLE IF NOT EXISTS usage (month TEXT NOT NULL, model TEXT NOT NULL, engine TEXT NOT NULL,
        requests INTEGER NOT NULL DEFAULT 0, prompt_tokens INTEGER NOT NULL DEFAULT 0,
        completion_tokens INTEGER NOT NULL DEFAULT 0, cache_hits INTEGER NOT NULL DEFAULT 0,
        cached_tokens INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (month, model, engine));
    `);
  }

  // ---------------------------------------------------------------- tenant record

  private meta(k: string): string | null {
    const row = this.sql.exec<{ v: string }>('SELECT v FROM meta WHERE k = ?', k).toArray()[0];
    return row ? row.v : null;
  }

  private setMeta(k: string, v: string) {
    this.sql.exec('INSERT INTO meta (k, v) VALUES (?, ?) ON CONFLICT (k) DO UPDATE SET v = excluded.v', k, v);
  }

  /** Creates the tenant (idempotent); `limits` overrides the stored ones when given. */
  setup(tenantId: string, limits: TenantLimits): { id: string; limits: TenantLimits; created_at: number } {
    if (this.meta('id') === null) {
      this.setMeta('id', tenantId);
      this.setMeta('created_at', String(Date.now()));
      this.setMeta('limits', JSON.stringify(limits));
    }
    return this.info()!;
  }

  exists(): boolean {
    return this.meta('id') !== null;
  }

  info(): { id: string; limits: TenantLimits; created_at: number } | null {
    const id = this.meta('id');
    if (id === null) return null;
    return { id, limits: this.limits(), created_at: Number(this.meta('created_at')) };
  }

  setLimits(patch: Partial<TenantLimits>): TenantLimits {
    const limits = { ...this.limits(), ...patch };
    this.setMeta('limits', JSON.stringify(limits));
    return limits;
  }

  private limits(): TenantLimits {
    return JSON.parse(this.meta('limits') ?? 'null');
  }

  // ---------------------------------------------------------------- keys

  addKey(k: { id: string; prefix: string; hash: string; name: string | null; models: string[] | null }): KeyRecord {
    if (!this.exists()) throw new Error('tenant does not exist');
    this.sql.exec(
      'INSERT INTO keys (id, prefix, hash, name, models, created_at, revoked_at) VALUES (?, ?, ?, ?, ?, ?, NULL)',
      k.id, k.prefix, k.hash, k.name, k.models ? JSON.stringify(k.models) : null, Date.now(),
    );
    return this.listKeys().find((r) => r.id === k.id)!;
  }

  /** Inserts the key unless a key with this id exists (a revoked seed stays revoked). */
  seedKey(k: { id: string; prefix: string; hash: string; name: string | null; models: string[] | null }): void {
    const found = this.sql.exec('SELECT id FROM keys WHERE id = ?', k.id).toArray().length > 0;
    if (!found) this.addKey(k);
  }

  listKeys(): KeyRecord[] {
    return this.sql
      .exec<{ id: string; prefix: string; name: string | null; models: string | null; created_at: number; revoked_at: number | null }>(
        'SELECT id, prefix, name, models, created_at, revoked_at FROM keys ORDER BY created_at, id',
      )
      .toArray()
      .map((r) => ({ ...r, models: r.models ? (JSON.parse(r.models) as string[]) : null }));
  }

  revokeKey(keyId: string): boolean {
    const cur = this.sql.exec('UPDATE keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL', Date.now(), keyId);
    return cur.rowsWritten > 0;
  }

  authenticate(keyId: string, hash: string): AuthResult {
    const row = this.sql
      .exec<{ hash: string; models: string | null; revoked_at: number | null }>('SELECT hash, models, revoked_at FROM keys WHERE id = ?', keyId)
      .toArray()[0];
    const matches = constantTimeEqual(row ? row.hash : DUMMY_HASH, hash);
    const tenantId = this.meta('id');
    if (!row || !matches || tenantId === null) return { ok: false, reason: 'unknown' };
    if (row.revoked_at !== null) return { ok: false, reason: 'revoked' };
    return { ok: true, tenantId, keyId, models: row.models ? (JSON.parse(row.models) as string[]) : null };
  }

  // ---------------------------------------------------------------- limits

  private purge(now: number) {
    this.sql.exec('DELETE FROM window WHERE ts <= ?', now - WINDOW_MS);
    this.sql.exec('DELETE FROM leases WHERE expires <= ?', now);
  }

  private scalar(query: string, ...bindings: unknown[]): number {
    const row = this.sql.exec<{ v: number | null }>(query, ...bindings).toArray()[0];
    return row?.v ?? 0;
  }

  admit(req: AdmitRequest): AdmitResult {
    const now = Date.now();
    this.purge(now);
    const limits = this.limits();
    const reserve = Math.max(0, Math.floor(req.reserveTokens));

    if (limits.requestsPerMinute > 0) {
      const requests = this.scalar('SELECT SUM(requests) AS v FROM window');
      if (requests >= limits.requestsPerMinute) {
        // The oldest request leaving the window frees a slot.
        const oldest = this.scalar('SELECT MIN(ts) AS v FROM window WHERE requests > 0');
        return {
          ok: false,
          kind: 'requests_per_minute',
          message: `Rate limit reached: ${limits.requestsPerMinute} requests per minute.`,
          retryAfterMs: oldest + WINDOW_MS - now,
        };
      }
    }

    const reserved = this.scalar('SELECT SUM(reserved) AS v FROM leases');
    if (limits.tokensPerMinute > 0) {
      if (reserve > limits.tokensPerMinute) {
        return {
          ok: false,
          kind: 'tokens_per_minute',
          message: `Request too large: it may use ${reserve} tokens, the limit is ${limits.tokensPerMinute} tokens per minute. Lower max_tokens.`,
          retryAfterMs: WINDOW_MS,
        };
      }
      const used = this.scalar('SELECT SUM(tokens) AS v FROM window');
      if (used + reserved + reserve > limits.tokensPerMinute) {
        let retryAfterMs = 1000; // blocked by open reservations: they settle soon
        let excess = used + reserved + reserve - limits.tokensPerMinute;
        for (const row of this.sql.exec<{ ts: number; tokens: number }>('SELECT ts, tokens FROM window WHERE tokens > 0 ORDER BY ts').toArray()) {
          excess -= row.tokens;
          if (excess <= 0) {
            retryAfterMs = row.ts + WINDOW_MS - now;
            break;
          }
        }
        return {
          ok: false,
          kind: 'tokens_per_minute',
          message: `Rate limit reached: ${limits.tokensPerMinute} tokens per minute (used ${used}, reserved ${reserved}, requested up to ${reserve}).`,
          retryAfterMs,
        };
      }
    }

    if (req.stream && limits.concurrentStreams > 0) {
      const open = this.scalar('SELECT COUNT(*) AS v FROM leases WHERE stream = 1');
      if (open >= limits.concurrentStreams) {
        return {
          ok: false,
          kind: 'concurrent_streams',
          message: `Too many concurrent streams: the limit is ${limits.concurrentStreams}.`,
          retryAfterMs: 1000,
        };
      }
    }

    if (limits.monthlyTokens > 0) {
      const month = monthOf(now);
      const spent = this.scalar('SELECT SUM(prompt_tokens + completion_tokens) AS v FROM usage WHERE month = ?', month);
      if (spent + reserved + reserve > limits.monthlyTokens) {
        return {
          ok: false,
          kind: 'monthly_quota',
          message: `Monthly token quota exceeded: ${spent} of ${limits.monthlyTokens} tokens used${reserved ? `, ${reserved} reserved` : ''}, this request may use ${reserve}.`,
          retryAfterMs: spent + reserve > limits.monthlyTokens ? msToNextMonth(now) : 1000,
        };
      }
    }

    const leaseId = crypto.randomUUID();
    this.sql.exec('INSERT INTO leases (id, stream, reserved, expires) VALUES (?, ?, ?, ?)', leaseId, req.stream ? 1 : 0, reserve, now + LEASE_TTL_MS);
    this.sql.exec('INSERT INTO window (id, ts, requests, tokens) VALUES (?, ?, 1, 0)', leaseId, now);
    return { ok: true, leaseId };
  }

  /** Ends a lease and meters what the request used. Metering happens even if the lease had expired. */
  settle(leaseId: string, m: Metering): void {
    const now = Date.now();
    this.sql.exec('DELETE FROM leases WHERE id = ?', leaseId);
    const tokens = m.cacheHit ? 0 : m.promptTokens + m.completionTokens;
    if (tokens > 0) this.sql.exec('INSERT INTO window (id, ts, requests, tokens) VALUES (?, ?, 0, ?)', `${leaseId}:t`, now, tokens);
    this.sql.exec(
      `INSERT INTO usage (month, model, engine, requests, prompt_tokens, completion_tokens, cache_hits, cached_tokens)
       VALUES (?, ?, ?, 1, ?, ?, ?, ?)
       ON CONFLICT (month, model, engine) DO UPDATE SET requests = requests + 1,
         prompt_tokens = prompt_tokens + excluded.prompt_tokens, completion_tokens = completion_tokens + excluded.completion_tokens,
         cache_hits = cache_hits + excluded.cache_hits, cached_tokens = cached_tokens + excluded.cached_tokens`,
      monthOf(now), m.model, m.engine,
      m.cacheHit ? 0 : m.promptTokens, m.cacheHit ? 0 : m.completionTokens,
      m.cacheHit ? 1 : 0, m.cacheHit ? m.promptTokens + m.completionTokens : 0,
    );
  }

  /** Admission and metering of a cache hit in one call (a hit holds no lease: it is answered at once). */
  admitHit(req: AdmitRequest, m: Metering): AdmitResult {
    const admitted = this.admit({ ...req, reserveTokens: 0 });
    if (admitted.ok) this.settle(admitted.leaseId, { ...m, cacheHit: true });
    return admitted;
  }

  /** Ends a lease without charging: the request was rejected after admission (nothing was generated). */
  release(leaseId: string): void {
    this.sql.exec('DELETE FROM leases WHERE id = ?', leaseId);
    this.sql.exec('DELETE FROM window WHERE id = ?', leaseId);
  }

  usage(month?: string): UsageReport {
    const now = Date.now();
    this.purge(now);
    const m = month ?? monthOf(now);
    const rows = this.sql
      .exec<UsageRow & Record<string, string | number>>(
        'SELECT model, engine, requests, prompt_tokens, completion_tokens, cache_hits, cached_tokens FROM usage WHERE month = ? ORDER BY model, engine',
        m,
      )
      .toArray()
      .map((r) => ({ ...r }) as UsageRow);
    const sum = (f: keyof Omit<UsageRow, 'model' | 'engine'>) => rows.reduce((s, r) => s + r[f], 0);
    return {
      tenant: this.meta('id') ?? '',
      month: m,
      totals: {
        requests: sum('requests'),
        prompt_tokens: sum('prompt_tokens'),
        completion_tokens: sum('completion_tokens'),
        total_tokens: sum('prompt_tokens') + sum('completion_tokens'),
        cache_hits: sum('cache_hits'),
        cached_tokens: sum('cached_tokens'),
      },
      by_model: rows,
      limits: this.limits(),
      current: {
        requests_last_minute: this.scalar('SELECT SUM(requests) AS v FROM window'),
        tokens_last_minute: this.scalar('SELECT SUM(tokens) AS v FROM window'),
        open_streams: this.scalar('SELECT COUNT(*) AS v FROM leases WHERE stream = 1'),
      },
    };
  }
}
