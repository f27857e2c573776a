// A fleet of hosts that dial in (issue 13): host tokens (made and revoked through the admin API,
// checked before the upgrade reaches the host's object), heartbeats (a host that misses them is out
// of routing at once, and its socket closed 4002), routing from the table (the most free KV among
// the hosts of a model, O(1) storage reads per request with 50 hosts: the registry's counters), a
// session whose host went away moving to another live host of its model, and a host dying in the
// middle of a request (503 host_unavailable with Retry-After; the retry lands elsewhere).
import { runInDurableObject } from "cloudflare:test";
import { env } from "cloudflare:workers";
import { afterAll, describe, expect, it } from "vitest";

import { sha256Hex } from "../src/auth.js";
import { hostId } from "../src/host-id.js";
import { ADMIN, as, call, error, eventually, hostRow, makeTenant, readSse } from "./client.js";
import { dialIn, eventuallyAsync, FakeHost, hostToken, routingTable } from "./fake-host.js";

const MiB = 1 << 20;
const started: FakeHost[] = [];

/** A fake host of `model`, connected, reporting `freeMiB` of free KV. */
async function hostOf(
  name: string,
  model: string,
  freeMiB: number,
  hello: { heartbeat_ms?: number; beat_every_ms?: number } = {},
) {
  const h = new FakeHost(name, model, hello);
  started.push(h);
  await h.connect();
  h.heartbeat({ free_bytes: freeMiB * MiB });
  await eventuallyAsync(
    async () => (await hostRow(name))?.free_bytes === freeMiB * MiB,
    `${name}'s heartbeat in the table`,
  );
  return h;
}

afterAll(async () => {
  for (const h of started) if (h.connected) await h.disconnect();
});

const chatOf = (model: string, stream = false) => ({
  model,
  messages: [{ role: "user", content: "hi" }],
  ...(stream ? { stream: true } : {}),
});
const opened = (h: FakeHost) => h.frames.filter((f) => f.type === "open_session").length;

describe("host tokens", () => {
  it("POST /admin/hosts shows the token once and keeps its hash; an existing name is 409, a bad one 400 naming the rule", async () => {
    const r = await call("/admin/hosts", {
      method: "POST",
      headers: ADMIN,
      body: JSON.stringify({ name: "tok-host" }),
    });
    expect(r.status).toBe(201);
    const { name, token } = (await r.json()) as { name: string; token: string };
    expect(name).toBe("tok-host");
    expect(token).toMatch(/^pkvh\.tok-host\.[0-9a-f]{64}$/);
    const stored = (await env.KEYS.get("host:tok-host", "json")) as Record<string, unknown>;
    expect(stored).toMatchObject({ name: "tok-host", token_sha256: await sha256Hex(token) });
    expect(JSON.stringify(stored)).not.toContain(token.slice("pkvh.tok-host.".length));
    const again = await call("/admin/hosts", { method: "POST", headers: ADMIN, body: JSON.stringify({ name }) });
    expect(await error(again)).toMatchObject({ status: 409, code: "host_exists", param: "name" });
    const bad = await call("/admin/hosts", {
      method: "POST",
      headers: ADMIN,
      body: JSON.stringify({ name: "Tok Host" }),
    });
    const e = await error(bad);
    expect(e).toMatchObject({ status: 400, param: "name" });
    expect(e.message).toContain("^[a-z0-9][a-z0-9-]{0,62}$");
  });

  it("no token, a malformed one, an unknown host's, a wrong secret: 401 invalid_host_token before any upgrade", async () => {
    const token = await hostToken("tok-real");
    const wrong = `pkvh.tok-real.${"0".repeat(64)}`;
    for (const auth of [undefined, "Bearer nope", `Bearer pkvh.tok-nobody.${"a".repeat(64)}`, `Bearer ${wrong}`]) {
      const r = await dialIn(auth);
      expect(r.webSocket).toBeNull();
      expect(await error(r)).toMatchObject({ status: 401, type: "authentication_error", code: "invalid_host_token" });
    }
    const ok = await dialIn(`Bearer ${token}`);
    expect(ok.status).toBe(101);
    ok.webSocket!.accept();
    ok.webSocket!.close(1000, "test");
  });

  it("a revoked host: its live socket is closed 4003, it is out of routing, and its token is refused from then on", async () => {
    const h = await hostOf("revoked-host", "revoke-model", 100);
    const token = await hostToken(h.name);
    const r = await call(`/admin/hosts/${h.name}`, { method: "DELETE", headers: ADMIN });
    expect(await r.json()).toMatchObject({ name: h.name, revoked: true, disconnected: true });
    await eventually(() => h.closeCode === 4003, "the host's socket to close 4003");
    expect(await routingTable().live(h.name)).toBe(false);
    expect(await error(await dialIn(`Bearer ${token}`))).toMatchObject({ status: 401, code: "invalid_host_token" });
    expect(await hostRow(h.name)).toBeUndefined();
    expect((await call(`/admin/hosts/${h.name}`, { method: "DELETE", headers: ADMIN })).status).toBe(404);
  });

  it("a second connection of the same name replaces the first (closed 4001)", async () => {
    const first = await hostOf("twice-host", "twice-model", 10);
    const second = new FakeHost("twice-host", "twice-model");
    started.push(second);
    await second.connect();
    await eventually(() => first.closeCode === 4001, "the first socket to close 4001");
    expect(await routingTable().live("twice-host")).toBe(true);
  });
});

