/**
 * Admin API (tenants, keys, limits, usage), guarded by ADMIN_SECRET. Answers 404 when no secret is set.
 * Keys are returned in full only by the call that creates them; afterwards only their id and prefix.
 */
import { OpenAPIHono, createRoute, z } from '@hono/zod-openapi';
import type { MiddlewareHandler } from 'hono';
import { directoryStub, tenantStub } from '../auth/middleware';
import { TENANT_ID_PATTERN, constantTimeEqual, keyPrefix, newKey, sha256Hex } from '../auth/keys';
import type { AppDeps, AppEnv } from '../context';
import { ApiError, unauthorized } from '../errors';
import { ErrorResponse } from '../schemas/openai';
import { validationHook } from './validation';

const Limits = z
  .object({
    requestsPerMinute: z.number().int().min(0),
    tokensPerMinute: z.number().int().min(0),
    concurrentStreams: z.number().int().min(0),
    monthlyTokens: z.number().int().min(0),
  })
  .openapi('TenantLimits', { description: '0 = unlimited' });

const TenantParam = z.object({ tenant: z.string().regex(TENANT_ID_PATTERN).openapi({ param: { name: 'tenant', in: 'path' } }) });
const KeyParam = TenantParam.extend({ keyId: z.string().regex(/^[a-z0-9]{8}$/).openapi({ param: { name: 'keyId', in: 'path' } }) });
const json = <T extends z.ZodType>(schema: T) => ({ 'application/json': { schema } });
const err = { description: 'Error', content: json(ErrorResponse) };
const security = [{ adminSecret: [] }];
const ok = (description: string) => ({ description, content: json(z.any()) });

const tenantNotFound = (id: string) =>
  new ApiError({ status: 404, type: 'not_found_error', message: `Tenant '${id}' does not exist.`, param: 'tenant', code: 'tenant_not_found' });

function adminAuth(): MiddlewareHandler<AppEnv> {
  return async function adminAuth(c, next) {
    const secret = c.env.ADMIN_SECRET;
    if (!secret) throw new ApiError({ status: 404, type: 'not_found_error', message: 'Not found.', code: 'not_found' });
    const given = /^Bearer\s+(\S+)\s*$/i.exec(c.req.header('authorization') ?? '')?.[1] ?? '';
    // Compare digests: equal length, so the comparison time says nothing about the secret.
    if (!constantTimeEqual(await sha256Hex(given), await sha256Hex(secret))) throw unauthorized('Invalid admin secret.', 'invalid_admin_secret');
    await next();
  };
}

export function adminRoutes(deps: AppDeps) {
  const app = new OpenAPIHono<AppEnv>({ defaultHook: validationHook });
  app.use('*', adminAuth());

  async function existing(env: AppEnv['Bindings'], id: string) {
    const stub = tenantStub(env, id);
    if (!(await stub.exists())) throw tenantNotFound(id);
    return stub;
  }

  app.openapi(
    createRoute({
      method: 'post', path: '/tenants', security,
      request: { body: { required: true, content: json(z.object({ id: z.string().regex(TENANT_ID_PATTERN), limits: Limits.partial().optional() })) } },
      responses: { 201: ok('Tenant created'), 400: err, 401: err, 409: err },
    }),
    async (c) => {
      const { id, limits } = c.req.valid('json');
      if (!(await directoryStub(c.env).add(id)) && (await tenantStub(c.env, id).exists())) {
        throw new ApiError({ status: 409, type: 'conflict_error', message: `Tenant '${id}' already exists.`, param: 'id', code: 'tenant_exists' });
      }
      const info = await tenantStub(c.env, id).setup(id, { ...deps.settings.defaultLimits, ...limits });
      return c.json(info, 201);
    },
  );

  app.openapi(createRoute({ method: 'get', path: '/tenants', security, responses: { 200: ok('Tenant ids'), 401: err } }), async (c) =>
    c.json({ data: await directoryStub(c.env).list() }, 200),
  );

  app.openapi(
    createRoute({ method: 'get', path: '/tenants/{tenant}', security, request: { params: TenantParam }, responses: { 200: ok('Tenant'), 401: err, 404: err } }),
    async (c) => {
      const stub = await existing(c.env, c.req.valid('param').tenant);
      return c.json({ ...(await stub.info()), keys: await stub.listKeys() }, 200);
    },
  );

  app.openapi(
    createRoute({
      method: 'patch', path: '/tenants/{tenant}/limits', security,
      request: { params: TenantParam, body: { required: true, content: json(Limits.partial()) } },
      responses: { 200: ok('New limits'), 400: err, 401: err, 404: err },
    }),
    async (c) => {
      const stub = await existing(c.env, c.req.valid('param').tenant);
      return c.json({ limits: await stub.setLimits(c.req.valid('json')) }, 200);
    },
  );

  app.openapi(
    createRoute({
      method: 'post', path: '/tenants/{tenant}/keys', security,
      request: {
        params: TenantParam,
        body: { required: true, content: json(z.object({ name: z.string().max(100).optional(), models: z.array(z.string().min(1)).min(1).optional() })) },
      },
      responses: { 201: ok('The new key (shown once)'), 400: err, 401: err, 404: err },
    }),
    async (c) => {
      const { tenant } = c.req.valid('param');
      const { name, models } = c.req.valid('json');
      const stub = await existing(c.env, tenant);
      const { key, keyId } = newKey(tenant);
      const record = await stub.addKey({ id: keyId, prefix: keyPrefix(key), hash: await sha256Hex(key), name: name ?? null, models: models ?? null });
      return c.json({ ...record, key }, 201);
    },
  );

  app.openapi(
    createRoute({ method: 'get', path: '/tenants/{tenant}/keys', security, request: { params: TenantParam }, responses: { 200: ok('Keys (id and prefix, never the key)'), 401: err, 404: err } }),
    async (c) => {
      const stub = await existing(c.env, c.req.valid('param').tenant);
      return c.json({ data: await stub.listKeys() }, 200);
    },
  );

  app.openapi(
    createRoute({ method: 'delete', path: '/tenants/{tenant}/keys/{keyId}', security, request: { params: KeyParam }, responses: { 200: ok('Revoked'), 401: err, 404: err } }),
    async (c) => {
      const { tenant, keyId } = c.req.valid('param');
      const stub = await existing(c.env, tenant);
      const keys = await stub.listKeys();
      if (!keys.some((k) => k.id === keyId)) {
        throw new ApiError({ status: 404, type: 'not_found_error', message: `Key '${keyId}' does not exist.`, param: 'keyId', code: 'key_not_found' });
      }
      const revoked = await stub.revokeKey(keyId);
      return c.json({ id: keyId, revoked: true, already_revoked: !revoked }, 200);
    },
  );

  app.openapi(
    createRoute({
      method: 'get', path: '/tenants/{tenant}/usage', security,
      request: { params: TenantParam, query: z.object({ month: z.string().regex(/^\d{4}-\d{2}$/).optional() }) },
      responses: { 200: ok('Usage report'), 401: err, 404: err },
    }),
    async (c) => {
      const stub = await existing(c.env, c.req.valid('param').tenant);
      return c.json(await stub.usage(c.req.valid('query').month), 200);
    },
  );

  return app;
}
