/**
 * Bearer-key authentication of /v1/*: the key names its tenant, whose Durable Object checks the hash
 * (constant time) and revocation on every request, so a revoked key fails at once.
 */
import type { MiddlewareHandler } from 'hono';
import type { AppEnv } from '../context';
import type { Env } from '../env';
import { unauthorized } from '../errors';
import type { TenantLimits } from '../tenants/limits';
import { keyPrefix, parseKey, sha256Hex } from './keys';

export function tenantStub(env: Env, tenantId: string) {
  return env.TENANTS.get(env.TENANTS.idFromName(tenantId));
}

export function directoryStub(env: Env) {
  return env.DIRECTORY.get(env.DIRECTORY.idFromName('directory'));
}

/** Creates the development tenant and key from DEV_API_KEY (local dev only), once per isolate and key. */
const seeded = new Map<string, Promise<void>>();
export function seedDevKey(env: Env, limits: TenantLimits): Promise<void> {
  const key = env.DEV_API_KEY;
  if (!key) return Promise.resolve();
  let done = seeded.get(key);
  if (!done) {
    const parsed = parseKey(key);
    if (!parsed) throw new Error('DEV_API_KEY is not of the form rk_<tenant>_<8 chars>_<secret of 20+ chars>');
    done = (async () => {
      const stub = tenantStub(env, parsed.tenantId);
      await stub.setup(parsed.tenantId, limits);
      await directoryStub(env).add(parsed.tenantId);
      await stub.seedKey({ id: parsed.keyId, prefix: keyPrefix(key), hash: await sha256Hex(key), name: 'development key (DEV_API_KEY)', models: null });
    })();
    done.catch(() => seeded.delete(key));
    seeded.set(key, done);
  }
  return done;
}

export function tenantAuth(devLimits: TenantLimits): MiddlewareHandler<AppEnv> {
  return async function tenantAuth(c, next) {
    const header = c.req.header('authorization') ?? '';
    const match = /^Bearer\s+(\S+)\s*$/i.exec(header);
    if (!match) throw unauthorized('Missing API key: send Authorization: Bearer <key>.', 'missing_api_key');
    const key = match[1];
    await seedDevKey(c.env, devLimits);
    const parsed = parseKey(key);
    if (!parsed) throw unauthorized('Incorrect API key provided.');
    const result = await tenantStub(c.env, parsed.tenantId).authenticate(parsed.keyId, await sha256Hex(key));
    if (!result.ok) {
      throw result.reason === 'revoked'
        ? unauthorized('This API key has been revoked.', 'revoked_api_key')
        : unauthorized('Incorrect API key provided.');
    }
    c.set('auth', result);
    await next();
  };
}
