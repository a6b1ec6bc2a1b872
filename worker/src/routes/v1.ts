/** The OpenAI-compatible routes under /v1 (authenticated by tenantAuth in app.ts). */
import { OpenAPIHono, createRoute, z } from '@hono/zod-openapi';
import type { AppDeps, AppEnv } from '../context';
import { modelNotAllowed, modelNotFound } from '../errors';
import { tenantStub } from '../auth/middleware';
import {
  ChatCompletionRequest,
  ChatCompletionResponse,
  CompletionRequest,
  CompletionResponse,
  ModelList,
  UsageResponse,
  errorResponses,
} from '../schemas/openai';
import { chatJob, completionJob } from '../serve/build-job';
import { serveGeneration } from '../serve/serve-generation';
import type { Engine } from '../engine/types';
import { validationHook } from './validation';

const security = [{ apiKey: [] }];

const chatRoute = createRoute({
  method: 'post',
  path: '/chat/completions',
  security,
  request: { body: { required: true, content: { 'application/json': { schema: ChatCompletionRequest } } } },
  responses: {
    200: {
      description: 'A chat completion, or an SSE stream of chunks ending with `data: [DONE]` when `stream` is true. Headers: x-engine, x-cache-status.',
      content: { 'application/json': { schema: ChatCompletionResponse }, 'text/event-stream': { schema: z.string() } },
    },
    ...errorResponses,
  },
});

const completionRoute = createRoute({
  method: 'post',
  path: '/completions',
  security,
  request: { body: { required: true, content: { 'application/json': { schema: CompletionRequest } } } },
  responses: {
    200: {
      description: 'A text completion, or an SSE stream when `stream` is true.',
      content: { 'application/json': { schema: CompletionResponse }, 'text/event-stream': { schema: z.string() } },
    },
    ...errorResponses,
  },
});

const modelsRoute = createRoute({
  method: 'get',
  path: '/models',
  security,
  responses: { 200: { description: 'Models this key may use', content: { 'application/json': { schema: ModelList } } }, 401: errorResponses[401] },
});

const usageRoute = createRoute({
  method: 'get',
  path: '/usage',
  security,
  request: { query: z.object({ month: z.string().regex(/^\d{4}-\d{2}$/).optional().openapi({ example: '2026-11' }) }) },
  responses: { 200: { description: "The tenant's own usage and limits", content: { 'application/json': { schema: UsageResponse } } }, 400: errorResponses[400], 401: errorResponses[401] },
});

export function v1Routes(deps: AppDeps) {
  const app = new OpenAPIHono<AppEnv>({ defaultHook: validationHook });
  const engines = new Map(deps.engines.map((e) => [e.info.id, e]));

  /** The model's in-worker engine (null for pod-only models); throws 404/403. */
  async function resolveModel(model: string, allowed: string[] | null): Promise<Engine | null> {
    const edge = engines.get(model) ?? null;
    if (!edge) {
      let known = deps.settings.pods.models.includes(model);
      if (!known && deps.pool) {
        await deps.pool.refresh();
        known = deps.pool.models().includes(model);
      }
      if (!known) throw modelNotFound(model);
    }
    if (allowed && !allowed.includes(model)) throw modelNotAllowed(model);
    return edge;
  }

  app.openapi(chatRoute, async (c) => {
    const body = c.req.valid('json');
    const edge = await resolveModel(body.model, c.get('auth').models);
    return serveGeneration(c, deps, chatJob(body, edge, deps.settings), edge) as never;
  });

  app.openapi(completionRoute, async (c) => {
    const body = c.req.valid('json');
    const edge = await resolveModel(body.model, c.get('auth').models);
    return serveGeneration(c, deps, completionJob(body, edge, deps.settings), edge) as never;
  });

  app.openapi(modelsRoute, async (c) => {
    if (deps.pool) await deps.pool.refresh();
    const podModels = new Set([...deps.settings.pods.models, ...(deps.pool?.models() ?? [])]);
    const ids = new Set([...engines.keys(), ...podModels]);
    const allowed = c.get('auth').models;
    const data = [...ids]
      .filter((id) => !allowed || allowed.includes(id))
      .sort()
      .map((id) => {
        const edge = engines.get(id);
        return {
          id,
          object: 'model' as const,
          created: 0,
          owned_by: 'ring-serve',
          engines: [...(edge ? [`edge:${edge.info.engine}`] : []), ...(podModels.has(id) ? ['pod'] : [])],
          max_context: edge ? edge.info.maxContext : null,
        };
      });
    return c.json({ object: 'list' as const, data }, 200);
  });

  app.openapi(usageRoute, async (c) => {
    const { month } = c.req.valid('query');
    const report = await tenantStub(c.env, c.get('auth').tenantId).usage(month);
    return c.json(report, 200);
  });

  return app;
}
