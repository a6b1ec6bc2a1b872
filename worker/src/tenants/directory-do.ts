/**
 * The list of tenant ids, for the admin API only (one instance, named "directory"). Requests never touch
 * it: a key names its tenant, whose own Durable Object holds everything else.
 */
import { DurableObject } from 'cloudflare:workers';

export class TenantDirectory extends DurableObject {
  private sql: SqlStorage;

  constructor(ctx: DurableObjectState, env: unknown) {
    super(ctx, env as never);
    this.sql = ctx.storage.sql;
    this.sql.exec('CREATE TABLE IF NOT EXISTS tenants (id TEXT PRIMARY KEY, created_at INTEGER NOT NULL)');
  }

  /** true when the tenant is new. */
  add(id: string): boolean {
    return this.sql.exec('INSERT OR IGNORE INTO tenants (id, created_at) VALUES (?, ?)', id, Date.now()).rowsWritten > 0;
  }

  list(): { id: string; created_at: number }[] {
    return this.sql.exec<{ id: string; created_at: number }>('SELECT id, created_at FROM tenants ORDER BY id').toArray();
  }
}