describe("heartbeats", () => {
  it("a host whose last heartbeat is older than 2 × its heartbeat_ms is out of routing at once, its socket still open", async () => {
    const steady = await hostOf("hb-steady", "hb-model", 10);
    const silent = await hostOf("hb-silent", "hb-model", 500);
    expect((await routingTable().route("hb-model")).name).toBe("hb-silent");
    // its last heartbeat 2 × 60 s + 1 s ago, as the table sees it (no time waited)
    await runInDurableObject(routingTable(), (registry) => {
      const row = (registry as unknown as { table: Map<string, { last_heartbeat_ms: number }> }).table.get(
        "hb-silent",
      )!;
      row.last_heartbeat_ms -= 121_000;
    });
    expect(await routingTable().live("hb-silent")).toBe(false);
    expect((await routingTable().route("hb-model")).name).toBe("hb-steady");
    expect((await call("/v1/chat/completions", as(await key(), chatOf("hb-model")))).status).toBe(200);
    expect(opened(steady)).toBe(1);
    expect(opened(silent)).toBe(0);
    expect(silent.connected).toBe(true); // out of routing before anything closed its socket
    silent.heartbeat(); // it beats again: back in routing
    await eventuallyAsync(() => routingTable().live("hb-silent"), "hb-silent live again");
  });

  it("a host that stops beating (hung, socket open): its object's alarm closes the socket 4002 and it leaves the table", async () => {
    const hung = await hostOf("hb-hung", "hb-hung-model", 500, { heartbeat_ms: 1000, beat_every_ms: 100 });
    expect((await routingTable().route("hb-hung-model")).name).toBe("hb-hung");
    hung.stopBeating();
    await eventually(() => hung.closeCode === 4002, "the hung host's socket to close 4002", 10_000);
    expect(await routingTable().live("hb-hung")).toBe(false);
    expect(await hostRow("hb-hung")).toMatchObject({ connected: false });
  });

  it("a draining host takes no new sessions", async () => {
    const a = await hostOf("drain-a", "drain-model", 900);
    await hostOf("drain-b", "drain-model", 10);
    expect((await routingTable().route("drain-model")).name).toBe("drain-a");
    a.send({ type: "draining" });
    await eventuallyAsync(async () => (await hostRow("drain-a"))?.draining === true, "drain-a draining");
    expect((await routingTable().route("drain-model")).name).toBe("drain-b");
  });
});

let tenantKey: string | undefined;
async function key(): Promise<string> {
  tenantKey ??= await makeTenant("fleet", { max_sessions: 64, requests_per_minute: 100_000 });
  return tenantKey;
}

