// Starting and stopping the processes of end-to-end tests and benchmarks: `wrangler dev` and a gpu-backend pod.
// Each runs in its own process group (setsid-like `detached`), stopped by group id only.
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';

export const ROOT = resolve(new URL('../..', import.meta.url).pathname);
export const DEV_KEY = 'rk_dev_devkey01_local-development-key-not-secret'; // wrangler.toml [vars] DEV_API_KEY
export const ADMIN_SECRET = 'dev-admin-secret';

/** A TCP port free right now on 127.0.0.1. */
export function freePort() {
  return new Promise((ok, fail) => {
    const srv = createServer();
    srv.once('error', fail);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => ok(port));
    });
  });
}

function startGroup(cmd, args, env, logName) {
  const child = spawn(cmd, args, { cwd: ROOT, env: { ...process.env, ...env }, detached: true, stdio: ['ignore', 'pipe', 'pipe'] });
  let log = '';
  const keep = (d) => {
    log = (log + d.toString()).slice(-20_000);
  };
  child.stdout.on('data', keep);
  child.stderr.on('data', keep);
  const exited = new Promise((r) => child.once('exit', r));
  return {
    child,
    name: logName,
    log: () => log,
    exited,
    /** Stops the whole process group (npm -> wrangler -> workerd; python). */
    async stop(signal = 'SIGTERM') {
      if (child.exitCode !== null || child.signalCode !== null) return;
      try {
        process.kill(-child.pid, signal);
      } catch {
        return;
      }
      const timer = setTimeout(() => {
        try {
          process.kill(-child.pid, 'SIGKILL');
        } catch {}
      }, 5000);
      await exited;
      clearTimeout(timer);
    },
  };
}

async function waitFor(url, { headers = {}, timeoutMs = 120_000, proc, ok = (r) => r.ok } = {}) {
  const end = Date.now() + timeoutMs;
  for (;;) {
    if (proc && proc.child.exitCode !== null) throw new Error(`${proc.name} exited early:\n${proc.log()}`);
    try {
      const res = await fetch(url, { headers });
      if (ok(res)) return res;
    } catch {}
    if (Date.now() > end) throw new Error(`timed out waiting for ${url}\n${proc?.log() ?? ''}`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

/** Why a gpu-backend pod cannot be started here, or null when it can. */
export function podMissing() {
  if (!existsSync(join(ROOT, 'gpu-backend/ringlinear/server/app.py'))) return 'the pod server (gpu-backend/ringlinear/server/) is absent';
  if (!existsSync(join(ROOT, '.venv/bin/python'))) return 'the Python venv (.venv) is absent';
  if (!podModel()) return 'neither models/default nor test/fixtures/tiny holds a checkpoint (bash tools/fixtures.sh)';
  return null;
}

/** The checkpoint the pod serves: the embedded default model when present (same model on both sides), else tiny. */
export function podModel() {
  for (const dir of ['models/default', 'test/fixtures/tiny']) {
    if (existsSync(join(ROOT, dir, 'model.safetensors')) && existsSync(join(ROOT, dir, 'config.json'))) return dir;
  }
  return null;
}

/** Why the worker cannot be built here, or null. */
export function workerMissing() {
  if (!existsSync(join(ROOT, 'wasm/build/ringlinear.wasm'))) return 'wasm/build/ringlinear.wasm is absent (bash tools/build-wasm.sh)';
  if (!existsSync(join(ROOT, 'models/default/model.safetensors'))) return 'models/default/model.safetensors (the embedded model) is absent';
  return null;
}

/** `python -m ringlinear serve` on CPU, serving `model` (default: podModel()) under `servedName`. */
export async function startPod({ port, secret, servedName, model = podModel() }) {
  const proc = startGroup(
    join(ROOT, '.venv/bin/python'),
    ['-m', 'ringlinear', 'serve', '--model', model, '--port', String(port), '--device', 'cpu', '--served-model-name', servedName, '--shared-secret', secret],
    { PYTHONPATH: join(ROOT, 'gpu-backend') },
    'pod',
  );
  const url = `http://127.0.0.1:${port}`;
  try {
    await waitFor(`${url}/health`, { headers: { authorization: `Bearer ${secret}` }, proc, timeoutMs: 180_000 });
  } catch (err) {
    await proc.stop();
    throw err;
  }
  return { ...proc, url };
}

/** `wrangler dev` on 127.0.0.1 with its own state folder; waits until the engine has loaded. */
export async function startWorker({ port, vars = {} }) {
  const inspector = await freePort();
  const state = mkdtempSync(join(tmpdir(), 'ring-worker-state-'));
  const args = ['wrangler', 'dev', '--ip', '127.0.0.1', '--port', String(port), '--inspector-port', String(inspector), '--persist-to', state, '--show-interactive-dev-session=false'];
  for (const [k, v] of Object.entries(vars)) args.push('--var', `${k}:${v}`);
  const proc = startGroup('npx', args, { CLOUDFLARE_CF_FETCH_ENABLED: 'false', WRANGLER_SEND_METRICS: 'false' }, 'wrangler');
  const url = `http://127.0.0.1:${port}`;
  // /health answers once the embedded engine is loaded (the first request loads it).
  const stop = async (signal) => {
    await proc.stop(signal);
    rmSync(state, { recursive: true, force: true });
  };
  try {
    await waitFor(`${url}/health`, { proc, timeoutMs: 180_000, ok: (r) => r.status === 200 || r.status === 503 });
  } catch (err) {
    await stop();
    throw err;
  }
  return { ...proc, url, stop };
}
