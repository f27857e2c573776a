// Prefix-aware routing of the prompt cache (prompt-cache.ts withCache, registry.ts route/peek): a
// request with the cache on looks its keys up before it is routed and goes to the host that
// stored its hit (that host's snapshot memory holds the state: no copy from R2) while that host is
// live, serves the model and has room — also when another host has more free KV; otherwise to the
// usual pick, which still opens the copy (from the edge's store). A host's cache_miss on a hit
// whose state is missing or damaged forgets the entry (cacheForget). Fake hosts of protocol 3.1 share their cached states as hosts
// share the edge's store; which host took a snapshot and which opened the copy is read from each
// fake host's frames.
import type { ToHostMessage } from "@pyramidkv/shared";
import { runInDurableObject } from "cloudflare:test";
import { env } from "cloudflare:workers";
import { afterAll, beforeAll, beforeEach, describe, expect, it } from "vitest";

import { hostId } from "../src/host-id.js";
import { HostRegistry } from "../src/registry.js";
import { TenantState } from "../src/tenant.js";
import { as, call, contractKey, hostRow, type Msg, makeTenant } from "./client.js";
import { eventuallyAsync, FakeHost, routingTable, type StateCache } from "./fake-host.js";

const MODEL_FILE = "route-model.gguf";
const MODEL = "route-model";
const TENANT = "cr-a";
const states: StateCache = new Map();
/** hosts that make states alike: the same host_hello.cache_fingerprint (each channel's hello carries it too) */
const FINGERPRINT = "cr-fingerprint-1";
const ra = new FakeHost("cr-a-host", MODEL_FILE, { protocol_minor: 1, cache_fingerprint: FINGERPRINT }, states);
const rb = new FakeHost("cr-b-host", MODEL_FILE, { protocol_minor: 1, cache_fingerprint: FINGERPRINT }, states);
/** a host of another model and protocol 3.0 */
const old = new FakeHost("cr-old-host", "cr-old-model.gguf", { protocol_minor: 0 });
const hosts = [ra, rb, old];
let key: string;

const MiB = 1 << 20;
/**
 * What the two hosts of the model report free (MiB); waits until the routing table knows (a
 * heartbeat also starts their picks from 0). A pick is estimated at pool/64 = 16 MiB on a host
 * without sessions (registry.ts): below that a host has no room.
 */
async function load(a: number, b: number) {
  for (const [h, free] of [
    [ra, a],
    [rb, b],
  ] as const)
    h.heartbeat({ free_bytes: free * MiB });
  for (const [h, free] of [
    [ra, a],
    [rb, b],
  ] as const)
    await eventuallyAsync(async () => (await hostRow(h.name))?.free_bytes === free * MiB, `${h.name}'s heartbeat`);
}

beforeAll(async () => {
  key = await makeTenant(TENANT, { max_sessions: 16, requests_per_minute: 10_000 });
  for (const h of hosts) await h.connect();
});
afterAll(async () => {
  for (const h of hosts) if (h.connected) await h.disconnect();
});
beforeEach(async () => {
  for (const h of hosts) {
    if (!h.connected) await h.connect();
    await h.settle();
    h.reset();
  }
});

const cacheKey = (
  kind: "doc" | "reply",
  messages: Msg[],
  model = MODEL_FILE,
  fingerprint: string | null = FINGERPRINT,
) => contractKey(kind, messages, model, fingerprint);

type Frame<T extends ToHostMessage["type"]> = Extract<ToHostMessage, { type: T }>;
const ofType = <T extends ToHostMessage["type"]>(frames: ToHostMessage[], type: T) =>
  frames.filter((f) => f.type === type) as Frame<T>[];
/** The open_session frames a host received since its reset. */
const opensOn = (h: FakeHost) => ofType(h.frames, "open_session");
/** The keys a host snapshotted since its reset. */
const snapshotsOn = (h: FakeHost) => ofType(h.frames, "snapshot").map((f) => f.key);

interface ChatBody {
  choices: { message: { content: string }; finish_reason: string }[];
  usage: { prompt_tokens_details: { cached_tokens: number } };
}
/** One turn (every host's frames reset first): the answer as the client received it (reply keys are over it). */
async function turn(messages: Msg[]): Promise<{ answer: string; cached: number }> {
  for (const h of hosts) h.reset();
  const r = await call("/v1/chat/completions", as(key, { model: MODEL, messages }));
  expect(r.status, await r.clone().text()).toBe(200);
  const b = (await r.json()) as ChatBody;
  return { answer: b.choices[0]!.message.content, cached: b.usage.prompt_tokens_details.cached_tokens };
}
const sys = (s: string) => ({ role: "system", content: s });
const user = (s: string) => ({ role: "user", content: s });
const assistant = (s: string) => ({ role: "assistant", content: s });

