/** A validated chat or text completion request, reduced to what every serving path needs. */
import type { GenerateParams, TokenLogprob } from '../engine/types';

export type JobKind = 'chat' | 'completion';

export interface GenerationJob {
  kind: JobKind;
  model: string;
  /** Prompt text per prompt (a chat request has one: the rendered template). */
  prompts: string[];
  /** Token ids per prompt, when the worker holds the model's tokenizer. */
  promptIds: number[][] | null;
  promptTokens: number;
  n: number;
  params: GenerateParams;
  stream: boolean;
  includeUsage: boolean;
  /** The validated request body; forwarded to pods. */
  body: Record<string, unknown>;
}

/** Incremental output of any serving path, per choice index. */
export type OutEvent =
  | { type: 'delta'; index: number; text: string; logprobs?: TokenLogprob[] }
  | { type: 'finish'; index: number; reason: string };

export interface TokenUsage {
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
}

export interface ChoiceResult {
  index: number;
  text: string;
  finishReason: string;
  logprobs: TokenLogprob[] | null;
}

/** A finished completion in engine-neutral form: what the cache stores and the formatters render. */
export interface CompletionResult {
  id: string;
  created: number;
  model: string;
  choices: ChoiceResult[];
  usage: TokenUsage;
}

export const usageOf = (prompt: number, completion: number): TokenUsage => ({
  prompt_tokens: prompt,
  completion_tokens: completion,
  total_tokens: prompt + completion,
});

/** Folds events into choices (used to build non-stream answers and to cache streamed ones). */
export class ChoiceCollector {
  private choices = new Map<number, ChoiceResult>();

  constructor(private readonly wantLogprobs: boolean) {}

  add(ev: OutEvent) {
    let choice = this.choices.get(ev.index);
    if (!choice) {
      choice = { index: ev.index, text: '', finishReason: 'stop', logprobs: this.wantLogprobs ? [] : null };
      this.choices.set(ev.index, choice);
    }
    if (ev.type === 'delta') {
      choice.text += ev.text;
      if (choice.logprobs && ev.logprobs) choice.logprobs.push(...ev.logprobs);
    } else {
      choice.finishReason = ev.reason;
    }
  }

  result(): ChoiceResult[] {
    return [...this.choices.values()].sort((a, b) => a.index - b.index);
  }
}

export function completionId(kind: JobKind): string {
  return `${kind === 'chat' ? 'chatcmpl' : 'cmpl'}-${crypto.randomUUID().replace(/-/g, '')}`;
}
