// Faults at the edge (issue 12), against a scripted host: sessions expire after their tenant's idle
// TTL (the tenant Durable Object's alarm closes them on their hosts), DELETE keeps a tombstone when
// the host close failed, records of opens that never finished are handled, clients that go away
// end their leases, the host's new error codes map to HTTP statuses, and tenants never see host URLs.
import type { ToHostMessage } from "@pyramidkv/shared";
import { runDurableObjectAlarm, runInDurableObject } from "cloudflare:test";
import { env } from "cloudflare:workers";
import { afterAll, beforeEach, describe, expect, it } from "vitest";

import { ADMIN, as, call, error, eventually, makeTenant } from "./client.js";
import { FakeHost } from "./fake-host.js";

const host = new FakeHost("fault-host");
const chatBody = { model: "default", messages: [{ role: "user", content: "héllo" }] };

afterAll(async () => {
  if (host.connected) await host.disconnect();
});
beforeEach(async () => {
  if (host.connected) await host.settle();
  host.reset();
  if (!host.connected) await host.connect(); // a test may have made it go away
});

const stubOf = (tenant: string) => env.TENANTS.get(env.TENANTS.idFromName(tenant));

/** The tenant's stored session records (tombstones included). */
async function records(tenant: string): Promise<Record<string, unknown>[]> {
  return runInDurableObject(stubOf(tenant), async (_o, state) => [
    ...(await state.storage.list<Record<string, unknown>>({ prefix: "session:" })).values(),
  ]);
}

/** Moves a record's clock back by `ms` (its creation and last use), as if that much time had passed. */
async function age(tenant: string, id: string, ms: number): Promise<void> {
  await runInDurableObject(stubOf(tenant), async (_o, state) => {
    const rec = (await state.storage.get<Record<string, number>>(`session:${id}`))!;
    for (const k of ["used_ms", "closing_since_ms", "next_try_ms"]) if (typeof rec[k] === "number") rec[k] -= ms;
    rec.created! -= Math.ceil(ms / 1000);
    await state.storage.put(`session:${id}`, rec);
  });
}

/** Makes a tombstone's next close attempt due now (instead of after its back-off). */
async function retryNow(tenant: string, id: string): Promise<void> {
  await runInDurableObject(stubOf(tenant), async (_o, state) => {
    const rec = (await state.storage.get<Record<string, number>>(`session:${id}`))!;
    rec.next_try_ms = Date.now() - 1;
    await state.storage.put(`session:${id}`, rec);
  });
}

async function usageSessions(key: string): Promise<number> {
  return ((await (await call("/v1/usage", as(key))).json()) as { sessions: number }).sessions;
}

async function newSession(key: string): Promise<string> {
  const r = await call("/v1/sessions", as(key, { document: "A short document." }));
  expect(r.status).toBe(201);
  return ((await r.json()) as { id: string }).id;
}

const closes = (id: string) => host.frames.filter((f) => f.type === "close" && f.session === id).length;
const del = (key: string, id: string) => call(`/v1/sessions/${id}`, { ...as(key), method: "DELETE" });

