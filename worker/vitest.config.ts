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
  test: { include: ["test/**/*.test.ts"] },
});
