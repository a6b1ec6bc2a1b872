/**
 * onnxruntime-web inside workerd, where wasm cannot be compiled from bytes at run time (toolchain probe §6):
 * the ORT wasm is imported precompiled (CompiledWasm), a dummy `wasmBinary` makes ORT take its embedded
 * single-threaded glue (no URL, fetch or dynamic import), and the glue's `WebAssembly.instantiate(bytes)` is
 * answered with the precompiled module. Only that exact dummy is redirected; every other call is untouched.
 */
import * as ort from 'onnxruntime-web/wasm';
import ortWasmModule from 'onnxruntime-web/ort-wasm-simd-threaded.wasm';
import type { Ort } from './step-model';

const DUMMY_WASM = new Uint8Array([0, 97, 115, 109, 1, 0, 0, 0]); // "\0asm" v1, never compiled

function isDummy(src: unknown): boolean {
  const bytes = src instanceof ArrayBuffer ? new Uint8Array(src) : ArrayBuffer.isView(src) ? new Uint8Array(src.buffer, src.byteOffset, src.byteLength) : null;
  return bytes !== null && bytes.length === DUMMY_WASM.length && bytes.every((b, i) => b === DUMMY_WASM[i]);
}

let installed = false;

/** onnxruntime-web set up for workerd (idempotent). */
export function ortForWorkerd(): Ort {
  if (installed) return ort;
  ort.env.wasm.numThreads = 1;
  ort.env.wasm.proxy = false;
  ort.env.wasm.wasmBinary = DUMMY_WASM;
  const original = WebAssembly.instantiate.bind(WebAssembly) as (src: unknown, imports?: WebAssembly.Imports) => Promise<unknown>;
  (WebAssembly as unknown as { instantiate: unknown }).instantiate = (src: unknown, imports?: WebAssembly.Imports) =>
    isDummy(src)
      ? original(ortWasmModule, imports).then((instance) => ({ instance, module: ortWasmModule }))
      : original(src, imports);
  installed = true;
  return ort;
}
