// Unit tests inside the Workers runtime (workerd via Miniflare), with the bindings of wrangler.jsonc.
import { cloudflareTest } from "@cloudflare/vitest-pool-workers";
import { defineConfig } from "vitest/config";

export default defineConfig({
  plugins: [
    cloudflareTest({
      wrangler: { configPath: "./wrangler.jsonc" },
      miniflare: {
        bindings: {
          ADMIN_TOKEN: "test-admin-token",
          EDGE_SECRET: "test-secret-0123456789abcdef",
          PKV_MAX_BODY_BYTES: "4096",
        },
      },
    }),
  ],
  test: {
    include: ["test/**/*.test.ts"],
    // No retries: a test that fails once fails the run. (0.12.1 and earlier retried twice for a
    // flake of @cloudflare/vitest-pool-workers 0.15: its Durable Object wrapper awaited a module
    // import before each webSocketMessage handler, so a fake host's frames sent back to back could
    // reach the edge's object swapped. 0.16.12 queues the handlers in arrival order; CHANGELOG 0.12.2.)
  },
});
