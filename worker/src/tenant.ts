// One Durable Object per tenant: its quotas, an exact requests-per-minute window, and its
// sessions (id → host). Exact because one object serialises every update of a tenant (Workers KV
// is eventually consistent; the rate-limit binding is approximate). State lives in storage, so
// eviction loses nothing.
//
// Sessions expire (docs/WORKER.md, "Session lifetime"): each record holds its last use, and the
// object's alarm runs at the earliest deadline — a session idle past the tenant's session_ttl_s,
// an open stuck before its host answered, a tombstone's next close attempt. An expired or deleted
// session stops counting against max_sessions at once; its record stays as a tombstone until its
// host confirms the close (retried with back-off by later alarms) or the TTL has passed, after
// which the host's own idle sweep has closed it.
//
// A session's checkpoint lives in R2 (sessions/<tenant>/<session>, written by its host through its
// HostConn): the object counts against the tenant's max_stored_bytes fleet-wide (storedPut, one
// record per session) and is deleted, with its record, when the session is deleted or expires.
// Only the host a session's record names reads or writes it (storedCheck, storedPut: a former host
// holding a stale copy is refused), and a session moves to another host by compare-and-set
// (moveSession), so that two requests racing for it land on one host.
//
// The tenant's prompt cache (cacheLookup, cacheRenew, cachePut, cacheRelease, cacheForget,
// cacheStats, and cacheWritten from host-conn.ts; cache-store.ts): its entries live here too, their
// states in R2 (cache/<tenant>/<key>), within the tenant's cache_max_bytes and cache_ttl_s; the
// alarm deletes entries unused for the TTL, and states whose entry never came.
import { DurableObject } from "cloudflare:workers";

import {
  type CacheEntry,
  type CacheEntryIn,
  type CacheStats,
  CacheStore,
  type ReleaseOutcome,
  DEFAULT_CACHE_MAX_BYTES,
  DEFAULT_CACHE_TTL_S,
} from "./cache-store.js";
import type { Env } from "./env.js";
import { stateKey } from "./host-conn.js";
import { connectTo } from "./routing.js";

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
  /** a session idle this long is closed, at the edge and on its host (default 3600) */
  session_ttl_s?: number;
  /** checkpointed session state the tenant may keep: in R2, fleet-wide, and on each host (absent: unbounded at the edge, the host's --max-stored-bytes there) */
  max_stored_bytes?: number;
  /** the prompt cache for a request that does not say (absent: on) */
  kv_cache?: "on" | "off";
  /** the cached states' bytes the tenant may keep in R2 (LRU by last use; absent: 1 GiB) */
  cache_max_bytes?: number;
  /** a cached state unused this long is deleted (absent: 3600) */
  cache_ttl_s?: number;
}

export type { CacheEntry, CacheStats, ReleaseOutcome } from "./cache-store.js";
export { MAX_CACHE_TTL_S } from "./cache-store.js";

export const DEFAULT_LIMITS: Omit<TenantConfig, "name"> = {
  kv_quota_bytes: 0,
  max_sessions: 16,
  requests_per_minute: 600,
  policy: "refuse",
  session_ttl_s: 3600,
};

/** The prompt cache's settings of a tenant whose config does not name them (kept out of a new tenant's config). */
export const CACHE_DEFAULTS = {
  kv_cache: "on",
  cache_max_bytes: DEFAULT_CACHE_MAX_BYTES,
  cache_ttl_s: DEFAULT_CACHE_TTL_S,
} as const satisfies Required<Pick<TenantConfig, "kv_cache" | "cache_max_bytes" | "cache_ttl_s">>;

export const MAX_SESSION_TTL_S = 30 * 86_400;
/** an open whose host has not answered open_session by then is given up (its request died with its isolate) */
export const OPENING_DEADLINE_MS = 5 * 60_000;
/** how long a request for an expired session still says session_expired (then: session_not_found) */
const EXPIRED_KEPT_MS = 86_400_000;
const RETRY_FIRST_MS = 30_000;
const RETRY_MAX_MS = 15 * 60_000;

