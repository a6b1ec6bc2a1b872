/**
 * Production entry: builds the app from wrangler vars and the embedded engine, and exports the
 * Durable Object classes declared in wrangler.toml.
 */
import { createApp } from './app';
import { CompletionCache } from './cache/completion-cache';
import type { AppDeps } from './context';
import type { Env } from './env';
import { PodPool } from './routing/pod-pool';
import { readSettings } from './settings';

export { TenantLimiter } from './tenants/tenant-do';
export { TenantDirectory } from './tenants/directory-do';

let app: ReturnType<typeof createApp> | null = null;

/** Built on the first request (vars are only known then) and kept for the isolate's life. */
function appFor(env: Env) {
  if (app) return app;
  const settings = readSettings(env);
  const fetcher = (input: Request | string, init?: RequestInit) => fetch(input, init);
  const deps: AppDeps = {
    engines: [],
    settings,
    pool: settings.pods.urls.length ? new PodPool(settings.pods, fetcher) : null,
    fetcher,
    cache: new CompletionCache(),
  };
  app = createApp(deps);
  return app;
}

export default {
  fetch(request: Request, env: Env, ctx: ExecutionContext) {
    return appFor(env).fetch(request, env, ctx);
  },
} satisfies ExportedHandler<Env>;
