/**
 * Request and response schemas of the OpenAI-compatible API. The same objects validate requests (through
 * the route definitions) and describe the API in the OpenAPI document.
 */
import { z } from '@hono/zod-openapi';

const Stop = z
  .union([z.string().min(1), z.array(z.string().min(1)).min(1).max(4)])
  .nullable()
  .optional()
  .openapi({ description: 'Up to 4 strings; the text stops before the first match.' });

const StreamOptions = z.object({ include_usage: z.boolean().optional() }).nullable().optional();

/** Fields shared by chat and text completions. */
const sampling = {
  model: z.string().min(1).openapi({ example: 'ring-mini' }),
  max_tokens: z.number().int().min(1).nullable().optional(),
  temperature: z.number().min(0).max(2).nullable().optional().openapi({ description: '0 = greedy (cacheable).' }),
  top_p: z.number().gt(0).max(1).nullable().optional(),
  top_k: z.number().int().min(0).nullable().optional().openapi({ description: 'Extension: 0 = off.' }),
  seed: z.number().int().nullable().optional().openapi({ description: 'Same seed and parameters give the same tokens (cacheable).' }),
  stop: Stop,
  n: z.number().int().min(1).max(8).nullable().optional(),
  stream: z.boolean().nullable().optional(),
  stream_options: StreamOptions,
  user: z.string().max(256).optional(),
};

const TextPart = z.object({ type: z.literal('text'), text: z.string() });

export const ChatMessage = z
  .object({
    role: z.enum(['system', 'developer', 'user', 'assistant']),
    content: z.union([z.string(), z.array(TextPart).min(1)]),
    name: z.string().optional(),
  })
  .openapi('ChatMessage');

export const ChatCompletionRequest = z
  .object({
    ...sampling,
    messages: z.array(ChatMessage).min(1),
    max_completion_tokens: z.number().int().min(1).nullable().optional(),
    logprobs: z.boolean().nullable().optional(),
    top_logprobs: z.number().int().min(0).max(20).nullable().optional(),
  })
  .refine((b) => b.top_logprobs == null || b.logprobs === true, {
    message: 'top_logprobs requires logprobs: true',
    path: ['top_logprobs'],
  })
  .openapi('ChatCompletionRequest');

export const CompletionRequest = z
  .object({
    ...sampling,
    prompt: z.union([z.string(), z.array(z.string()).min(1).max(8)]),
    logprobs: z.number().int().min(0).max(5).nullable().optional(),
  })
  .openapi('CompletionRequest');

export type ChatCompletionBody = z.infer<typeof ChatCompletionRequest>;
export type CompletionBody = z.infer<typeof CompletionRequest>;

const Usage = z
  .object({ prompt_tokens: z.number().int(), completion_tokens: z.number().int(), total_tokens: z.number().int() })
  .openapi('Usage');

export const ChatCompletionResponse = z
  .object({
    id: z.string(),
    object: z.literal('chat.completion'),
    created: z.number().int(),
    model: z.string(),
    choices: z.array(
      z.object({
        index: z.number().int(),
        message: z.object({ role: z.literal('assistant'), content: z.string() }),
        logprobs: z.unknown().nullable(),
        finish_reason: z.string(),
      }),
    ),
    usage: Usage,
  })
  .openapi('ChatCompletion');

export const CompletionResponse = z
  .object({
    id: z.string(),
    object: z.literal('text_completion'),
    created: z.number().int(),
    model: z.string(),
    choices: z.array(
      z.object({ index: z.number().int(), text: z.string(), logprobs: z.unknown().nullable(), finish_reason: z.string() }),
    ),
    usage: Usage,
  })
  .openapi('Completion');

export const ErrorResponse = z
  .object({
    error: z.object({ message: z.string(), type: z.string(), param: z.string().nullable(), code: z.string().nullable() }),
  })
  .openapi('Error');

export const ModelList = z
  .object({
    object: z.literal('list'),
    data: z.array(
      z.object({
        id: z.string(),
        object: z.literal('model'),
        created: z.number().int(),
        owned_by: z.string(),
        engines: z.array(z.string()).openapi({ description: 'Extension: where the model can run (edge kinds, pod).' }),
        max_context: z.number().int().nullable(),
      }),
    ),
  })
  .openapi('ModelList');

export const UsageResponse = z
  .object({
    tenant: z.string(),
    month: z.string(),
    totals: z.object({
      requests: z.number().int(),
      prompt_tokens: z.number().int(),
      completion_tokens: z.number().int(),
      total_tokens: z.number().int(),
      cache_hits: z.number().int(),
      cached_tokens: z.number().int(),
    }),
    by_model: z.array(
      z.object({
        model: z.string(),
        engine: z.string(),
        requests: z.number().int(),
        prompt_tokens: z.number().int(),
        completion_tokens: z.number().int(),
        cache_hits: z.number().int(),
        cached_tokens: z.number().int(),
      }),
    ),
    limits: z.object({
      requestsPerMinute: z.number().int(),
      tokensPerMinute: z.number().int(),
      concurrentStreams: z.number().int(),
      monthlyTokens: z.number().int(),
    }),
    current: z.object({
      requests_last_minute: z.number().int(),
      tokens_last_minute: z.number().int(),
      open_streams: z.number().int(),
    }),
  })
  .openapi('Usage report');

export const errorResponses = {
  400: { description: 'Invalid request', content: { 'application/json': { schema: ErrorResponse } } },
  401: { description: 'Missing, unknown or revoked API key', content: { 'application/json': { schema: ErrorResponse } } },
  403: { description: 'Model not allowed for this key', content: { 'application/json': { schema: ErrorResponse } } },
  404: { description: 'Unknown model', content: { 'application/json': { schema: ErrorResponse } } },
  413: { description: 'Body too large', content: { 'application/json': { schema: ErrorResponse } } },
  429: { description: 'A tenant limit was reached (Retry-After)', content: { 'application/json': { schema: ErrorResponse } } },
  503: { description: 'No engine can serve the request now (Retry-After)', content: { 'application/json': { schema: ErrorResponse } } },
} as const;
