#!/usr/bin/env node
// Worker benchmark on local workerd (wrangler dev): cached completions (latency, throughput) against the same
// requests served by the embedded edge engine with the cache skipped, measured side by side in one run.
//
//   node bench/worker_cache.mjs [--duration 10] [--connections 8] [--max-tokens 16]
//
// Starts `wrangler dev` itself (own state folder), creates a tenant without limits through the admin API,
// then runs autocannon against POST /v1/completions.
import autocannon from 'autocannon';
import { cpus } from 'node:os';
import { parseArgs } from 'node:util';
import { ADMIN_SECRET, freePort, startWorker, workerMissing } from '../test/e2e/processes.mjs';

const { values } = parseArgs({ options: { duration: { type: 'string', default: '10' }, connections: { type: 'string', default: '8' }, 'max-tokens': { type: 'string', default: '16' } } });
const duration = Number(values.duration);
const connections = Number(values.connections);
const maxTokens = Number(values['max-tokens']);

const missing = workerMissing();
if (missing) {
  console.error(`cannot run: ${missing}`);
  process.exit(1);
}

const worker = await startWorker({ port: await freePort() });
try {
  const admin = async (path, body) => {
    const res = await fetch(`${worker.url}/admin${path}`, { method: 'POST', headers: { authorization: `Bearer ${ADMIN_SECRET}`, 'content-type': 'application/json' }, body: JSON.stringify(body) });
    if (!res.ok) throw new Error(`${path}: ${res.status} ${await res.text()}`);
    return res.json();
  };
  await admin('/tenants', { id: 'bench', limits: { requestsPerMinute: 0, tokensPerMinute: 0, concurrentStreams: 0, monthlyTokens: 0 } });
  const { key } = await admin('/tenants/bench/keys', { name: 'bench' });
  const health = await (await fetch(`${worker.url}/health`)).json();
  const model = health.engines[0]?.model;
  if (!model) throw new Error(`no edge engine loaded: ${JSON.stringify(health)}`);

  const body = JSON.stringify({ model, prompt: 'The edge cache benchmark prompt says', max_tokens: maxTokens, temperature: 0 });
  const headers = { authorization: `Bearer ${key}`, 'content-type': 'application/json' };
  const url = `${worker.url}/v1/completions`;

  // Warm: load the engine path and store the answer.
  const warm = await fetch(url, { method: 'POST', headers, body });
  const warmBody = await warm.json();
  const check = await fetch(url, { method: 'POST', headers, body });
  if (check.headers.get('x-cache-status') !== 'HIT') throw new Error('second request was not a cache HIT');
  await check.arrayBuffer();

  const run = (title, extraHeaders) =>
    autocannon({ title, url, method: 'POST', headers: { ...headers, ...extraHeaders }, body, connections, duration });
  const floor = await autocannon({ title: 'GET /health', url: `${worker.url}/health`, connections, duration });
  const authOnly = await autocannon({ title: 'GET /v1/models', url: `${worker.url}/v1/models`, headers, connections, duration });
  const cached = await run('cached', {});
  const edge = await run('edge engine (cache skipped)', { 'x-skip-cache': 'true' });

  const row = (name, r) =>
    `| ${name} | ${r.requests.average.toFixed(1)} | ${r.latency.p50} | ${r.latency.p99} | ${r.non2xx} | ${r.errors} |`;
  const usage = warmBody.usage;
  console.log(`\nmachine: ${cpus().length} x ${cpus()[0].model}, node ${process.version}, wrangler dev (local workerd)`);
  console.log(`request: POST /v1/completions, ${usage.prompt_tokens} prompt tokens, max_tokens ${maxTokens} (${usage.completion_tokens} generated), temperature 0, model ${model} (${health.engines[0].engine})`);
  console.log(`autocannon: ${connections} connections, ${duration} s each\n`);
  console.log('| path | req/s | p50 ms | p99 ms | non-2xx | errors |');
  console.log('|---|---|---|---|---|---|');
  console.log(row('floor: GET /health (no auth, no storage)', floor));
  console.log(row('GET /v1/models (key check: one Durable Object call)', authOnly));
  console.log(row('cache HIT (key check + Cache API + admission/metering call)', cached));
  console.log(row('edge engine (x-skip-cache)', edge));
  console.log(`\ncache HIT / edge engine throughput: ${(cached.requests.average / edge.requests.average).toFixed(1)}x`);
  console.log(`edge engine: ${edge.requests.average.toFixed(2)} completions/s = ${(edge.requests.average * usage.completion_tokens).toFixed(0)} generated tokens/s over ${connections} connections`);
} finally {
  await worker.stop();
}
