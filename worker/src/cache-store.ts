// The tenant's compressed prompt cache at the edge (docs/WORKER.md, "Prompt cache"): which cached
// states exist, in the tenant's Durable Object (tenant.ts owns the object; this module the entries).
// One storage key per entry (`cache:<key>`); the state itself is the R2 object
// cache/<tenant>/<key>, written by the host that took the snapshot (host-conn.ts, state_put
// cache:true) before its entry is put here.
//
// Bounds: cache_max_bytes (the entries' R2 bytes summed; least recently used go first; an entry
// larger than the bound is not kept) and cache_ttl_s (an entry unused that long is gone: at the
// next lookup or put, or by the object's alarm). An entry that goes takes its R2 object with it.
//
// Single flight: a request that would build a document's state claims its key (cacheLookup's
// `claim`); requests for the same document meanwhile wait for that one's cachePut (then they hit),
// its cacheRelease "not_stored" (the holder built it but it is not kept: they go on without the
// claim, at once, each building its own) or its cacheRelease "failed" (the holder built nothing:
// one of them claims it). The holder renews its claim while it prefills (cacheRenew); a claim not
// renewed for CLAIM_LEASE_MS is void (its request died unseen) and the next lookup claims afresh.
// A waiter waits while the claim is alive, CLAIM_WAIT_MS at most in all, then goes on without it.
// Claims live in this object's memory only: an object that leaves memory meanwhile forgets them
// (its waiters' calls keep it in memory, so only a claim nobody waits on is lost); a later request
// then claims afresh — at worst one more prefill of the document.
//
// A state written to R2 whose entry never comes (its request died between the snapshot and
// cachePut) is noted when written (`written`, by host-conn.ts) and deleted by the alarm after
// UNCLAIMED_OBJECT_MS, unless an entry holds it by then.
import { cacheObjectKey } from "./host-conn.js";

export interface CacheEntry {
  /** 64 lowercase hex (worker/src/prompt-cache.ts) */
  key: string;
  kind: "doc" | "reply";
  /** how many messages the state holds (a reply counts as one) */
  messages: number;
  /** the host that stored it (a hint: any host of the model can read it) */
  host: string;
  /** the storing host's hello.model */
  model: string;
  /** the R2 object's bytes */
  bytes: number;
  /** tokens the state holds (a copy's cached_tokens) */
  tokens: number;
  created_ms: number;
  used_ms: number;
  expires_ms: number;
}

export type CacheEntryIn = Omit<CacheEntry, "created_ms" | "used_ms" | "expires_ms">;

export interface CacheStats {
  entries: number;
  bytes: number;
  max_bytes: number;
  ttl_s: number;
}

export const CACHE_KEY = /^[0-9a-f]{64}$/;
/** lookup candidates at most (a conversation of 64 messages: a doc and a reply key per prefix) */
export const MAX_CACHE_CANDIDATES = 128;
export const DEFAULT_CACHE_MAX_BYTES = 1 << 30;
export const DEFAULT_CACHE_TTL_S = 3600;
export const MAX_CACHE_TTL_S = 30 * 86_400;
/** a request waits this long at most, in all, for another's claim on the document it needs; nobody waits on a claim older than this */
export const CLAIM_WAIT_MS = 10 * 60_000;
/** a claim not renewed (cacheRenew) this long since its creation or last renewal is void: its request died */
export const CLAIM_LEASE_MS = 30_000;

/** a cached state in R2 with no entry this long after it was written is deleted */
export const UNCLAIMED_OBJECT_MS = 10 * 60_000;

const PREFIX = "cache:";
/** a state written to R2, its entry not put yet: when (Unix ms) */
const WRITTEN = "cache-written:";
/** the tenant's name, as the last cachePut said it (the object does not know its own name) */
const TENANT_KEY = "cache_tenant";

