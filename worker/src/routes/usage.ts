// GET /v1/usage: the calling tenant's limits, requests in the last minute, sessions, the bytes of
// its sessions' checkpoints (R2, fleet-wide), its prompt cache (entries and bytes vs its bound),
// and per live host the KV bytes it uses vs its quota.
// The same report is the admin's GET /admin/tenants/{name}.
import { type Context, Hono } from "hono";

import { tenantStub } from "../auth.js";
import type { AppEnv } from "../env.js";
import { hostId, withoutHostNames } from "../host-id.js";
import { withHost } from "../host-lease.js";
import { registry } from "../routing.js";

/** a Worker invocation keeps at most 6 connections open at once: the hosts are asked a few at a time */
const HOSTS_AT_ONCE = 4;

async function inBatches<T, R>(items: T[], f: (item: T) => Promise<R>): Promise<R[]> {
  const out: R[] = [];
  for (let i = 0; i < items.length; i += HOSTS_AT_ONCE)
    out.push(...(await Promise.all(items.slice(i, i + HOSTS_AT_ONCE).map(f))));
  return out;
}

/**
 * A tenant's usage at the edge and on every live host (KV bytes used vs quota, from each host's
 * stats). Hosts are named by their opaque ids (host-id.ts), by name only for the admin.
 */
export async function tenantUsage(c: Context<AppEnv>, tenant: string, forAdmin = false) {
  const hosts = await registry(c.env).list();
  const names = hosts.map((h) => h.name);
  const name = (host: string) => (forAdmin ? Promise.resolve(host) : hostId(c.env, host));
  const say = async (text: string) => (forAdmin ? text : withoutHostNames(c.env, text, names));
  const stub = tenantStub(c.env, tenant);
  const { config, sessions, requests_last_minute } = await stub.usage();
  const storedBytes = await stub.storedBytes();
  const cache = await stub.cacheStats();
  const perHost = await inBatches(
    hosts.filter((h) => h.live),
    (h) =>
      withHost(c, { host: h.name, tenant, tenantSettings: false }, async ({ link }) => {
        const st = await link.call({ type: "stats" }, "stats_result");
        return {
          host: await name(h.name),
          kv_used_bytes: st.kv_used_bytes ?? 0,
          kv_quota_bytes: st.kv_quota_bytes ?? 0,
          sessions: st.sessions ?? 0,
          offloaded: st.offloaded ?? 0,
        };
      }).catch(async (e: unknown) => ({
        host: await name(h.name),
        error: await say(e instanceof Error ? e.message : String(e)),
      })),
  );
  return {
    tenant,
    limits: config,
    requests_last_minute,
    sessions: sessions.length,
    stored_bytes: storedBytes,
    cache,
    session_list: await Promise.all(
      sessions.map(async (s) => ({
        id: s.id,
        host: await name(s.host),
        kv_method: s.kv_method,
        kv_budget: s.kv_budget,
        created: s.created,
        ...(s.used_ms !== undefined ? { last_used: Math.floor(s.used_ms / 1000) } : {}),
      })),
    ),
    hosts: perHost,
  };
}

export const usage = new Hono<AppEnv>();

usage.get("/", async (c) => c.json(await tenantUsage(c, c.get("tenant"))));