describe("sessions expire at the edge", () => {
  it("the tenant's session_ttl_s and max_stored_bytes go to the host with its settings (default TTL 3600 s)", async () => {
    const k = await makeTenant("ttl-default", { requests_per_minute: 1000 });
    expect((await call("/v1/chat/completions", as(k, chatBody))).status).toBe(200);
    expect(host.frames[0]).toMatchObject({ type: "set_tenant", session_ttl_s: 3600 });
    expect(host.frames[0]).not.toHaveProperty("max_stored_bytes");
    await makeTenant("ttl-default", { session_ttl_s: 90, max_stored_bytes: 1 << 20 });
    host.connections.length = 0;
    expect((await call("/v1/chat/completions", as(k, chatBody))).status).toBe(200);
    expect(host.frames[0]).toMatchObject({ type: "set_tenant", session_ttl_s: 90, max_stored_bytes: 1 << 20 });
    const bad = await call("/admin/tenants/ttl-default", {
      method: "PUT",
      headers: ADMIN,
      body: JSON.stringify({ session_ttl_s: 0 }),
    });
    expect(await error(bad)).toMatchObject({ status: 400, param: "session_ttl_s" });
  });

  it("an idle session is closed on its host by the alarm, its slot freed; a request for it is 404 session_expired", async () => {
    const k = await makeTenant("ttl", { max_sessions: 1, requests_per_minute: 1000, session_ttl_s: 60 });
    const id = await newSession(k);
    expect((await call("/v1/sessions", as(k, { document: "another" }))).status).toBe(429);
    await age("ttl", id, 61_000);
    await runDurableObjectAlarm(stubOf("ttl"));
    expect(closes(id)).toBe(1);
    expect(await records("ttl")).toEqual([]);
    expect(await usageSessions(k)).toBe(0);
    expect(await error(await call(`/v1/sessions/${id}`, as(k)))).toMatchObject({
      status: 404,
      code: "session_expired",
    });
    expect(
      await error(await call(`/v1/sessions/${id}/messages`, as(k, { content: "hi", stream: false }))),
    ).toMatchObject({ status: 404, code: "session_expired" });
    await newSession(k); // the slot is free again
  });

  it("a request touches its session: the TTL counts from the last use", async () => {
    const k = await makeTenant("ttl-touch", { requests_per_minute: 1000, session_ttl_s: 60 });
    const id = await newSession(k);
    await age("ttl-touch", id, 50_000);
    expect((await call(`/v1/sessions/${id}`, as(k))).status).toBe(200); // used now: 60 s from here
    await age("ttl-touch", id, 20_000);
    await runDurableObjectAlarm(stubOf("ttl-touch"));
    expect(closes(id)).toBe(0);
    expect((await call(`/v1/sessions/${id}`, as(k))).status).toBe(200);
  });

  it("a request still in flight past the TTL keeps its session: the alarm expires it only after the request ended", async () => {
    const k = await makeTenant("ttl-busy", { requests_per_minute: 1000, session_ttl_s: 60 });
    const id = await newSession(k);
    // a long prefill or generation: its request began (useSession) and has not ended yet
    expect((await stubOf("ttl-busy").useSession(id)).ok).toBe(true);
    await age("ttl-busy", id, 61_000);
    await runDurableObjectAlarm(stubOf("ttl-busy"));
    expect(closes(id)).toBe(0);
    expect(await records("ttl-busy")).toMatchObject([{ id, state: "open" }]);
    await stubOf("ttl-busy").touchSession(id); // the request ended: the TTL counts from now
    await age("ttl-busy", id, 61_000);
    await runDurableObjectAlarm(stubOf("ttl-busy"));
    expect(closes(id)).toBe(1);
    expect(await records("ttl-busy")).toEqual([]);
  });

  it("a host unreachable at expiry: the slot is freed at once, the close retried by a later alarm", async () => {
    const k = await makeTenant("ttl-retry", { max_sessions: 1, requests_per_minute: 1000, session_ttl_s: 60 });
    const id = await newSession(k);
    await age("ttl-retry", id, 61_000);
    await host.disconnect();
    await runDurableObjectAlarm(stubOf("ttl-retry"));
    expect(await records("ttl-retry")).toMatchObject([{ id, state: "closing", expired: true }]);
    expect(await usageSessions(k)).toBe(0);
    expect(await error(await call(`/v1/sessions/${id}`, as(k)))).toMatchObject({
      status: 404,
      code: "session_expired",
    });
    await host.connect();
    await retryNow("ttl-retry", id);
    await runDurableObjectAlarm(stubOf("ttl-retry"));
    expect(closes(id)).toBe(1);
    expect(await records("ttl-retry")).toEqual([]);
    expect(await error(await call(`/v1/sessions/${id}`, as(k)))).toMatchObject({
      status: 404,
      code: "session_expired",
    });
  });

  it("the host answers session_expired (its own sweep closed it): 404 session_expired, the edge record dropped", async () => {
    const k = await makeTenant("ttl-host", { max_sessions: 1, requests_per_minute: 1000 });
    const id = await newSession(k);
    host.on.stats = (m, reply) =>
      reply({ type: "error", id: (m as { id: number }).id, code: "session_expired", message: `session ${id} expired` });
    expect(await error(await call(`/v1/sessions/${id}`, as(k)))).toMatchObject({
      status: 404,
      code: "session_expired",
    });
    expect(await records("ttl-host")).toEqual([]);
    delete host.on.stats;
    await newSession(k);
  });
});

