/** Renders engine-neutral results and events in the OpenAI wire shapes (responses and SSE chunks). */
import type { TokenLogprob } from '../engine/types';
import type { ChoiceResult, CompletionResult, JobKind, OutEvent, TokenUsage } from './job';

const utf8 = new TextEncoder();

function chatLogprobs(lps: TokenLogprob[]) {
  return {
    content: lps.map((lp) => ({
      token: lp.token,
      logprob: lp.logprob,
      bytes: [...utf8.encode(lp.token)],
      top_logprobs: lp.top.map((t) => ({ token: t.token, logprob: t.logprob, bytes: [...utf8.encode(t.token)] })),
    })),
  };
}

/** Legacy completions logprobs; `offset` is the text offset of the first token. */
function completionLogprobs(lps: TokenLogprob[], offset: number) {
  const text_offset: number[] = [];
  let at = offset;
  for (const lp of lps) {
    text_offset.push(at);
    at += lp.token.length;
  }
  return {
    tokens: lps.map((lp) => lp.token),
    token_logprobs: lps.map((lp) => lp.logprob),
    top_logprobs: lps.map((lp) => Object.fromEntries(lp.top.map((t) => [t.token, t.logprob]))),
    text_offset,
  };
}

function formatLogprobs(kind: JobKind, lps: TokenLogprob[] | null | undefined, offset = 0) {
  if (!lps) return null;
  return kind === 'chat' ? chatLogprobs(lps) : completionLogprobs(lps, offset);
}

export function formatResponse(kind: JobKind, r: CompletionResult) {
  if (kind === 'chat') {
    return {
      id: r.id,
      object: 'chat.completion' as const,
      created: r.created,
      model: r.model,
      choices: r.choices.map((c: ChoiceResult) => ({
        index: c.index,
        message: { role: 'assistant' as const, content: c.text },
        logprobs: formatLogprobs(kind, c.logprobs),
        finish_reason: c.finishReason,
      })),
      usage: r.usage,
    };
  }
  return {
    id: r.id,
    object: 'text_completion' as const,
    created: r.created,
    model: r.model,
    choices: r.choices.map((c) => ({ index: c.index, text: c.text, logprobs: formatLogprobs(kind, c.logprobs), finish_reason: c.finishReason })),
    usage: r.usage,
  };
}

export interface ChunkBase {
  id: string;
  created: number;
  model: string;
}

/** Builds the SSE chunks of one completion from its events. Keeps per-choice text offsets for logprobs. */
export class ChunkWriter {
  private started = new Set<number>();
  private offsets = new Map<number, number>();

  constructor(
    private readonly kind: JobKind,
    private readonly base: ChunkBase,
    private readonly includeUsage: boolean,
  ) {}

  private chunk(choices: unknown[]) {
    const object = this.kind === 'chat' ? 'chat.completion.chunk' : 'text_completion';
    return { id: this.base.id, object, created: this.base.created, model: this.base.model, choices, ...(this.includeUsage ? { usage: null } : {}) };
  }

  /** Chunks for one event (chat sends a role-only chunk before a choice's first text). */
  chunks(ev: OutEvent): unknown[] {
    const out: unknown[] = [];
    if (this.kind === 'chat' && !this.started.has(ev.index)) {
      this.started.add(ev.index);
      out.push(this.chunk([{ index: ev.index, delta: { role: 'assistant', content: '' }, logprobs: null, finish_reason: null }]));
    }
    if (ev.type === 'delta') {
      const offset = this.offsets.get(ev.index) ?? 0;
      this.offsets.set(ev.index, offset + ev.text.length);
      const logprobs = formatLogprobs(this.kind, ev.logprobs, offset);
      out.push(
        this.kind === 'chat'
          ? this.chunk([{ index: ev.index, delta: { content: ev.text }, logprobs, finish_reason: null }])
          : this.chunk([{ index: ev.index, text: ev.text, logprobs, finish_reason: null }]),
      );
    } else {
      out.push(
        this.kind === 'chat'
          ? this.chunk([{ index: ev.index, delta: {}, logprobs: null, finish_reason: ev.reason }])
          : this.chunk([{ index: ev.index, text: '', logprobs: null, finish_reason: ev.reason }]),
      );
    }
    return out;
  }

  usageChunk(usage: TokenUsage) {
    const object = this.kind === 'chat' ? 'chat.completion.chunk' : 'text_completion';
    return { id: this.base.id, object, created: this.base.created, model: this.base.model, choices: [], usage };
  }
}

/** A stored result as events: one delta and one finish per choice (cache replay). */
export function resultEvents(r: CompletionResult): OutEvent[] {
  return r.choices.flatMap((c): OutEvent[] => [
    { type: 'delta', index: c.index, text: c.text, ...(c.logprobs ? { logprobs: c.logprobs } : {}) },
    { type: 'finish', index: c.index, reason: c.finishReason },
  ]);
}
