/**
 * What every in-worker engine does around its forward pass: request validation, the memory/context budget, and the
 * token loop (sampling, eos, stop strings, incremental UTF-8 detokenisation, logprobs, cancellation, yielding between
 * tokens). The WASM and ORT-web engines differ only in the `Forward` they pass in.
 */
import { Prng, logprobsOf, randomSeed, sampleToken } from './sampling';
import { IncrementalDetokenizer, StopCutter, type TextCodec } from './text';
import { EngineBudgetError, type EngineInfo, type GenerateEvent, type GenerateParams, type TokenLogprob } from './types';

/** Cloudflare's per-isolate limit. */
export const ISOLATE_MEMORY_BYTES = 128 * 1024 * 1024;
/** Reserved for the JS heap, script and tokenizer tables (measured tokenizer heap for the tiny model is ~2 MB). */
export const JS_RESERVE_BYTES = 24 * 1024 * 1024;

/** One request's forward pass: logits after the prompt, then after each sampled token. */
export interface Forward {
  prefill(promptIds: number[]): Float32Array | Promise<Float32Array>;
  step(id: number): Float32Array | Promise<Float32Array>;
  /** frees the request's state (always called, also on errors and cancellation) */
  release(): void;
}

/** Memory accounting shared by the engines: base bytes + running requests + this request must fit the budget. */
export class MemoryBudget {
  private active = 0;

  constructor(
    private readonly info: EngineInfo,
    readonly budgetBytes: number,
    private readonly baseBytes: () => number,
    private readonly requestBytes: (positions: number) => number,
  ) {}

  /** Throws EngineBudgetError if the request cannot run now; returns the positions (prompt + max_tokens) it needs. */
  check(promptLen: number, maxTokens: number): number {
    const positions = promptLen + maxTokens;
    const max = this.info.maxContext;
    if (promptLen > max) throw new EngineBudgetError(`prompt has ${promptLen} tokens; this engine accepts at most ${max}`, 'prompt');
    if (positions > max)
      throw new EngineBudgetError(`prompt (${promptLen}) + max_tokens (${maxTokens}) = ${positions} exceeds the engine context of ${max} tokens`);
    const need = this.baseBytes() + this.active + this.requestBytes(positions);
    if (need > this.budgetBytes)
      throw new EngineBudgetError(
        `request needs ${(need / 2 ** 20).toFixed(1)} MiB (model + running requests + this one's state for ${positions} tokens) ` +
          `but the engine budget is ${(this.budgetBytes / 2 ** 20).toFixed(1)} MiB; lower max_tokens or retry later`,
      );
    return positions;
  }

  /** Re-checks (other requests may have started since) and holds the request's bytes until `free` is called. */
  reserve(promptLen: number, maxTokens: number): { positions: number; free: () => void } {
    const positions = this.check(promptLen, maxTokens);
    const bytes = this.requestBytes(positions);
    this.active += bytes;
    return { positions, free: () => void (this.active -= bytes) };
  }
}

/** Rejects an empty prompt or ids outside the vocabulary before any work. */
export function validatePrompt(promptIds: number[], vocabSize: number): void {
  if (promptIds.length === 0) throw new RangeError('prompt must contain at least one token');
  for (const id of promptIds)
    if (!Number.isInteger(id) || id < 0 || id >= vocabSize)
      throw new RangeError(`token id ${id} is outside the vocabulary (0..${vocabSize - 1})`);
}

export function tokenLogprob(codec: TextCodec, logits: Float32Array, id: number, top: number): TokenLogprob {
  const r = logprobsOf(logits, id, top);
  return {
    token: codec.tokenText(id),
    logprob: r.logprob,
    top: r.top.map(([i, lp]) => ({ token: codec.tokenText(i), logprob: lp })),
  };
}

/**
 * The shell every in-worker engine shares: text side, request validation, the memory budget and the token loop.
 * A subclass says what the model costs (`baseBytes`, `requestBytes`) and opens one request's forward pass.
 */