/**
 * How a claim's wait ended, for a request waiting on it: stored (look again: a hit), refused (its
 * state is not kept: go on without the claim), released (look again: claim it), lapsed (the claim
 * may be void by now, or was taken over: look again), timeout (waited CLAIM_WAIT_MS: go on without).
 */
type Outcome = "stored" | "refused" | "released" | "lapsed" | "timeout";

/** How a holder gives up its claim (cacheRelease): it built nothing, or built a state that is not kept. */
export type ReleaseOutcome = "failed" | "not_stored";

interface Claim {
  /** created (Unix ms, the caller's clock): waited on until CLAIM_WAIT_MS after it at most */
  since: number;
  /** created or last renewed (Unix ms, the caller's clock) */
  renewed: number;
  waiters: Set<(o: Outcome) => void>;
}

const alive = (c: Claim | undefined, nowMs: number): boolean => c !== undefined && c.renewed + CLAIM_LEASE_MS > nowMs;

export interface CacheSettings {
  maxBytes: number;
  ttlMs: number;
}

export class CacheStore {
  private readonly claims = new Map<string, Claim>();

  constructor(
    private readonly storage: DurableObjectStorage,
    private readonly bucket: R2Bucket,
    private readonly settings: () => Promise<CacheSettings>,
    /** the object's alarm runs by then (expiry of entries nobody asks for) */
    private readonly wakeBy: (atMs: number) => Promise<void>,
  ) {}

  /**
   * The first of `keys` (longest prefix first) with a live entry: touched, its TTL counting from
   * now. With `claim` (a key of `keys`): when nothing at or before it hits, the caller claims it
   * (claimed: true; it builds that state, renews the claim while it prefills, and calls put or
   * release), or, when another request holds a live claim on it, waits until that one's put or
   * release, or until the claim is void, and looks again (CLAIM_WAIT_MS at most in all).
   */
  async lookup(
    keys: string[],
    claim?: string,
    nowMs = Date.now(),
  ): Promise<{ hit: CacheEntry | null; claimed: boolean }> {
    checkKeys(keys);
    const claimAt = claim === undefined ? -1 : keys.indexOf(claim);
    if (claim !== undefined && claimAt < 0)
      throw new Error(`cacheLookup: claim '${String(claim).slice(0, 80)}' is not one of the ${keys.length} keys`);
    const started = Date.now();
    let now = nowMs;
    for (;;) {
      const { hit, at } = await this.firstLive(keys, now);
      if (claim === undefined || (hit && at <= claimAt))
        return { hit: hit ? await this.touch(hit, now) : null, claimed: false };
      // checked and taken with no await between: two lookups never both claim
      const held = this.claims.get(claim);
      if (!held || !alive(held, now)) {
        // a void claim's other waiters look again (and wait on this one)
        if (held) for (const w of held.waiters) w("lapsed");
        this.claims.set(claim, { since: now, renewed: now, waiters: new Set() });
        return { hit: hit ? await this.touch(hit, now) : null, claimed: true };
      }
      // CLAIM_WAIT_MS at most, for this request and for this claim (one renewed for ever is not waited on for ever)
      const deadline = Math.min(nowMs, held.since) + CLAIM_WAIT_MS;
      // woken at the claim's end, or when it would be void unless renewed meanwhile (then it waits on)
      const outcome =
        now >= deadline ? "timeout" : await waitFor(held, Math.min(held.renewed + CLAIM_LEASE_MS, deadline) - now);
      now = nowMs + (Date.now() - started);
      // stored, released, lapsed: look again (a void claim is taken, one past the deadline given up)
      if (outcome === "timeout" || outcome === "refused") {
        // the holder is slow, or its state is not kept: go on without the claim
        const again = await this.firstLive(keys, now);
        return { hit: again.hit ? await this.touch(again.hit, now) : null, claimed: false };
      }
    }
  }

