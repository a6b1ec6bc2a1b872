/**
 * Production entry: builds the app from wrangler vars and the embedded engine, and exports the
 * Durable Object classes declared in wrangler.toml.
 */
import { createApp } from './app';
import { CompletionCache } from './cache/completion-cache';
import type { AppDeps } from './context';
import type { Engine } from './engine/types';
import type { Env } from './env';
import { PodPool } from './routing/pod-pool';
import { readSettings } from './settings';

export { TenantLimiter } from './tenants/tenant-do';
export { TenantDirectory } from './tenants/directory-do';

const DEFAULT_MODEL_ID = 'ring-default'; // module exports of the entry must be handlers or classes

let app: Promise<ReturnType<typeof createApp>> | null = null;

async function edgeEngines(env: Env): Promise<Engine[]> {
  if (env.EDGE_ENGINE === 'off') return [];
  const quant = env.EDGE_QUANT === 'f32' ? 'f32' : 'int8';
  try {
    // Imported on demand: the checkpoint modules are large, and only isolates that serve requests need them.
    const { createEmbeddedEngine } = await import('./embedded-model');
    return [await createEmbeddedEngine({ id: typeof env.EDGE_MODEL_ID === 'string' && env.EDGE_MODEL_ID ? env.EDGE_MODEL_ID : DEFAULT_MODEL_ID, quant })];
  } catch (err) {
    // Without the edge engine the worker still routes to pods; /health reports the missing engine.
    console.error('edge engine failed to load', err);
    return [];
  }
}

/** Built on the first request (vars are only known then) and kept for the isolate's life. */
function appFor(env: Env) {
  app ??= (async () => {
    const settings = readSettings(env);
    const fetcher = (input: Request | string, init?: RequestInit) => fetch(input, init);
    const deps: AppDeps = {
      engines: await edgeEngines(env),
      settings,
      pool: settings.pods.urls.length ? new PodPool(settings.pods, fetcher) : null,
      fetcher,
      cache: new CompletionCache(),
    };
    return createApp(deps);
  })();
  return app;
}

export default {
  async fetch(request: Request, env: Env, ctx: ExecutionContext) {
    return (await appFor(env)).fetch(request, env, ctx);
  },
} satisfies ExportedHandler<Env>;
