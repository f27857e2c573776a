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
    // A known flake of this pool, not of the code under test: a fake host's frames, sent back to
    // back over its in-process WebSocket, now and then reach the edge swapped (a token after its
    // `done`: "Hel" for "Hello"; seen at 0.9.0 too, 2 of 6 runs of openai.test.ts; cause not
    // found, CHANGELOG 0.10.0). Real hosts (over TCP, test/ e2e) never showed it. A test that
    // fails three times in a row still fails the run.
    retry: 2,
  },
});
