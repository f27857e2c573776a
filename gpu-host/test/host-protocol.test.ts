// The host's doors: its HTTP port takes no WebSocket (the host dials the edge; edge-link.ts);
// malformed, oversized and unknown frames on a channel get error frames while the host keeps
// serving, /health and /metrics answer.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { encodeMsgpack, HOST_MAX_FRAME_BYTES } from "@pyramidkv/shared";
import { WebSocket } from "ws";

import { expectType, HostClient, scrape, startTestHost } from "./host-client.js";

let host: Awaited<ReturnType<typeof startTestHost>>;

before(async () => {
  host = await startTestHost({}, ["--kv-pool-bytes", String(32 << 20)]);
});
after(async () => {
  await host.stop();
});

function upgradeStatus(url: string, headers: Record<string, string>): Promise<number> {
  return new Promise((resolve) => {
    const ws = new WebSocket(url, { headers });
    ws.on("unexpected-response", (_req, res) => resolve(res.statusCode ?? 0));
    ws.on("open", () => {
      ws.close();
      resolve(101);
    });
    ws.on("error", () => resolve(-1));
  });
}

test("the host's HTTP port accepts no WebSocket: nothing listens for the edge on the GPU box", {
  timeout: 10_000,
}, async () => {
  const url = `ws://127.0.0.1:${host.address.port}`;
  assert.notEqual(await upgradeStatus(url, {}), 101);
  assert.notEqual(await upgradeStatus(`${url}/hosts/connect`, { authorization: "Bearer x" }), 101);
  // and the host is serving, through its own socket to the edge
  const c = await HostClient.connect(host.url);
  assert.equal(expectType(await c.call({ type: "stats", tenant: "t" }), "stats_result").tenant, "t");
  c.close();
});

test("malformed, unknown, invalid and oversized frames get error frames; the host keeps serving", {
  timeout: 30_000,
}, async () => {
  const c = await HostClient.connect(host.url);
  const cases: [Uint8Array, string, boolean][] = [
    [new Uint8Array([0xc1]), "bad_frame", true],
    [new Uint8Array([0x92, 0x01]), "bad_frame", true],
    [encodeMsgpack([1, 2]), "invalid", true],
    [encodeMsgpack({ type: "explode", id: 1 }), "unknown_type", true],
    [encodeMsgpack({ type: "append", id: 7, session: "x" }), "invalid", true],
    [encodeMsgpack({ type: "open_session", id: 8, tenant: "t", session: "x", budget: "big" }), "invalid", true],
    [encodeMsgpack({ type: "open_session", id: 9, tenant: "../etc", session: "x" }), "invalid", true],
    [encodeMsgpack({ type: "done", id: 10, session: "x", reason: "end", new_tokens: 1, text: "" }), "invalid", true],
    [new Uint8Array(HOST_MAX_FRAME_BYTES + 10), "too_large", true],
    // a control message belongs on channel 0, never on a request's channel
    [encodeMsgpack({ type: "channel_open", ch: 9, tenant: "t" }), "unknown_type", true],
  ];
  for (const [bytes, code] of cases) {
    const got = await c.raw(bytes);
    assert.equal(expectType(got, "error").code, code, JSON.stringify(got));
  }
  const err = c.unsolicited.find((m) => m.type === "error" && "id" in m && m.id === 7) as
    | { id?: number; session?: string }
    | undefined;
  assert.deepEqual(err && { id: err.id, session: err.session }, { id: 7, session: "x" });
  const bad = expectType(await c.call({ type: "open_session", tenant: "t", session: "m", method: "nope" }), "error");
  assert.equal(bad.code, "invalid");
  assert.match(bad.message, /method 'nope' is not one of full, /, "names the field, the value and the accepted ones");
  // Still alive and serving.
  expectType(await c.call({ type: "open_session", tenant: "t", session: "ok", budget: 32 }), "opened");
  expectType(await c.call({ type: "append", tenant: "t", session: "ok", text: "Hello!", chat: true }), "appended");
  const done = expectType(await c.call({ type: "generate", tenant: "t", session: "ok", max_tokens: 3 }), "done");
  assert.equal(done.new_tokens > 0, true);
  const health = await fetch(`http://127.0.0.1:${host.address.port}/health`);
  assert.equal(health.status, 200);
  assert.equal(((await health.json()) as { status: string }).status, "ok");
  const metrics = await scrape(host.address.port);
  for (const name of [
    "pkv_host_sessions",
    "pkv_host_kv_pool_bytes",
    "pkv_host_tenant_kv_bytes",
    "pkv_host_quota_refusals_total",
    "pkv_host_generated_tokens_total",
    "pkv_host_queue_length",
    "pkv_host_engine_restarts_total",
    "pkv_host_request_seconds_bucket",
  ]) {
    assert.ok(metrics.includes(name), name);
  }
  c.close();
});

test("cancel stops a running generation: done with reason cancelled, then cancelled", { timeout: 30_000 }, async () => {
  const c = await HostClient.connect(host.url);
  expectType(await c.call({ type: "open_session", tenant: "t", session: "cx", budget: 32 }), "opened");
  expectType(
    await c.call({ type: "append", tenant: "t", session: "cx", text: "Count from one to five hundred.", chat: true }),
    "appended",
  );
  let cancel: Promise<unknown> | undefined;
  const frames = await c.request({ type: "generate", tenant: "t", session: "cx", max_tokens: 500 }, (f) => {
    if (f.type === "token" && !cancel) cancel = c.call({ type: "cancel", tenant: "t", session: "cx" });
  });
  const done = expectType(frames[frames.length - 1]!, "done");
  assert.ok(done.reason === "cancelled" || done.reason === "end", done.reason);
  assert.equal(expectType((await cancel) as never, "cancelled").session, "cx");
  // The session is usable afterwards.
  expectType(await c.call({ type: "generate", tenant: "t", session: "cx", max_tokens: 2 }), "done");
  c.close();
});