describe("DELETE and opens that never finished", () => {
  it("DELETE whose host close fails: host_closed false, the slot freed, a tombstone the alarm retries until the host confirms", async () => {
    const k = await makeTenant("del", { max_sessions: 1, requests_per_minute: 1000 });
    const id = await newSession(k);
    await host.disconnect();
    const r = await del(k, id);
    expect(r.status).toBe(200);
    expect(await r.json()).toMatchObject({ id, deleted: true, host_closed: false });
    expect(await usageSessions(k)).toBe(0);
    expect(await records("del")).toMatchObject([{ id, state: "closing" }]);
    expect(await error(await call(`/v1/sessions/${id}`, as(k)))).toMatchObject({ status: 404 });
    await host.connect();
    await newSession(k); // the slot was freed
    await retryNow("del", id);
    await runDurableObjectAlarm(stubOf("del"));
    expect(closes(id)).toBe(1);
    expect((await records("del")).map((r) => r.id)).not.toContain(id);
  });

  it("a tombstone whose host never answers is dropped once the TTL has passed (the host's own sweep closed it)", async () => {
    const k = await makeTenant("del-ttl", { requests_per_minute: 1000, session_ttl_s: 60 });
    const id = await newSession(k);
    await host.disconnect();
    expect(await (await del(k, id)).json()).toMatchObject({ host_closed: false });
    await age("del-ttl", id, 61_000);
    await runDurableObjectAlarm(stubOf("del-ttl"));
    expect(await records("del-ttl")).toEqual([]);
  });

  it("the host is recorded when the link is dialled, before open_session; DELETE of a session being opened closes it", async () => {
    const k = await makeTenant("opening", { max_sessions: 1, requests_per_minute: 1000 });
    // The answer waits for the test's word, polled from the host's own context (a socket is used
    // only from the request that made it).
    let opening = false;
    let release = false;
    host.on.open_session = (m, reply) => {
      const o = m as Extract<ToHostMessage, { type: "open_session" }>;
      opening = true;
      const poll = setInterval(() => {
        if (!release) return;
        clearInterval(poll);
        reply({ type: "opened", id: o.id, session: o.session, method: "pyramidkv", budget: 128, reserved_bytes: 0 });
      }, 10);
    };
    const made = call("/v1/sessions", as(k, { document: "A short document." }));
    await eventually(() => opening, "open_session to reach the host", 10_000);
    const [rec] = await records("opening");
    expect(rec).toMatchObject({ host: host.name, state: "opening" });
    const id = rec!.id as string;
    const r = await del(k, id);
    expect(await r.json()).toMatchObject({ id, deleted: true, host_closed: true });
    expect(closes(id)).toBe(1);
    release = true; // the open finishes after the DELETE: the request fails and closes what it opened
    expect((await made).status).toBe(404);
    await eventually(() => closes(id) === 2, "the opening request to close its session", 10_000);
    expect(await records("opening")).toEqual([]);
  });

  it("a record left opening (its isolate went away) is deletable, and the alarm expires it after a short deadline", async () => {
    const k = await makeTenant("stuck", { max_sessions: 2, requests_per_minute: 1000 });
    const stub = stubOf("stuck");
    // as an evicted isolate leaves them: one before any host was dialled, one dialled
    expect(await stub.reserveSession("sess-stuck1", { method: "pyramidkv", budget: 128 })).not.toBeNull();
    expect(await stub.reserveSession("sess-stuck2", { method: "pyramidkv", budget: 128 })).not.toBeNull();
    await stub.updateSession("sess-stuck2", { host: host.name });
    expect(await (await del(k, "sess-stuck1")).json()).toMatchObject({ deleted: true, host_closed: true });
    expect(await usageSessions(k)).toBe(1);
    await age("stuck", "sess-stuck2", 10 * 60_000);
    await runDurableObjectAlarm(stub);
    expect(closes("sess-stuck2")).toBe(1);
    expect(await records("stuck")).toEqual([]);
  });
});

