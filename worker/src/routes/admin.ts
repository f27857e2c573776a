// /admin/*: tenants, their API keys and quotas, and the GPU hosts' tokens and routing table.
// Guarded by the ADMIN_TOKEN secret (Bearer); `npx pkv admin` is its client.
import { isKvMethod, KV_METHODS } from "@pyramidkv/shared";
import { Hono, type MiddlewareHandler } from "hono";
import { validator } from "hono/validator";

import { newApiKey, sha256Hex, storeKey, tenantStub } from "../auth.js";
import type { AppEnv } from "../env.js";
import { ApiError, invalid, notFound } from "../errors.js";
import { HOST_NAME, hostStub, newHostToken, type HostTokenRecord } from "../host-token.js";
import { hostId } from "../host-id.js";
import { registry } from "../routing.js";
import { MAX_CACHE_TTL_S, MAX_SESSION_TTL_S, type TenantConfig } from "../tenant.js";
import { BUDGET_RANGE, jsonBody } from "../validate.js";
import { tenantUsage } from "./usage.js";

/** admin bodies are a few fields */
const ADMIN_MAX_BODY_BYTES = 1 << 16;

export const TENANT_NAME = /^[A-Za-z0-9_.-]{1,64}$/;

const requireAdmin: MiddlewareHandler<AppEnv> = async (c, next) => {
  const want = c.env.ADMIN_TOKEN;
  if (!want)
    throw new ApiError(
      401,
      "authentication_error",
      "the admin API is disabled: set the ADMIN_TOKEN secret",
      null,
      "admin_disabled",
    );
  const got = /^Bearer\s+(\S+)$/.exec(c.req.header("authorization") ?? "")?.[1] ?? "";
  // Compare digests, so the comparison takes the same time whatever the token.
  if ((await sha256Hex(got)) !== (await sha256Hex(want)))
    throw new ApiError(401, "authentication_error", "invalid admin token", null, "invalid_admin_token");
  await next();
};

/** `:name` must be a valid tenant name (checked before any body is read). */
const tenantParam = validator("param", (p) => {
  const name = p.name!;
  if (!TENANT_NAME.test(name))
    throw invalid("tenant", `tenant name '${name.slice(0, 80)}' must match ${TENANT_NAME.source}`);
  return name;
});

function limit(o: Record<string, unknown>, name: string): number | undefined {
  const v = o[name];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== "number" || !Number.isSafeInteger(v) || v < 0)
    throw invalid(name, `'${name}': ${JSON.stringify(v)} is not an integer >= 0`);
  return v;
}

export const admin = new Hono<AppEnv>();
admin.use("*", requireAdmin);

const TENANT_FIELDS = [
  "kv_quota_bytes",
  "max_sessions",
  "requests_per_minute",
  "policy",
  "kv_method",
  "kv_budget",
  "session_ttl_s",
  "max_stored_bytes",
  "kv_cache",
  "cache_max_bytes",
  "cache_ttl_s",
];

function tenantPatch(body: Record<string, unknown>): Partial<Omit<TenantConfig, "name">> {
  for (const k of Object.keys(body)) {
    if (!TENANT_FIELDS.includes(k))
      throw invalid(k, `unknown field '${k}': accepted are ${TENANT_FIELDS.join(", ")}`, "unknown_parameter");
  }
  const policy = body.policy;
  if (policy !== undefined && policy !== "refuse" && policy !== "auto")
    throw invalid("policy", `'policy': ${JSON.stringify(policy)} is not one of refuse, auto`);
  const method = body.kv_method;
  if (method !== undefined && method !== null && (typeof method !== "string" || !isKvMethod(method)))
    throw invalid("kv_method", `'kv_method': ${JSON.stringify(method)} is not one of ${KV_METHODS.join(", ")}`);
  const budget = limit(body, "kv_budget");
  if (budget !== undefined && (budget < BUDGET_RANGE[0] || budget > BUDGET_RANGE[1]))
    throw invalid("kv_budget", `'kv_budget': ${budget} is not an integer in [${BUDGET_RANGE[0]}, ${BUDGET_RANGE[1]}]`);
  const ttl = limit(body, "session_ttl_s");
  if (ttl !== undefined && (ttl < 1 || ttl > MAX_SESSION_TTL_S))
    throw invalid("session_ttl_s", `'session_ttl_s': ${ttl} is not an integer in [1, ${MAX_SESSION_TTL_S}]`);
  const kvCache = body.kv_cache;
  if (kvCache !== undefined && kvCache !== null && kvCache !== "on" && kvCache !== "off")
    throw invalid("kv_cache", `'kv_cache': ${JSON.stringify(kvCache)?.slice(0, 80)} is not one of "on", "off"`);
  const cacheTtl = limit(body, "cache_ttl_s");
  if (cacheTtl !== undefined && (cacheTtl < 1 || cacheTtl > MAX_CACHE_TTL_S))
    throw invalid("cache_ttl_s", `'cache_ttl_s': ${cacheTtl} is not an integer in [1, ${MAX_CACHE_TTL_S}]`);
  return {
    ...(typeof method === "string" ? { kv_method: method } : {}),
    ...(budget !== undefined ? { kv_budget: budget } : {}),
    kv_quota_bytes: limit(body, "kv_quota_bytes"),
    max_sessions: limit(body, "max_sessions"),
    requests_per_minute: limit(body, "requests_per_minute"),
    policy: policy as TenantConfig["policy"] | undefined,
    session_ttl_s: ttl,
    max_stored_bytes: limit(body, "max_stored_bytes"),
    kv_cache: typeof kvCache === "string" ? (kvCache as "on" | "off") : undefined,
    cache_max_bytes: limit(body, "cache_max_bytes"),
    cache_ttl_s: cacheTtl,
  };
}

