/** Bindings and vars declared in wrangler.toml. Vars are strings; settings.ts parses and checks them. */
import type { TenantDirectory } from './tenants/directory-do';
import type { TenantLimiter } from './tenants/tenant-do';

export interface Env {
  TENANTS: DurableObjectNamespace<TenantLimiter>;
  DIRECTORY: DurableObjectNamespace<TenantDirectory>;
  /** Guards /admin/*. Unset: the admin API answers 404. */
  ADMIN_SECRET?: string;
  /** Local development only: a key seeded for tenant "dev" (see docs/worker.md). Empty in production. */
  DEV_API_KEY?: string;
  /** Comma-separated GPU pod base URLs. */
  GPU_BACKENDS?: string;
  POD_SHARED_SECRET?: string;
  [name: string]: unknown;
}