describe("clients that go away, and what opens carry", () => {
  it("a non-streaming client that aborts: the session is closed on the host and the link closed", async () => {
    const k = await makeTenant("abort", { requests_per_minute: 1000 });
    host.on.generate = () => {}; // never answers
    const ac = new AbortController();
    const r = call("/v1/chat/completions", { ...as(k, chatBody), signal: ac.signal });
    await eventually(() => host.types().includes("generate"), "the generation to start", 10_000);
    ac.abort();
    await r.catch(() => {});
    await eventually(() => host.types().includes("close"), "the edge to close the session on the host", 10_000);
    await eventually(() => host.closedByEdge === 1, "the edge to close the link", 10_000);
  });

  it("chat completions and completions open ephemeral sessions; every open carries prompt_bytes", async () => {
    const k = await makeTenant("open-fields", { requests_per_minute: 1000 });
    const opens = () => host.frames.filter((f) => f.type === "open_session");
    expect((await call("/v1/chat/completions", as(k, chatBody))).status).toBe(200);
    expect(opens()[0]).toMatchObject({ ephemeral: true, prompt_bytes: 6 }); // "héllo": 6 UTF-8 bytes
    expect((await call("/v1/completions", as(k, { model: "default", prompt: "ünï" }))).status).toBe(200);
    expect(opens()[1]).toMatchObject({ ephemeral: true, prompt_bytes: 5 });
    const r = await call("/v1/sessions", as(k, { document: "dé", system: "sys" }));
    expect(r.status).toBe(201);
    expect(opens()[2]).toMatchObject({ prompt_bytes: 6 });
    expect(opens()[2]).not.toHaveProperty("ephemeral");
  });
});

describe("host error codes at the edge", () => {
  async function askWith(tenant: string, code: string, message = `the host says ${code}`) {
    const k = await makeTenant(tenant, { requests_per_minute: 1000 });
    const id = await newSession(k);
    host.on.append = (m, reply) => reply({ type: "error", id: (m as { id: number }).id, code, message });
    return call(`/v1/sessions/${id}/messages`, as(k, { content: "Why?", stream: false }));
  }

  it("session_busy → 409 naming the other request", async () => {
    const e = await error(await askWith("busy", "session_busy", "another request holds the session's turn"));
    expect(e).toMatchObject({ status: 409, code: "session_busy" });
    expect(e.message).toMatch(/another request is using this session/);
  });

  it("timeout → 504 with Retry-After", async () => {
    const r = await askWith("timeout", "timeout");
    expect(r.status).toBe(504);
    expect(Number(r.headers.get("retry-after"))).toBeGreaterThanOrEqual(1);
    expect(await error(r)).toMatchObject({ type: "server_error", code: "timeout" });
  });

  it("checkpoint_failed → 503 retryable (x-should-retry: true)", async () => {
    const r = await askWith("ckpt", "checkpoint_failed");
    expect(r.status).toBe(503);
    expect(r.headers.get("x-should-retry")).toBe("true");
    expect(r.headers.get("retry-after")).not.toBeNull();
    expect(await error(r)).toMatchObject({ code: "checkpoint_failed" });
  });

  it("stored_quota_exceeded → 429 naming the quota, not retried", async () => {
    const r = await askWith("stored", "stored_quota_exceeded", "offloaded state would exceed the tenant's bound");
    expect(r.status).toBe(429);
    expect(r.headers.get("x-should-retry")).toBe("false");
    const e = await error(r);
    expect(e).toMatchObject({ type: "rate_limit_error", code: "stored_quota_exceeded" });
    expect(e.message).toMatch(/max_stored_bytes/);
  });

  it("unauthorized → 500 (an edge bug)", async () => {
    expect(await error(await askWith("unauth", "unauthorized"))).toMatchObject({
      status: 500,
      type: "server_error",
      code: "unauthorized",
    });
  });
});

