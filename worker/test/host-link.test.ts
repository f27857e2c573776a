// The edge's side of a host link (src/host-link.ts, issue 12 items 5 and 9): the token it mints
// names the tenant and the host; the connect and every call have deadlines, so a host that
// accepts and never answers ends the request as a retryable HostGone and is marked down, while a
// call that keeps sending progress is not cut short. Hosts here are scripted (fetch replaced).
import {
  decodeHostMessage,
  encodeHostMessage,
  type FromHostMessage,
  HOST_PROTOCOL_VERSION,
  type ToHostMessage,
} from "@pyramidkv/shared";
import { env } from "cloudflare:workers";
import { afterEach, describe, expect, it, vi } from "vitest";

import { ApiError } from "../src/errors.js";
import { edgeToken, HostGone, HostLink, normaliseHost } from "../src/host-link.js";
import { connectTo } from "../src/routing.js";
import { addHost, hostEntry, removeHost } from "./client.js";

const SECRET = "test-secret-0123456789abcdef";
const SHORT = { connectMs: 300, idleMs: 300 };

afterEach(() => {
  vi.restoreAllMocks();
});

/** fetch to `url` answered by `answer` (everything else as usual); the Authorization headers seen. */
function route(url: string, answer: (req: Request) => Promise<Response>): string[] {
  const real = globalThis.fetch;
  const auth: string[] = [];
  vi.spyOn(globalThis, "fetch").mockImplementation(async (input, init) => {
    const req = new Request(input, init);
    if (new URL(req.url).origin !== url) return real(input, init);
    auth.push(req.headers.get("authorization") ?? "");
    return answer(req);
  });
  return auth;
}

/** A host that accepted the connection and never answers (the request gives up when its signal aborts). */
const silent = (onAbort?: () => void) => (req: Request) =>
  new Promise<Response>((_, reject) => {
    req.signal.addEventListener("abort", () => {
      onAbort?.();
      reject(req.signal.reason);
    });
  });

/** A host that upgrades, says hello and then hands each frame to `onFrame`. */
function scripted(onFrame: (m: ToHostMessage, reply: (f: FromHostMessage) => void) => void, hello = true) {
  return async (): Promise<Response> => {
    const [client, server] = Object.values(new WebSocketPair()) as [WebSocket, WebSocket];
    server.accept();
    server.binaryType = "arraybuffer";
    const reply = (f: FromHostMessage) => server.send(encodeHostMessage(f));
    server.addEventListener("message", (ev) => {
      const d = decodeHostMessage(new Uint8Array(ev.data as ArrayBuffer), "to_host");
      if (d.ok) onFrame(d.message, reply);
    });
    if (hello)
      reply({
        type: "hello",
        protocol: HOST_PROTOCOL_VERSION,
        model: "fake.gguf",
        n_layer: 2,
        n_ctx: 4096,
        pool_bytes: 1 << 30,
        bytes_per_entry: 64,
        protocol_minor: 2,
      });
    return new Response(null, { status: 101, webSocket: client });
  };
}

/** How `p` settled: its error, if any (a hang is the test's timeout). */
async function settle(p: Promise<unknown>): Promise<{ error?: unknown }> {
  try {
    await p;
    return {};
  } catch (error) {
    return { error };
  }
}

