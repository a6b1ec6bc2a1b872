/**
 * The model embedded in the worker bundle: the kernel (CompiledWasm) and the checkpoint files of
 * models/default (JSON modules and the weights as a Data module). Built into an engine lazily, on the first
 * request that needs it, and kept for the isolate's life.
 */
import kernelModule from '../../wasm/build/ringlinear.wasm';
import config from '../../models/default/config.json';
import generationConfig from '../../models/default/generation_config.json';
import tokenizer from '../../models/default/tokenizer.json';
import tokenizerConfig from '../../models/default/tokenizer_config.json';
import weights from '../../models/default/model.safetensors';
import type { Engine } from './engine/types';
import { createWasmEngine } from './engine/wasm-engine';

export interface EmbeddedModelOptions {
  id: string;
  quant: 'f32' | 'int8';
  maxContext?: number;
}

export function createEmbeddedEngine(opts: EmbeddedModelOptions): Promise<Engine> {
  return createWasmEngine({
    module: kernelModule,
    files: { config, tokenizer, tokenizerConfig, generationConfig, weights },
    quant: opts.quant,
    id: opts.id,
    ...(opts.maxContext ? { maxContext: opts.maxContext } : {}),
  });
}
