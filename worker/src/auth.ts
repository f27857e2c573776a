// Tenants' API keys: `Authorization: Bearer pkv-…`, stored only as SHA-256 hashes in KV
// (key:<hex> → {tenant}). Each authenticated request is counted against the tenant's requests per
// minute in its Durable Object (exact), 429 with Retry-After beyond it.
import type { MiddlewareHandler } from "hono";

import type { AppEnv, Env } from "./env.js";
import { ApiError } from "./errors.js";

export interface KeyRecord {
  tenant: string;
  created: number;
  prefix: string; // the first characters, to recognise a key in listings
}

export async function sha256Hex(text: string): Promise<string> {
  const d = new Uint8Array(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(text)));
  return [...d].map((b) => b.toString(16).padStart(2, "0")).join("");
}

export function newApiKey(): string {
  const bytes = crypto.getRandomValues(new Uint8Array(24));
  return `pkv-${[...bytes].map((b) => b.toString(16).padStart(2, "0")).join("")}`;
}

export async function storeKey(env: Env, tenant: string, key: string): Promise<KeyRecord> {
  const rec: KeyRecord = { tenant, created: Math.floor(Date.now() / 1000), prefix: key.slice(0, 10) };
  await env.KEYS.put(`key:${await sha256Hex(key)}`, JSON.stringify(rec));
  return rec;
}

export const tenantStub = (env: Env, tenant: string) => env.TENANTS.get(env.TENANTS.idFromName(tenant));

export const requireKey: MiddlewareHandler<AppEnv> = async (c, next) => {
  const m = /^Bearer\s+(\S+)$/.exec(c.req.header("authorization") ?? "");
  if (!m)
    throw new ApiError(
      401,
      "authentication_error",
      "missing API key: send 'Authorization: Bearer <key>'",
      null,
      "invalid_api_key",
    );
  const rec = await c.env.KEYS.get<KeyRecord>(`key:${await sha256Hex(m[1]!)}`, "json");
  if (!rec) throw new ApiError(401, "authentication_error", "invalid API key", null, "invalid_api_key");
  const adm = await tenantStub(c.env, rec.tenant).admitRequest();
  if (!adm.ok) {
    c.set("rate", { limit: adm.limit, remaining: 0, reset_s: adm.retry_after_s });
    throw new ApiError(
      429,
      "rate_limit_error",
      `tenant '${rec.tenant}' made ${adm.used} requests in the last minute; its limit is ${adm.limit} per minute`,
      null,
      "rate_limit_exceeded",
      { "retry-after": String(adm.retry_after_s) },
    );
  }
  c.set("tenant", rec.tenant);
  c.set("tenantConfig", adm.config);
  c.set("rate", { limit: adm.limit, remaining: Math.max(0, adm.limit - adm.used), reset_s: adm.reset_s });
  await next();
};