/** The one host that opened a session in the last turn, and that open. */
function servedBy(): { host: FakeHost; open: Frame<"open_session"> } {
  const on = hosts.filter((h) => opensOn(h).length > 0);
  expect(on.map((h) => h.name)).toHaveLength(1);
  return { host: on[0]!, open: opensOn(on[0]!)[0]! };
}

describe("a request goes to the host holding its cached prefix", { timeout: 60_000 }, () => {
  it("a 3-turn chat: turns 2 and 3 open their copy on the host that stored turn 1's / turn 2's reply, though the other host has more free KV; one route and no storage read per request", async () => {
    await load(900, 100);
    const before = await routingTable().counters();
    const t1 = [sys("Be brief."), user("Hi, three turns")];
    const a1 = await turn(t1);
    expect(servedBy().host).toBe(ra);
    expect(servedBy().open.from_cache).toBeUndefined();
    const reply1 = await cacheKey("reply", [...t1, assistant(a1.answer)]);
    expect(snapshotsOn(ra)).toEqual([reply1]);

    await load(100, 900); // rb has more free KV now; ra still has room
    const t2 = [...t1, assistant(a1.answer), user("And then?")];
    const a2 = await turn(t2);
    expect(servedBy().host).toBe(ra);
    expect(servedBy().open.from_cache).toBe(reply1);
    expect(a2.cached).toBe(11);
    const reply2 = await cacheKey("reply", [...t2, assistant(a2.answer)]);
    expect(snapshotsOn(ra)).toEqual([reply2]);

    const t3 = [...t2, assistant(a2.answer), user("And last?")];
    const a3 = await turn(t3);
    expect(servedBy().host).toBe(ra);
    expect(servedBy().open.from_cache).toBe(reply2);
    expect(a3.cached).toBe(22);
    expect(opensOn(rb)).toHaveLength(0);

    const after = await routingTable().counters();
    expect(after.routes - before.routes).toBe(3);
    expect(after.storage_reads - before.storage_reads).toBeLessThanOrEqual(1);
  });

  it("the hit's host without room: the turn goes to the other host and still opens the copy (from the edge's store); the next turn stays there", async () => {
    await load(900, 100);
    const t1 = [sys("Be brief."), user("Hi, no room")];
    const a1 = await turn(t1);
    expect(servedBy().host).toBe(ra);
    const reply1 = await cacheKey("reply", [...t1, assistant(a1.answer)]);

    await load(10, 100); // 10 MiB free: less than one pick's estimate (16 MiB)
    const t2 = [...t1, assistant(a1.answer), user("Where now?")];
    const a2 = await turn(t2);
    expect(servedBy().host).toBe(rb);
    // rb never took that snapshot: its copy came from the shared store
    expect(servedBy().open.from_cache).toBe(reply1);
    expect(a2.cached).toBe(11);
    const reply2 = await cacheKey("reply", [...t2, assistant(a2.answer)]);
    expect(snapshotsOn(rb)).toEqual([reply2]);

    await load(900, 100); // ra has room and more free KV again: turn 3 still goes where turn 2's reply is
    const t3 = [...t2, assistant(a2.answer), user("And now?")];
    await turn(t3);
    expect(servedBy().host).toBe(rb);
    expect(servedBy().open.from_cache).toBe(reply2);
  });

  it("the hit's host gone: the turn goes to another live host of the model and still opens the copy", async () => {
    await load(900, 100);
    const t1 = [sys("Be brief."), user("Hi, host gone")];
    const a1 = await turn(t1);
    expect(servedBy().host).toBe(ra);
    await ra.disconnect();
    const t2 = [...t1, assistant(a1.answer), user("Still there?")];
    const a2 = await turn(t2);
    expect(servedBy().host).toBe(rb);
    expect(servedBy().open.from_cache).toBe(await cacheKey("reply", [...t1, assistant(a1.answer)]));
    expect(a2.cached).toBe(11);
    await ra.connect(); // (beforeEach would too)
  });

  it("POST /v1/sessions: a document opened before starts from its copy on the host that stored it", async () => {
    await load(900, 100);
    const body = { model: MODEL, system: "Answer from the document.", document: "A routed document." };
    const first = await call("/v1/sessions", as(key, body));
    expect(first.status).toBe(201);
    const docKey = await cacheKey("doc", [sys(body.system), user(body.document)]);
    expect(snapshotsOn(ra)).toEqual([docKey]);

    await load(100, 900);
    for (const h of hosts) h.reset();
    const second = await call("/v1/sessions", as(key, body));
    expect(second.status).toBe(201);
    const s = (await second.json()) as { id: string; host: string; cached_tokens: number };
    expect(servedBy().host).toBe(ra);
    expect(servedBy().open.from_cache).toBe(docKey);
    expect(s.cached_tokens).toBe(10);
    expect(s.host).toBe(await hostId(env, ra.name));
    for (const id of [((await first.json()) as { id: string }).id, s.id])
      expect((await call(`/v1/sessions/${id}`, { ...as(key), method: "DELETE" })).status).toBe(200);
  });
});

