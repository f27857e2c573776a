// The edge worker: a streaming chat API for long contexts on Cloudflare Workers (Miniflare
// locally). Auth and quotas as middleware, one file per route group with its body validators
// (validate.ts), GPU hosts used through one lifecycle (host-lease.ts). docs/WORKER.md is the contract.
import { Hono } from "hono";

import { requireKey } from "./auth.js";
import type { AppEnv } from "./env.js";
import { ApiError, errorResponse } from "./errors.js";
import { admin } from "./routes/admin.js";
import { chat } from "./routes/chat.js";
import { sessions } from "./routes/sessions.js";
import { usage } from "./routes/usage.js";

export { HostRegistry } from "./registry.js";
export { TenantState } from "./tenant.js";

const app = new Hono<AppEnv>();

app.onError((e, c) => errorResponse(c, e));
app.notFound((c) =>
  errorResponse(
    c,
    new ApiError(
      404,
      "not_found_error",
      `no route ${c.req.method} ${new URL(c.req.url).pathname}`,
      null,
      "unknown_route",
    ),
  ),
);

app.get("/", (c) =>
  c.json({ service: "pyramidkv edge", api: ["/v1/chat/completions", "/v1/models", "/v1/sessions", "/v1/usage"] }),
);
app.use("/v1/*", requireKey);
app.route("/v1", chat);
app.route("/v1/sessions", sessions);
app.route("/v1/usage", usage);
app.route("/admin", admin);

export default app;
