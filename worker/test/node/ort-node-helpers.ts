/** Node-only helpers of the ORT-web tests: make the ONNX export a test needs (skipped while it is up to date). */
import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { resolve } from 'node:path';

export const ROOT = resolve(__dirname, '../../..');
const PYTHON = process.env.PYTHON ?? resolve(ROOT, '.venv/bin/python');

/** Path of test/fixtures/onnx/<variant>.onnx, exported first when missing or older than checkpoint/exporter. */
export function ensureOnnx(variant: string): string {
  const out = resolve(ROOT, `test/fixtures/onnx/${variant}.onnx`);
  execFileSync('bash', ['tools/fixtures.sh'], { cwd: ROOT, stdio: 'ignore' });
  execFileSync(PYTHON, ['-m', 'ringlinear', 'export-onnx', '--model', `test/fixtures/${variant}`, '--out', out, '--skip-existing'], {
    cwd: ROOT,
    stdio: 'ignore',
    env: { ...process.env, PYTHONPATH: resolve(ROOT, 'gpu-backend') },
  });
  if (!existsSync(out)) throw new Error(`export-onnx did not write ${out}`);
  return out;
}