describe("edge token", () => {
  it("is the HMAC the host verifies (gpu-host/src/host/auth.ts): expiry, tenant, host and nonce", async () => {
    // the same token computed with node:crypto by gpu-host's makeEdgeToken
    expect(
      await edgeToken(SECRET, "acme.eu", "gpu-a:8790", 1_800_000_000_000, "0123456789abcdef0123456789abcdef"),
    ).toBe(
      "pkv2.1800000120.0123456789abcdef0123456789abcdef.91f4447acea8105df311ec9a03001a35ad83349346b00925753e49ff2e4bc32c.acme.eu",
    );
    expect(normaliseHost("GPU-A:443")).toBe("gpu-a");
    // a fresh nonce each time: no two upgrades carry the same token
    const [a, b] = await Promise.all([edgeToken(SECRET, "t", "h:1"), edgeToken(SECRET, "t", "h:1")]);
    expect(a).not.toBe(b);
  });

  it("is minted per link, for the link's tenant and the host it dials", async () => {
    const url = "http://token-host:8790";
    const auth = route(
      url,
      scripted(() => {}),
    );
    (await HostLink.connect(url, SECRET, "acme.eu", SHORT)).close();
    (await HostLink.connect(url, SECRET, "other", SHORT)).close();
    expect(auth).toHaveLength(2);
    expect(auth[0]).toMatch(/^Bearer pkv2\.\d+\.[0-9a-f]{32}\.[0-9a-f]{64}\.acme\.eu$/);
    expect(auth[1]).toMatch(/\.other$/);
    // the MAC covers the host: recompute it for token-host:8790 with the token's own expiry and nonce
    const [, expiry, nonce] = auth[0]!.slice("Bearer ".length).split(".");
    const again = await edgeToken(SECRET, "acme.eu", "token-host:8790", Number(expiry) * 1000 - 120_000, nonce);
    expect(`Bearer ${again}`).toBe(auth[0]);
  });

  it("a 401 from the host is HostGone naming the host's reason", async () => {
    const url = "http://refusing-host";
    route(url, async () => new Response("this edge token has the format of pyramidkv before 0.8.0", { status: 401 }));
    const { error } = await settle(HostLink.connect(url, SECRET, "t", SHORT));
    expect(error).toBeInstanceOf(HostGone);
    expect((error as Error).message).toMatch(/refused the edge token \(401: this edge token has the format/);
  });
});

describe("deadlines", () => {
  it("a host that accepts and never answers the upgrade: the connect ends within its deadline", async () => {
    const url = "http://silent-host";
    let aborted = false;
    route(
      url,
      silent(() => (aborted = true)),
    );
    const { error } = await settle(HostLink.connect(url, SECRET, "t", SHORT));
    expect(error).toBeInstanceOf(HostGone);
    expect((error as HostGone).status).toBe(503);
    expect((error as Error).message).toMatch(/no connection and hello within 300 ms/);
    expect(aborted).toBe(true); // the upgrade was given up, not left running
  });

  it("a host that upgrades and never says hello: the connect ends within its deadline", async () => {
    const url = "http://mute-host";
    route(
      url,
      scripted(() => {}, false),
    );
    const { error } = await settle(HostLink.connect(url, SECRET, "t", SHORT));
    expect(error).toBeInstanceOf(HostGone);
    expect((error as Error).message).toMatch(/within 300 ms/);
  });

  it("a call the host never answers fails after the idle deadline and closes the link", async () => {
    const url = "http://stuck-host";
    const seen: string[] = [];
    route(
      url,
      scripted((m) => seen.push(m.type)),
    );
    const link = await HostLink.connect(url, SECRET, "t", SHORT);
    const { error } = await settle(link.call({ type: "stats" }, "stats_result"));
    expect(seen).toEqual(["stats"]);
    expect(error).toBeInstanceOf(HostGone);
    expect((error as Error).message).toMatch(/no answer from the host for 300 ms/);
    expect((error as HostGone).byEdge).toBe(false); // reported: routing marks the host down
    expect(link.alive).toBe(false);
  });

  it("progress frames keep a long call alive: only silence counts", async () => {
    const url = "http://slow-host";
    route(
      url,
      scripted((m, reply) => {
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
      }),
    );
    const link = await HostLink.connect(url, SECRET, "t", SHORT);
    const progress: number[] = [];
    const done = await link.call({ type: "append", session: "s", text: "long" }, "appended", (f) => {
      if (f.type === "progress") progress.push(f.done);
    });
    expect(done.tokens_seen).toBe(80);
    expect(progress).toHaveLength(8);
    link.close();
  });

  it("connectTo a host that never answers: 503 host_unavailable and the host marked down", async () => {
    const url = "http://silent-registered";
    await addHost(url);
    try {
      route(url, silent());
      const vars = { ...env, PKV_HOST_CONNECT_TIMEOUT_MS: "300" };
      const { error } = await settle(connectTo(vars, url, "t"));
      expect(error).toBeInstanceOf(ApiError);
      expect((error as ApiError).status).toBe(503);
      expect((error as ApiError).code).toBe("host_unavailable");
      const entry = await hostEntry(url);
      expect(entry.down_until).toBeGreaterThan(Date.now());
      expect(entry.last_error).toMatch(/within 300 ms/);
    } finally {
      await removeHost(url);
    }
  });
});
