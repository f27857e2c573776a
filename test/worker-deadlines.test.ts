// End to end, the edge's deadlines and credentials (issue 12, items 5 and 9) through the real
// edge worker (Miniflare): its tenant- and host-bound token is accepted by a real GPU host; a host
// that accepts TCP and never answers, and one that says hello and then never answers a call, end
// the request with a retryable 503 (Retry-After) within the deadlines set by the worker's vars,
// and the host is marked down for routing. The silent hosts are small servers in this process.
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { createServer, type Server } from "node:http";
import { createServer as createTcpServer, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";

import {
  decodeHostMessage,
  encodeHostMessage,
  type FromHostMessage,
  HOST_PROTOCOL_VERSION,
  type ToHostMessage,
} from "@pyramidkv/shared";
import { type Stack, startStack } from "@pyramidkv/gpu-host/stack";
import { type WebSocket, WebSocketServer } from "ws";

const CONNECT_MS = 4000;
const IDLE_MS = 8000;
/** a request that the deadlines do not end waits for ever: give up on it (and fail) long after them */
const GIVE_UP_MS = 90_000;

let stack: Stack;
let dir: string;
let key: string;
const closers: (() => Promise<void>)[] = [];

before(async () => {
  dir = mkdtempSync(join(tmpdir(), "pkv-deadlines-"));
  stack = await startStack({
    hosts: 1,
    kvPoolBytes: 64 << 20,
    persistDir: join(dir, "state"),
    threads: 2,
    vars: { PKV_HOST_CONNECT_TIMEOUT_MS: String(CONNECT_MS), PKV_HOST_IDLE_TIMEOUT_MS: String(IDLE_MS) },
  });
  await stack.admin.setTenant("acme.eu", { requests_per_minute: 1000, max_sessions: 8 });
  key = await stack.admin.createKey("acme.eu");
});

after(async () => {
  for (const close of closers) await close().catch(() => {});
  await stack?.stop();
  rmSync(dir, { recursive: true, force: true });
});

function api(method: string, path: string, body?: unknown): Promise<Response> {
  return fetch(`${stack.worker.url}${path}`, {
    method,
    headers: { authorization: `Bearer ${key}`, "content-type": "application/json" },
    ...(body === undefined ? {} : { body: JSON.stringify(body) }),
    signal: AbortSignal.timeout(GIVE_UP_MS),
  });
}

async function hostState(url: string): Promise<{ down_until: number; last_error?: string }> {
  const h = (await stack.admin.hosts()).data.find((x) => x.url === url);
  assert.ok(h, `${url} is registered`);
  return h as unknown as { down_until: number; last_error?: string };
}

/** What a healthy host answers. */
function answer(m: ToHostMessage, reply: (f: FromHostMessage) => void) {
  switch (m.type) {
    case "set_tenant":
      return reply({
        type: "tenant_set",
        id: m.id,
        tenant: m.tenant,
        kv_quota_bytes: 0,
        max_sessions: 1000,
        policy: "refuse",
      });
    case "open_session":
      return reply({
        type: "opened",
        id: m.id,
        session: m.session,
        method: m.method ?? "pyramidkv",
        budget: m.budget ?? 128,
        reserved_bytes: 0,
      });
    case "append":
      if (m.more) return reply({ type: "buffered", id: m.id, session: m.session, buffered_bytes: 0 });
      return reply({ type: "appended", id: m.id, session: m.session, tokens_seen: 10, kv_bytes: 640 });
    case "generate":
      reply({ type: "token", id: m.id, session: m.session, tokens: [1], text: "Hi" });
      return reply({ type: "done", id: m.id, session: m.session, reason: "end", new_tokens: 1, text: "Hi" });
    case "stats":
      return reply({
        type: "stats_result",
        id: m.id,
        tenant: m.tenant,
        ...(m.session
          ? { session: m.session, tokens_seen: 10, kv_bytes: 640, full_kv_bytes: 6400 }
          : { kv_used_bytes: 640, kv_quota_bytes: 0, sessions: 1, offloaded: 0 }),
      });
    case "close":
      return reply({ type: "closed", id: m.id, session: m.session });
    case "cancel":
      return reply({ type: "cancelled", id: m.id, session: m.session });
  }
}

interface FakeHost {
  url: string;
  port: number;
  /** request types received */
  seen: string[];
  /** connections the edge closed */
  closed: number;
  close(): Promise<void>;
}

/** A host speaking the protocol over ws (the edge's token checked for shape and tenant), never answering `silent`. */
async function fakeHost(silent: string[] = [], port = 0): Promise<FakeHost> {
  const wss = new WebSocketServer({ noServer: true });
  const sockets = new Set<WebSocket>();
  const seen: string[] = [];
  const self = { closed: 0 };
  const http: Server = createServer((_req, res) => {
    res.writeHead(200, { "content-type": "application/json" });
    res.end(
      JSON.stringify({
        status: "ok",
        protocol: HOST_PROTOCOL_VERSION,
        model: "fake.gguf",
        n_ctx: 4096,
        pool_bytes: 1 << 40,
        kv_used_bytes: 0,
      }),
    );
  });
  http.on("upgrade", (req, socket, head) => {
    if (!/^Bearer pkv2\.\d+\.[0-9a-f]{32}\.[0-9a-f]{64}\.acme\.eu$/.test(req.headers.authorization ?? "")) {
      socket.end("HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n");
      return;
    }
    wss.handleUpgrade(req, socket, head, (ws) => {
      sockets.add(ws);
      ws.on("close", () => {
        sockets.delete(ws);
        self.closed++;
      });
      const reply = (f: FromHostMessage) => ws.send(encodeHostMessage(f));
      ws.on("message", (data: Buffer) => {
        const d = decodeHostMessage(new Uint8Array(data), "to_host");
        if (!d.ok) return;
        seen.push(d.message.type);
        if (!silent.includes(d.message.type)) answer(d.message, reply);
      });
      reply({
        type: "hello",
        protocol: HOST_PROTOCOL_VERSION,
        model: "fake.gguf",
        n_layer: 2,
        n_ctx: 4096,
        pool_bytes: 1 << 40,
        bytes_per_entry: 64,
        protocol_minor: 2,
      });
    });
  });
  await new Promise<void>((r) => http.listen(port, "127.0.0.1", r));
  const bound = (http.address() as { port: number }).port;
  return {
    url: `http://127.0.0.1:${bound}`,
    port: bound,
    seen,
    get closed() {
      return self.closed;
    },
    close: () =>
      new Promise<void>((r) => {
        for (const ws of sockets) ws.terminate();
        http.closeAllConnections();
        http.close(() => r());
      }),
  };
}

/** A server on `port` that accepts every TCP connection and never sends a byte. */
async function silentTcp(port: number): Promise<{ accepted: () => number; close: () => Promise<void> }> {
  const sockets = new Set<Socket>();
  let accepted = 0;
  const srv = createTcpServer((s) => {
    accepted++;
    sockets.add(s);
    s.on("error", () => {});
    s.on("close", () => sockets.delete(s));
  });
  await new Promise<void>((r) => srv.listen(port, "127.0.0.1", r));
  return {
    accepted: () => accepted,
    close: () =>
      new Promise<void>((r) => {
        for (const s of sockets) s.destroy();
        srv.close(() => r());
      }),
  };
}

async function until(check: () => boolean | Promise<boolean>, what: string, ms = 30_000): Promise<void> {
  const end = Date.now() + ms;
  while (!(await check())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

test("the edge's token (tenant 'acme.eu', this host) is accepted by a real GPU host", {
  timeout: 300_000,
}, async () => {
  const r = await api("POST", "/v1/chat/completions", {
    model: "default",
    max_tokens: 2,
    messages: [{ role: "user", content: "Hi" }],
  });
  assert.equal(r.status, 200, await r.clone().text());
  const metrics = await stack.metrics(stack.hosts[0]!);
  assert.match(metrics, /pkv_host_generated_tokens_total\{tenant="acme\.eu"\} [1-9]/);
});

test("a host that accepts TCP and never answers: a session's next message is a 503 with Retry-After within the connect deadline, the host marked down", {
  timeout: 300_000,
}, async () => {
  const host = await fakeHost();
  closers.push(() => host.close());
  await stack.admin.setHosts([host.url]);
  const made = await api("POST", "/v1/sessions", { document: "The meeting is on Tuesday." });
  assert.equal(made.status, 201, await made.clone().text());
  const { id } = (await made.json()) as { id: string };
  // The host goes silent: the same address accepts connections and says nothing.
  await host.close();
  const tcp = await silentTcp(host.port);
  closers.push(() => tcp.close());
  const r = await api("POST", `/v1/sessions/${id}/messages`, {
    content: "When is the meeting?",
    stream: false,
    max_tokens: 4,
  });
  assert.ok(tcp.accepted() >= 1, "the edge reached the silent host");
  assert.equal(r.status, 503, await r.clone().text());
  assert.ok(Number(r.headers.get("retry-after")) > 0, "Retry-After");
  const e = ((await r.json()) as { error: { code: string; message: string } }).error;
  assert.equal(e.code, "host_unavailable");
  assert.match(e.message, new RegExp(`within ${CONNECT_MS} ms`));
  const state = await hostState(host.url);
  assert.ok(state.down_until > Date.now(), "marked down for routing");
});

test("a host that says hello and never answers a call: 503 with Retry-After after the idle deadline, marked down, the link closed", {
  timeout: 300_000,
}, async () => {
  const host = await fakeHost(["generate"]);
  closers.push(() => host.close());
  await stack.admin.setHosts([host.url]);
  const r = await api("POST", "/v1/chat/completions", {
    model: "default",
    max_tokens: 4,
    messages: [{ role: "user", content: "Hi" }],
  });
  assert.ok(host.seen.includes("generate"), `the host got the generate (${host.seen.join(", ")})`);
  assert.equal(r.status, 503, await r.clone().text());
  assert.ok(Number(r.headers.get("retry-after")) > 0, "Retry-After");
  const e = ((await r.json()) as { error: { code: string; message: string } }).error;
  assert.equal(e.code, "host_unavailable");
  assert.match(e.message, new RegExp(`no answer from the host for ${IDLE_MS} ms`));
  assert.ok((await hostState(host.url)).down_until > Date.now(), "marked down for routing");
  await until(() => host.closed >= 1, "the edge to close the link (cancelling the work on the host)");
});