describe("the host dialled serves another model than the peeked one", { timeout: 60_000 }, () => {
  it("the lookup runs again with its model's keys (the claim on the peeked model's document released)", async () => {
    await load(900, 100);
    const document = sys(`Peeked elsewhere: ${"All the facts of the manual, one by one. ".repeat(30)}`);
    const t1 = [document, user("Q1?")];
    const a1 = await turn(t1);
    const reply1 = await cacheKey("reply", [...t1, assistant(a1.answer)]);
    const t2 = [...t1, assistant(a1.answer), user("Q2?")];
    // as when the host peek saw (model "default", a fleet of several models) left before the route
    const OTHER = "cr-other.gguf";
    const proto = HostRegistry.prototype as unknown as { peek: unknown };
    const peek = proto.peek;
    let peeks = 0;
    proto.peek = () => {
      peeks++;
      return { model: OTHER, protocol_minor: 1 };
    };
    const tenantProto = TenantState.prototype as unknown as { cacheRelease: (k: string) => Promise<void> };
    const release = tenantProto.cacheRelease;
    const released: string[] = [];
    tenantProto.cacheRelease = function (k: string) {
      released.push(k);
      return release.call(this, k);
    };
    try {
      await turn(t2);
    } finally {
      proto.peek = peek;
      tenantProto.cacheRelease = release;
    }
    expect(peeks).toBe(1);
    expect(servedBy().host).toBe(ra);
    expect(servedBy().open.from_cache).toBe(reply1);
    // the document the first lookup claimed (under the other model's keys) was released
    const otherDoc = await cacheKey("doc", t2.slice(0, 3), OTHER, null);
    expect(released).toEqual([otherDoc]);
    const claims = await runInDurableObject(env.TENANTS.get(env.TENANTS.idFromName(TENANT)), (state) => [
      ...(state as unknown as { cacheStore: { claims: Map<string, unknown> } }).cacheStore.claims.keys(),
    ]);
    expect(claims).not.toContain(otherDoc);
  });
});

describe("the host dialled makes states otherwise than the peeked one (cache_fingerprint)", { timeout: 60_000 }, () => {
  it("the lookup runs again for the link's hello", async () => {
    await load(900, 100);
    const t1 = [sys("Be brief."), user("Hi, fingerprints")];
    const a1 = await turn(t1);
    const t2 = [...t1, assistant(a1.answer), user("And?")];
    const reg = HostRegistry.prototype as unknown as { peek: unknown };
    const tenant = TenantState.prototype as unknown as { cacheLookup: (...a: unknown[]) => unknown };
    const [peek, lookup] = [reg.peek, tenant.cacheLookup];
    let lookups = 0;
    reg.peek = () => ({ model: MODEL_FILE, protocol_minor: 1, cache_fingerprint: "cr-fingerprint-other" });
    tenant.cacheLookup = function (...a: unknown[]) {
      lookups++;
      return lookup.apply(this, a);
    };
    try {
      await turn(t2);
    } finally {
      reg.peek = peek;
      tenant.cacheLookup = lookup;
    }
    expect(lookups).toBe(2);
    expect(servedBy().open.from_cache).toBe(await cacheKey("reply", [...t1, assistant(a1.answer)]));
    // the fingerprint seeds the keys: the same messages under another host's fingerprint (or none) are no entry
    const stub = env.TENANTS.get(env.TENANTS.idFromName(TENANT));
    for (const fingerprint of ["cr-fingerprint-other", null])
      expect(
        (await stub.cacheLookup([await cacheKey("reply", [...t1, assistant(a1.answer)], MODEL_FILE, fingerprint)])).hit,
      ).toBeNull();
  });
});

