import { defineConfig } from 'vitest/config';
import { cloudflareTest } from '@cloudflare/vitest-pool-workers';

// Two projects: tests that run inside workerd (the Workers runtime, through the vitest pool) and
// tests that run under plain Node (engine parity, end-to-end tests that start processes).
export default defineConfig({
  test: {
    projects: [
      {
        plugins: [cloudflareTest({ wrangler: { configPath: './wrangler.toml' } })],
        test: { name: 'workerd', include: ['worker/test/workerd/**/*.test.ts'] },
      },
      {
        test: { name: 'node', environment: 'node', include: ['worker/test/node/**/*.test.ts', 'test/e2e/**/*.test.ts'], testTimeout: 120_000, hookTimeout: 180_000 },
      },
    ],
  },
});