export interface SessionRecord {
  id: string;
  /** the host holding it, recorded when the link is dialled ("" before) */
  host: string;
  created: number; // Unix seconds
  kv_method: string;
  kv_budget: number;
  /** the model the session's host serves */
  model?: string;
  /**
   * opening: its host has not answered open_session yet; open; closing: a tombstone — deleted or
   * expired at the edge, not counted, its host's close not yet confirmed. Absent (records before
   * 0.8): opening when no host was recorded, else open.
   */
  state?: "opening" | "open" | "closing";
  /** the last request that touched it (Unix ms; absent: its creation) */
  used_ms?: number;
  /** a request on it is in flight: it does not expire before this (Unix ms; cleared when the request ends) */
  busy_until_ms?: number;
  /** a tombstone of a session that expired (requests for it get session_expired), not deleted */
  expired?: boolean;
  closing_since_ms?: number;
  /** a tombstone's next close attempt (Unix ms) and how many failed */
  next_try_ms?: number;
  attempts?: number;
}

/** What a request for a session finds: the record (now touched), or why there is none. */
export type SessionUse =
  | { ok: true; rec: SessionRecord }
  | { ok: false; code: "session_expired" | "session_not_found" };

const stateOf = (r: SessionRecord) => r.state ?? (r.host === "" ? "opening" : "open");
const usedMs = (r: SessionRecord) => r.used_ms ?? r.created * 1000;
/** A request in flight holds its session at most this long (one whose end the edge never saw: an
 * evicted isolate); a long prefill or generation is never expired under itself by the alarm. */
export const REQUEST_MAX_MS = 30 * 60_000;
/** When an open session expires: its TTL after its last use, not while a request runs on it. */
const expiresAt = (r: SessionRecord, ttl: number) => Math.max(usedMs(r) + ttl, r.busy_until_ms ?? 0);

export type Admission =
  | { ok: true; used: number; limit: number; reset_s: number; config: TenantConfig | null }
  | { ok: false; used: number; limit: number; retry_after_s: number };

const WINDOW_MS = 60_000;

export class TenantState extends DurableObject<Env> {
  private cacheStore?: CacheStore;

  /** The prompt cache's entries (made on first use: its claims live in this object's memory). */
  private get cache(): CacheStore {
    this.cacheStore ??= new CacheStore(
      this.ctx.storage,
      this.env.SESSIONS,
      async () => {
        const cfg = await this.config();
        return {
          maxBytes: cfg?.cache_max_bytes ?? CACHE_DEFAULTS.cache_max_bytes,
          ttlMs: (cfg?.cache_ttl_s ?? CACHE_DEFAULTS.cache_ttl_s) * 1000,
        };
      },
      (at) => this.wakeBy(at),
    );
    return this.cacheStore;
  }

