/**
 * Edge engines side by side under Node, one thread: onnxruntime-web (wasm SIMD, the exported step graph) vs our WASM
 * engine (C + SIMD128) in f32 and int8, on the same weights. Prefill and decode tokens/s, ratios against ORT-web.
 * A benchmark, not a test. Run through bench/edge_vs_ort.sh (prepares the models, bundles this file, runs node).
 */
import { readFileSync } from 'node:fs';
import { cpus } from 'node:os';
import * as ort from 'onnxruntime-web/wasm';
import { createWasmEngine, type WasmEngine } from '../worker/src/engine/wasm-engine';
import { OrtStepModel, parseStepMeta } from '../worker/src/ort/step-model';

const ROOT = new URL('../', import.meta.url).pathname.replace(/bench\/dist\/$/, '').replace(/bench\/$/, '');
const read = (p: string) => readFileSync(ROOT + p);
const arg = (name: string, dflt: number) => {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? Number(process.argv[i + 1]) : dflt;
};
const PREFILL = arg('prefill', 64);
const DECODE = arg('decode', 64);
const REPEAT = arg('repeat', 3);
const MODELS = (process.argv.includes('--models') ? process.argv[process.argv.indexOf('--models') + 1] : 'tiny,bench-45m').split(',');

interface Runner {
  name: string;
  /** ms for prefilling `ids` into a fresh sequence; returns the argmax of the last logits */
  prefill(ids: number[]): Promise<{ ms: number; next: number }>;
  /** ms for `n` greedy decode steps after a prefill of `ids`; returns the greedy ids */
  decode(ids: number[], n: number): Promise<{ ms: number; ids: number[] }>;
}

function argmax(x: Float32Array): number {
  let b = 0;
  for (let i = 1; i < x.length; i++) if (x[i] > x[b]) b = i;
  return b;
}

async function ortRunner(model: string, moe: 'gather' | 'dense'): Promise<Runner> {
  const file = moe === 'gather' ? model : `${model}-dense`;
  const meta = parseStepMeta(JSON.parse(read(`test/fixtures/onnx-bench/${file}.json`).toString()));
  const m = await OrtStepModel.create(ort, new Uint8Array(read(`test/fixtures/onnx-bench/${file}.onnx`)), meta);
  return {
    name: `ort-web (${moe} MoE)`,
    async prefill(ids) {
      const t = performance.now();
      const r = await m.forward(ids, m.initialState(), { chunk: 64, lastOnly: true });
      return { ms: performance.now() - t, next: argmax(r.logits) };
    },
    async decode(ids, n) {
      let { logits, state } = await m.forward(ids, m.initialState(), { chunk: 64, lastOnly: true });
      const out: number[] = [];
      const t = performance.now();
      for (let i = 0; i < n; i++) {
        const id = argmax(logits);
        out.push(id);
        ({ logits, state } = await m.forward([id], state));
      }
      return { ms: performance.now() - t, ids: out };
    },
  };
}

async function wasmRunner(model: string, quant: 'f32' | 'int8'): Promise<Runner> {
  const dir = `test/fixtures/${model}/`;
  const module = new (WebAssembly.Module as unknown as new (b: Uint8Array) => WebAssembly.Module)(read('wasm/build/ringlinear.wasm'));
  const engine: WasmEngine = await createWasmEngine({
    module,
    quant,
    memoryBudgetBytes: 1024 * 2 ** 20, // the bench measures speed; the 128 MB budget is tested elsewhere
    files: {
      config: read(dir + 'config.json').toString(),
      tokenizer: read(dir + 'tokenizer.json').toString(),
      tokenizerConfig: read(dir + 'tokenizer_config.json').toString(),
      weights: new Uint8Array(read(dir + 'model.safetensors')),
    },
  });
  const { runner } = engine;
  const k = runner.kernel;
  const V = engine.info.vocabSize;
  return {
    name: `wasm-${quant}`,
    async prefill(ids) {
      const s = k.createSession(ids.length + 1);
      const t = performance.now();
      const last = runner.prefill(s, ids)[0];
      const ms = performance.now() - t;
      k.freeSession(s);
      return { ms, next: argmax(last) };
    },
    async decode(ids, n) {
      const s = k.createSession(ids.length + n + 1);
      let logits = Float32Array.from(runner.prefill(s, ids)[0]);
      const buf = new Float32Array(V);
      const out: number[] = [];
      const t = performance.now();
      for (let i = 0; i < n; i++) {
        const id = argmax(logits);
        out.push(id);
        logits = runner.decode(s, id, buf);
      }
      const ms = performance.now() - t;
      k.freeSession(s);
      return { ms, ids: out };
    },
  };
}

async function benchModel(model: string) {
  const tokens = (n: number) => Array.from({ length: n }, (_, i) => 3 + ((i * 7919) % 4000)); // ids valid in both vocabularies
  const runners: Runner[] = [await ortRunner(model, 'gather'), await ortRunner(model, 'dense')];
  let wasmError = '';
  for (const q of ['f32', 'int8'] as const) {
    try {
      runners.push(await wasmRunner(model, q));
    } catch (e) {
      wasmError = `wasm engine unavailable: ${(e as Error).message}`;
    }
  }
  // Rounds alternate between the engines so that load from other processes hits them alike; best round counts.
  const rows = runners.map((r) => ({ name: r.name, prefill: 0, decode: 0, ids: [] as number[] }));
  for (let round = 0; round <= REPEAT; round++) {
    for (const [i, r] of runners.entries()) {
      const p = await r.prefill(tokens(PREFILL));
      const d = await r.decode(tokens(16), DECODE);
      if (round === 0) continue; // warm-up
      rows[i].prefill = Math.max(rows[i].prefill, (PREFILL / p.ms) * 1000);
      rows[i].decode = Math.max(rows[i].decode, (DECODE / d.ms) * 1000);
      rows[i].ids = d.ids;
    }
  }
  // The bar is the faster ORT-web graph in each phase.
  const ortPrefill = Math.max(rows[0].prefill, rows[1].prefill);
  const ortDecode = Math.max(rows[0].decode, rows[1].decode);
  console.log(`\n## ${model}: prefill ${PREFILL} tokens, decode ${DECODE} tokens after 16 (best of ${REPEAT})`);
  console.log('| engine | prefill tok/s | decode tok/s | prefill vs best ORT-web | decode vs best ORT-web | greedy ids = ORT-web |');
  console.log('|---|---|---|---|---|---|');
  for (const r of rows) {
    const same = r.ids.findIndex((id, i) => id !== rows[0].ids[i]);
    console.log(
      `| ${r.name} | ${r.prefill.toFixed(1)} | ${r.decode.toFixed(1)} | ${(r.prefill / ortPrefill).toFixed(2)}x | ` +
        `${(r.decode / ortDecode).toFixed(2)}x | ${same < 0 ? 'all' : `first ${same} of ${DECODE}`} |`,
    );
  }
  if (wasmError) console.log(`\n${wasmError}`);
}

console.log(`machine: ${cpus()[0]?.model ?? 'unknown'}, node ${process.version}, onnxruntime-web ${ort.env.versions.web ?? ''} (1 thread)`);
for (const m of MODELS) await benchModel(m);
