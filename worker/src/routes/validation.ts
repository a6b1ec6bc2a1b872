/** Turns a failed schema check into a 400 in the OpenAI error shape, naming the first offending field. */
import type { Hook } from '@hono/zod-openapi';
import { badRequest } from '../errors';

export const validationHook: Hook<unknown, any, any, unknown> = (result) => {
  if (result.success) return;
  const issue = result.error.issues[0];
  const param = issue?.path.length ? issue.path.join('.') : null;
  const message = issue ? `Invalid request: ${param ? `'${param}': ` : ''}${issue.message}` : 'Invalid request body.';
  throw badRequest(message, param, 'invalid_request');
};