function hostName(body: Record<string, unknown>): string {
  for (const k of Object.keys(body))
    if (k !== "name") throw invalid(k, `unknown field '${k}': accepted is name`, "unknown_parameter");
  const name = body.name;
  if (typeof name !== "string" || !HOST_NAME.test(name))
    throw invalid(
      "name",
      `'name': ${JSON.stringify(name ?? null)?.slice(0, 80)} is not a host name: it must match ${HOST_NAME.source}`,
    );
  return name;
}

const hostParam = validator("param", (p) => {
  const name = p.name!;
  if (!HOST_NAME.test(name)) throw invalid("name", `host name '${name.slice(0, 80)}' must match ${HOST_NAME.source}`);
  return name;
});

admin.put(
  "/tenants/:name",
  tenantParam,
  jsonBody(tenantPatch, () => ADMIN_MAX_BODY_BYTES),
  async (c) => {
    const name = c.req.valid("param");
    const cfg = await tenantStub(c.env, name).configure(name, c.req.valid("json"));
    await c.env.KEYS.put(`tenant:${name}`, JSON.stringify(cfg));
    return c.json(cfg);
  },
);

admin.get("/tenants", async (c) => {
  const list = await c.env.KEYS.list({ prefix: "tenant:" });
  return c.json({ data: list.keys.map((k) => k.name.slice("tenant:".length)) });
});

admin.get("/tenants/:name", tenantParam, async (c) => {
  const name = c.req.valid("param");
  const usage = await tenantUsage(c, name, true);
  if (!usage.limits) throw notFound(`no tenant '${name}'`, "tenant_not_found");
  return c.json(usage);
});

admin.post("/tenants/:name/keys", tenantParam, async (c) => {
  const name = c.req.valid("param");
  if (!(await tenantStub(c.env, name).config()))
    throw notFound(`no tenant '${name}': create it first (PUT /admin/tenants/${name})`, "tenant_not_found");
  const key = newApiKey();
  const rec = await storeKey(c.env, name, key);
  return c.json({ key, ...rec }, 201);
});

// GPU hosts: each has a token (pkv host --host-token), stored hashed; the table is the routing
// table's (registry.ts): every created host, connected or not.
admin.get("/hosts", async (c) => {
  const reg = registry(c.env);
  const [rows, routing] = await Promise.all([reg.list(), reg.counters()]);
  const names = new Set<string>(rows.map((r) => r.name));
  let cursor: string | undefined;
  do {
    const page = await c.env.KEYS.list({ prefix: "host:", ...(cursor ? { cursor } : {}) });
    for (const k of page.keys) names.add(k.name.slice("host:".length));
    cursor = page.list_complete ? undefined : page.cursor;
  } while (cursor);
  const byName = new Map(rows.map((r) => [r.name, r]));
  const hosts = await Promise.all(
    [...names].sort().map(async (name) => {
      const r = byName.get(name);
      const id = await hostId(c.env, name);
      if (!r) return { name, id, connected: false, live: false, draining: false };
      return {
        name,
        id,
        connected: true,
        live: r.live,
        draining: r.draining,
        model: r.model,
        n_ctx: r.n_ctx,
        pool_bytes: r.pool_bytes,
        free_bytes: r.free_bytes,
        kv_used_bytes: r.kv_used_bytes,
        sessions: r.sessions,
        active: r.active,
        queued: r.queued,
        last_heartbeat_ms: r.last_heartbeat_ms,
        connected_at: r.connected_at,
        heartbeat_ms: r.heartbeat_ms,
        ...(r.host_version !== undefined ? { host_version: r.host_version } : {}),
      };
    }),
  );
  return c.json({ hosts, routing });
});

/** A new host: its token, shown once (only its SHA-256 is kept). */
admin.post(
  "/hosts",
  jsonBody(hostName, () => ADMIN_MAX_BODY_BYTES),
  async (c) => {
    const name = c.req.valid("json");
    if ((await c.env.KEYS.get(`host:${name}`)) !== null)
      throw new ApiError(
        409,
        "invalid_request_error",
        `host '${name}' exists: revoke it first (DELETE /admin/hosts/${name}) to make a new token`,
        "name",
        "host_exists",
      );
    const token = newHostToken(name);
    const rec: HostTokenRecord = { name, token_sha256: await sha256Hex(token), created: Math.floor(Date.now() / 1000) };
    await c.env.KEYS.put(`host:${name}`, JSON.stringify(rec));
    return c.json({ name, token }, 201);
  },
);

/** Revokes a host's token and closes its live socket (4003): it cannot connect again. */
admin.delete("/hosts/:name", hostParam, async (c) => {
  const name = c.req.valid("param");
  const existed = (await c.env.KEYS.get(`host:${name}`)) !== null;
  await c.env.KEYS.delete(`host:${name}`);
  const closed = await hostStub(c.env, name).revoke();
  if (!existed && !closed) throw notFound(`no host '${name}'`, "host_not_found");
  return c.json({ name, revoked: true, disconnected: closed });
});