describe("without the cache, nothing of it", { timeout: 60_000 }, () => {
  it("kv_cache off: no peek and no lookup; a host of protocol 3.0: no lookup (peek says so)", async () => {
    const reg = HostRegistry.prototype as unknown as { peek: (m: string) => unknown };
    const tenant = TenantState.prototype as unknown as { cacheLookup: (...a: unknown[]) => unknown };
    const [peek, lookup] = [reg.peek, tenant.cacheLookup];
    let peeks = 0;
    let lookups = 0;
    reg.peek = function (m: string) {
      peeks++;
      return peek.call(this, m);
    };
    tenant.cacheLookup = function (...a: unknown[]) {
      lookups++;
      return lookup.apply(this, a);
    };
    try {
      for (const h of hosts) h.reset();
      const messages = [sys("Be brief."), user("Hi, off"), assistant("Hello"), user("And?")];
      const r = await call("/v1/chat/completions", as(key, { model: MODEL, messages, kv_cache: "off" }));
      expect(r.status).toBe(200);
      const s = await call("/v1/sessions", as(key, { model: MODEL, document: "Off.", kv_cache: "off" }));
      expect(s.status).toBe(201);
      expect([peeks, lookups]).toEqual([0, 0]);
      const o = await call("/v1/chat/completions", as(key, { model: "cr-old-model", messages }));
      expect(o.status).toBe(200);
      expect([peeks, lookups]).toEqual([1, 0]);
      expect(opensOn(old).map((f) => f.from_cache)).toEqual([undefined]);
      // and with the cache on, a host of 3.1: one peek, one lookup (the link's hello is what was peeked, fingerprint and all)
      await call("/v1/chat/completions", as(key, { model: MODEL, messages }));
      expect([peeks, lookups]).toEqual([2, 1]);
      await call(`/v1/sessions/${((await s.json()) as { id: string }).id}`, { ...as(key), method: "DELETE" });
    } finally {
      reg.peek = peek;
      tenant.cacheLookup = lookup;
    }
  });
});

describe("the registry: route with a preferred host, peek", () => {
  it("prefer is picked while it is live, serves the model, is not excluded and has room (its picks since the heartbeat counted); else the most free KV", async () => {
    await load(40, 900);
    const reg = routingTable();
    // 40 MiB free, 16 MiB per pick: two picks fit, the third goes to the most free KV
    expect((await reg.route(MODEL, [], ra.name)).name).toBe(ra.name);
    expect((await reg.route(MODEL, [], ra.name)).name).toBe(ra.name);
    expect((await reg.route(MODEL, [], ra.name)).name).toBe(rb.name);
    await load(900, 100);
    expect((await reg.route(MODEL, [ra.name], ra.name)).name).toBe(rb.name);
    expect((await reg.route(MODEL_FILE, [], rb.name)).name).toBe(rb.name);
    // a host of another model, or one not in the table: the usual pick
    expect((await reg.route(MODEL, [], old.name)).name).toBe(ra.name);
    expect((await reg.route(MODEL, [], "cr-nobody")).name).toBe(ra.name);
    // a preferred host that does not serve the model never turns "none serves it" into a pick
    expect(await reg.route("cr-no-model", [], ra.name)).toMatchObject({ name: null });
  });

  it("peek answers the model and protocol of the host route() would pick, counting no route and no pick", async () => {
    await load(100, 130);
    const reg = routingTable();
    const before = await reg.counters();
    for (let i = 0; i < 20; i++)
      expect(await reg.peek(MODEL)).toEqual({ model: MODEL_FILE, protocol_minor: 1, cache_fingerprint: FINGERPRINT });
    expect(await reg.peek("cr-old-model")).toEqual({ model: "cr-old-model.gguf", protocol_minor: 0 });
    expect(await reg.peek("cr-no-model")).toBeNull();
    expect((await reg.counters()).routes).toBe(before.routes);
    // 20 peeks counted no pick (20 × 16 MiB would have put rb below ra): rb twice, then ra
    expect((await reg.route(MODEL)).name).toBe(rb.name);
    expect((await reg.route(MODEL)).name).toBe(rb.name);
    expect((await reg.route(MODEL)).name).toBe(ra.name);
  });
});

