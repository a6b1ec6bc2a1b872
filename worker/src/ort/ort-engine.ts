/**
 * The `Engine` over onnxruntime-web: the exported step graph (see step-model.ts) plus the same text side and sampling
 * as the WASM engine (worker/src/engine/text.ts, sampling.ts), so the two engines differ only in the forward pass.
 *
 * Memory: onnxruntime-web copies the model bytes into its wasm heap and unpacks the initializers there, and the heap
 * never shrinks. Measured under Node (docs/ort-engine.md): RSS grows by about 3.7 bytes per .onnx byte on session
 * creation, one of which is the caller's copy of the bytes, over a fixed ~100 MiB of compiled ORT code. The engine
 * counts ORT_HEAP_PER_MODEL_BYTE x the .onnx size plus the JS reserve as its base (ORT exposes no heap size, so this is
 * an estimate, compiled code excluded) and refuses a request whose states + KV cache + logits would exceed the budget.
 */
import { parseJson } from '../engine/config';
import { type Forward, ISOLATE_MEMORY_BYTES, JS_RESERVE_BYTES, LocalEngine } from '../engine/generation';
import { TextCodec } from '../engine/text';
import { type Engine, EngineBudgetError, type EngineInfo } from '../engine/types';
import { type Ort, OrtStepModel, parseStepMeta } from './step-model';

export { ISOLATE_MEMORY_BYTES, JS_RESERVE_BYTES };
/** wasm heap bytes per .onnx byte after session creation (measured 2.7, rounded up). */
export const ORT_HEAP_PER_MODEL_BYTE = 3;
const DEFAULT_CHUNK = 64;

export interface OrtEngineOptions {
  /** `onnxruntime-web/wasm` (in workerd after `installWorkerdShim`, see workerd.ts) */
  ort: Ort;
  /** the .onnx written by `python -m ringlinear export-onnx` */
  model: ArrayBuffer | Uint8Array;
  /** the .json written beside it */
  meta: string | object;
  tokenizer: string | object; // tokenizer.json
  tokenizerConfig?: string | object; // tokenizer_config.json
  generationConfig?: string | object; // generation_config.json (eos ids)
  id?: string;
  memoryBudgetBytes?: number;
  /** prompt tokens per graph call (bounds the T x T attention inside one call) */
  chunk?: number;
}

function eosIds(generationConfig: string | object | undefined, fallback: number[]): number[] {
  if (!generationConfig) return fallback;
  const e = parseJson(generationConfig, 'generation_config.json').eos_token_id;
  if (e === undefined || e === null) return fallback;
  const ids = Array.isArray(e) ? e : [e];
  if (!ids.every((x) => Number.isInteger(x))) throw new Error('generation_config.json: eos_token_id must be an integer or a list of integers');
  return ids as number[];
}

export class OrtEngine extends LocalEngine implements Engine {
  readonly info: EngineInfo;

  constructor(
    readonly model: OrtStepModel,
    codec: TextCodec,
    eos: Set<number>,
    readonly baseBytes: number,
    readonly budgetBytes: number,
    private readonly chunk: number,
    id: string,
  ) {
    super(codec, eos);
    this.info = { id, engine: 'ort-web', maxContext: model.meta.max_context, vocabSize: model.meta.vocab_size };
  }

  /** Bytes a request of `positions` tokens adds: states and KV cache, plus one chunk of logits. */
  requestBytes(positions: number): number {
    return this.model.stateBytes(positions) + 4 * this.chunk * this.info.vocabSize;
  }

  // session.run is asynchronous, so other requests of the isolate also interleave inside each step.
  protected open(): Forward {
    let state = this.model.initialState();
    return {
      prefill: async (ids: number[]) => {
        const r = await this.model.forward(ids, state, { chunk: this.chunk, lastOnly: true });
        state = r.state;
        return r.logits;
      },
      step: async (id: number) => {
        const r = await this.model.forward([id], state);
        state = r.state;
        return r.logits;
      },
      release: () => {},
    };
  }

  async destroy(): Promise<void> {
    await this.model.release();
  }
}

/** Builds the engine; refuses (EngineBudgetError, param "model") a model that cannot fit the budget at all. */
export async function createOrtEngine(opts: OrtEngineOptions): Promise<OrtEngine> {
  const budget = opts.memoryBudgetBytes ?? ISOLATE_MEMORY_BYTES;
  const meta = parseStepMeta(parseJson(opts.meta, 'ONNX metadata (.json beside the .onnx)'));
  const bytes = opts.model instanceof Uint8Array ? opts.model : new Uint8Array(opts.model);
  const base = ORT_HEAP_PER_MODEL_BYTE * bytes.byteLength + JS_RESERVE_BYTES;
  if (base > budget)
    throw new EngineBudgetError(
      `the ONNX model (${(bytes.byteLength / 2 ** 20).toFixed(1)} MiB, about ${ORT_HEAP_PER_MODEL_BYTE}x that in ` +
        `onnxruntime-web's heap) plus the ` +
        `${JS_RESERVE_BYTES / 2 ** 20} MiB JS reserve exceeds the ${(budget / 2 ** 20).toFixed(1)} MiB budget`,
      'model',
    );
  const codec = new TextCodec(opts.tokenizer, opts.tokenizerConfig);
  const model = await OrtStepModel.create(opts.ort, bytes, meta);
  const eos = new Set(eosIds(opts.generationConfig, meta.eos_token_ids));
  return new OrtEngine(model, codec, eos, base, budget, Math.max(1, opts.chunk ?? DEFAULT_CHUNK), opts.id ?? 'ringlinear-edge-ort');
}