  /**
   * Records an entry whose R2 object is written (cache/<tenant>/<key>), evicting the least
   * recently used ones to stay within cache_max_bytes; one larger than the bound is not kept (its
   * object deleted). Expired entries go first. Resolves the claim on its key.
   */
  async put(tenant: string, e: CacheEntryIn, nowMs = Date.now()): Promise<{ stored: boolean; evicted: number }> {
    checkEntry(tenant, e);
    const claim = this.claims.get(e.key);
    try {
      if ((await this.storage.get<string>(TENANT_KEY)) !== tenant) await this.storage.put(TENANT_KEY, tenant);
      const { maxBytes, ttlMs } = await this.settings();
      let evicted = await this.sweep(nowMs, ttlMs, tenant);
      if (e.bytes > maxBytes) {
        // the object under this key is the new one (the host wrote it): an older entry of the key is gone too
        await this.storage.delete(PREFIX + e.key);
        await this.bucket.delete(cacheObjectKey(tenant, e.key));
        this.resolve(e.key, claim, "refused");
        return { stored: false, evicted };
      }
      evicted += await this.evictTo(maxBytes - e.bytes, tenant, e.key);
      await this.storage.delete(WRITTEN + e.key);
      const entry: CacheEntry = {
        key: e.key,
        kind: e.kind,
        messages: e.messages,
        host: e.host,
        model: e.model,
        bytes: e.bytes,
        tokens: e.tokens,
        created_ms: nowMs,
        used_ms: nowMs,
        expires_ms: nowMs + ttlMs,
      };
      await this.storage.put(PREFIX + e.key, entry);
      await this.wakeBy(entry.expires_ms);
      this.resolve(e.key, claim, "stored");
      return { stored: true, evicted };
    } catch (err) {
      // the holder built its state: its waiters do not wait for another to build it again
      this.resolve(e.key, claim, "refused");
      throw err;
    }
  }

  /**
   * The tenant's settings changed: expired entries go, then the least recently used ones until the
   * rest fit cache_max_bytes; the alarm is due at the next expiry under the new TTL.
   */
  async trim(tenant: string, nowMs = Date.now()): Promise<void> {
    const { maxBytes, ttlMs } = await this.settings();
    await this.sweep(nowMs, ttlMs, tenant);
    await this.evictTo(maxBytes, tenant);
    const next = await this.nextExpiry();
    if (Number.isFinite(next)) await this.wakeBy(next);
  }

  /** Drops the least recently used entries (but `keep`) until the others' bytes are at most `limit`; how many. */
  private async evictTo(limit: number, tenant: string, keep?: string): Promise<number> {
    const others = [...(await this.entries()).values()].filter((x) => x.key !== keep);
    let total = others.reduce((n, x) => n + x.bytes, 0);
    others.sort((a, b) => a.used_ms - b.used_ms);
    let evicted = 0;
    for (const old of others) {
      if (total <= limit) break;
      await this.drop(old.key, tenant);
      total -= old.bytes;
      evicted++;
    }
    return evicted;
  }

  /** A state was written to R2 as cache/<tenant>/<key>: deleted later unless its entry is put. */
  async written(tenant: string, key: string, nowMs = Date.now()): Promise<void> {
    checkTenant(tenant);
    if (typeof key !== "string" || !CACHE_KEY.test(key)) throw new Error(badKey(key));
    if ((await this.storage.get<string>(TENANT_KEY)) !== tenant) await this.storage.put(TENANT_KEY, tenant);
    await this.storage.put(WRITTEN + key, nowMs);
    await this.wakeBy(nowMs + UNCLAIMED_OBJECT_MS);
  }

  /**
   * A host found no usable state for entry `key` (it answered cache_miss: the R2 object is gone or
   * damaged): the entry goes, and its object, so that later requests do not pay the miss again.
   * With `createdMs` (the created_ms of the entry the caller hit), an entry stored again since is
   * kept. Whether an entry went.
   */
  async forget(key: string, createdMs?: number): Promise<boolean> {
    if (typeof key !== "string" || !CACHE_KEY.test(key)) throw new Error(badKey(key));
    const e = await this.storage.get<CacheEntry>(PREFIX + key);
    if (!e || (createdMs !== undefined && e.created_ms !== createdMs)) return false;
    await this.drop(key, await this.storage.get<string>(TENANT_KEY));
    return true;
  }

