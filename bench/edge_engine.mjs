#!/usr/bin/env node
/**
 * Edge engine benchmark (not a test): single-thread prefill and decode tokens/s of the C kernel built as
 * WASM SIMD128 (f32 and int8), WASM without SIMD, and natively (gcc -O3 -march=native, strict and -ffast-math),
 * on the same random weights (rl_fill_random) and the same procedure, side by side, with ratios.
 *
 *   bash tools/build-wasm.sh && node bench/edge_engine.mjs [--configs tiny,m40] [--prompt 64] [--decode 32] [--reps 5]
 *
 * Exports `prepareWasm` / `CONFIGS` / `paramCount` for other engine benchmarks that want the same numbers next to theirs.
 */
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { cpus } from 'node:os';
import { fileURLToPath } from 'node:url';

const ROOT = fileURLToPath(new URL('..', import.meta.url));

/** Field order of the C rl_config (wasm/include/model.h): 24 int32 then 3 float32. */
const INT_FIELDS = ['vocab', 'dim', 'nLayers', 'layerGroupSize', 'nHeads', 'nKvHeads', 'headDim', 'rotDim', 'groupNormSize',
  'inter', 'firstDense', 'nExperts', 'topk', 'nGroup', 'topkGroup', 'moeInter', 'sharedInter', 'normTopkProb', 'useQkNorm',
  'linearSilu', 'slopeRuleHf', 'quant', 'maxChunk', 'maxContext'];
const FLOAT_FIELDS = ['ropeTheta', 'rmsEps', 'routedScale'];

const BASE = { normTopkProb: 1, useQkNorm: 1, linearSilu: 0, slopeRuleHf: 0, maxChunk: 64, maxContext: 1024, ropeTheta: 1e6, rmsEps: 1e-6, routedScale: 2.5 };
export const CONFIGS = {
  // architecture doc §9, the test fixture's shape
  tiny: { ...BASE, vocab: 4096, dim: 256, nLayers: 8, layerGroupSize: 4, nHeads: 4, nKvHeads: 2, headDim: 64, rotDim: 32, groupNormSize: 2,
    inter: 512, firstDense: 1, nExperts: 16, topk: 2, nGroup: 4, topkGroup: 2, moeInter: 64, sharedInter: 64 },
  // ~43M parameters, ~20M active per token: the size the 128 MB isolate can hold in int8
  m40: { ...BASE, vocab: 8192, dim: 512, nLayers: 8, layerGroupSize: 4, nHeads: 8, nKvHeads: 2, headDim: 64, rotDim: 32, groupNormSize: 4,
    inter: 1536, firstDense: 1, nExperts: 16, topk: 2, nGroup: 4, topkGroup: 2, moeInter: 128, sharedInter: 128 },
};

export function paramCount(c) {
  const hd = c.nHeads * c.headDim;
  let n = 2 * c.vocab * c.dim + c.dim;
  for (let l = 0; l < c.nLayers; l++) {
    const softmax = (l + 1) % c.layerGroupSize === 0 || l >= Math.floor(c.nLayers / c.layerGroupSize) * c.layerGroupSize;
    n += 2 * c.dim + 2 * c.headDim + hd * c.dim;
    n += softmax ? (hd + 2 * c.nKvHeads * c.headDim) * c.dim : 3 * hd * c.dim + hd * c.dim + hd;
    if (l < c.firstDense) n += 3 * c.inter * c.dim;
    else n += c.nExperts * (3 * c.moeInter * c.dim + c.dim) + 3 * c.sharedInter * c.dim + c.nExperts;
  }
  return n;
}

const promptIds = (P, V) => Array.from({ length: P }, (_, i) => (i * 7919 + 13) % V);
const argmax = (a) => { let b = 0; for (let i = 1; i < a.length; i++) if (a[i] > a[b]) b = i; return b; };

/**
 * Loads the kernel with random weights; `run()` does the procedure of wasm/bench/bench_native.c once: prefill of P
 * tokens (logits of the last row), then N greedy decode steps. Returns tokens/s of each phase.
 */
