/**
 * One exit for every error: ApiError carries the HTTP status and the OpenAI error fields; `onError`
 * renders it as `{ error: { message, type, param, code } }`. Anything else becomes a 500 without details.
 */
import type { Context } from 'hono';
import { HTTPException } from 'hono/http-exception';

export type ErrorType =
  | 'invalid_request_error'
  | 'authentication_error'
  | 'permission_error'
  | 'not_found_error'
  | 'conflict_error'
  | 'rate_limit_error'
  | 'insufficient_quota'
  | 'service_unavailable'
  | 'server_error';

export interface ApiErrorInit {
  status: 400 | 401 | 403 | 404 | 409 | 413 | 429 | 500 | 502 | 503;
  message: string;
  type: ErrorType;
  code: string | null;
  param?: string | null;
  /** Seconds; sent as Retry-After (429 and 503). */
  retryAfter?: number;
}

export class ApiError extends Error {
  readonly status: ApiErrorInit['status'];
  readonly type: ErrorType;
  readonly code: string | null;
  readonly param: string | null;
  readonly retryAfter?: number;

  constructor(init: ApiErrorInit) {
    super(init.message);
    this.name = 'ApiError';
    this.status = init.status;
    this.type = init.type;
    this.code = init.code;
    this.param = init.param ?? null;
    this.retryAfter = init.retryAfter;
  }

  get body() {
    return { error: { message: this.message, type: this.type, param: this.param, code: this.code } };
  }

  toResponse(): Response {
    const headers = new Headers({ 'content-type': 'application/json' });
    if (this.retryAfter !== undefined) headers.set('retry-after', String(Math.max(1, Math.ceil(this.retryAfter))));
    return new Response(JSON.stringify(this.body), { status: this.status, headers });
  }
}

export const badRequest = (message: string, param: string | null = null, code: string | null = 'invalid_request') =>
  new ApiError({ status: 400, type: 'invalid_request_error', message, param, code });

export const unauthorized = (message: string, code = 'invalid_api_key') =>
  new ApiError({ status: 401, type: 'authentication_error', message, code });

export const modelNotAllowed = (model: string) =>
  new ApiError({
    status: 403,
    type: 'permission_error',
    message: `This API key is not allowed to use the model '${model}'.`,
    param: 'model',
    code: 'model_not_allowed',
  });

export const modelNotFound = (model: string) =>
  new ApiError({
    status: 404,
    type: 'not_found_error',
    message: `The model '${model}' does not exist.`,
    param: 'model',
    code: 'model_not_found',
  });

export const bodyTooLarge = (maxBytes: number) =>
  new ApiError({
    status: 413,
    type: 'invalid_request_error',
    message: `Request body is larger than ${maxBytes} bytes.`,
    code: 'request_too_large',
  });

export const noEngine = (message: string, retryAfter: number) =>
  new ApiError({ status: 503, type: 'service_unavailable', message, code: 'no_engine_available', retryAfter });

/** Hono onError: ApiError -> its OpenAI-shaped response; anything else -> logged, generic 500. */
export function renderError(err: Error, _c?: Context): Response {
  if (err instanceof ApiError) return err.toResponse();
  if (err instanceof HTTPException && err.status < 500) {
    // Hono's own request errors (malformed JSON body and the like).
    return new ApiError({ status: 400, type: 'invalid_request_error', message: err.message || 'Invalid request.', code: 'invalid_request' }).toResponse();
  }
  console.error('unhandled error', err);
  return new ApiError({ status: 500, type: 'server_error', message: 'Internal server error.', code: 'internal_error' }).toResponse();
}