describe("routing from the table", () => {
  it("50 hosts: the most free KV among the hosts of the model; ≤ 1 storage read per request; heartbeats move the pick", async () => {
    const hosts: FakeHost[] = [];
    for (let i = 0; i < 50; i++)
      hosts.push(await hostOf(`many-${i}`, i % 2 === 0 ? "many-even" : "many-odd", 100 + i * 100));
    const k = await key();
    const before = await routingTable().counters();
    // the odd host with the most free KV is many-49; the even one many-48
    expect((await call("/v1/chat/completions", as(k, chatOf("many-odd")))).status).toBe(200);
    expect(opened(hosts[49]!)).toBe(1);
    expect((await call("/v1/chat/completions", as(k, chatOf("many-even")))).status).toBe(200);
    expect(opened(hosts[48]!)).toBe(1);
    // a heartbeat changes the table: many-1 now has the most free KV of the odd hosts
    hosts[1]!.heartbeat({ free_bytes: 100_000 * MiB });
    await eventuallyAsync(async () => (await hostRow("many-1"))?.free_bytes === 100_000 * MiB, "many-1's heartbeat");
    const N = 10;
    for (let i = 0; i < N; i++)
      expect((await call("/v1/chat/completions", as(k, chatOf("many-odd")))).status).toBe(200);
    expect(opened(hosts[1]!)).toBe(N);
    const after = await routingTable().counters();
    const requests = N + 2;
    expect(after.routes - before.routes).toBe(requests);
    expect(after.storage_reads - before.storage_reads).toBeLessThanOrEqual(1);
    const admin = (await (await call("/admin/hosts", { headers: ADMIN })).json()) as {
      routing: { routes: number; storage_reads: number };
    };
    expect(admin.routing.routes).toBeGreaterThanOrEqual(after.routes);
    expect(admin.routing.storage_reads).toBeLessThanOrEqual(1);
    for (const h of hosts) h.close();
  }, 120_000);

  it("a burst of new sessions spreads: each pick since a heartbeat lowers a host's free KV by an estimate", async () => {
    const a = await hostOf("burst-a", "burst-model", 1024);
    const b = await hostOf("burst-b", "burst-model", 1000);
    const picks: string[] = [];
    for (let i = 0; i < 4; i++) picks.push((await routingTable().route("burst-model")).name!);
    expect(picks[0]).toBe(a.name);
    expect(new Set(picks)).toEqual(new Set([a.name, b.name]));
  });
});

describe("sessions outlive their host", () => {
  it("a session whose host went away moves to another live host of its model: the request reaches the new host", async () => {
    const k = await key();
    const first = await hostOf("move-a", "move-model", 900);
    const second = await hostOf("move-b", "move-model", 100);
    await hostOf("move-other", "other-model", 5000);
    const made = await call("/v1/sessions", as(k, { model: "move-model", document: "A short document." }));
    expect(made.status).toBe(201);
    const s = (await made.json()) as { id: string; host: string };
    expect(s.host).toBe(await hostId(env, "move-a"));
    await first.disconnect();
    const r = await call(`/v1/sessions/${s.id}/messages`, as(k, { content: "Why?", stream: false }));
    expect(r.status).toBe(200);
    expect(second.frames.filter((f) => "session" in f && f.session === s.id).map((f) => f.type)).toEqual([
      "stats",
      "append",
      "generate",
      "stats",
    ]);
    const got = (await (await call(`/v1/sessions/${s.id}`, as(k))).json()) as { host: string };
    expect(got.host).toBe(await hostId(env, "move-b"));
    // and with no live host of its model left: 503, retryable
    await second.disconnect();
    const e = await call(`/v1/sessions/${s.id}/messages`, as(k, { content: "Again?", stream: false }));
    expect(e.status).toBe(503);
    expect(e.headers.get("retry-after")).not.toBeNull();
    expect(await error(e)).toMatchObject({ code: "host_unavailable" });
  });

  it("a host dying mid-request: 503 host_unavailable with Retry-After; in a stream an error event; the retry lands on another host", async () => {
    const k = await key();
    const dying = await hostOf("die-a", "die-model", 900);
    const spare = await hostOf("die-b", "die-model", 100);
    dying.on.generate = (m, reply, ws) => {
      if (m.type !== "generate") return;
      reply({ type: "token", id: m.id, session: m.session, tokens: [1], text: "Hal" });
      ws.close(1011, "killed");
    };
    const r = await call("/v1/chat/completions", as(k, chatOf("die-model")));
    expect(r.status).toBe(503);
    expect(Number(r.headers.get("retry-after"))).toBeGreaterThanOrEqual(1);
    const e = await error(r);
    expect(e).toMatchObject({ code: "host_unavailable", type: "server_error" });
    expect(e.message).not.toContain("die-a");
    await eventuallyAsync(async () => !(await routingTable().live("die-a")), "die-a out of routing");
    // the retry: on the live host
    expect((await call("/v1/chat/completions", as(k, chatOf("die-model")))).status).toBe(200);
    expect(opened(spare)).toBe(1);
    // mid-stream: the status was sent already, the error is an event of the stream
    spare.on.generate = dying.on.generate;
    const sse = await call("/v1/chat/completions", as(k, chatOf("die-model", true)));
    expect(sse.status).toBe(200);
    const events = [];
    for await (const ev of readSse(sse)) events.push(ev.data);
    expect(events.join("\n")).toMatch(/"code":"host_unavailable"/);
    expect(events.join("\n")).not.toContain("[DONE]");
  });
});
