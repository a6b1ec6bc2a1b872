#!/usr/bin/env node
// Admin CLI for the ring-serve worker: tenants, keys, limits, usage. Drives the worker's /admin API.
//
//   npm run admin -- tenants create acme --rpm 60 --tpm 50000 --streams 4 --monthly 1000000
//   npm run admin -- keys create acme --name ci --models ring-mini   (prints the key once)
//   npm run admin -- keys list acme | keys revoke acme <keyId> | usage acme [--month 2026-11]
//   npm run admin -- tenants list | tenants show acme | limits set acme --rpm 120
//
// Target: --url (default $RING_URL or http://127.0.0.1:8787). Secret: --secret, else $ADMIN_SECRET, else (local
// targets only) the development ADMIN_SECRET from wrangler.toml [vars].
import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';

const USAGE = `usage: npm run admin -- [--url URL] [--secret S] <command>
  tenants list
  tenants create <tenant> [--rpm N] [--tpm N] [--streams N] [--monthly N]
  tenants show <tenant>
  limits set <tenant> [--rpm N] [--tpm N] [--streams N] [--monthly N]
  keys create <tenant> [--name NAME] [--models m1,m2]
  keys list <tenant>
  keys revoke <tenant> <keyId>
  usage <tenant> [--month YYYY-MM]
(limits: 0 = unlimited)`;

function fail(message) {
  console.error(`error: ${message}\n\n${USAGE}`);
  process.exit(2);
}

function devSecret() {
  try {
    const toml = readFileSync(new URL('../wrangler.toml', import.meta.url), 'utf8');
    const top = toml.split(/^\[env\./m)[0];
    return /^ADMIN_SECRET\s*=\s*"([^"]*)"/m.exec(top)?.[1];
  } catch {
    return undefined;
  }
}

const { values: opts, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    url: { type: 'string' },
    secret: { type: 'string' },
    rpm: { type: 'string' },
    tpm: { type: 'string' },
    streams: { type: 'string' },
    monthly: { type: 'string' },
    name: { type: 'string' },
    models: { type: 'string' },
    month: { type: 'string' },
    help: { type: 'boolean', short: 'h' },
  },
});
if (opts.help || positionals.length === 0) {
  console.log(USAGE);
  process.exit(opts.help ? 0 : 2);
}

const base = (opts.url ?? process.env.RING_URL ?? 'http://127.0.0.1:8787').replace(/\/+$/, '');
const local = /^https?:\/\/(127\.0\.0\.1|localhost|\[::1\])(:\d+)?$/.test(base);
const secret = opts.secret ?? process.env.ADMIN_SECRET ?? (local ? devSecret() : undefined);
if (!secret) fail('no admin secret: pass --secret or set ADMIN_SECRET');

function limits() {
  const out = {};
  for (const [flag, field] of [['rpm', 'requestsPerMinute'], ['tpm', 'tokensPerMinute'], ['streams', 'concurrentStreams'], ['monthly', 'monthlyTokens']]) {
    if (opts[flag] === undefined) continue;
    const n = Number(opts[flag]);
    if (!Number.isInteger(n) || n < 0) fail(`--${flag} must be an integer >= 0`);
    out[field] = n;
  }
  return out;
}

async function api(method, path, body) {
  let res;
  try {
    res = await fetch(`${base}/admin${path}`, {
      method,
      headers: { authorization: `Bearer ${secret}`, ...(body ? { 'content-type': 'application/json' } : {}) },
      body: body ? JSON.stringify(body) : undefined,
    });
  } catch (err) {
    console.error(`error: cannot reach ${base}: ${err.cause?.message ?? err.message}`);
    process.exit(1);
  }
  const text = await res.text();
  let json;
  try {
    json = JSON.parse(text);
  } catch {
    json = { raw: text };
  }
  if (!res.ok) {
    console.error(`error: ${res.status} ${json.error?.message ?? text}`);
    process.exit(1);
  }
  return json;
}

const [group, action, ...rest] = positionals;
const need = (n, what) => rest[n] ?? fail(`missing ${what}`);
const print = (x) => console.log(JSON.stringify(x, null, 2));

switch (`${group} ${action ?? ''}`.trim()) {
  case 'tenants list':
    print(await api('GET', '/tenants'));
    break;
  case 'tenants create':
    print(await api('POST', '/tenants', { id: need(0, '<tenant>'), limits: limits() }));
    break;
  case 'tenants show':
    print(await api('GET', `/tenants/${need(0, '<tenant>')}`));
    break;
  case 'limits set':
    print(await api('PATCH', `/tenants/${need(0, '<tenant>')}/limits`, limits()));
    break;
  case 'keys create': {
    const body = {};
    if (opts.name) body.name = opts.name;
    if (opts.models) body.models = opts.models.split(',').map((m) => m.trim()).filter(Boolean);
    const key = await api('POST', `/tenants/${need(0, '<tenant>')}/keys`, body);
    print(key);
    console.error('\nThe key is shown only now; only its SHA-256 is stored.');
    break;
  }
  case 'keys list':
    print(await api('GET', `/tenants/${need(0, '<tenant>')}/keys`));
    break;
  case 'keys revoke':
    print(await api('DELETE', `/tenants/${need(0, '<tenant>')}/keys/${need(1, '<keyId>')}`));
    break;
  default:
    if (group === 'usage') {
      const tenant = action ?? fail('missing <tenant>');
      print(await api('GET', `/tenants/${tenant}/usage${opts.month ? `?month=${encodeURIComponent(opts.month)}` : ''}`));
      break;
    }
    fail(`unknown command '${positionals.join(' ')}'`);
}
