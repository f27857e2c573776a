// The edge's side of a request's channel (src/host-link.ts): it is opened through the host's
// Durable Object (no URL, no token), its hello is made from the host's host_hello, and the connect
// and every call have deadlines, so a host that stays silent ends the request as a retryable
// HostGone, while a call that keeps sending progress is not cut short. Hosts here are fake hosts
// that dial in (fake-host.ts).
import { env } from "cloudflare:workers";
import { afterAll, beforeAll, beforeEach, describe, expect, it } from "vitest";

import { ApiError } from "../src/errors.js";
import { HostGone, HostLink } from "../src/host-link.js";
import { connectTo } from "../src/routing.js";
import { eventually } from "./client.js";
import { FakeHost } from "./fake-host.js";

const SHORT = { connectMs: 2000, idleMs: 300 };
const host = new FakeHost("link-host", "linked.gguf", { n_ctx: 3072, chat_template: "chatml" });

beforeAll(() => host.connect());
afterAll(() => host.disconnect());
beforeEach(async () => {
  await host.settle();
  host.reset();
});

/** How `p` settled: its error, if any (a hang is the test's timeout). */
async function settle(p: Promise<unknown>): Promise<{ error?: unknown }> {
  try {
    await p;
    return {};
  } catch (error) {
    return { error };
  }
}

describe("channels", () => {
  it("a channel's hello is the host's host_hello, made by its object; the host is told channel_open with the tenant", async () => {
    const link = await HostLink.connect(env, host.name, "acme.eu", SHORT);
    expect(link.hello).toMatchObject({
      type: "hello",
      protocol: 3,
      model: "linked.gguf",
      n_ctx: 3072,
      chat_template: "chatml",
    });
    expect(link.host).toBe(host.name);
    await eventually(() => host.control.some((m) => m.type === "channel_open"), "channel_open");
    expect(host.control.find((m) => m.type === "channel_open")).toMatchObject({ tenant: "acme.eu" });
    expect(host.frames).toEqual([]); // no frame of the request's reached the host for the hello
    link.close();
    await eventually(() => host.closedByEdge === 1, "channel_close");
  });

  it("frames are relayed both ways on the channel, with the tenant the link was opened for", async () => {
    const link = await HostLink.connect(env, host.name, "acme.eu", SHORT);
    const st = await link.call({ type: "stats" }, "stats_result");
    expect(st).toMatchObject({ tenant: "acme.eu", kv_used_bytes: 640 });
    expect(host.frames).toMatchObject([{ type: "stats", tenant: "acme.eu" }]);
    link.close();
  });

  it("two links at once are two channels: each answer reaches its own link", async () => {
    const [a, b] = await Promise.all([
      HostLink.connect(env, host.name, "tenant-a", SHORT),
      HostLink.connect(env, host.name, "tenant-b", SHORT),
    ]);
    const [sa, sb] = await Promise.all([
      a.call({ type: "stats" }, "stats_result"),
      b.call({ type: "stats" }, "stats_result"),
    ]);
    expect([sa.tenant, sb.tenant]).toEqual(["tenant-a", "tenant-b"]);
    expect(host.connections).toHaveLength(2);
    a.close();
    b.close();
    await eventually(() => host.closedByEdge === 2, "both channels closed");
  });
});

describe("deadlines", () => {
  it("a host that is not connected: the channel is refused at once, HostGone (503)", async () => {
    const { error } = await settle(HostLink.connect(env, "never-connected", "t", SHORT));
    expect(error).toBeInstanceOf(HostGone);
    expect((error as HostGone).status).toBe(503);
    expect((error as Error).message).toMatch(/not connected/);
  });

  it("a call the host never answers fails after the idle deadline and closes the link", async () => {
    host.on.stats = () => {};
    const link = await HostLink.connect(env, host.name, "t", SHORT);
    const { error } = await settle(link.call({ type: "stats" }, "stats_result"));
    expect(host.types()).toEqual(["stats"]);
    expect(error).toBeInstanceOf(HostGone);
    expect((error as Error).message).toMatch(/no answer from the host for 300 ms/);
    expect(link.alive).toBe(false);
    await eventually(() => host.closedByEdge === 1, "the channel closed (the host cancels its work)");
  });

  it("progress frames keep a long call alive: only silence counts", async () => {
    host.on.append = (m, reply) => {
      if (m.type !== "append") return;
      // 8 progress frames 100 ms apart (800 ms in all, more than the 300 ms idle deadline), then the answer
      let n = 0;
      const tick = setInterval(() => {
        if (++n <= 8) {
          reply({ type: "progress", id: m.id, session: m.session, done: n * 10, total: 80 });
          return;
        }
        clearInterval(tick);
        reply({ type: "appended", id: m.id, session: m.session, tokens_seen: 80, kv_bytes: 640 });
      }, 100);
    };
    const link = await HostLink.connect(env, host.name, "t", SHORT);
    const progress: number[] = [];
    const done = await link.call({ type: "append", session: "s", text: "long" }, "appended", (f) => {
      if (f.type === "progress") progress.push(f.done);
    });
    expect(done.tokens_seen).toBe(80);
    expect(progress).toHaveLength(8);
    link.close();
  });

  it("connectTo a host that is not connected: 503 host_unavailable", async () => {
    const { error } = await settle(connectTo(env, "gone-host", "t"));
    expect(error).toBeInstanceOf(ApiError);
    expect((error as ApiError).status).toBe(503);
    expect((error as ApiError).code).toBe("host_unavailable");
  });

  it("the host's channel_drop (e.g. a reader too slow): that link ends with HostGone, the others go on", async () => {
    host.on.generate = () => {};
    const dropped = await HostLink.connect(env, host.name, "t", { connectMs: 2000, idleMs: 30_000 });
    const kept = await HostLink.connect(env, host.name, "t", SHORT);
    const call = settle(dropped.call({ type: "generate", session: "s" }, "done"));
    await eventually(() => host.types().includes("generate"), "the generate to reach the host");
    const ch = host.control.filter((m) => m.type === "channel_open").map((m) => (m as { ch: number }).ch);
    const generating = host.connections.findIndex((frames) => frames.some((f) => f.type === "generate"));
    host.send({ type: "channel_drop", ch: ch[generating]!, reason: "slow reader" });
    const { error } = await call;
    expect(error).toBeInstanceOf(HostGone);
    expect((error as Error).message).toMatch(/dropped by the host: slow reader/);
    expect((await kept.call({ type: "stats" }, "stats_result")).type).toBe("stats_result");
    kept.close();
  });

  it("the host's socket closing mid-call: every channel on it ends with HostGone (1011 host gone)", async () => {
    const other = new FakeHost("link-host-2");
    await other.connect();
    other.on.generate = () => {};
    const link = await HostLink.connect(env, other.name, "t", { connectMs: 2000, idleMs: 30_000 });
    const call = settle(link.call({ type: "generate", session: "s" }, "done"));
    await eventually(() => other.types().includes("generate"), "the generate to reach the host");
    other.close(1001, "going away");
    const { error } = await call;
    expect(error).toBeInstanceOf(HostGone);
    expect((error as Error).message).toMatch(/1011 host gone/);
  });
});
