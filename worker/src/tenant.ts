// One Durable Object per tenant: its quotas, an exact requests-per-minute window, and its
// sessions (id → host). Exact because one object serialises every update of a tenant (Workers KV
// is eventually consistent; the rate-limit binding is approximate). State lives in storage, so
// eviction loses nothing.
import { DurableObject } from "cloudflare:workers";

import type { Env } from "./env.js";

export interface TenantConfig {
  name: string;
  /** KV bytes this tenant may hold on each GPU host (enforced by the hosts; 0 = the host's pool) */
  kv_quota_bytes: number;
  /** open sessions (sessions API) at once */
  max_sessions: number;
  /** requests per rolling minute, every API call counted */
  requests_per_minute: number;
  /** hosts' admission policy: refuse, or auto (shrink the budget to fit) */
  policy: "refuse" | "auto";
  /** the compression of a request that names none (absent: the engine's default) */
  kv_method?: string;
  /** the KV budget of a request that names none (absent: the engine's default) */
  kv_budget?: number;
}

export const DEFAULT_LIMITS: Omit<TenantConfig, "name"> = {
  kv_quota_bytes: 0,
  max_sessions: 16,
  requests_per_minute: 600,
  policy: "refuse",
};

export interface SessionRecord {
  id: string;
  host: string; // "" while being opened
  created: number; // Unix seconds
  kv_method: string;
  kv_budget: number;
  /** the model the session's host serves */
  model?: string;
}

export type Admission =
  | { ok: true; used: number; limit: number; reset_s: number; config: TenantConfig | null }
  | { ok: false; used: number; limit: number; retry_after_s: number };

const WINDOW_MS = 60_000;

export class TenantState extends DurableObject<Env> {
  async configure(name: string, patch: Partial<Omit<TenantConfig, "name">>): Promise<TenantConfig> {
    const prev = (await this.ctx.storage.get<TenantConfig>("config")) ?? { name, ...DEFAULT_LIMITS };
    const next: TenantConfig = {
      ...prev,
      ...Object.fromEntries(Object.entries(patch).filter(([, v]) => v !== undefined)),
      name,
    };
    await this.ctx.storage.put("config", next);
    return next;
  }

  async config(): Promise<TenantConfig | null> {
    return (await this.ctx.storage.get<TenantConfig>("config")) ?? null;
  }

  /** Counts one request against the rolling minute, or refuses it (nothing counted); the tenant's config with it. */
  async admitRequest(nowMs = Date.now()): Promise<Admission> {
    const config = await this.config();
    const limit = config?.requests_per_minute ?? DEFAULT_LIMITS.requests_per_minute;
    const window = ((await this.ctx.storage.get<number[]>("window")) ?? []).filter((t) => t > nowMs - WINDOW_MS);
    if (window.length >= limit) {
      const retry = Math.max(1, Math.ceil((window[0]! + WINDOW_MS - nowMs) / 1000));
      await this.ctx.storage.put("window", window);
      return { ok: false, used: window.length, limit, retry_after_s: retry };
    }
    window.push(nowMs);
    await this.ctx.storage.put("window", window);
    // when the oldest request of the window leaves it (one more request is then allowed)
    const reset = Math.max(1, Math.ceil((window[0]! + WINDOW_MS - nowMs) / 1000));
    return { ok: true, used: window.length, limit, reset_s: reset, config };
  }

  /** Claims a session slot; null when the tenant is at max_sessions. */
  async reserveSession(
    id: string,
    kv: { method: string; budget: number },
  ): Promise<{ used: number; limit: number } | null> {
    const limit = (await this.config())?.max_sessions ?? DEFAULT_LIMITS.max_sessions;
    const sessions = await this.ctx.storage.list<SessionRecord>({ prefix: "session:" });
    if (sessions.size >= limit) return null;
    const rec: SessionRecord = {
      id,
      host: "",
      created: Math.floor(Date.now() / 1000),
      kv_method: kv.method,
      kv_budget: kv.budget,
    };
    await this.ctx.storage.put(`session:${id}`, rec);
    return { used: sessions.size + 1, limit };
  }

  async updateSession(id: string, patch: Partial<Omit<SessionRecord, "id">>): Promise<SessionRecord | null> {
    const rec = await this.session(id);
    if (!rec) return null;
    const next = { ...rec, ...patch };
    await this.ctx.storage.put(`session:${id}`, next);
    return next;
  }

  async session(id: string): Promise<SessionRecord | null> {
    return (await this.ctx.storage.get<SessionRecord>(`session:${id}`)) ?? null;
  }

  async dropSession(id: string): Promise<boolean> {
    return this.ctx.storage.delete(`session:${id}`);
  }

  async usage(
    nowMs = Date.now(),
  ): Promise<{ config: TenantConfig | null; sessions: SessionRecord[]; requests_last_minute: number }> {
    const window = ((await this.ctx.storage.get<number[]>("window")) ?? []).filter((t) => t > nowMs - WINDOW_MS);
    const sessions = [...(await this.ctx.storage.list<SessionRecord>({ prefix: "session:" })).values()];
    return { config: await this.config(), sessions, requests_last_minute: window.length };
  }
}
