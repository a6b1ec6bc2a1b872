import * as ort from 'onnxruntime-web/wasm';
import { readFileSync } from 'node:fs';
ort.env.wasm.numThreads = 1;
const meta = JSON.parse(readFileSync('test/fixtures/onnx/tiny.json'));
for (const f of ['test/fixtures/onnx/tiny.onnx', '/tmp/ox/tiny-int8.onnx', 'test/fixtures/onnx/tiny.onnx', '/tmp/ox/tiny-int8.onnx']) {
  const s = await ort.InferenceSession.create(new Uint8Array(readFileSync(f)), { executionProviders: ['wasm'], graphOptimizationLevel: 'all' });
  const st = {};
  for (const n of meta.inputs.slice(2)) st[n] = n.startsWith('state_') ? new ort.Tensor('float32', new Float32Array(4*64*64), [4,64,64]) : new ort.Tensor('float32', new Float32Array(2*16*64), [2,16,64]);
  const feeds = { input_ids: new ort.Tensor('int64', BigInt64Array.of(5n), [1]), position: new ort.Tensor('int64', BigInt64Array.of(16n), [1]), ...st };
  for (let i = 0; i < 5; i++) await s.run(feeds);
  const t = performance.now(); for (let i = 0; i < 40; i++) await s.run(feeds);
  console.log(f, (40 / (performance.now() - t) * 1000).toFixed(1), 'steps/s');
}
