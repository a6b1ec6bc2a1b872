/**
 * The worker's HTTP app, built from injected parts (engines, pods, settings) so tests can assemble it with
 * their own engine and pod stand-ins while index.ts wires the real ones.
 */
import { OpenAPIHono } from '@hono/zod-openapi';
import { bodyLimit } from 'hono/body-limit';
import { tenantAuth } from './auth/middleware';
import type { AppDeps, AppEnv } from './context';
import { ApiError, bodyTooLarge, renderError } from './errors';
import { adminRoutes } from './routes/admin';
import { v1Routes } from './routes/v1';

export function createApp(deps: AppDeps) {
  const app = new OpenAPIHono<AppEnv>();
  const limitBody = bodyLimit({
    maxSize: deps.settings.maxBodyBytes,
    onError: () => {
      throw bodyTooLarge(deps.settings.maxBodyBytes);
    },
  });

  app.get('/health', async (c) => {
    if (deps.pool) await deps.pool.refresh();
    const pods = deps.pool?.snapshot() ?? [];
    const ready = deps.engines.length > 0 || pods.some((p) => p.healthy);
    return c.json(
      {
        status: ready ? 'ok' : 'degraded',
        engines: deps.engines.map((e) => ({ model: e.info.id, engine: e.info.engine, max_context: e.info.maxContext })),
        pods,
      },
      ready ? 200 : 503,
    );
  });

  app.use('/v1/*', limitBody);
  app.use('/admin/*', limitBody);
  app.use('/v1/*', tenantAuth(deps.settings.defaultLimits));
  app.route('/v1', v1Routes(deps));
  app.route('/admin', adminRoutes(deps));

  app.openAPIRegistry.registerComponent('securitySchemes', 'apiKey', { type: 'http', scheme: 'bearer', description: 'Tenant API key rk_<tenant>_<id>_<secret>' });
  app.openAPIRegistry.registerComponent('securitySchemes', 'adminSecret', { type: 'http', scheme: 'bearer', description: 'ADMIN_SECRET' });
  app.doc31('/openapi.json', {
    openapi: '3.1.0',
    info: { title: 'ring-serve', version: '1.0.0', description: 'OpenAI-compatible API for Ring-linear models, at the edge and on GPU pods.' },
  });

  app.notFound(() => new ApiError({ status: 404, type: 'not_found_error', message: 'Not found.', code: 'not_found' }).toResponse());
  app.onError((err, c) => renderError(err, c));
  return app;
}
