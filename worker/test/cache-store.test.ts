// The edge's side of the prompt cache: the tenant's entries in its Durable Object (cacheLookup,
// cachePut, cacheRelease, cacheRenew, cacheStats — longest live key first, LRU within
// cache_max_bytes, TTL cache_ttl_s from last use, single flight on a claimed document key renewed
// while it is built, tenants apart), the cached states in R2 through the host's control messages
// (state_put/state_get/state_head cache:true on cache/<tenant>/<key>: any host reads them, no
// fence, not counted against max_stored_bytes), and the admin API's validation of kv_cache,
// cache_max_bytes, cache_ttl_s.
import { type ControlFromHost, type ControlToHost, HOST_STATE_PART_BYTES } from "@pyramidkv/shared";
import { runDurableObjectAlarm, runInDurableObject } from "cloudflare:test";
import { env } from "cloudflare:workers";
import { afterAll, beforeAll, describe, expect, it } from "vitest";

import { HostLink } from "../src/host-link.js";
import { ADMIN, as, call, error, eventually, makeTenant } from "./client.js";
import { FakeHost } from "./fake-host.js";

const MODEL = "cache-model.gguf";
const a = new FakeHost("cache-a", MODEL);
const b = new FakeHost("cache-b", MODEL);
const stubOf = (tenant: string) => env.TENANTS.get(env.TENANTS.idFromName(tenant));
const objectOf = (tenant: string, key: string) => `cache/${tenant}/${key}`;
let nextId = 1;

beforeAll(async () => {
  await a.connect();
  await b.connect();
});
afterAll(async () => {
  await a.disconnect();
  await b.disconnect();
});

/** A cache key: 64 lowercase hex, distinct per name. */
async function keyOf(name: string): Promise<string> {
  const d = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(name));
  return [...new Uint8Array(d)].map((x) => x.toString(16).padStart(2, "0")).join("");
}

const entry = (key: string, bytes: number, over: Record<string, unknown> = {}) => ({
  key,
  kind: "doc" as const,
  messages: 2,
  host: "cache-a",
  model: MODEL,
  bytes,
  tokens: 700,
  ...over,
});

/** An entry as the routes make it: the host's object in R2 first, then cachePut. */
async function store(tenant: string, key: string, bytes: number, nowMs: number) {
  await env.SESSIONS.put(objectOf(tenant, key), new Uint8Array(bytes));
  return stubOf(tenant).cachePut(tenant, entry(key, bytes), nowMs);
}

/** The message an RPC call fails with ("" when it does not). */
async function failure(f: () => Promise<unknown>): Promise<string> {
  try {
    await f();
    return "";
  } catch (e) {
    return e instanceof Error ? e.message : String(e);
  }
}