describe("cache_miss on a hit forgets the entry", { timeout: 60_000 }, () => {
  const stub = () => env.TENANTS.get(env.TENANTS.idFromName(TENANT));
  const object = (k: string) => `cache/${TENANT}/${k}`;

  it("the host has no copy (reason missing): the entry and its R2 object go, and the next request with the same messages does not pay the miss again", async () => {
    await load(900, 100);
    const t1 = [sys("Be brief."), user("Hi, forgotten")];
    const a1 = await turn(t1);
    const reply1 = await cacheKey("reply", [...t1, assistant(a1.answer)]);
    // the fake hosts keep states in memory; the edge's object stands for the one a real host writes
    await env.SESSIONS.put(object(reply1), new Uint8Array(16));
    states.delete(`${TENANT}/${reply1}`); // no host can read it any more
    const t2 = [...t1, assistant(a1.answer), user("And?")];
    const a2 = await turn(t2);
    const opens = opensOn(servedBy().host);
    expect(opens.map((o) => o.from_cache)).toEqual([reply1, undefined]);
    expect(a2.cached).toBe(0);
    expect((await stub().cacheLookup([reply1])).hit).toBeNull();
    expect(await env.SESSIONS.head(object(reply1))).toBeNull();

    const again = await turn(t2);
    expect(opensOn(servedBy().host).map((o) => o.from_cache)).toEqual([undefined]);
    expect(again.cached).toBe(0);
  });

  it("a cache_miss that says the store could not be read now (reason unavailable) or the state is another host's kind (incompatible) keeps the entry", async () => {
    await load(900, 100);
    const t1 = [sys("Be brief."), user("Hi, kept")];
    const a1 = await turn(t1);
    const reply1 = await cacheKey("reply", [...t1, assistant(a1.answer)]);
    const t2 = [...t1, assistant(a1.answer), user("And?")];
    for (const reason of ["unavailable", "incompatible"]) {
      for (const h of hosts) h.reset();
      ra.on.open_session = (m, reply, ws) => {
        if (m.type === "open_session" && m.from_cache !== undefined)
          return reply({ type: "error", id: m.id, session: m.session, code: "cache_miss", message: "no", reason });
        ra.answer(m, reply, ws);
      };
      const r = await call("/v1/chat/completions", as(key, { model: MODEL, messages: t2 }));
      expect(r.status).toBe(200);
      expect(opensOn(ra).map((o) => o.from_cache)).toEqual([reply1, undefined]);
      expect((await stub().cacheLookup([reply1])).hit?.key).toBe(reply1);
    }
    // and the next request copies it again
    const again = await turn(t2);
    expect(servedBy().open.from_cache).toBe(reply1);
    expect(again.cached).toBe(11);
  });

  it("cacheForget drops only the entry the caller hit (created_ms): one stored again since is kept", async () => {
    const k = await cacheKey("doc", [user("forget me")]);
    const e = { key: k, kind: "doc" as const, messages: 1, host: ra.name, model: MODEL_FILE, bytes: 8, tokens: 3 };
    const t0 = Date.now();
    await env.SESSIONS.put(object(k), new Uint8Array(8));
    expect(await stub().cachePut(TENANT, e, t0)).toEqual({ stored: true, evicted: 0 });
    const hit = (await stub().cacheLookup([k], undefined, t0)).hit!;
    expect(hit.created_ms).toBe(t0);
    expect(await stub().cacheForget(k, t0 - 1)).toBe(false);
    expect((await stub().cacheLookup([k], undefined, t0)).hit?.key).toBe(k);
    expect(await env.SESSIONS.head(object(k))).not.toBeNull();
    expect(await stub().cacheForget(k, t0)).toBe(true);
    expect((await stub().cacheLookup([k], undefined, t0)).hit).toBeNull();
    expect(await env.SESSIONS.head(object(k))).toBeNull();
    expect(await stub().cacheForget(k)).toBe(false);
    let refused = "";
    try {
      await stub().cacheForget("nope");
    } catch (err) {
      refused = err instanceof Error ? err.message : String(err);
    }
    expect(refused).toMatch(/"nope" is not 64 lowercase hex/);
  });
});
