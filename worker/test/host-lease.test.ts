// The host-link lifecycle (src/host-lease.ts) through the routes, against a scripted host: what the
// host receives and whether the edge closes the session, closes the link and reports the host when
// the work succeeds, fails in the middle, loses its host, or loses its client.
import { afterAll, beforeAll, beforeEach, describe, expect, it } from "vitest";

import { as, call, error, eventually, hostRow, makeTenant } from "./client.js";
import { FakeHost } from "./fake-host.js";

const host = new FakeHost("lease-host");
const chatBody = { model: "default", messages: [{ role: "user", content: "hi" }] };
let key: string;

beforeAll(async () => {
  key = await makeTenant("lease", { max_sessions: 4, requests_per_minute: 10_000 });
});
afterAll(() => host.close());
beforeEach(async () => {
  if (host.connected) await host.settle();
  host.reset();
  if (!host.connected) await host.connect(); // a test may have made it go away
});

async function sessionsOfTenant(): Promise<number> {
  return ((await (await call("/v1/usage", as(key))).json()) as { sessions: number }).sessions;
}

describe("host lifecycle", () => {
  it("a chat completion: tenant settings, work, the ephemeral session closed after the answer, then the link", async () => {
    const r = await call("/v1/chat/completions", as(key, chatBody));
    expect(r.status).toBe(200);
    expect(((await r.json()) as { choices: { message: { content: string } }[] }).choices[0]!.message.content).toBe(
      "Hello",
    );
    // stats: the session's KV bytes vs FullKV for the usage, before the close
    expect(host.types()).toEqual(["set_tenant", "open_session", "append", "generate", "stats", "close"]);
    const [, open, , , , close] = host.frames;
    expect(close).toMatchObject({ type: "close", session: (open as { session: string }).session });
    await eventually(() => host.closedByEdge === 1, "the edge to close the link");
  });

  it("a host error in the middle: the session is closed on the host, the link closed, the host still routable", async () => {
    host.on.append = (m, reply) =>
      reply({ type: "error", id: (m as { id: number }).id, code: "context_full", message: "prompt over the context" });
    expect(await error(await call("/v1/chat/completions", as(key, chatBody)))).toMatchObject({
      status: 400,
      code: "context_length_exceeded",
      param: "messages",
    });
    expect(host.types()).toEqual(["set_tenant", "open_session", "append", "close"]);
    await eventually(() => host.closedByEdge === 1, "the edge to close the link");
    expect((await hostRow(host.name)).live).toBe(true);
  });

  it("a host that goes away mid-upload: the request ends with host_unavailable, the host out of routing, the slot given back", async () => {
    host.on.append = (_m, _reply, ws) => ws.close(1011, "engine crashed");
    const e = await error(await call("/v1/sessions", as(key, { document: "A short document." })));
    expect(e).toMatchObject({ status: 503, code: "host_unavailable" });
    expect(e.message).toMatch(/went away/);
    expect(host.types()).toEqual(["set_tenant", "open_session", "append"]);
    expect((await hostRow(host.name)).connected).toBe(false);
    expect(await sessionsOfTenant()).toBe(0);
  });

  it("a failure inside a stream: an error frame, the session closed on the host, the link closed, the slot given back", async () => {
    host.on.append = (m, reply) =>
      reply({ type: "error", id: (m as { id: number }).id, code: "pool_full", message: "the KV pool is full" });
    const r = await call("/v1/sessions", as(key, { document: "A short document.", stream: true }));
    expect(r.status).toBe(200);
    const text = await r.text();
    expect(text).toMatch(/"code":"pool_full"/);
    expect(text).not.toMatch(/event: session/);
    expect(host.types()).toEqual(["set_tenant", "open_session", "append", "close"]);
    await eventually(() => host.closedByEdge === 1, "the edge to close the link");
    expect(await sessionsOfTenant()).toBe(0);
  });

  it("a client that leaves a stream: the generation's session is closed on the host and the link closed", async () => {
    host.on.generate = (m, reply) => {
      const g = m as { id: number; session: string };
      reply({ type: "token", id: g.id, session: g.session, tokens: [1], text: "One" }); // and never done
    };
    const r = await call("/v1/chat/completions", as(key, { ...chatBody, stream: true }));
    expect(r.status).toBe(200);
    const reader = r.body!.getReader();
    let seen = "";
    while (!seen.includes('"content":"One"')) seen += new TextDecoder().decode((await reader.read()).value);
    await reader.cancel();
    await eventually(() => host.types().includes("close"), "the edge to close the session on the host");
    await eventually(() => host.closedByEdge === 1, "the edge to close the link");
    expect(host.types()).toEqual(["set_tenant", "open_session", "append", "generate", "close"]);
    expect((await hostRow(host.name)).live).toBe(true);
  });

  it("a session's own host: the question goes there, the link is closed after the answer", async () => {
    const made = await call("/v1/sessions", as(key, { document: "A short document." }));
    expect(made.status).toBe(201);
    const { id, host: at } = (await made.json()) as { id: string; host: string };
    expect(at).toMatch(/^host-[0-9a-f]{16}$/); // an opaque id: tenants never see host URLs
    await host.settle();
    host.reset();
    const r = await call(`/v1/sessions/${id}/messages`, as(key, { content: "Why?", stream: false }));
    expect(r.status).toBe(200);
    expect(host.types()).toEqual(["set_tenant", "stats", "append", "generate", "stats"]);
    await eventually(() => host.closedByEdge === 1, "the edge to close the link");
    expect((await call(`/v1/sessions/${id}`, { ...as(key), method: "DELETE" })).status).toBe(200);
    expect(host.types().slice(-1)).toEqual(["close"]);
  });

  it("GET /v1/usage: the tenant's stats from each host, on a link of its own, closed after", async () => {
    const u = (await (await call("/v1/usage", as(key))).json()) as { tenant: string; hosts: unknown[] };
    expect(u.tenant).toBe("lease");
    expect(u.hosts).toContainEqual({
      host: expect.stringMatching(/^host-[0-9a-f]{16}$/), // not its URL
      kv_used_bytes: 640,
      kv_quota_bytes: 1 << 20,
      sessions: 1,
      offloaded: 0,
    });
    expect(host.types()).toEqual(["stats"]);
    expect(host.frames[0]).toMatchObject({ tenant: "lease" });
    await eventually(() => host.closedByEdge === 1, "the edge to close the link");
  });
});
