// The worker as a client sees it, inside the Workers runtime with its Durable Objects and KV:
// auth, admin, tenant binding, quotas, error bodies, and 503 when no GPU host is reachable.
import { env } from "cloudflare:workers";
import { beforeAll, describe, expect, it } from "vitest";

import { ADMIN, as, call, error, makeTenant } from "./client.js";

describe("edge API", () => {
  let key: string;
  beforeAll(async () => {
    key = await makeTenant("acme", { max_sessions: 2, requests_per_minute: 1000 });
  });

  it("stores API keys only as SHA-256 hashes", async () => {
    const list = await env.KEYS.list({ prefix: "key:" });
    expect(list.keys.length).toBeGreaterThan(0);
    for (const k of list.keys) expect(k.name).toMatch(/^key:[0-9a-f]{64}$/);
    const raw = await Promise.all(list.keys.map((k) => env.KEYS.get(k.name)));
    expect(raw.join("")).not.toContain(key);
  });

  it("401 without a key, with a wrong key, and on admin with a wrong token", async () => {
    expect(await error(await call("/v1/models"))).toMatchObject({ status: 401, type: "authentication_error" });
    expect(await error(await call("/v1/models", as("pkv-0000")))).toMatchObject({
      status: 401,
      code: "invalid_api_key",
    });
    expect((await call("/admin/tenants", { headers: { authorization: "Bearer nope" } })).status).toBe(401);
  });

  it("400 for malformed bodies and 413 beyond the size limit", async () => {
    expect(await error(await call("/v1/chat/completions", as(key, "{")))).toMatchObject({ status: 400, param: "body" });
    expect(
      await error(
        await call(
          "/v1/chat/completions",
          as(key, { model: "m", messages: [{ role: "user", content: "x" }], kv_budget: 1 }),
        ),
      ),
    ).toMatchObject({ status: 400, param: "kv_budget" });
    expect(await error(await call("/v1/sessions", as(key, { document: "x".repeat(5000) })))).toMatchObject({
      status: 413,
    });
    expect((await call("/admin/tenants/bad name!", { method: "PUT", headers: ADMIN, body: "{}" })).status).toBe(400);
  });

  it("404 for unknown sessions and routes", async () => {
    expect(await error(await call("/v1/sessions/sess-nope", as(key)))).toMatchObject({
      status: 404,
      type: "not_found_error",
    });
    expect(await error(await call("/v1/sessions/sess-nope/messages", as(key, { content: "hi" })))).toMatchObject({
      status: 404,
    });
    expect((await call("/v1/nothing", as(key))).status).toBe(404);
  });

  it("503 when no GPU host is connected, and the session slot is given back", async () => {
    const r = await error(
      await call("/v1/chat/completions", as(key, { model: "m", messages: [{ role: "user", content: "hi" }] })),
    );
    expect(r).toMatchObject({ status: 503, code: "host_unavailable" });
    for (let i = 0; i < 3; i++) expect((await call("/v1/sessions", as(key, { document: "doc" }))).status).toBe(503);
    const usage = (await (await call("/v1/usage", as(key))).json()) as { sessions: number };
    expect(usage.sessions).toBe(0);
  });

  it("a host created but not connected is listed, not live, and serves nothing", async () => {
    const made = await call("/admin/hosts", {
      method: "POST",
      headers: ADMIN,
      body: JSON.stringify({ name: "idle-box" }),
    });
    expect(made.status).toBe(201);
    const list = (await (await call("/admin/hosts", { headers: ADMIN })).json()) as {
      hosts: { name: string; connected: boolean; live: boolean; id: string }[];
      routing: { routes: number; storage_reads: number };
    };
    expect(list.hosts.find((h) => h.name === "idle-box")).toMatchObject({ connected: false, live: false });
    expect(list.routing).toMatchObject({ routes: expect.any(Number), storage_reads: expect.any(Number) });
    expect((await call("/v1/models", as(key))).status).toBe(503);
    expect((await call("/admin/hosts/idle-box", { method: "DELETE", headers: ADMIN })).status).toBe(200);
  });

  it("429 beyond the tenant's requests per minute, with Retry-After", async () => {
    const k = await makeTenant("slow", { requests_per_minute: 3 });
    for (let i = 0; i < 3; i++) expect((await call("/v1/usage", as(k))).status).toBe(200);
    const r = await call("/v1/usage", as(k));
    expect(r.status).toBe(429);
    expect(Number(r.headers.get("retry-after"))).toBeGreaterThanOrEqual(1);
    expect(await error(r)).toMatchObject({ type: "rate_limit_error", code: "rate_limit_exceeded" });
  });

  it("tenant settings: validated, reported in usage", async () => {
    const r = await call("/admin/tenants/acme", {
      method: "PUT",
      headers: ADMIN,
      body: JSON.stringify({ max_sessions: -1 }),
    });
    expect(await error(r)).toMatchObject({ status: 400, param: "max_sessions" });
    const u = (await (await call("/v1/usage", as(key))).json()) as { tenant: string; limits: { max_sessions: number } };
    expect(u).toMatchObject({ tenant: "acme", limits: { max_sessions: 2 } });
  });
});
