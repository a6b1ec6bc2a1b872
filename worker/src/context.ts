/** What the app is built from, and the Hono environment its handlers see. */
import type { CompletionCache } from './cache/completion-cache';
import type { Engine } from './engine/types';
import type { Env } from './env';
import type { Fetcher, PodPool } from './routing/pod-pool';
import type { Settings } from './settings';
import type { AuthResult } from './tenants/limits';

export interface AppDeps {
  /** In-worker engines, one per model id. */
  engines: Engine[];
  settings: Settings;
  /** GPU pods; null when GPU_BACKENDS is empty. */
  pool: PodPool | null;
  /** How pods are reached (global fetch in production). */
  fetcher: Fetcher;
  cache: CompletionCache;
}

export type Authenticated = Extract<AuthResult, { ok: true }>;

export interface AppEnv {
  Bindings: Env;
  Variables: { auth: Authenticated };
}
