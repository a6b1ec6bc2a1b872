import { env } from 'cloudflare:workers';
import { describe, expect, it } from 'vitest';
import { sha256Hex } from '../../src/auth/keys';
import type { Env } from '../../src/env';
import { ADMIN, harness } from './helpers/harness';

const chat = { model: 'ring-test', messages: [{ role: 'user', content: 'hi' }], max_tokens: 2 };

describe('tenants and keys (admin API)', () => {
  it('is closed without the admin secret', async () => {
    const h = harness();
    expect((await h.call('/admin/tenants')).status).toBe(401);
    expect((await h.call('/admin/tenants', { headers: { authorization: 'Bearer wrong' } })).status).toBe(401);
    expect((await h.call('/admin/tenants', { headers: ADMIN })).status).toBe(200);
  });

  it('creates tenants (409 on a duplicate) and lists them', async () => {
    const h = harness();
    const t = await h.createTenant({ requestsPerMinute: 7 });
    const dup = await h.call('/admin/tenants', { method: 'POST', headers: ADMIN, json: { id: t.id } });
    expect(dup.status).toBe(409);
    const list = (await (await h.call('/admin/tenants', { headers: ADMIN })).json()) as any;
    expect(list.data.map((x: any) => x.id)).toContain(t.id);
    const info = (await (await h.call(`/admin/tenants/${t.id}`, { headers: ADMIN })).json()) as any;
    expect(info.limits.requestsPerMinute).toBe(7);
    expect((await h.call('/admin/tenants/no-such-tenant', { headers: ADMIN })).status).toBe(404);
    expect((await h.call('/admin/tenants', { method: 'POST', headers: ADMIN, json: { id: 'Bad_Id' } })).status).toBe(400);
  });

  it('stores only the SHA-256 of a key and lists keys by id and prefix', async () => {
    const h = harness();
    const t = await h.createTenant();
    expect(t.key).toMatch(new RegExp(`^rk_${t.id}_${t.keyId}_[A-Za-z0-9_-]{43}$`));
    const listed = (await (await h.call(`/admin/tenants/${t.id}/keys`, { headers: ADMIN })).json()) as any;
    expect(listed.data).toHaveLength(1);
    expect(listed.data[0]).toMatchObject({ id: t.keyId, prefix: t.key.slice(0, `rk_${t.id}_${t.keyId}_`.length + 4), revoked_at: null, models: null });
    expect(JSON.stringify(listed)).not.toContain(t.key);
    // Inside the Durable Object: the hash, never the key.
    const e = env as unknown as Env;
    const stub = e.TENANTS.get(e.TENANTS.idFromName(t.id));
    const auth = await stub.authenticate(t.keyId, await sha256Hex(t.key));
    expect(auth).toMatchObject({ ok: true, tenantId: t.id });
    expect(JSON.stringify(await stub.listKeys())).not.toContain(t.key.slice(-20));
  });

  it('revocation takes effect on the very next request', async () => {
    const h = harness();
    const t = await h.createTenant();
    expect((await h.call('/v1/chat/completions', { method: 'POST', headers: t.auth, json: chat })).status).toBe(200);
    const revoked = await h.call(`/admin/tenants/${t.id}/keys/${t.keyId}`, { method: 'DELETE', headers: ADMIN });
    expect(revoked.status).toBe(200);
    const res = await h.call('/v1/chat/completions', { method: 'POST', headers: t.auth, json: chat });
    expect(res.status).toBe(401);
    expect(((await res.json()) as any).error.code).toBe('revoked_api_key');
    const listed = (await (await h.call(`/admin/tenants/${t.id}/keys`, { headers: ADMIN })).json()) as any;
    expect(listed.data[0].revoked_at).toBeGreaterThan(0);
    expect((await h.call(`/admin/tenants/${t.id}/keys/zzzzzzzz`, { method: 'DELETE', headers: ADMIN })).status).toBe(404);
  });

  it('keeps a tenant with several keys working when one is revoked', async () => {
    const h = harness();
    const t = await h.createTenant();
    const second = (await (await h.call(`/admin/tenants/${t.id}/keys`, { method: 'POST', headers: ADMIN, json: { name: 'ci' } })).json()) as any;
    await h.call(`/admin/tenants/${t.id}/keys/${t.keyId}`, { method: 'DELETE', headers: ADMIN });
    expect((await h.call('/v1/models', { headers: t.auth })).status).toBe(401);
    expect((await h.call('/v1/models', { headers: { authorization: `Bearer ${second.key}` } })).status).toBe(200);
  });

  it('updates limits through the admin API', async () => {
    const h = harness();
    const t = await h.createTenant({ requestsPerMinute: 1 });
    await h.call('/v1/models', { headers: t.auth });
    expect((await h.call('/v1/chat/completions', { method: 'POST', headers: t.auth, json: chat })).status).toBe(200);
    expect((await h.call('/v1/chat/completions', { method: 'POST', headers: t.auth, json: chat })).status).toBe(429);
    const patched = await h.call(`/admin/tenants/${t.id}/limits`, { method: 'PATCH', headers: ADMIN, json: { requestsPerMinute: 10 } });
    expect(((await patched.json()) as any).limits.requestsPerMinute).toBe(10);
    expect((await h.call('/v1/chat/completions', { method: 'POST', headers: t.auth, json: chat })).status).toBe(200);
  });

  it("usage is per tenant: one tenant never sees another's", async () => {
    const h = harness();
    const a = await h.createTenant();
    const b = await h.createTenant();
    const res = await h.call('/v1/chat/completions', { method: 'POST', headers: a.auth, json: chat });
    await res.done();
    const ua = await h.usage(a.auth);
    const ub = await h.usage(b.auth);
    expect(ua.tenant).toBe(a.id);
    expect(ua.totals.requests).toBe(1);
    expect(ub.tenant).toBe(b.id);
    expect(ub.totals).toMatchObject({ requests: 0, prompt_tokens: 0, completion_tokens: 0 });
    const viaAdmin = (await (await h.call(`/admin/tenants/${a.id}/usage`, { headers: ADMIN })).json()) as any;
    expect(viaAdmin.totals).toEqual(ua.totals);
  });

  it('seeds the development key from DEV_API_KEY', async () => {
    const h = harness();
    const devKey = (env as unknown as Env).DEV_API_KEY!;
    const res = await h.call('/v1/chat/completions', { method: 'POST', headers: { authorization: `Bearer ${devKey}` }, json: chat });
    expect(res.status).toBe(200);
    expect((await h.usage({ authorization: `Bearer ${devKey}` })).tenant).toBe('dev');
  });
});
