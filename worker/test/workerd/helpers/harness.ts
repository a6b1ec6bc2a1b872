/** Builds the app with test engines and pods, and runs requests through it with an execution context. */
import { createExecutionContext, waitOnExecutionContext } from 'cloudflare:test';
import { env } from 'cloudflare:workers';
import { createApp } from '../../../src/app';
import { CompletionCache } from '../../../src/cache/completion-cache';
import type { AppDeps } from '../../../src/context';
import type { Engine } from '../../../src/engine/types';
import type { Env } from '../../../src/env';
import { PodPool } from '../../../src/routing/pod-pool';
import { readSettings } from '../../../src/settings';
import type { TenantLimits } from '../../../src/tenants/limits';
import { TestEngine } from './test-engine';
import { type TestPod, podFetcher } from './test-pod';

export const ADMIN = { authorization: `Bearer ${(env as unknown as Env).ADMIN_SECRET}` };

export interface HarnessOptions {
  engines?: Engine[];
  pods?: TestPod[];
  vars?: Record<string, string>;
  now?: () => number;
}

export function harness(opts: HarnessOptions = {}) {
  const pods = opts.pods ?? [];
  const settings = readSettings({
    ...(env as unknown as Record<string, unknown>),
    GPU_BACKENDS: pods.map((p) => p.url).join(','),
    POD_SHARED_SECRET: pods[0]?.secret ?? '',
    ...opts.vars,
  });
  const fetcher = podFetcher(pods);
  const deps: AppDeps = {
    engines: opts.engines ?? [new TestEngine()],
    settings,
    pool: pods.length ? new PodPool(settings.pods, fetcher, opts.now) : null,
    fetcher,
    cache: new CompletionCache(),
  };
  const app = createApp(deps);

  /** One request; `done()` waits for its background work (metering, cache writes, stream producers). */
  async function call(path: string, init: RequestInit & { json?: unknown } = {}) {
    const ctx = createExecutionContext();
    const headers = new Headers(init.headers);
    let body = init.body;
    if (init.json !== undefined) {
      headers.set('content-type', 'application/json');
      body = JSON.stringify(init.json);
    }
    const res = await app.fetch(new Request(`http://worker.test${path}`, { ...init, headers, body }), env, ctx);
    return Object.assign(res, { done: () => waitOnExecutionContext(ctx) });
  }

  async function createTenant(limits: Partial<TenantLimits> = {}, models?: string[]) {
    const id = `t-${crypto.randomUUID().slice(0, 8)}`;
    const created = await call('/admin/tenants', { method: 'POST', headers: ADMIN, json: { id, limits } });
    if (created.status !== 201) throw new Error(`tenant creation failed: ${created.status} ${await created.text()}`);
    const keyRes = await call(`/admin/tenants/${id}/keys`, { method: 'POST', headers: ADMIN, json: models ? { models } : {} });
    const key = (await keyRes.json()) as { key: string; id: string };
    return { id, key: key.key, keyId: key.id, auth: { authorization: `Bearer ${key.key}` } };
  }

  async function usage(auth: Record<string, string>) {
    return (await (await call('/v1/usage', { headers: auth })).json()) as any;
  }

  return { app, deps, call, createTenant, usage };
}

/** Reads an SSE body into its data payloads (JSON parsed, `[DONE]` kept as a string). */
export async function readSse(res: Response): Promise<any[]> {
  const text = await res.text();
  return text
    .split('\n\n')
    .filter((e) => e.startsWith('data: '))
    .map((e) => e.slice(6))
    .map((d) => (d === '[DONE]' ? d : JSON.parse(d)));
}
