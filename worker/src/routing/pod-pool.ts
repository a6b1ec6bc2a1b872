/**
 * The GPU pods known to this isolate: their health (from GET /health, refreshed when stale), a circuit
 * breaker each (consecutive failures open it for a cooldown, then one trial request may close it), and
 * the order in which to try them for a request (rendezvous affinity, demoting pods with long queues).
 */
import { rendezvousOrder } from './rendezvous';

export interface PodSettings {
  urls: string[];
  secret: string;
  healthTtlMs: number;
  breakerThreshold: number;
  breakerCooldownMs: number;
  /** A pod whose queue is this much longer than the shortest one loses its affinity (bounded load). */
  queueSlack?: number;
  healthTimeoutMs?: number;
}

export interface Pod {
  id: string; // its base URL
  index: number; // position in GPU_BACKENDS, used in the engine header
  healthy: boolean;
  model: string | null;
  queueDepth: number;
  checkedAt: number; // -Infinity: never checked
  failures: number; // consecutive
  openUntil: number; // circuit open while now < openUntil
}

export type Fetcher = (input: Request | string, init?: RequestInit) => Promise<Response>;

export class PodPool {
  readonly pods: Pod[];
  private refreshing: Promise<void> | null = null;

  constructor(
    private readonly settings: PodSettings,
    private readonly fetcher: Fetcher,
    private readonly now: () => number = Date.now,
  ) {
    this.pods = settings.urls.map((id, index) => ({
      id, index, healthy: false, model: null, queueDepth: 0, checkedAt: -Infinity, failures: 0, openUntil: 0,
    }));
  }

  get secret() {
    return this.settings.secret;
  }

  /** Refreshes stale health entries (all pods at once, concurrent callers share one refresh). */
  async refresh(force = false): Promise<void> {
    const now = this.now();
    const stale = this.pods.filter((p) => force || now - p.checkedAt >= this.settings.healthTtlMs);
    if (stale.length === 0) return;
    this.refreshing ??= Promise.all(stale.map((p) => this.check(p))).then(() => {
      this.refreshing = null;
    });
    await this.refreshing;
  }

  private async check(pod: Pod): Promise<void> {
    try {
      const res = await this.fetcher(`${pod.id}/health`, {
        headers: { authorization: `Bearer ${this.settings.secret}` },
        signal: AbortSignal.timeout(this.settings.healthTimeoutMs ?? 2000),
      });
      const body = (await res.json().catch(() => null)) as { status?: string; model?: string; queue_depth?: number } | null;
      pod.healthy = res.ok && body?.status === 'ok';
      pod.model = typeof body?.model === 'string' ? body.model : pod.model;
      pod.queueDepth = typeof body?.queue_depth === 'number' ? body.queue_depth : 0;
    } catch {
      pod.healthy = false;
    }
    pod.checkedAt = this.now();
  }

  /** Model ids the pods reported. */
  models(): string[] {
    return [...new Set(this.pods.map((p) => p.model).filter((m): m is string => m !== null))];
  }

  private admissible(pod: Pod, model: string): boolean {
    return pod.healthy && this.now() >= pod.openUntil && (pod.model === null || pod.model === model);
  }

  /** Pods to try for a request, best first. */
  async candidates(model: string, key: string): Promise<Pod[]> {
    await this.refresh();
    const usable = this.pods.filter((p) => this.admissible(p, model));
    if (usable.length === 0) return [];
    const shortest = Math.min(...usable.map((p) => p.queueDepth));
    const slack = this.settings.queueSlack ?? 8;
    const ordered = rendezvousOrder(usable, key);
    // Stable partition: pods within the slack keep their rendezvous order, overloaded ones go last.
    return [...ordered.filter((p) => p.queueDepth <= shortest + slack), ...ordered.filter((p) => p.queueDepth > shortest + slack)];
  }

  recordSuccess(pod: Pod) {
    pod.failures = 0;
    pod.openUntil = 0;
  }

  /**
   * Counts a failure; at the threshold the circuit opens (again, after a failed trial). An unreachable pod
   * is also marked unhealthy until its next health check.
   */
  recordFailure(pod: Pod, unreachable = false) {
    pod.failures += 1;
    if (unreachable) {
      pod.healthy = false;
      pod.checkedAt = this.now();
    }
    if (pod.failures >= this.settings.breakerThreshold) pod.openUntil = this.now() + this.settings.breakerCooldownMs;
  }

  /** Seconds until some pod may be tried again (for Retry-After). */
  retryAfterSeconds(): number {
    const now = this.now();
    const waits = this.pods.map((p) => (p.openUntil > now ? p.openUntil - now : this.settings.healthTtlMs));
    return Math.max(1, Math.ceil(Math.min(...waits, 30_000) / 1000));
  }

  snapshot() {
    const now = this.now();
    return this.pods.map((p) => ({ index: p.index, healthy: p.healthy, circuit: now < p.openUntil ? 'open' : p.failures > 0 ? 'half-open' : 'closed', model: p.model, queue_depth: p.queueDepth }));
  }
}
