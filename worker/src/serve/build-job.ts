/** From a validated request body to a GenerationJob: defaults, chat template, token counts. */
import type { Engine } from '../engine/types';
import type { ChatCompletionBody, CompletionBody } from '../schemas/openai';
import type { Settings } from '../settings';
import type { GenerationJob } from './job';

function messageText(content: string | { type: 'text'; text: string }[]): string {
  return typeof content === 'string' ? content : content.map((p) => p.text).join('');
}

function common(body: ChatCompletionBody | CompletionBody, maxTokens: number | null | undefined, settings: Settings) {
  const stop = body.stop == null ? [] : typeof body.stop === 'string' ? [body.stop] : body.stop;
  return {
    maxTokens: maxTokens ?? settings.defaultMaxTokens,
    temperature: body.temperature ?? 1,
    topP: body.top_p ?? 1,
    topK: body.top_k ?? 0,
    ...(body.seed != null ? { seed: body.seed } : {}),
    stop,
  };
}

function finish(
  kind: GenerationJob['kind'],
  body: ChatCompletionBody | CompletionBody,
  prompts: string[],
  params: GenerationJob['params'],
  engine: Engine | null,
): GenerationJob {
  const promptIds = engine ? prompts.map((p) => engine.encode(p)) : null;
  return {
    kind,
    model: body.model,
    prompts,
    promptIds,
    promptTokens: promptIds ? promptIds.reduce((s, ids) => s + ids.length, 0) : 0,
    n: body.n ?? 1,
    params,
    stream: body.stream === true,
    includeUsage: body.stream === true && body.stream_options?.include_usage === true,
    body: body as Record<string, unknown>,
  };
}

/** `engine` is the in-worker engine of the model (its tokenizer and chat template), or null for pod-only models. */
export function chatJob(body: ChatCompletionBody, engine: Engine | null, settings: Settings): GenerationJob {
  const messages = body.messages.map((m) => ({ role: m.role, content: messageText(m.content) }));
  // Without the model's template in the worker (pod-only model) the messages themselves identify the prompt.
  const prompt = engine ? engine.applyChatTemplate(messages) : JSON.stringify(messages);
  const params = { ...common(body, body.max_completion_tokens ?? body.max_tokens, settings), ...(body.logprobs ? { logprobs: body.top_logprobs ?? 0 } : {}) };
  return finish('chat', body, [prompt], params, engine);
}

export function completionJob(body: CompletionBody, engine: Engine | null, settings: Settings): GenerationJob {
  const prompts = typeof body.prompt === 'string' ? [body.prompt] : body.prompt;
  const params = { ...common(body, body.max_tokens, settings), ...(body.logprobs != null ? { logprobs: body.logprobs } : {}) };
  return finish('completion', body, prompts, params, engine);
}