  /**
   * A claim given up without a put. "failed": its request built nothing (it failed before): the
   * requests waiting on it look again, and one of them claims it. "not_stored": it built the state
   * but it is not kept (too large, the snapshot or its put failed, no cache room): they go on at
   * once without the claim (each builds its own; none waits for another).
   */
  release(key: string, outcome: ReleaseOutcome = "failed"): void {
    if (typeof key !== "string" || !CACHE_KEY.test(key)) throw new Error(badKey(key));
    if (outcome !== "failed" && outcome !== "not_stored")
      throw new Error(
        `cacheRelease: outcome ${JSON.stringify(outcome)?.slice(0, 80)} is not one of "failed", "not_stored"`,
      );
    this.resolve(key, this.claims.get(key), outcome === "failed" ? "released" : "refused");
  }

  /**
   * The holder of the claim on `key` is still building it (called while it prefills): the claim
   * lives CLAIM_LEASE_MS from now. False when there is no claim on the key any more (void and
   * taken over, ended by a put or release, or lost with the object's memory): the caller goes on
   * and puts its state as usual; nothing is claimed again.
   */
  renew(key: string, nowMs = Date.now()): boolean {
    if (typeof key !== "string" || !CACHE_KEY.test(key)) throw new Error(badKey(key));
    const held = this.claims.get(key);
    if (!held) return false;
    held.renewed = Math.max(held.renewed, nowMs);
    return true;
  }

  async stats(nowMs = Date.now()): Promise<CacheStats> {
    const { maxBytes, ttlMs } = await this.settings();
    let entries = 0;
    let bytes = 0;
    for (const e of (await this.entries()).values())
      if (e.used_ms + ttlMs > nowMs) {
        entries++;
        bytes += e.bytes;
      }
    return { entries, bytes, max_bytes: maxBytes, ttl_s: ttlMs / 1000 };
  }

  /** Deletes the entries unused for the TTL, and their objects (and objects no entry came for); how many entries. */
  async sweep(nowMs: number, ttlMs?: number, tenantName?: string): Promise<number> {
    const ttl = ttlMs ?? (await this.settings()).ttlMs;
    const tenant = tenantName ?? (await this.storage.get<string>(TENANT_KEY));
    let n = 0;
    for (const e of (await this.entries()).values())
      if (e.used_ms + ttl <= nowMs) {
        await this.drop(e.key, tenant);
        n++;
      }
    for (const [k, at] of await this.storage.list<number>({ prefix: WRITTEN })) {
      if (at + UNCLAIMED_OBJECT_MS > nowMs) continue;
      const key = k.slice(WRITTEN.length);
      // an entry of the key holds the object (put since, or stored before and written again)
      if (tenant !== undefined && !(await this.storage.get(PREFIX + key)))
        await this.bucket.delete(cacheObjectKey(tenant, key));
      await this.storage.delete(k);
    }
    return n;
  }

  /** When the next entry expires (Unix ms; Infinity: none). */
  async nextExpiry(): Promise<number> {
    const { ttlMs } = await this.settings();
    let next = Number.POSITIVE_INFINITY;
    for (const e of (await this.entries()).values()) next = Math.min(next, e.used_ms + ttlMs);
    for (const at of (await this.storage.list<number>({ prefix: WRITTEN })).values())
      next = Math.min(next, at + UNCLAIMED_OBJECT_MS);
    return next;
  }

  private entries(): Promise<Map<string, CacheEntry>> {
    return this.storage.list<CacheEntry>({ prefix: PREFIX });
  }

