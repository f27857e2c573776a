// The edge worker: a streaming chat API for long contexts on Cloudflare Workers (Miniflare
// locally). Auth and quotas as middleware, one file per route group with its body validators
// (validate.ts), GPU hosts used through one lifecycle (host-lease.ts). GPU hosts dial in at
// /hosts/connect (host-token.ts, host-conn.ts). docs/WORKER.md is the contract.
import { Hono } from "hono";

import { requireKey } from "./auth.js";
import type { AppEnv } from "./env.js";
import { ApiError, errorResponse } from "./errors.js";
import { forTenant } from "./host-id.js";
import { hostOfToken, hostStub } from "./host-token.js";
import { admin } from "./routes/admin.js";
import { chat } from "./routes/chat.js";
import { completions } from "./routes/completions.js";
import { models } from "./routes/models.js";
import { sessions } from "./routes/sessions.js";
import { usage } from "./routes/usage.js";

export { HostConn } from "./host-conn.js";
export { HostRegistry } from "./registry.js";
export { TenantState } from "./tenant.js";

const app = new Hono<AppEnv>();

/** A client's own x-request-id is kept when it is a plain token; otherwise the edge makes one. */
const REQUEST_ID = /^[A-Za-z0-9_.:-]{1,128}$/;

// Headers of every response, errors included (set after the route, so they reflect what it did):
// x-request-id; the rate check's x-ratelimit-*; the compression that served it (x-pkv-kv-*).
app.use("*", async (c, next) => {
  const asked = c.req.header("x-request-id");
  c.set(
    "requestId",
    asked !== undefined && REQUEST_ID.test(asked) ? asked : `req_${crypto.randomUUID().replaceAll("-", "")}`,
  );
  await next();
  if (c.res.status === 101) return; // a host's socket: its headers are the upgrade's
  c.header("x-request-id", c.get("requestId"));
  const rate = c.get("rate");
  if (rate) {
    c.header("x-ratelimit-limit-requests", String(rate.limit));
    c.header("x-ratelimit-remaining-requests", String(rate.remaining));
    c.header("x-ratelimit-reset-requests", `${rate.reset_s}s`);
  }
  const kv = c.get("kv");
  if (kv) {
    c.header("x-pkv-kv-method", kv.method);
    c.header("x-pkv-kv-budget", kv.method === "full" ? "all" : String(kv.budget));
  }
});

// A tenant's errors name no GPU host URL (host-id.ts); the admin's keep them.
app.onError(async (e, c) =>
  errorResponse(c, new URL(c.req.url).pathname.startsWith("/v1/") ? await forTenant(c.env, e) : e),
);
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
  c.json({
    service: "pyramidkv edge",
    api: ["/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/sessions", "/v1/usage"],
  }),
);
// A GPU host's one WebSocket (pkv host --connect): its token is checked here, before the upgrade
// reaches the host's Durable Object, which holds the socket.
app.get("/hosts/connect", async (c) => {
  const name = await hostOfToken(c.env, c.req.header("authorization"));
  if (c.req.header("upgrade")?.toLowerCase() !== "websocket")
    throw new ApiError(
      426,
      "invalid_request_error",
      "GET /hosts/connect is a WebSocket upgrade (Upgrade: websocket)",
      null,
      "upgrade_required",
    );
  return hostStub(c.env, name).fetch("https://host/connect", {
    headers: { Upgrade: "websocket", "x-pkv-host-name": name },
  });
});
app.use("/v1/*", requireKey);
app.route("/v1", chat);
app.route("/v1", completions);
app.route("/v1/models", models);
app.route("/v1/sessions", sessions);
app.route("/v1/usage", usage);
app.route("/admin", admin);

export default app;
