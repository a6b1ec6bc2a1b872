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
import { Prng, logprobsOf, randomSeed, sampleToken } from '../engine/sampling';
import { IncrementalDetokenizer, StopCutter, TextCodec } from '../engine/text';
import {
  type Engine,
  EngineBudgetError,
  type EngineInfo,
  type GenerateEvent,
  type GenerateParams,
  type TokenLogprob,
} from '../engine/types';
import { type Ort, OrtStepModel, parseStepMeta } from './step-model';

export const ISOLATE_MEMORY_BYTES = 128 * 1024 * 1024;
export const JS_RESERVE_BYTES = 24 * 1024 * 1024;
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

export class OrtEngine implements Engine {
  readonly info: EngineInfo;
  private activeRequestBytes = 0;

  constructor(
    readonly model: OrtStepModel,
    private readonly codec: TextCodec,
    private readonly eos: Set<number>,
    readonly baseBytes: number,
    readonly budgetBytes: number,
    private readonly chunk: number,
    id: string,
  ) {
    this.info = { id, engine: 'ort-web', maxContext: model.meta.max_context, vocabSize: model.meta.vocab_size };
  }

  /** Bytes a request of `positions` tokens adds: states and KV cache, plus one chunk of logits. */
  requestBytes(positions: number): number {
    return this.model.stateBytes(positions) + 4 * this.chunk * this.info.vocabSize;
  }

  encode(text: string): number[] {
    return this.codec.encode(text);
  }

  decode(ids: number[]): string {
    return this.codec.decode(ids);
  }

  applyChatTemplate(messages: { role: string; content: string }[]): string {
    return this.codec.applyChatTemplate(messages);
  }

  private checkBudget(promptLen: number, maxTokens: number): number {
    const positions = promptLen + maxTokens;
    if (promptLen > this.info.maxContext)
      throw new EngineBudgetError(`prompt has ${promptLen} tokens; this engine accepts at most ${this.info.maxContext}`, 'prompt');
    if (positions > this.info.maxContext)
      throw new EngineBudgetError(
        `prompt (${promptLen}) + max_tokens (${maxTokens}) = ${positions} exceeds the engine context of ${this.info.maxContext} tokens`,
      );
    const need = this.baseBytes + this.activeRequestBytes + this.requestBytes(positions);
    if (need > this.budgetBytes)
      throw new EngineBudgetError(
        `request needs ${(need / 2 ** 20).toFixed(1)} MiB (model + running requests + this one's state for ${positions} tokens) ` +
          `but the engine budget is ${(this.budgetBytes / 2 ** 20).toFixed(1)} MiB; lower max_tokens or retry later`,
      );
    return positions;
  }

  generate(promptIds: number[], params: GenerateParams, signal?: AbortSignal): AsyncIterable<GenerateEvent> {
    if (promptIds.length === 0) throw new RangeError('prompt must contain at least one token');
    for (const id of promptIds)
      if (!Number.isInteger(id) || id < 0 || id >= this.info.vocabSize)
        throw new RangeError(`token id ${id} is outside the vocabulary (0..${this.info.vocabSize - 1})`);
    this.checkBudget(promptIds.length, params.maxTokens);
    return this.run(promptIds, params, signal);
  }

  private async *run(promptIds: number[], params: GenerateParams, signal?: AbortSignal): AsyncGenerator<GenerateEvent> {
    // Re-checked: other requests may have started between generate() and the first iteration.
    const bytes = this.requestBytes(this.checkBudget(promptIds.length, params.maxTokens));
    this.activeRequestBytes += bytes;
    const rng = new Prng(params.seed ?? randomSeed());
    const detok = new IncrementalDetokenizer(this.codec);
    const cutter = new StopCutter(params.stop);
    let produced = 0;
    let finish: 'stop' | 'length' = 'length';
    let hitStopString = false;
    try {
      let logits: Float32Array = new Float32Array(0);
      let state = this.model.initialState();
      if (params.maxTokens > 0 && !signal?.aborted) {
        ({ logits, state } = await this.model.forward(promptIds, state, { chunk: this.chunk, lastOnly: true }));
      }
      while (produced < params.maxTokens) {
        if (signal?.aborted) { finish = 'stop'; break; }
        const id = sampleToken(logits, params, rng);
        produced++;
        if (this.eos.has(id)) { finish = 'stop'; break; }
        const lp = params.logprobs !== undefined ? [this.tokenLogprob(logits, id, params.logprobs)] : undefined;
        const piece = cutter.push(detok.push(id));
        if (piece.text || lp) yield { type: 'text', text: piece.text, ...(lp ? { logprobs: lp } : {}) };
        if (piece.stopped) { finish = 'stop'; hitStopString = true; break; }
        if (produced < params.maxTokens) {
          if (signal?.aborted) { finish = 'stop'; break; }
          // session.run is asynchronous, so other requests of the isolate interleave between tokens here.
          ({ logits, state } = await this.model.forward([id], state));
        }
      }
      if (!hitStopString && !signal?.aborted) {
        const tail = cutter.push(detok.flush());
        const rest = tail.stopped ? tail.text : tail.text + cutter.flush();
        if (rest) yield { type: 'text', text: rest };
      }
      yield { type: 'done', finishReason: finish, promptTokens: promptIds.length, completionTokens: produced };
    } finally {
      this.activeRequestBytes -= bytes;
    }
  }

  private tokenLogprob(logits: Float32Array, id: number, top: number): TokenLogprob {
    const r = logprobsOf(logits, id, top);
    return {
      token: this.codec.tokenText(id),
      logprob: r.logprob,
      top: r.top.map(([i, lp]) => ({ token: this.codec.tokenText(i), logprob: lp })),
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