  async configure(name: string, patch: Partial<Omit<TenantConfig, "name">>): Promise<TenantConfig> {
    const prev = (await this.ctx.storage.get<TenantConfig>("config")) ?? { name, ...DEFAULT_LIMITS };
    const next: TenantConfig = {
      ...prev,
      ...Object.fromEntries(Object.entries(patch).filter(([, v]) => v !== undefined)),
      name,
    };
    await this.ctx.storage.put("config", next);
    // a lower bound or a shorter TTL applies to the entries already cached
    if (patch.cache_max_bytes !== undefined || patch.cache_ttl_s !== undefined) await this.cache.trim(name);
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

  private async ttlMs(): Promise<number> {
    return ((await this.config())?.session_ttl_s ?? DEFAULT_LIMITS.session_ttl_s!) * 1000;
  }

  private async records(): Promise<SessionRecord[]> {
    return [...(await this.ctx.storage.list<SessionRecord>({ prefix: "session:" })).values()];
  }

  /** Makes sure the alarm runs by `atMs` (an earlier alarm finds nothing due and sets the next). */
  private async wakeBy(atMs: number): Promise<void> {
    const current = await this.ctx.storage.getAlarm();
    if (current === null || current > atMs) await this.ctx.storage.setAlarm(atMs);
  }

  /** Claims a session slot (a record being opened); null when the tenant is at max_sessions. */
  async reserveSession(
    id: string,
    kv: { method: string; budget: number },
    nowMs = Date.now(),
  ): Promise<{ used: number; limit: number } | null> {
    const limit = (await this.config())?.max_sessions ?? DEFAULT_LIMITS.max_sessions;
    const counted = (await this.records()).filter((r) => stateOf(r) !== "closing").length;
    if (counted >= limit) return null;
    const rec: SessionRecord = {
      id,
      host: "",
      created: Math.floor(nowMs / 1000),
      kv_method: kv.method,
      kv_budget: kv.budget,
      state: "opening",
      used_ms: nowMs,
    };
    await this.ctx.storage.put(`session:${id}`, rec);
    await this.wakeBy(nowMs + OPENING_DEADLINE_MS);
    return { used: counted + 1, limit };
  }

  /** Updates a live record; null when it is gone or a tombstone (deleted or expired meanwhile). */
  async updateSession(id: string, patch: Partial<Omit<SessionRecord, "id">>): Promise<SessionRecord | null> {
    const rec = await this.session(id);
    if (!rec || stateOf(rec) === "closing") return null;
    const next = { ...rec, ...patch };
    await this.ctx.storage.put(`session:${id}`, next);
    if (stateOf(next) === "open") await this.wakeBy(expiresAt(next, await this.ttlMs()));
    return next;
  }

  /**
   * Moves a session from the host `from` to `to`, only if `from` is still its recorded host (a
   * compare-and-set: of two requests that found its host gone, one moves it, the other learns where
   * to). The session's host after the call; null when it is gone or a tombstone.
   */
  async moveSession(id: string, from: string, to: string): Promise<string | null> {
    const rec = await this.session(id);
    if (!rec || stateOf(rec) === "closing") return null;
    if (rec.host !== from) return rec.host;
    return (await this.updateSession(id, { host: to }))?.host ?? null;
  }

  /** A request for an open session: touches it (its TTL counts from now), or says why it cannot be used. */
  async useSession(id: string, nowMs = Date.now()): Promise<SessionUse> {
    const rec = await this.session(id);
    if (!rec) {
      const expired = await this.ctx.storage.get<number>(`expired:${id}`);
      return { ok: false, code: expired !== undefined ? "session_expired" : "session_not_found" };
    }
    const state = stateOf(rec);
    if (state === "closing") return { ok: false, code: rec.expired ? "session_expired" : "session_not_found" };
    if (state === "opening") return { ok: false, code: "session_not_found" };
    const ttl = await this.ttlMs();
    if (expiresAt(rec, ttl) <= nowMs) {
      await this.tombstone(rec, true, nowMs);
      return { ok: false, code: "session_expired" };
    }
    const next = { ...rec, used_ms: nowMs, busy_until_ms: nowMs + REQUEST_MAX_MS };
    await this.ctx.storage.put(`session:${id}`, next);
    await this.wakeBy(nowMs + ttl);
    return { ok: true, rec: next };
  }

  /** A request on the session ended: its TTL counts from now. */
  async touchSession(id: string, nowMs = Date.now()): Promise<void> {
    const rec = await this.session(id);
    if (rec && stateOf(rec) === "open") {
      const { busy_until_ms: _, ...idle } = rec;
      await this.ctx.storage.put(`session:${id}`, { ...idle, used_ms: nowMs });
    }
  }

  async session(id: string): Promise<SessionRecord | null> {
    return (await this.ctx.storage.get<SessionRecord>(`session:${id}`)) ?? null;
  }

  /** Forgets a session whose host has closed it (or never had it), and its checkpoint. */
  async dropSession(id: string): Promise<boolean> {
    await this.forgetState(id);
    return this.ctx.storage.delete(`session:${id}`);
  }

  /** The host closed the session after its idle TTL: forget it; requests for it say session_expired. */
  async expireSession(id: string, nowMs = Date.now()): Promise<void> {
    await this.forgetState(id);
    await this.ctx.storage.delete(`session:${id}`);
    await this.ctx.storage.put(`expired:${id}`, nowMs);
    await this.wakeBy(nowMs + EXPIRED_KEPT_MS);
  }

  /** Deleted by its tenant, its host close not confirmed: a tombstone the alarm retries. */
  async closeLater(id: string, nowMs = Date.now()): Promise<void> {
    const rec = await this.session(id);
    if (rec && stateOf(rec) !== "closing") await this.tombstone(rec, false, nowMs, nowMs + RETRY_FIRST_MS);
  }

  /**
   * Whether the host `writer` holds `session` as the edge sees it: "ok" when the session is open (or
   * opening) with `writer` as its recorded host, "moved" when another host holds it, "gone" when it
   * is deleted, expired or was never made. Only its host reads or writes its checkpoint.
   */
  async storedCheck(session: string, writer: string): Promise<"ok" | "moved" | "gone"> {
    const rec = await this.session(session);
    if (!rec || stateOf(rec) === "closing") return "gone";
    return rec.host === writer ? "ok" : "moved";
  }

  /**
   * A checkpoint of `session` of `bytes` is being written by the host `writer` (its HostConn, on
   * part 0 of a state_put): recorded, unless it would take the tenant's stored bytes, every
   * session's last checkpoint summed, over max_stored_bytes. A session the edge does not hold open
   * (deleted, expired, never made) stores nothing, nor does a host that is not the session's.
   */
  async storedPut(
    session: string,
    bytes: number,
    writer: string,
  ): Promise<
    | { ok: true; used: number; prev?: number }
    | { ok: false; code: "stored_quota_exceeded" | "not_found" | "state_conflict"; message: string }
  > {
    const owner = await this.storedCheck(session, writer);
    if (owner === "gone")
      return {
        ok: false,
        code: "not_found",
        message: `session '${session}' is not open at the edge (deleted or expired): its checkpoint is not kept`,
      };
    if (owner === "moved")
      return {
        ok: false,
        code: "state_conflict",
        message: `session '${session}' is on another host: host '${writer}' no longer holds it (its checkpoint is not kept)`,
      };
    const limit = (await this.config())?.max_stored_bytes;
    let others = 0;
    let prev: number | undefined;
    for (const [key, n] of await this.ctx.storage.list<number>({ prefix: "stored:" }))
      if (key !== `stored:${session}`) others += n;
      else prev = n;
    if (limit !== undefined && others + bytes > limit)
      return {
        ok: false,
        code: "stored_quota_exceeded",
        message: `a checkpoint of ${bytes} bytes would take the tenant's stored sessions to ${others + bytes} bytes, over its max_stored_bytes ${limit}`,
      };
    await this.ctx.storage.put(`stored:${session}`, bytes);
    return { ok: true, used: others + bytes, ...(prev !== undefined ? { prev } : {}) };
  }

  /**
   * A checkpoint counted by storedPut is in R2 now. "gone" when the session was deleted or expired
   * meanwhile (its record and count went with it; the caller deletes the object again, which
   * forgetState may have deleted before it was written). A session that moved meanwhile keeps it:
   * `writer` was its host when the put began, and the new host's if_etag tells it the state changed.
   */
  async storedCommit(session: string, writer: string): Promise<"ok" | "gone"> {
    if ((await this.storedCheck(session, writer)) !== "gone") return "ok";
    await this.ctx.storage.delete(`stored:${session}`);
    return "gone";
  }

  /** A checkpoint counted by storedPut was not stored after all: the session's count is its earlier one again. */
  async storedUndo(session: string, bytes: number, prev: number | undefined): Promise<void> {
    if ((await this.ctx.storage.get<number>(`stored:${session}`)) !== bytes) return; // counted anew since
    if (prev === undefined) await this.ctx.storage.delete(`stored:${session}`);
    else await this.ctx.storage.put(`stored:${session}`, prev);
  }

  /** The session's checkpoint was deleted from R2 (by its host). */
  async storedDrop(session: string): Promise<void> {
    await this.ctx.storage.delete(`stored:${session}`);
  }

  /** The tenant's checkpointed bytes, every session's last checkpoint summed. */
  async storedBytes(): Promise<number> {
    let total = 0;
    for (const n of (await this.ctx.storage.list<number>({ prefix: "stored:" })).values()) total += n;
    return total;
  }

  /** A session is gone for its tenant: its R2 checkpoint and its stored-bytes record too. */
  private async forgetState(id: string): Promise<void> {
    const tenant = (await this.config())?.name;
    if (tenant !== undefined) await this.env.SESSIONS.delete(stateKey(tenant, id));
    await this.ctx.storage.delete(`stored:${id}`);
  }

  private async tombstone(rec: SessionRecord, expired: boolean, nowMs: number, tryAt = nowMs): Promise<void> {
    const t: SessionRecord = {
      ...rec,
      state: "closing",
      expired,
      closing_since_ms: nowMs,
      next_try_ms: tryAt,
      attempts: 0,
    };
    await this.ctx.storage.put(`session:${rec.id}`, t);
    await this.forgetState(rec.id);
    await this.wakeBy(tryAt);
  }

  /** A tombstone is done with: its host confirmed the close or the TTL has passed (a checkpoint written since goes too). */
  private async bury(rec: SessionRecord, nowMs: number): Promise<void> {
    await this.forgetState(rec.id);
    await this.ctx.storage.delete(`session:${rec.id}`);
    if (rec.expired) await this.ctx.storage.put(`expired:${rec.id}`, nowMs);
  }

  /**
   * Expires what is due, then closes tombstones on their hosts (one link per host; best effort),
   * then sets the next alarm. State changes come first, before any host is called: a request that
   * arrives meanwhile finds a tombstone, never a session being closed under it.
   */
  override async alarm(): Promise<void> {
    const now = Date.now();
    const ttl = await this.ttlMs();
    for (const rec of await this.records()) {
      const state = stateOf(rec);
      if (state === "opening" && rec.created * 1000 + OPENING_DEADLINE_MS <= now) {
        if (rec.host === "") await this.dropSession(rec.id);
        else await this.tombstone(rec, false, now);
      } else if (state === "open" && expiresAt(rec, ttl) <= now) await this.tombstone(rec, true, now);
    }
    const due = new Map<string, SessionRecord[]>();
    for (const rec of await this.records()) {
      if (stateOf(rec) !== "closing") continue;
      if ((rec.closing_since_ms ?? now) + ttl <= now) await this.bury(rec, now);
      else if ((rec.next_try_ms ?? now) <= now) {
        // claimed before any host is called: an alarm run meanwhile does not close it a second time
        const claimed = { ...rec, next_try_ms: now + RETRY_FIRST_MS };
        await this.ctx.storage.put(`session:${rec.id}`, claimed);
        due.set(rec.host, [...(due.get(rec.host) ?? []), claimed]);
      }
    }
    const tenant = (await this.config())?.name ?? "";
    await Promise.all([...due].map(([host, recs]) => this.closeOn(host, tenant, recs, now)));
    for (const [key, at] of await this.ctx.storage.list<number>({ prefix: "expired:" }))
      if (at + EXPIRED_KEPT_MS <= now) await this.ctx.storage.delete(key);
    await this.cache.sweep(now);
    await this.scheduleNext(ttl);
  }

  private async closeOn(host: string, tenant: string, recs: SessionRecord[], now: number): Promise<void> {
    const closed = new Set<string>();
    try {
      const link = await connectTo(this.env, host, tenant);
      try {
        for (const rec of recs) {
          const f = await link.send({ type: "close", session: rec.id });
          const gone = f.type === "error" && ["unknown_session", "session_expired", "session_lost"].includes(f.code);
          if (f.type === "closed" || gone) closed.add(rec.id);
        }
      } finally {
        link.close();
      }
    } catch {
      // unreachable: retried by a later alarm
    }
    for (const rec of recs) {
      if (closed.has(rec.id)) await this.bury(rec, now);
      else {
        const attempts = (rec.attempts ?? 0) + 1;
        const wait = Math.min(RETRY_MAX_MS, RETRY_FIRST_MS * 2 ** attempts);
        await this.ctx.storage.put(`session:${rec.id}`, { ...rec, attempts, next_try_ms: now + wait });
      }
    }
  }

  private async scheduleNext(ttl: number): Promise<void> {
    let next = Number.POSITIVE_INFINITY;
    for (const rec of await this.records()) {
      const state = stateOf(rec);
      const at =
        state === "opening"
          ? rec.created * 1000 + OPENING_DEADLINE_MS
          : state === "open"
            ? expiresAt(rec, ttl)
            : Math.min(rec.next_try_ms ?? 0, (rec.closing_since_ms ?? 0) + ttl);
      next = Math.min(next, at);
    }
    for (const at of (await this.ctx.storage.list<number>({ prefix: "expired:" })).values())
      next = Math.min(next, at + EXPIRED_KEPT_MS);
    next = Math.min(next, await this.cache.nextExpiry());
    if (Number.isFinite(next)) await this.ctx.storage.setAlarm(Math.max(next, Date.now() + 1000));
    else await this.ctx.storage.deleteAlarm();
  }

  // ---- the prompt cache (cache-store.ts) ----

  /**
   * The first of `keys` (longest cached prefix first, at most 128, 64 lowercase hex) with a live
   * entry, touched. With `claim` (one of `keys`: the document state the caller would build): when
   * nothing at or before it hits, the caller claims it (`claimed`: it then calls cacheRenew while
   * it prefills, then cachePut or cacheRelease), or waits for the request that holds it (while
   * that one's claim is alive, 10 minutes at most) and looks again.
   */
  cacheLookup(
    keys: string[],
    claim?: string,
    nowMs = Date.now(),
  ): Promise<{ hit: CacheEntry | null; claimed: boolean }> {
    return this.cache.lookup(keys, claim, nowMs);
  }

  /** An entry whose state is in R2 (cache/<tenant>/<key>): kept within cache_max_bytes (LRU), or not at all when larger. */
  cachePut(tenant: string, e: CacheEntryIn, nowMs = Date.now()): Promise<{ stored: boolean; evicted: number }> {
    return this.cache.put(tenant, e, nowMs);
  }

  /** A cached state was written to R2 (host-conn.ts): deleted by the alarm unless its entry is put within 10 minutes. */
  cacheWritten(tenant: string, key: string, nowMs = Date.now()): Promise<void> {
    return this.cache.written(tenant, key, nowMs);
  }

  /**
   * A host answered cache_miss for entry `key`: the entry and its R2 object go (not when
   * `createdMs` is given and the entry was stored again since). Whether an entry went.
   */
  cacheForget(key: string, createdMs?: number): Promise<boolean> {
    return this.cache.forget(key, createdMs);
  }

  /**
   * A claim given up without a cachePut. "failed" (the default): the request built nothing; one of
   * those waiting claims it. "not_stored": it built the state but it is not kept (too large, the
   * snapshot or its put failed, no cache room); those waiting go on at once without the claim.
   */
  async cacheRelease(key: string, outcome: ReleaseOutcome = "failed"): Promise<void> {
    this.cache.release(key, outcome);
  }

  /**
   * The claim's holder is still building (call it while the document prefills, e.g. every 10 s):
   * a claim not renewed for 30 s is void. False when the claim is gone (nothing to do: the caller
   * puts or releases as usual).
   */
  async cacheRenew(key: string, nowMs = Date.now()): Promise<boolean> {
    return this.cache.renew(key, nowMs);
  }

  cacheStats(nowMs = Date.now()): Promise<CacheStats> {
    return this.cache.stats(nowMs);
  }

  async usage(
    nowMs = Date.now(),
  ): Promise<{ config: TenantConfig | null; sessions: SessionRecord[]; requests_last_minute: number }> {
    const window = ((await this.ctx.storage.get<number[]>("window")) ?? []).filter((t) => t > nowMs - WINDOW_MS);
    // tombstones are not the tenant's sessions any more
    const sessions = (await this.records()).filter((r) => stateOf(r) !== "closing");
    return { config: await this.config(), sessions, requests_last_minute: window.length };
  }
}
