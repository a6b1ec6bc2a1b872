/**
 * A small deterministic engine for tests of the HTTP layer (routing, metering, cache, limits). It is a real
 * implementation of the Engine contract over a toy model: byte-level tokenizer, an 8-word vocabulary
 * plus end-of-text, logits from a hash of the context, greedy or seeded sampling with temperature/top-k/
 * top-p, stop strings, logprobs, budget refusal and abort. Test-only: production never imports it.
 */
import { EngineBudgetError, type Engine, type EngineInfo, type GenerateEvent, type GenerateParams, type TokenLogprob } from '../../../src/engine/types';

export const WORDS = ['alpha ', 'beta ', 'gamma ', 'delta ', 'echo ', 'fox ', 'golf ', 'hotel '];
const EOS = WORDS.length; // index of end-of-text

function mix(h: number, v: number): number {
  h ^= v + 0x9e3779b9 + (h << 6) + (h >>> 2);
  return Math.imul(h ^ (h >>> 15), 0x2c1b3c6d) >>> 0;
}

/** Mulberry32: a seeded PRNG. */
function prng(seed: number) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export interface TestEngineOptions {
  id?: string;
  maxContext?: number;
  /** Milliseconds between tokens (lets tests abort or overlap streams). */
  tokenDelayMs?: number;
  /** Logit bias of end-of-text; very negative keeps generations at max_tokens. */
  eosBias?: number;
}

export class TestEngine implements Engine {
  readonly info: EngineInfo;
  generateCalls = 0;
  /** Tokens produced by the last finished generation (what its done event reported). */
  lastProduced = 0;
  private readonly delay: number;
  private readonly eosBias: number;

  constructor(opts: TestEngineOptions = {}) {
    this.info = { id: opts.id ?? 'ring-test', engine: 'wasm-f32', maxContext: opts.maxContext ?? 4096, vocabSize: 256 };
    this.delay = opts.tokenDelayMs ?? 0;
    this.eosBias = opts.eosBias ?? -1000;
  }

  encode(text: string): number[] {
    return [...new TextEncoder().encode(text)];
  }

  applyChatTemplate(messages: { role: string; content: string }[]): string {
    return messages.map((m) => `<|${m.role}|>${m.content}\n`).join('') + '<|assistant|>';
  }

  private logits(context: number[]): number[] {
    let h = 0x12345;
    for (const id of context) h = mix(h, id);
    return [...WORDS.map((_, i) => ((mix(h, i + 1) % 1000) / 1000) * 4), this.eosBias];
  }

  async *generate(promptIds: number[], params: GenerateParams, signal?: AbortSignal): AsyncGenerator<GenerateEvent> {
    if (promptIds.length + params.maxTokens > this.info.maxContext) {
      throw new EngineBudgetError(`prompt ${promptIds.length} + max_tokens ${params.maxTokens} exceeds ${this.info.maxContext}`);
    }
    this.generateCalls++;
    const random = prng(params.seed ?? Math.floor(Math.random() * 2 ** 32));
    const context = [...promptIds];
    let text = '';
    let emitted = 0; // characters of `text` already sent
    let produced = 0;
    let finishReason: 'stop' | 'length' = 'length';
    while (produced < params.maxTokens) {
      if (signal?.aborted) break;
      await new Promise((r) => setTimeout(r, this.delay));
      if (signal?.aborted) break;
      const logits = this.logits(context);
      const max = Math.max(...logits);
      const logZ = max + Math.log(logits.reduce((s, l) => s + Math.exp(l - max), 0));
      const logprobs = logits.map((l) => l - logZ);
      let choice: number;
      if (params.temperature === 0) {
        choice = logits.indexOf(max);
      } else {
        let order = logits.map((l, i) => ({ i, p: Math.exp((l - max) / params.temperature) })).sort((a, b) => b.p - a.p);
        if (params.topK > 0) order = order.slice(0, params.topK);
        const total = order.reduce((s, x) => s + x.p, 0);
        let kept = 0;
        order = order.filter((x) => (kept += x.p / total) - x.p / total < params.topP);
        const sum = order.reduce((s, x) => s + x.p, 0);
        let r = random() * sum;
        choice = order[order.length - 1].i;
        for (const x of order) if ((r -= x.p) <= 0) { choice = x.i; break; }
      }
      produced++;
      if (choice === EOS) {
        finishReason = 'stop';
        break;
      }
      context.push(...this.encode(WORDS[choice]));
      text += WORDS[choice];
      const lp: TokenLogprob[] | undefined =
        params.logprobs === undefined
          ? undefined
          : [{
              token: WORDS[choice],
              logprob: logprobs[choice],
              top: logprobs
                .map((l, i) => ({ token: i === EOS ? '' : WORDS[i], logprob: l }))
                .sort((a, b) => b.logprob - a.logprob)
                .slice(0, params.logprobs),
            }];
      const stopAt = params.stop.map((s) => text.indexOf(s)).filter((i) => i >= 0);
      if (stopAt.length) {
        const cut = Math.min(...stopAt);
        if (cut > emitted) yield { type: 'text', text: text.slice(emitted, cut), logprobs: lp };
        finishReason = 'stop';
        break;
      }
      // Hold back a tail that could still become a stop string.
      let safe = text.length;
      for (const s of params.stop) for (let k = Math.min(s.length - 1, text.length); k > 0; k--) if (text.endsWith(s.slice(0, k))) safe = Math.min(safe, text.length - k);
      if (safe > emitted || lp) {
        yield { type: 'text', text: text.slice(emitted, safe), logprobs: lp };
        emitted = Math.max(emitted, safe);
      }
    }
    if (finishReason === 'length' && emitted < text.length && !signal?.aborted) yield { type: 'text', text: text.slice(emitted) };
    this.lastProduced = produced;
    yield { type: 'done', finishReason, promptTokens: promptIds.length, completionTokens: produced };
  }
}