export async function prepareWasm(wasmFile, cfg, quant, { P, N, seed = 1 }) {
  const module = new WebAssembly.Module(readFileSync(ROOT + wasmFile));
  const { exports: ex } = await WebAssembly.instantiate(module, { env: { emscripten_notify_memory_growth() {} } });
  ex._initialize?.();
  const c = { ...cfg, quant: quant === 'int8' ? 1 : 0 };
  const cp = ex.rl_malloc(4 * (INT_FIELDS.length + FLOAT_FIELDS.length));
  new Int32Array(ex.memory.buffer, cp, INT_FIELDS.length).set(INT_FIELDS.map((k) => c[k]));
  new Float32Array(ex.memory.buffer, cp + 4 * INT_FIELDS.length, 3).set(FLOAT_FIELDS.map((k) => c[k]));
  const m = ex.rl_create(cp);
  if (!m) throw new Error('rl_create failed');
  ex.rl_fill_random(m, seed);
  const tok = ex.rl_malloc(4 * c.maxChunk);
  const ids = promptIds(P, c.vocab);
  const logits = (row) => new Float32Array(ex.memory.buffer, ex.rl_logits(m, row), c.vocab);
  return {
    model_mib: (ex.rl_model_bytes(m) >>> 0) / 2 ** 20,
    run() {
      const s = ex.rl_session_create(m, P + N);
      const t0 = performance.now();
      let last = 0;
      for (let i = 0; i < P; i += c.maxChunk) {
        const chunk = ids.slice(i, i + c.maxChunk);
        new Int32Array(ex.memory.buffer, tok, chunk.length).set(chunk);
        if (ex.rl_forward(m, s, tok, chunk.length)) throw new Error('rl_forward failed');
        last = chunk.length - 1;
      }
      let next = argmax(logits(last));
      const t1 = performance.now();
      for (let j = 0; j < N; j++) {
        new Int32Array(ex.memory.buffer, tok, 1)[0] = next;
        ex.rl_forward(m, s, tok, 1);
        next = argmax(logits(0));
      }
      const t2 = performance.now();
      ex.rl_session_free(s);
      return { prefill_tps: (P * 1000) / (t1 - t0), decode_tps: (N * 1000) / (t2 - t1) };
    },
    destroy: () => ex.rl_destroy(m),
  };
}

function benchNative(binary, cfg, quant, { P, N, reps, seed = 1 }) {
  const c = { ...cfg, quant: quant === 'int8' ? 1 : 0 };
  const args = [...INT_FIELDS.map((k) => String(c[k])), ...FLOAT_FIELDS.map((k) => String(c[k])), String(seed), String(P), String(N), String(reps)];
  return JSON.parse(execFileSync(ROOT + binary, args).toString());
}

function arg(name, dflt) {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? process.argv[i + 1] : dflt;
}

async function main() {
  const configs = arg('configs', 'tiny,m40').split(',');
  const opts = { P: Number(arg('prompt', 64)), N: Number(arg('decode', 32)), reps: Number(arg('reps', 5)) };
  console.log(`edge engine benchmark: ${cpus()[0]?.model ?? 'unknown cpu'}, node ${process.version}, single thread, prompt ${opts.P}, decode ${opts.N}, best of ${opts.reps} interleaved rounds`);
  const best = (a, b) => ({ prefill_tps: Math.max(a?.prefill_tps ?? 0, b.prefill_tps), decode_tps: Math.max(a?.decode_tps ?? 0, b.decode_tps) });
  for (const name of configs) {
    const cfg = CONFIGS[name];
    console.log(`\n${name}: ${(paramCount(cfg) / 1e6).toFixed(1)}M parameters`);
    console.log('engine                    quant  model MiB  prefill tok/s  decode tok/s  prefill/native  decode/native');
    for (const quant of ['f32', 'int8']) {
      const simdK = await prepareWasm('wasm/build/ringlinear.wasm', cfg, quant, opts);
      const scalarK = await prepareWasm('wasm/build/ringlinear_scalar.wasm', cfg, quant, opts);
      const r = {};
      // Rounds alternate the engines so a busy machine slows all of them alike; the best round of each counts.
      for (let i = 0; i < opts.reps; i++) {
        r.simd = best(r.simd, simdK.run());
        r.scalar = best(r.scalar, scalarK.run());
        r.native = best(r.native, benchNative('wasm/build/native/bench_native', cfg, quant, { ...opts, reps: 1 }));
        r.fast = best(r.fast, benchNative('wasm/build/native/bench_native_fastmath', cfg, quant, { ...opts, reps: 1 }));
      }
      const ref = best(r.native, r.fast);
      const row = (label, x) =>
        console.log(`${label.padEnd(26)}${quant.padEnd(7)}${simdK.model_mib.toFixed(1).padStart(9)}${x.prefill_tps.toFixed(1).padStart(15)}${x.decode_tps.toFixed(1).padStart(14)}` +
          `${(x.prefill_tps / ref.prefill_tps).toFixed(2).padStart(16)}${(x.decode_tps / ref.decode_tps).toFixed(2).padStart(15)}`);
      row('wasm simd128', r.simd);
      row('wasm scalar', r.scalar);
      row('native -O3 -march=native', r.native);
      row('native + -ffast-math', r.fast);
      simdK.destroy();
      scalarK.destroy();
    }
  }
  console.log('\nratios are against the faster native build of the same C (target: wasm simd128 >= 0.5)');
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) await main();