describe("tenants never see host names", () => {
  it("the session object names its host by an opaque id (the admin's host list maps it); usage and errors name no host", async () => {
    const k = await makeTenant("opaque", { requests_per_minute: 1000 });
    const made = await call("/v1/sessions", as(k, { document: "A short document." }));
    const s = (await made.json()) as { id: string; host: string };
    expect(s.host).toMatch(/^host-[0-9a-f]{16}$/);
    const hosts = (await (await call("/admin/hosts", { headers: ADMIN })).json()) as {
      hosts: { name: string; id: string }[];
    };
    expect(hosts.hosts.find((h) => h.name === host.name)!.id).toBe(s.host);
    const got = (await (await call(`/v1/sessions/${s.id}`, as(k))).json()) as { host: string };
    expect(got.host).toBe(s.host);
    const usage = await (await call("/v1/usage", as(k))).text();
    expect(usage).not.toContain("fault-host");
    expect(usage).toContain(s.host);
    await host.disconnect();
    const e = await error(await call(`/v1/sessions/${s.id}`, as(k)));
    expect(e).toMatchObject({ status: 503, code: "host_unavailable" });
    expect(e.message).not.toContain("fault-host");
    const u2 = await (await call("/v1/usage", as(k))).text();
    expect(u2).not.toContain("fault-host");
    const admin = await (await call("/admin/tenants/opaque", { headers: ADMIN })).text();
    expect(admin).toContain(host.name); // admins keep names
  });

  it("an error inside a stream names no host", async () => {
    const k = await makeTenant("opaque-sse", { requests_per_minute: 1000 });
    host.on.append = (m, reply) =>
      reply({
        type: "error",
        id: (m as { id: number }).id,
        code: "internal",
        message: `engine at ${host.name} failed`,
      });
    const r = await call("/v1/sessions", as(k, { document: "A short document.", stream: true }));
    const text = await r.text();
    expect(text).toMatch(/"code":"internal"/);
    expect(text).not.toContain("fault-host");
  });
});

describe("validation agrees with the host and the engine", () => {
  it("top_p 0 and an infinite temperature or top_p (1e999 in JSON) are 400s naming the field", async () => {
    const k = await makeTenant("valid", { requests_per_minute: 1000 });
    const raw = (extra: string) =>
      call("/v1/chat/completions", as(k, `{"model":"default","messages":[{"role":"user","content":"x"}],${extra}}`));
    expect(await error(await raw(`"top_p":0`))).toMatchObject({ status: 400, param: "top_p" });
    expect(await error(await raw(`"temperature":1e999`))).toMatchObject({ status: 400, param: "temperature" });
    expect(await error(await raw(`"top_p":-1e999`))).toMatchObject({ status: 400, param: "top_p" });
    const cmpl = await call("/v1/completions", as(k, `{"model":"default","prompt":"x","temperature":1e999}`));
    expect(await error(cmpl)).toMatchObject({ status: 400, param: "temperature" });
    expect(host.frames).toEqual([]);
  });
});