  /** The first live entry of `keys` and its index (expired ones met on the way are deleted). */
  private async firstLive(keys: string[], nowMs: number): Promise<{ hit: CacheEntry | null; at: number }> {
    if (keys.length === 0) return { hit: null, at: -1 };
    const found = await this.storage.get<CacheEntry>(keys.map((k) => PREFIX + k));
    const { ttlMs } = await this.settings();
    let tenant: string | undefined;
    for (let i = 0; i < keys.length; i++) {
      const e = found.get(PREFIX + keys[i]);
      if (!e) continue;
      if (e.used_ms + ttlMs > nowMs) return { hit: e, at: i };
      tenant ??= await this.storage.get<string>(TENANT_KEY);
      await this.drop(e.key, tenant);
    }
    return { hit: null, at: -1 };
  }

  private async touch(e: CacheEntry, nowMs: number): Promise<CacheEntry> {
    const { ttlMs } = await this.settings();
    const next = { ...e, used_ms: Math.max(e.used_ms, nowMs), expires_ms: Math.max(e.used_ms, nowMs) + ttlMs };
    await this.storage.put(PREFIX + e.key, next);
    return next;
  }

  private async drop(key: string, tenant: string | undefined): Promise<void> {
    await this.storage.delete(PREFIX + key);
    if (tenant !== undefined) await this.bucket.delete(cacheObjectKey(tenant, key));
  }

  private resolve(key: string, claim: Claim | undefined, outcome: Outcome): void {
    if (!claim || this.claims.get(key) !== claim) return;
    this.claims.delete(key);
    for (const w of claim.waiters) w(outcome);
  }
}

/** Waits for a claim's end, at most `ms` (then "lapsed": the caller looks at the claim again). */
function waitFor(claim: Claim, ms: number): Promise<Outcome> {
  return new Promise((resolve) => {
    const done = (o: Outcome) => {
      clearTimeout(timer);
      claim.waiters.delete(done);
      resolve(o);
    };
    const timer = setTimeout(() => done("lapsed"), Math.max(0, ms));
    claim.waiters.add(done);
  });
}

const badKey = (k: unknown) =>
  `cache key ${JSON.stringify(k)?.slice(0, 80)} is not 64 lowercase hex characters (worker/src/prompt-cache.ts)`;

function checkKeys(keys: unknown): asserts keys is string[] {
  if (!Array.isArray(keys)) throw new Error("cacheLookup: keys must be an array of cache keys");
  if (keys.length > MAX_CACHE_CANDIDATES)
    throw new Error(`cacheLookup: ${keys.length} keys; at most ${MAX_CACHE_CANDIDATES} are looked up at once`);
  for (const k of keys) if (typeof k !== "string" || !CACHE_KEY.test(k)) throw new Error(badKey(k));
}

const count = (v: unknown) => typeof v === "number" && Number.isSafeInteger(v) && v >= 0;

function checkTenant(tenant: unknown): void {
  if (typeof tenant !== "string" || !/^[A-Za-z0-9_.:-]{1,128}$/.test(tenant))
    throw new Error(`cache: tenant ${JSON.stringify(tenant)?.slice(0, 80)} is not a tenant name`);
}

function checkEntry(tenant: unknown, e: CacheEntryIn): void {
  checkTenant(tenant);
  if (typeof e?.key !== "string" || !CACHE_KEY.test(e.key)) throw new Error(badKey(e?.key));
  if (e.kind !== "doc" && e.kind !== "reply")
    throw new Error(`cachePut: kind ${JSON.stringify(e.kind)} is not one of doc, reply`);
  for (const f of ["messages", "bytes", "tokens"] as const)
    if (!count(e[f])) throw new Error(`cachePut: ${f} ${JSON.stringify(e[f])} is not an integer >= 0`);
  for (const f of ["host", "model"] as const)
    if (typeof e[f] !== "string") throw new Error(`cachePut: ${f} must be a string`);
}
