/**
 * The in-worker engine over the C/SIMD128 kernel: `createWasmEngine({ module, files, quant })`.
 *
 * Memory: weights, activation scratch and every running request's session (fp32 linear states + softmax KV cache
 * for prompt + max_tokens positions) live in the kernel's wasm memory. A fixed reserve stands for the JS side
 * (tokenizer tables, script, runtime). A request whose session would push the total over the budget is refused
 * with EngineBudgetError before any work; so is a model that does not fit at all.
 */
import { parseJson, parseModelConfig, type ModelConfig } from './config';
import { type Kernel, instantiateKernel } from './kernel';
import { type Bytes, readSafetensors, readShardedSafetensors } from './safetensors';
import { type Forward, ISOLATE_MEMORY_BYTES, JS_RESERVE_BYTES, LocalEngine } from './generation';
import { TextCodec } from './text';
import { type Engine, EngineBudgetError, type EngineInfo } from './types';
import { loadWeights } from './weights';

export { ISOLATE_MEMORY_BYTES, JS_RESERVE_BYTES };
const DEFAULT_MAX_CHUNK = 64;
const DEFAULT_MAX_CONTEXT = 4096;

export interface CheckpointFiles {
  config: string | object; // config.json
  tokenizer: string | object; // tokenizer.json
  tokenizerConfig?: string | object; // tokenizer_config.json (chat_template, special tokens)
  generationConfig?: string | object; // generation_config.json (eos ids)
  /** model.safetensors bytes, or the sharded form: index.json + shard bytes by file name */
  weights: Bytes | { index: string | object; shards: Record<string, Bytes> };
}

export interface WasmEngineOptions {
  /** the kernel, precompiled: `import m from '.../ringlinear.wasm'` in workers */
  module: WebAssembly.Module;
  files: CheckpointFiles;
  quant?: 'f32' | 'int8';
  id?: string;
  memoryBudgetBytes?: number;
  maxChunk?: number;
  maxContext?: number;
}

/** Direct access to the model for tests and benchmarks: prefill/decode with logits and states. */
export class ModelRunner {
  constructor(readonly kernel: Kernel, readonly cfg: ModelConfig) {}

  /** Feeds tokens in chunks; returns logits of every position (all = true) or of the last one. */
  prefill(session: number, ids: number[], all = false): Float32Array<ArrayBuffer>[] {
    const out: Float32Array<ArrayBuffer>[] = [];
    const C = this.cfg.kernel.maxChunk;
    for (let i = 0; i < ids.length; i += C) {
      const chunk = ids.slice(i, i + C);
      this.kernel.forward(session, chunk);
      if (all) for (let r = 0; r < chunk.length; r++) out.push(this.kernel.logits(r));
      else if (i + C >= ids.length) out.push(this.kernel.logits(chunk.length - 1));
    }
    return out;
  }

  decode(session: number, id: number, out?: Float32Array<ArrayBuffer>): Float32Array<ArrayBuffer> {
    this.kernel.forward(session, [id]);
    return this.kernel.logits(0, out);
  }
}

export class WasmEngine extends LocalEngine implements Engine {
  readonly info: EngineInfo;
  readonly runner: ModelRunner;

  constructor(
    private readonly kernel: Kernel,
    private readonly cfg: ModelConfig,
    codec: TextCodec,
    readonly budgetBytes: number,
    info: EngineInfo,
  ) {
    super(codec, new Set(cfg.eosTokenIds));
    this.info = info;
    this.runner = new ModelRunner(kernel, cfg);
  }

  /** Bytes the engine holds with no request running: wasm weights + scratch + the JS reserve. */
  get baseBytes(): number {
    return this.kernel.modelBytes() + JS_RESERVE_BYTES;
  }
  /** Bytes a request of `positions` tokens (prompt + max_tokens) adds. */
  requestBytes(positions: number): number {
    return this.kernel.sessionBytes(positions);
  }
  /** Current wasm linear memory (it only grows); tests compare it with the budget. */
  get wasmMemoryBytes(): number {
    return this.kernel.memoryBytes;
  }

  protected open(positions: number): Forward {
    const session = this.kernel.createSession(positions);
    const logits = new Float32Array(this.info.vocabSize);
    return {
      prefill: (ids: number[]) => (logits.set(this.runner.prefill(session, ids)[0]), logits),
      step: (id: number) => this.runner.decode(session, id, logits),
      release: () => this.kernel.freeSession(session),
    };
  }

  destroy(): void {
    this.kernel.destroy();
  }
}

/** Largest context (positions) whose session fits next to the model within the budget. */
function contextThatFits(kernel: Kernel, budget: number, cap: number): number {
  const free = budget - kernel.modelBytes() - JS_RESERVE_BYTES;
  let lo = 0;
  let hi = cap;
  while (lo < hi) {
    const mid = Math.floor((lo + hi + 1) / 2);
    if (kernel.sessionBytes(mid) <= free) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

/** Builds an engine from a checkpoint's bytes. The checkpoint buffers are not retained. */
export async function createWasmEngine(opts: WasmEngineOptions): Promise<WasmEngine> {
  const quant = opts.quant ?? 'f32';
  const budget = opts.memoryBudgetBytes ?? ISOLATE_MEMORY_BYTES;
  const f = opts.files;
  const generationConfig = f.generationConfig ? parseJson(f.generationConfig, 'generation_config.json') : undefined;
  const requestedContext = opts.maxContext ?? DEFAULT_MAX_CONTEXT;
  const cfg = parseModelConfig(f.config, {
    quant,
    maxChunk: opts.maxChunk ?? DEFAULT_MAX_CHUNK,
    maxContext: requestedContext,
    generationConfig,
  });
  const codec = new TextCodec(f.tokenizer, f.tokenizerConfig);
  const tensors =
    f.weights instanceof ArrayBuffer || f.weights instanceof Uint8Array
      ? readSafetensors(f.weights)
      : readShardedSafetensors(f.weights.index, f.weights.shards);
  const kernel = await instantiateKernel(opts.module);
  kernel.createModel(cfg.kernel);
  try {
    if (kernel.modelBytes() + JS_RESERVE_BYTES > budget)
      throw new EngineBudgetError(
        `model needs ${(kernel.modelBytes() / 2 ** 20).toFixed(1)} MiB of wasm memory in ${quant}; with the ` +
          `${JS_RESERVE_BYTES / 2 ** 20} MiB JS reserve that exceeds the ${(budget / 2 ** 20).toFixed(1)} MiB budget`,
        'model',
      );
    loadWeights(kernel, cfg, tensors);
  } catch (e) {
    kernel.destroy();
    throw e;
  }
  const maxContext = contextThatFits(kernel, budget, cfg.kernel.maxContext);
  if (maxContext < 1) {
    kernel.destroy();
    throw new EngineBudgetError('no room left for even one token of request state within the budget', 'model');
  }
  return new WasmEngine(kernel, cfg, codec, budget, {
    id: opts.id ?? 'ringlinear-edge',
    engine: quant === 'int8' ? 'wasm-int8' : 'wasm-f32',
    maxContext,
    vocabSize: cfg.kernel.vocab,
  });
}