export abstract class LocalEngine {
  abstract readonly info: EngineInfo;
  abstract readonly baseBytes: number;
  abstract readonly budgetBytes: number;
  private memory?: MemoryBudget;

  constructor(
    protected readonly codec: TextCodec,
    private readonly eos: Set<number>,
  ) {}

  /** Bytes a request of `positions` tokens (prompt + max_tokens) adds. */
  abstract requestBytes(positions: number): number;
  /** One request's forward pass, with state for `positions` tokens. */
  protected abstract open(positions: number): Forward;

  private get budget(): MemoryBudget {
    return (this.memory ??= new MemoryBudget(this.info, this.budgetBytes, () => this.baseBytes, (n) => this.requestBytes(n)));
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

  /** Validates and checks the budget now (errors before any work), then runs lazily. */
  generate(promptIds: number[], params: GenerateParams, signal?: AbortSignal): AsyncIterable<GenerateEvent> {
    validatePrompt(promptIds, this.info.vocabSize);
    this.budget.check(promptIds.length, params.maxTokens);
    return this.run(promptIds, params, signal);
  }

  private async *run(promptIds: number[], params: GenerateParams, signal?: AbortSignal): AsyncGenerator<GenerateEvent> {
    // Re-checked inside reserve(): other requests may have started since generate().
    const { positions, free } = this.budget.reserve(promptIds.length, params.maxTokens);
    let forward: Forward;
    try {
      forward = this.open(positions);
    } catch (e) {
      free();
      throw e;
    }
    const release = () => {
      forward.release();
      free();
    };
    yield* generateTokens({ prefill: forward.prefill, step: forward.step, release }, promptIds, params, this.codec, this.eos, signal);
  }
}

/** The token loop. `forward` is released when the loop ends, however it ends. */
export async function* generateTokens(
  forward: Forward,
  promptIds: number[],
  params: GenerateParams,
  codec: TextCodec,
  eos: Set<number>,
  signal?: AbortSignal,
): AsyncGenerator<GenerateEvent> {
  const rng = new Prng(params.seed ?? randomSeed());
  const detok = new IncrementalDetokenizer(codec);
  const cutter = new StopCutter(params.stop);
  let produced = 0;
  let finish: 'stop' | 'length' = 'length';
  let hitStopString = false;
  try {
    let logits: Float32Array = new Float32Array(0);
    if (params.maxTokens > 0 && !signal?.aborted) logits = await forward.prefill(promptIds);
    while (produced < params.maxTokens) {
      if (signal?.aborted) { finish = 'stop'; break; }
      const id = sampleToken(logits, params, rng);
      produced++;
      if (eos.has(id)) { finish = 'stop'; break; }
      const lp = params.logprobs !== undefined ? [tokenLogprob(codec, logits, id, params.logprobs)] : undefined;
      const piece = cutter.push(detok.push(id));
      if (piece.text || lp) yield { type: 'text', text: piece.text, ...(lp ? { logprobs: lp } : {}) };
      if (piece.stopped) { finish = 'stop'; hitStopString = true; break; }
      if (produced < params.maxTokens) {
        // Let other requests of this isolate run (and streamed bytes flush) between tokens.
        await new Promise<void>((r) => setTimeout(r, 0));
        if (signal?.aborted) { finish = 'stop'; break; }
        logits = await forward.step(id);
      }
    }
    if (!hitStopString && !signal?.aborted) {
      // text held back for an incomplete character or a possible stop string
      const tail = cutter.push(detok.flush());
      const rest = tail.stopped ? tail.text : tail.text + cutter.flush();
      if (rest) yield { type: 'text', text: rest };
    }
    yield { type: 'done', finishReason: finish, promptTokens: promptIds.length, completionTokens: produced };
  } finally {
    forward.release();
  }
}