/** Polls until `n` requests wait on the claim of `key` in the tenant's object. */
async function waiters(tenant: string, key: string, n: number): Promise<void> {
  for (let i = 0; ; i++) {
    const got = await runInDurableObject(stubOf(tenant), (o) => {
      const cache = (o as unknown as { cache: { claims: Map<string, { waiters: Set<unknown> }> } }).cache;
      return cache.claims.get(key)?.waiters.size ?? 0;
    });
    if (got >= n) return;
    if (i > 400) throw new Error(`${got} requests wait on the claim of ${key}, not ${n}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

const exists = async (tenant: string, key: string) => (await env.SESSIONS.head(objectOf(tenant, key))) !== null;

describe("entries: lookup, bounds, expiry", () => {
  it("the first live key of the candidates is the hit (longest first), touched; an unknown key is a miss", async () => {
    await makeTenant("c-hit", {});
    const [k1, k2, k3] = await Promise.all(["h1", "h2", "h3"].map(keyOf));
    const t0 = Date.now();
    expect(await store("c-hit", k2!, 1000, t0)).toEqual({ stored: true, evicted: 0 });
    expect(await store("c-hit", k3!, 500, t0)).toEqual({ stored: true, evicted: 0 });
    const stub = stubOf("c-hit");
    const r = await stub.cacheLookup([k1!, k2!, k3!], undefined, t0 + 5000);
    expect(r.claimed).toBe(false);
    expect(r.hit).toEqual({
      key: k2,
      kind: "doc",
      messages: 2,
      host: "cache-a",
      model: MODEL,
      bytes: 1000,
      tokens: 700,
      created_ms: t0,
      used_ms: t0 + 5000,
      expires_ms: t0 + 5000 + 3600_000,
    });
    expect((await stub.cacheLookup([k1!], undefined, t0 + 5000)).hit).toBeNull();
    expect(await stub.cacheLookup([], undefined, t0)).toEqual({ hit: null, claimed: false });
    expect(await stub.cacheStats(t0 + 5000)).toEqual({ entries: 2, bytes: 1500, max_bytes: 1 << 30, ttl_s: 3600 });
  });

  it("bad candidates are refused: not 64 lowercase hex, more than 128 keys, a claim that is not a candidate", async () => {
    const stub = stubOf("c-bad");
    const k = await keyOf("bad");
    const other = await keyOf("other");
    expect(await failure(() => stub.cacheLookup([k.toUpperCase()]))).toMatch(/64 lowercase hex/);
    expect(await failure(() => stub.cacheLookup(["../x"]))).toMatch(/64 lowercase hex/);
    expect(await failure(() => stub.cacheLookup(Array(129).fill(k)))).toMatch(/129 keys; at most 128/);
    expect(await failure(() => stub.cacheLookup([k], other))).toMatch(/claim .* is not one of the 1 keys/);
    expect(await failure(() => stub.cachePut("c-bad", entry("abc", 10)))).toMatch(/64 lowercase hex/);
    expect(await failure(() => stub.cachePut("c-bad", entry(k, -1)))).toMatch(/bytes -1 is not an integer >= 0/);
    expect(await failure(() => stub.cachePut("c-bad", entry(k, 1, { kind: "full" })))).toMatch(/kind "full"/);
    expect(await failure(() => stub.cachePut("../c-bad", entry(k, 1)))).toMatch(/not a tenant name/);
    expect(await failure(() => stub.cacheRelease("nope"))).toMatch(/64 lowercase hex/);
    expect(await stub.cacheLookup(Array(128).fill(k))).toEqual({ hit: null, claimed: false });
  });

  it("tenants never share: a key stored by one tenant is not a hit for another", async () => {
    await makeTenant("c-ten-a", {});
    await makeTenant("c-ten-b", {});
    const k = await keyOf("shared conversation");
    const t0 = Date.now();
    await store("c-ten-a", k, 100, t0);
    expect((await stubOf("c-ten-a").cacheLookup([k], undefined, t0))?.hit?.key).toBe(k);
    expect(await stubOf("c-ten-b").cacheLookup([k], undefined, t0)).toEqual({ hit: null, claimed: false });
    expect(await stubOf("c-ten-b").cacheStats()).toMatchObject({ entries: 0, bytes: 0 });
  });

  it("cache_max_bytes: the least recently used entries go (their R2 objects too); one larger than the bound is not kept", async () => {
    await makeTenant("c-lru", { cache_max_bytes: 3000 });
    const [k1, k2, k3, k4, big] = await Promise.all(["l1", "l2", "l3", "l4", "big"].map(keyOf));
    const t0 = Date.now();
    const stub = stubOf("c-lru");
    await store("c-lru", k1!, 1000, t0);
    await store("c-lru", k2!, 1000, t0 + 1);
    await store("c-lru", k3!, 1000, t0 + 2);
    // k1 used again: k2 is now the least recently used
    expect((await stub.cacheLookup([k1!], undefined, t0 + 3)).hit?.key).toBe(k1);
    expect(await store("c-lru", k4!, 1500, t0 + 4)).toEqual({ stored: true, evicted: 2 });
    expect(await stub.cacheLookup([k2!, k3!], undefined, t0 + 5)).toEqual({ hit: null, claimed: false });
    expect(await exists("c-lru", k2!)).toBe(false);
    expect(await exists("c-lru", k3!)).toBe(false);
    expect(await exists("c-lru", k1!)).toBe(true);
    expect(await stub.cacheStats(t0 + 5)).toMatchObject({ entries: 2, bytes: 2500, max_bytes: 3000 });
    // larger than the whole bound: not stored, its object deleted, nothing evicted for it
    expect(await store("c-lru", big!, 3001, t0 + 6)).toEqual({ stored: false, evicted: 0 });
    expect(await exists("c-lru", big!)).toBe(false);
    expect((await stub.cacheLookup([big!, k4!], undefined, t0 + 7)).hit?.key).toBe(k4);
    // the same key stored again replaces its entry (not counted twice)
    expect(await store("c-lru", k4!, 1500, t0 + 8)).toEqual({ stored: true, evicted: 0 });
    expect(await stub.cacheStats(t0 + 8)).toMatchObject({ entries: 2, bytes: 2500 });
  });

  it("a lower cache_max_bytes or a shorter cache_ttl_s set by the admin applies at once to what is cached", async () => {
    await makeTenant("c-trim", {});
    const [k1, k2, k3] = await Promise.all(["tr1", "tr2", "tr3"].map(keyOf));
    const t0 = Date.now();
    await store("c-trim", k1!, 1000, t0 - 2000);
    await store("c-trim", k2!, 1000, t0 - 1000);
    await store("c-trim", k3!, 1000, t0 - 600_000);
    const put = (body: unknown) =>
      call("/admin/tenants/c-trim", { method: "PUT", headers: ADMIN, body: JSON.stringify(body) });
    // k3 unused for 10 minutes: gone with a 5-minute TTL
    expect((await put({ cache_ttl_s: 300 })).status).toBe(200);
    expect(await exists("c-trim", k3!)).toBe(false);
    // k1 the least recently used of the others
    expect((await put({ cache_max_bytes: 1500 })).status).toBe(200);
    expect(await exists("c-trim", k1!)).toBe(false);
    expect(await exists("c-trim", k2!)).toBe(true);
    expect(await stubOf("c-trim").cacheStats()).toEqual({ entries: 1, bytes: 1000, max_bytes: 1500, ttl_s: 300 });
  });

  it("cache_ttl_s: an entry unused that long is gone at the next lookup, its object deleted; each use restarts it", async () => {
    await makeTenant("c-ttl", { cache_ttl_s: 60 });
    const [k1, k2] = await Promise.all(["t1", "t2"].map(keyOf));
    const t0 = Date.now();
    const stub = stubOf("c-ttl");
    await store("c-ttl", k1!, 100, t0);
    await store("c-ttl", k2!, 100, t0);
    expect((await stub.cacheLookup([k1!], undefined, t0 + 50_000)).hit).toMatchObject({
      used_ms: t0 + 50_000,
      expires_ms: t0 + 110_000,
    });
    expect((await stub.cacheLookup([k1!, k2!], undefined, t0 + 100_000)).hit?.key).toBe(k1);
    expect(await stub.cacheLookup([k2!], undefined, t0 + 100_000)).toEqual({ hit: null, claimed: false });
    expect(await exists("c-ttl", k2!)).toBe(false);
    expect(await exists("c-ttl", k1!)).toBe(true);
    expect(await stub.cacheStats(t0 + 100_000)).toMatchObject({ entries: 1, ttl_s: 60 });
  });

  it("the tenant's alarm deletes entries nobody asks for once their TTL has passed, and their objects", async () => {
    await makeTenant("c-alarm", { cache_ttl_s: 60 });
    const [k1, k2] = await Promise.all(["a1", "a2"].map(keyOf));
    const stub = stubOf("c-alarm");
    await store("c-alarm", k1!, 100, Date.now());
    await store("c-alarm", k2!, 100, Date.now());
    expect(await runInDurableObject(stub, (_o, state) => state.storage.getAlarm())).not.toBeNull();
    // k1 last used 61 s ago
    await runInDurableObject(stub, async (_o, state) => {
      const e = (await state.storage.get<Record<string, number>>(`cache:${k1}`))!;
      e.used_ms! -= 61_000;
      await state.storage.put(`cache:${k1}`, e);
    });
    await runDurableObjectAlarm(stub);
    expect(await exists("c-alarm", k1!)).toBe(false);
    expect(await exists("c-alarm", k2!)).toBe(true);
    expect(await stub.cacheStats()).toMatchObject({ entries: 1, bytes: 100 });
    // the next alarm is due when k2 expires
    expect(await runInDurableObject(stub, (_o, state) => state.storage.getAlarm())).not.toBeNull();
  });
});

describe("usage", () => {
  it("GET /v1/usage and the admin's tenant view show the tenant's cache: live entries, their bytes, the bound and the TTL", async () => {
    const key = await makeTenant("c-usage", { cache_max_bytes: 5000, cache_ttl_s: 120, requests_per_minute: 1000 });
    const [k1, k2] = await Promise.all(["u1", "u2"].map(keyOf));
    await store("c-usage", k1!, 100, Date.now());
    await store("c-usage", k2!, 200, Date.now() - 121_000); // expired already: not counted
    const usage = (await (await call("/v1/usage", as(key))).json()) as { cache: unknown };
    expect(usage.cache).toEqual({ entries: 1, bytes: 100, max_bytes: 5000, ttl_s: 120 });
    const admin = (await (await call("/admin/tenants/c-usage", { headers: ADMIN })).json()) as { cache: unknown };
    expect(admin.cache).toEqual({ entries: 1, bytes: 100, max_bytes: 5000, ttl_s: 120 });
  });
});

describe("single flight on a document key", () => {
  it("two lookups claiming the same key: one claims it, the other gets the hit after the holder's cachePut", async () => {
    await makeTenant("c-flight", {});
    const [reply, doc] = await Promise.all(["reply-3", "doc-2"].map(keyOf));
    const stub = stubOf("c-flight");
    const lookups = [0, 1].map((i) => stub.cacheLookup([reply!, doc!], doc).then((r) => ({ i, r })));
    const first = await Promise.race(lookups);
    expect(first.r).toEqual({ hit: null, claimed: true });
    await store("c-flight", doc!, 4000, Date.now());
    const second = await lookups[1 - first.i]!;
    expect(second.r.claimed).toBe(false);
    expect(second.r.hit).toMatchObject({ key: doc, bytes: 4000 });
  });

  it("after the holder's cacheRelease (failed: it built nothing), one waiter claims the key; the others wait on", async () => {
    await makeTenant("c-release", {});
    const doc = await keyOf("doc-released");
    const stub = stubOf("c-release");
    const lookups = [0, 1, 2].map((i) => stub.cacheLookup([doc], doc).then((r) => ({ i, r })));
    const first = await Promise.race(lookups);
    expect(first.r).toEqual({ hit: null, claimed: true });
    await waiters("c-release", doc, 2);
    await stub.cacheRelease(doc);
    const second = await Promise.race(lookups.filter((_, i) => i !== first.i));
    expect(second.r).toEqual({ hit: null, claimed: true });
    // the third waits on the second's claim: its put is a hit
    await waiters("c-release", doc, 1);
    await store("c-release", doc, 50, Date.now());
    const third = [0, 1, 2].find((i) => i !== first.i && i !== second.i)!;
    expect((await lookups[third]!).r).toMatchObject({ hit: { key: doc }, claimed: false });
  }, 30_000);

  it("after the holder's cacheRelease not_stored (its state is not kept), every waiter goes on at once without the claim", async () => {
    await makeTenant("c-not-stored", {});
    const doc = await keyOf("doc-not-stored");
    const stub = stubOf("c-not-stored");
    const lookups = [0, 1, 2, 3].map((i) => stub.cacheLookup([doc], doc).then((r) => ({ i, r })));
    const first = await Promise.race(lookups);
    expect(first.r).toEqual({ hit: null, claimed: true });
    await waiters("c-not-stored", doc, 3);
    await stub.cacheRelease(doc, "not_stored");
    // none of them claims it again (which would serialize them, one prefill after another)
    const rest = await Promise.all(lookups.filter((_, i) => i !== first.i));
    expect(rest.map((x) => x.r)).toEqual([0, 1, 2].map(() => ({ hit: null, claimed: false })));
    // the claim is over: the next request claims it
    expect(await stub.cacheLookup([doc], doc)).toEqual({ hit: null, claimed: true });
    expect(await failure(() => stub.cacheRelease(doc, "lost" as "failed"))).toMatch(
      /outcome "lost" is not one of "failed", "not_stored"/,
    );
    await stub.cacheRelease(doc, "not_stored");
  }, 30_000);

  it("a holder's cachePut that fails: its waiters go on without the claim", async () => {
    await makeTenant("c-put-fails", {});
    const doc = await keyOf("doc-put-fails");
    const stub = stubOf("c-put-fails");
    const lookups = [0, 1, 2].map((i) => stub.cacheLookup([doc], doc).then((r) => ({ i, r })));
    const first = await Promise.race(lookups);
    expect(first.r.claimed).toBe(true);
    await waiters("c-put-fails", doc, 2);
    // a put that fails after its checks (the tenant's settings unreadable: a stand-in for a storage error)
    const err = await runInDurableObject(stub, async (o) => {
      const cache = (o as unknown as { cache: { settings: () => Promise<unknown> } }).cache;
      const settings = cache.settings;
      cache.settings = () => Promise.reject(new Error("storage went away"));
      try {
        return await failure(() => o.cachePut("c-put-fails", entry(doc, 10)));
      } finally {
        cache.settings = settings;
      }
    });
    expect(err).toMatch(/storage went away/);
    const rest = await Promise.all(lookups.filter((_, i) => i !== first.i));
    expect(rest.map((x) => x.r)).toEqual([0, 1].map(() => ({ hit: null, claimed: false })));
  }, 30_000);

  it("a claim renewed by its holder (cacheRenew) lives 30 s from its last renewal: a waiter meanwhile waits for its put", async () => {
    await makeTenant("c-renew", {});
    const [doc, none] = await Promise.all(["doc-renew", "doc-renew-none"].map(keyOf));
    const t0 = Date.now();
    const stub = stubOf("c-renew");
    expect(await stub.cacheLookup([doc!], doc, t0)).toEqual({ hit: null, claimed: true });
    expect(await stub.cacheRenew(doc!, t0 + 20_000)).toBe(true);
    expect(await stub.cacheRenew(doc!, t0 + 40_000)).toBe(true);
    // 65 s after the claim, 25 s after its last renewal: still held
    const waiter = stub.cacheLookup([doc!], doc, t0 + 65_000);
    await waiters("c-renew", doc!, 1);
    await store("c-renew", doc!, 10, t0 + 66_000);
    expect(await waiter).toMatchObject({ hit: { key: doc }, claimed: false });
    // no claim on a key (none made, or ended by the put): nothing to renew, nothing claimed by it
    expect(await stub.cacheRenew(none!, t0)).toBe(false);
    expect(await stub.cacheRenew(doc!, t0 + 67_000)).toBe(false);
    expect(await stub.cacheLookup([none!], none, t0)).toEqual({ hit: null, claimed: true });
    expect(await failure(() => stub.cacheRenew("nope"))).toMatch(/64 lowercase hex/);
  }, 30_000);

  it("a waiter on a claim nobody renews claims it itself once the claim is void (30 s after its last renewal)", async () => {
    await makeTenant("c-lapse", {});
    const doc = await keyOf("doc-lapse");
    const t0 = Date.now();
    const stub = stubOf("c-lapse");
    expect(await stub.cacheLookup([doc], doc, t0)).toEqual({ hit: null, claimed: true });
    expect(await stub.cacheRenew(doc, t0 + 10_000)).toBe(true);
    // 39 s after the claim: void in 1 s (the holder died): the waiter then holds it
    expect(await stub.cacheLookup([doc], doc, t0 + 39_000)).toEqual({ hit: null, claimed: true });
    await stub.cacheRelease(doc);
  }, 30_000);

  it("eight concurrent lookups of one document: exactly one claims it, the seven others hit its entry", async () => {
    await makeTenant("c-eight", {});
    const doc = await keyOf("doc-eight");
    const stub = stubOf("c-eight");
    const lookups = Array.from({ length: 8 }, () => stub.cacheLookup([doc], doc));
    const first = await Promise.race(lookups);
    expect(first).toEqual({ hit: null, claimed: true });
    await store("c-eight", doc, 123, Date.now());
    const all = await Promise.all(lookups);
    expect(all.filter((r) => r.claimed)).toHaveLength(1);
    expect(all.filter((r) => !r.claimed && r.hit?.key === doc)).toHaveLength(7);
  });

  it("a holder whose state is not kept (larger than cache_max_bytes): the waiter goes on without a claim", async () => {
    await makeTenant("c-refused", { cache_max_bytes: 100 });
    const doc = await keyOf("doc-too-big");
    const stub = stubOf("c-refused");
    const lookups = [0, 1].map((i) => stub.cacheLookup([doc], doc).then((r) => ({ i, r })));
    const first = await Promise.race(lookups);
    expect(first.r.claimed).toBe(true);
    await waiters("c-refused", doc, 1);
    expect(await store("c-refused", doc, 101, Date.now())).toEqual({ stored: false, evicted: 0 });
    expect((await lookups[1 - first.i]!).r).toEqual({ hit: null, claimed: false });
  });

  it("nobody waits on a claim longer than 10 minutes after it was made, renewed or not: then the waiter goes on without it", async () => {
    await makeTenant("c-cap", {});
    const doc = await keyOf("doc-cap");
    const t0 = Date.now();
    const stub = stubOf("c-cap");
    expect(await stub.cacheLookup([doc], doc, t0)).toEqual({ hit: null, claimed: true });
    expect(await stub.cacheRenew(doc, t0 + 590_000)).toBe(true);
    // the claim is alive (renewed 9.5 s ago), 10 minutes old in 0.5 s: the waiter gives up then
    expect(await stub.cacheLookup([doc], doc, t0 + 599_500)).toEqual({ hit: null, claimed: false });
    // and at once past it
    expect(await stub.cacheLookup([doc], doc, t0 + 600_000)).toEqual({ hit: null, claimed: false });
    // the claim itself still holds (its holder may still put): a put is a hit for the next
    await store("c-cap", doc, 10, t0 + 601_000);
    expect(await stub.cacheLookup([doc], doc, t0 + 601_000)).toMatchObject({ hit: { key: doc }, claimed: false });
  }, 30_000);

  it("a hit at or before the claimed key is returned unclaimed; a shorter hit after it comes with the claim; a claim not renewed for 30 s is void", async () => {
    await makeTenant("c-order", {});
    const [reply, doc, shorter] = await Promise.all(["o-reply", "o-doc", "o-shorter"].map(keyOf));
    const t0 = Date.now();
    const stub = stubOf("c-order");
    await store("c-order", reply!, 10, t0);
    await store("c-order", shorter!, 10, t0);
    expect(await stub.cacheLookup([reply!, doc!, shorter!], doc, t0)).toMatchObject({
      hit: { key: reply },
      claimed: false,
    });
    expect(await stub.cacheLookup([doc!, shorter!], doc, t0)).toMatchObject({ hit: { key: shorter }, claimed: true });
    // its request died without put, release or renewal: void after 30 s
    expect(await stub.cacheLookup([doc!, shorter!], doc, t0 + 30_000)).toMatchObject({
      hit: { key: shorter },
      claimed: true,
    });
  });
});

describe("admin: the tenant's cache settings", () => {
  const put = (name: string, body: unknown) =>
    call(`/admin/tenants/${name}`, { method: "PUT", headers: ADMIN, body: JSON.stringify(body) });

  it("kv_cache on|off, cache_max_bytes >= 0, cache_ttl_s in [1, 2592000]: kept and shown; a new tenant's config names none of them", async () => {
    const fresh = (await (await put("c-admin", {})).json()) as Record<string, unknown>;
    expect(fresh).not.toHaveProperty("kv_cache");
    expect(fresh).not.toHaveProperty("cache_max_bytes");
    const r = await put("c-admin", { kv_cache: "off", cache_max_bytes: 0, cache_ttl_s: 2_592_000 });
    expect(r.status).toBe(200);
    expect(await r.json()).toMatchObject({ kv_cache: "off", cache_max_bytes: 0, cache_ttl_s: 2_592_000 });
    // a later PUT keeps what it does not name
    expect(await (await put("c-admin", { max_sessions: 3 })).json()).toMatchObject({
      kv_cache: "off",
      cache_max_bytes: 0,
      max_sessions: 3,
    });
    const shown = (await (await call("/admin/tenants/c-admin", { headers: ADMIN })).json()) as {
      limits: Record<string, unknown>;
    };
    expect(shown.limits).toMatchObject({ kv_cache: "off", cache_ttl_s: 2_592_000 });
    expect(await stubOf("c-admin").cacheStats()).toMatchObject({ max_bytes: 0, ttl_s: 2_592_000 });
  });

  it("bad values: 400 naming the field, the value and the accepted range", async () => {
    const cases: [Record<string, unknown>, string, RegExp][] = [
      [{ kv_cache: "auto" }, "kv_cache", /'kv_cache': "auto" is not one of "on", "off"/],
      [{ kv_cache: true }, "kv_cache", /'kv_cache': true is not one of "on", "off"/],
      [{ cache_ttl_s: 0 }, "cache_ttl_s", /'cache_ttl_s': 0 is not an integer in \[1, 2592000\]/],
      [{ cache_ttl_s: 2_592_001 }, "cache_ttl_s", /2592001 is not an integer in \[1, 2592000\]/],
      [{ cache_ttl_s: "60" }, "cache_ttl_s", /'cache_ttl_s': "60" is not an integer >= 0/],
      [{ cache_max_bytes: -1 }, "cache_max_bytes", /'cache_max_bytes': -1 is not an integer >= 0/],
      [{ cache_max_bytes: 1.5 }, "cache_max_bytes", /'cache_max_bytes': 1.5 is not an integer >= 0/],
    ];
    for (const [body, param, message] of cases) {
      const e = await error(await put("c-admin-bad", body));
      expect(e, JSON.stringify(body)).toMatchObject({ status: 400, type: "invalid_request_error", param });
      expect(e.message).toMatch(message);
    }
  });
});

// ---- cached states through the host's socket ----

type Answer = Extract<ControlToHost, { id?: number }>;
const FINAL = new Set(["state_stored", "state_info", "state_deleted", "control_error"]);

/** Sends a control request from `h`; its answers up to the last one (a put's part: its ack; the last state_data part). */
function ask(h: FakeHost, m: ControlFromHost & { id: number }): Promise<Answer[]> {
  const midPut = m.type === "state_put" && m.part + 1 < m.parts;
  return new Promise((resolve) => {
    const got: Answer[] = [];
    h.onControl = (f) => {
      if (!("id" in f) || f.id !== m.id) return;
      got.push(f as Answer);
      if (f.type === "state_data") {
        if (f.part + 1 < f.parts) h.send({ type: "data_ack", id: f.id, part: f.part });
        else resolve(got);
      } else if (FINAL.has(f.type) || (midPut && f.type === "state_ack")) resolve(got);
    };
    h.send(m);
  });
}

const bytesOf = (n: number, seed: number) => {
  const out = new Uint8Array(n);
  for (let i = 0; i < n; i++) out[i] = (i * 31 + seed) & 0xff;
  return out;
};

/** A cached state put by `h` as a host sends it: parts of HOST_STATE_PART_BYTES, each after the previous one's ack. */
async function cachePutFrom(h: FakeHost, tenant: string, key: string, data: Uint8Array, cache = true) {
  const id = nextId++;
  const parts = Math.max(1, Math.ceil(data.length / HOST_STATE_PART_BYTES));
  const all: Answer[] = [];
  for (let part = 0; part < parts; part++) {
    const answers = await ask(h, {
      type: "state_put",
      id,
      tenant,
      session: key,
      part,
      parts,
      data: data.subarray(part * HOST_STATE_PART_BYTES, (part + 1) * HOST_STATE_PART_BYTES),
      bytes: data.length,
      ...(part === 0 ? { meta: { tokens_seen: 700, kv_bytes: data.length } } : {}),
      ...(cache ? { cache: true } : {}),
    });
    all.push(...answers);
    if (answers.some((x) => x.type === "control_error")) break;
  }
  return all;
}

async function cacheGetFrom(h: FakeHost, tenant: string, key: string, cache = true) {
  const answers = await ask(h, { type: "state_get", id: nextId++, tenant, session: key, ...(cache ? { cache } : {}) });
  const parts = answers.filter((x) => x.type === "state_data") as Extract<ControlToHost, { type: "state_data" }>[];
  const data = new Uint8Array(parts.reduce((n, p) => n + p.data.length, 0));
  let at = 0;
  for (const p of parts) {
    data.set(p.data, at);
    at += p.data.length;
  }
  return { data, answers };
}

const stored = (answers: Answer[]) => answers.find((x) => x.type === "state_stored");

const digest = async (x: Uint8Array) =>
  `${x.length}:${[...new Uint8Array(await crypto.subtle.digest("SHA-256", x))].map((y) => y.toString(16).padStart(2, "0")).join("")}`;

/** Channels of `tenant` on each of `hosts` (requests of the tenant they serve): a host reads and writes the tenant's cached states only then. */
async function serve(tenant: string, ...hosts: FakeHost[]): Promise<HostLink[]> {
  return Promise.all(hosts.map((h) => HostLink.connect(env, h.name, tenant)));
}

/** Closes the links, and waits until their hosts were told (the edge has closed its side). */
async function unserve(links: HostLink[], ...hosts: FakeHost[]): Promise<void> {
  const before = hosts.map((h) => h.closedByEdge);
  for (const l of links) l.close();
  await eventually(() => hosts.every((h, i) => h.closedByEdge > before[i]!), "channel_close of the links", 10_000);
}

describe("cached states in R2 (state_* cache:true)", () => {
  // the hosts serve requests of the tenants below (the last tests open and close their own)
  let links: HostLink[] = [];
  beforeAll(async () => {
    for (const t of ["c-conn", "c-conn-big", "c-conn-orphan", "c-conn-quota", "c-conn-same"])
      links.push(...(await serve(t, a, b)));
  });
  afterAll(async () => {
    for (const l of links) l.close();
    links = [];
  });

  it("put by one host, read by another: same bytes, no fence; keyed cache/<tenant>/<key>, apart from sessions' checkpoints", async () => {
    await makeTenant("c-conn", {});
    const key = await keyOf("conn-doc");
    const data = bytesOf(5000, 1);
    const put = await cachePutFrom(a, "c-conn", key, data);
    expect(put.map((x) => x.type)).toEqual(["state_ack", "state_stored"]);
    expect(put[1]).toMatchObject({ bytes: 5000 });
    const obj = await env.SESSIONS.get(objectOf("c-conn", key));
    expect(new Uint8Array(await obj!.arrayBuffer())).toEqual(data);
    expect(obj!.customMetadata).toMatchObject({ model: MODEL, tokens_seen: "700", format: "pkvf1" });
    const got = await cacheGetFrom(b, "c-conn", key);
    expect(got.data).toEqual(data);
    expect(got.answers[0]).toMatchObject({
      type: "state_data",
      part: 0,
      parts: 1,
      bytes: 5000,
      meta: { model: MODEL },
    });
    expect(
      await ask(b, { type: "state_head", id: nextId++, tenant: "c-conn", session: key, cache: true }),
    ).toMatchObject([{ type: "state_info", exists: true, bytes: 5000, meta: { format: "pkvf1" } }]);
    // not a session's checkpoint: the session path neither finds it nor takes it
    expect((await cacheGetFrom(a, "c-conn", key, false)).answers).toMatchObject([
      { type: "state_info", exists: false },
    ]);
    expect(await env.SESSIONS.head(`sessions/c-conn/${key}`)).toBeNull();
  });

  it("above 8 MiB: multipart, read back in parts by another host", async () => {
    await makeTenant("c-conn-big", {});
    const key = await keyOf("conn-big");
    const data = bytesOf(HOST_STATE_PART_BYTES + 12_345, 2);
    const put = await cachePutFrom(a, "c-conn-big", key, data);
    expect(put.map((x) => x.type)).toEqual(["state_ack", "state_ack", "state_stored"]);
    const got = await cacheGetFrom(b, "c-conn-big", key);
    expect(got.answers.map((x) => [x.type, (x as { part?: number }).part])).toEqual([
      ["state_data", 0],
      ["state_data", 1],
    ]);
    expect(await digest(got.data)).toBe(await digest(data));
  }, 60_000);

  it("a missing cached state is state_info exists:false (get and head)", async () => {
    const key = await keyOf("conn-missing");
    expect((await cacheGetFrom(b, "c-conn", key)).answers).toMatchObject([{ type: "state_info", exists: false }]);
    expect(
      await ask(b, { type: "state_head", id: nextId++, tenant: "c-conn", session: key, cache: true }),
    ).toMatchObject([{ type: "state_info", exists: false }]);
  });

  it("a key that is not 64 lowercase hex is control_error bad_frame, nothing stored", async () => {
    const upper = (await keyOf("conn-upper")).toUpperCase();
    for (const session of [upper, "sess-1", `${await keyOf("x")}0`]) {
      const put = await cachePutFrom(a, "c-conn", session, bytesOf(10, 3));
      expect(put).toMatchObject([{ type: "control_error", code: "bad_frame" }]);
      expect((put[0] as { message: string }).message).toMatch(/64 lowercase hex/);
      expect(await env.SESSIONS.head(objectOf("c-conn", session))).toBeNull();
    }
    expect((await cacheGetFrom(a, "c-conn", "sess-1")).answers).toMatchObject([
      { type: "control_error", code: "bad_frame" },
    ]);
  });

  it("a state written whose entry never comes (its request died) is deleted by the tenant's alarm; one whose entry came stays", async () => {
    await makeTenant("c-conn-orphan", {});
    const [orphan, kept] = await Promise.all(["conn-orphan", "conn-kept"].map(keyOf));
    const stub = stubOf("c-conn-orphan");
    expect(stored(await cachePutFrom(a, "c-conn-orphan", orphan!, bytesOf(300, 6)))).toBeDefined();
    expect(stored(await cachePutFrom(a, "c-conn-orphan", kept!, bytesOf(300, 7)))).toBeDefined();
    expect(await stub.cachePut("c-conn-orphan", entry(kept!, 300))).toEqual({ stored: true, evicted: 0 });
    const written = () =>
      runInDurableObject(stub, async (_o, state) => [
        ...(await state.storage.list({ prefix: "cache-written:" })).keys(),
      ]);
    // noted when written, forgotten when its entry came
    expect(await written()).toEqual([`cache-written:${orphan}`]);
    // both written 11 minutes ago
    await runInDurableObject(stub, async (_o, state) => {
      for (const k of [orphan, kept]) await state.storage.put(`cache-written:${k}`, Date.now() - 11 * 60_000);
    });
    await runDurableObjectAlarm(stub);
    expect(await exists("c-conn-orphan", orphan!)).toBe(false);
    expect(await exists("c-conn-orphan", kept!)).toBe(true);
    expect((await stub.cacheLookup([orphan!, kept!])).hit?.key).toBe(kept);
    expect(await written()).toEqual([]);
  });

  it("a cached state does not count against max_stored_bytes, and needs no open session (a channel of the tenant)", async () => {
    await makeTenant("c-conn-quota", { max_stored_bytes: 100 });
    const key = await keyOf("conn-quota");
    const put = await cachePutFrom(a, "c-conn-quota", key, bytesOf(1000, 4));
    expect(put.map((x) => x.type)).toEqual(["state_ack", "state_stored"]);
    expect(await stubOf("c-conn-quota").storedBytes()).toBe(0);
    // the session path is fenced as before: a session the edge does not hold stores nothing
    expect(await cachePutFrom(a, "c-conn-quota", "sess-none", bytesOf(10, 5), false)).toMatchObject([
      { type: "control_error", code: "not_found" },
    ]);
  });

  it("a host reads and writes a tenant's cached states only while it serves a request of that tenant: else control_error unauthorized", async () => {
    await makeTenant("c-auth", {});
    await makeTenant("c-auth-other", {});
    const [key, other] = await Promise.all(["auth-doc", "auth-other"].map(keyOf));
    const data = bytesOf(400, 8);
    const aLinks = await serve("c-auth", a);
    expect(stored(await cachePutFrom(a, "c-auth", key!, data))).toBeDefined();
    // b serves another tenant only
    const bOther = await serve("c-auth-other", b);
    const refused = (answers: Answer[]) => {
      expect(answers).toMatchObject([{ type: "control_error", code: "unauthorized" }]);
      expect((answers[0] as { message: string }).message).toMatch(/serves no request of tenant 'c-auth'/);
    };
    refused((await cacheGetFrom(b, "c-auth", key!)).answers);
    refused(await ask(b, { type: "state_head", id: nextId++, tenant: "c-auth", session: key!, cache: true }));
    refused(await cachePutFrom(b, "c-auth", key!, bytesOf(400, 9)));
    refused(await cachePutFrom(b, "c-auth", other!, bytesOf(400, 9)));
    expect(await exists("c-auth", other!)).toBe(false);
    expect(new Uint8Array(await (await env.SESSIONS.get(objectOf("c-auth", key!)))!.arrayBuffer())).toEqual(data);
    // while b serves a request of the tenant, it reads the state
    const bLinks = await serve("c-auth", b);
    expect((await cacheGetFrom(b, "c-auth", key!)).data).toEqual(data);
    // and no more once that request is over
    await unserve(bLinks, b);
    refused((await cacheGetFrom(b, "c-auth", key!)).answers);
    await unserve([...aLinks, ...bOther], a, b);
    refused((await cacheGetFrom(a, "c-auth", key!)).answers);
  }, 60_000);

  it("a put of a key whose object exists already writes nothing: state_stored names the object there (one part and multipart)", async () => {
    await makeTenant("c-conn-same", {});
    const [small, big] = await Promise.all(["same-small", "same-big"].map(keyOf));
    const first = bytesOf(700, 10);
    const put1 = stored(await cachePutFrom(a, "c-conn-same", small!, first)) as { etag: string; bytes: number };
    const again = await cachePutFrom(b, "c-conn-same", small!, bytesOf(900, 11));
    expect(again.map((x) => x.type)).toEqual(["state_ack", "state_stored"]);
    expect(stored(again)).toMatchObject({ etag: put1.etag, bytes: 700 });
    expect(new Uint8Array(await (await env.SESSIONS.get(objectOf("c-conn-same", small!)))!.arrayBuffer())).toEqual(
      first,
    );
    // multipart, over an object of one part and over one of many parts
    const big1 = bytesOf(HOST_STATE_PART_BYTES + 100, 12);
    const putBig = stored(await cachePutFrom(a, "c-conn-same", big!, big1)) as { etag: string; bytes: number };
    for (const [k, etag, bytes] of [
      [small!, put1.etag, 700],
      [big!, putBig.etag, big1.length],
    ] as const) {
      const parts = await cachePutFrom(b, "c-conn-same", k, bytesOf(2 * HOST_STATE_PART_BYTES + 5, 13));
      expect(parts.map((x) => x.type)).toEqual(["state_ack", "state_ack", "state_ack", "state_stored"]);
      expect(stored(parts)).toMatchObject({ etag, bytes });
    }
    expect(
      await digest(new Uint8Array(await (await env.SESSIONS.get(objectOf("c-conn-same", big!)))!.arrayBuffer())),
    ).toBe(await digest(big1));
    expect(new Uint8Array(await (await env.SESSIONS.get(objectOf("c-conn-same", small!)))!.arrayBuffer())).toEqual(
      first,
    );
  }, 120_000);
});
