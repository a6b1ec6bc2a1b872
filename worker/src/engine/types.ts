/**
 * The seam between the HTTP layer (routes, routing, cache) and an in-worker engine
 * (the SIMD WASM kernel, or onnxruntime-web). Routes only ever see this interface.
 */

/** Sampling and stopping parameters, already validated and normalised by the API layer. */
export interface GenerateParams {
  maxTokens: number;
  temperature: number; // 0 = greedy
  topP: number; // 1 = off
  topK: number; // 0 = off
  seed?: number; // same seed + same params => same tokens
  stop: string[]; // up to 4 stop strings; the text stops before the first match
  logprobs?: number; // when set, report the chosen token's logprob and this many top alternatives (0..20)
}

export interface TokenLogprob {
  token: string;
  logprob: number;
  top: { token: string; logprob: number }[];
}

/** Events a generation yields, in order: zero or more `text`, then exactly one `done`. */
export type GenerateEvent =
  | { type: 'text'; text: string; logprobs?: TokenLogprob[] } // incremental, valid UTF-8, stop strings already cut
  | { type: 'done'; finishReason: 'stop' | 'length'; promptTokens: number; completionTokens: number };

export interface EngineInfo {
  id: string; // model id served under /v1/models
  engine: 'wasm-f32' | 'wasm-int8' | 'ort-web';
  maxContext: number; // prompt + completion tokens this engine accepts
  vocabSize: number;
}

export interface Engine {
  readonly info: EngineInfo;
  /** Token ids of raw text (no special tokens added). */
  encode(text: string): number[];
  /** Renders chat messages with the model's chat template (tokenizer_config.json) into prompt text. */
  applyChatTemplate(messages: { role: string; content: string }[]): string;
  /**
   * Throws EngineBudgetError before doing any work if prompt + maxTokens would exceed the memory budget
   * or maxContext. Yields to the event loop between tokens. Stops early when `signal` aborts
   * (then ends with `done` counting the tokens produced so far).
   */
  generate(promptIds: number[], params: GenerateParams, signal?: AbortSignal): AsyncIterable<GenerateEvent>;
}

/** Raised before any work when a request cannot fit the engine's memory or context budget. */
export class EngineBudgetError extends Error {
  constructor(message: string, readonly param: string = 'max_tokens') {
    super(message);
    this.name = 'EngineBudgetError';
  }
}
