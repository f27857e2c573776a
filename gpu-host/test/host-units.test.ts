// Pure parts of the host, without an engine: fair scheduling, the admission arithmetic, config.
import assert from "node:assert/strict";
import { test } from "node:test";

import { parseHostConfig, parseTenants } from "../src/host/config.js";
import { hostToken } from "../src/host/direct-edge.js";
import { FairScheduler } from "../src/host/scheduler.js";
import {
  appendTokenBound,
  largestBudgetThatFits,
  openReservationBytes,
  prefillPeakBytes,
  promptTokenBound,
} from "../src/host/tenants.js";

const EDGE_ENV = { PKV_EDGE_URL: "http://127.0.0.1:9", PKV_HOST_TOKEN: hostToken("h0") };

test("the scheduler serves tenants round-robin: many queued jobs of one cannot starve another", async () => {
  const s = new FairScheduler({ prefill: 1, decode: 8 });
  const order: string[] = [];
  let release!: () => void;
  const gate = new Promise<void>((r) => (release = r));
  const jobs: Promise<void>[] = [];
  const job = (tenant: string, name: string) =>
    jobs.push(
      s.run(tenant, "prefill", async () => {
        order.push(name);
        await gate;
      }).promise,
    );
  for (let i = 0; i < 5; i++) job("greedy", `g${i}`);
  job("polite", "p0");
  job("polite", "p1");
  assert.equal(s.queued("prefill"), 6);
  release();
  await Promise.all(jobs);
  // not g0..g4 then p0, p1; and polite, never served yet, goes before greedy, served just now
  assert.deepEqual(order, ["g0", "p0", "g1", "p1", "g2", "g3", "g4"]);
});

test("a queued job can be aborted; a running one cannot", async () => {
  const s = new FairScheduler({ prefill: 1, decode: 1 });
  let release!: () => void;
  const running = s.run("a", "prefill", () => new Promise<void>((r) => (release = r)));
  const queued = s.run("b", "prefill", async () => "ran");
  assert.equal(running.abort(new Error("x")), false);
  assert.equal(queued.abort(new Error("aborted")), true);
  await assert.rejects(queued.promise, /aborted/);
  release();
  await running.promise;
});

test("admission arithmetic: peak = (budget + min(prompt, chunk)) entries per layer", () => {
  const g = { nLayer: 30, bytesPerEntry: 768, chunkSize: 512 };
  assert.equal(openReservationBytes(g, "pyramidkv", 128, 4000), 30 * (128 + 512) * 768);
  assert.equal(openReservationBytes(g, "pyramidkv", 128, 100), 30 * 228 * 768);
  assert.equal(openReservationBytes(g, "full", 128, 4000), 30 * 4000 * 768);
  assert.equal(prefillPeakBytes(g, 10_000), 30 * 512 * 768);
  assert.equal(prefillPeakBytes(g, 10_000, "pyramidkv", 8192), 30 * 512 * 768);
  assert.equal(largestBudgetThatFits(g, "pyramidkv", 32, 30 * 768 * 100, 8), 68);
  assert.equal(largestBudgetThatFits(g, "pyramidkv", 32, 30 * 768 * 40, 8), 0);
  // The method's own minimum from the engine's table: StreamingLLM needs room beyond its 4 sinks.
  assert.equal(largestBudgetThatFits(g, "pyramidkv", 32, 30 * 768 * 36, 2), 4);
  assert.equal(largestBudgetThatFits(g, "streamingllm", 32, 30 * 768 * 36, 2), 0);
  assert.ok(appendTokenBound("héllo", [1, 2], true) >= 6 + 2);
});

test("FullKV arithmetic: its prefill peak is every new token (up to the context left), its open reservation the prompt's bound", () => {
  const g = { nLayer: 30, bytesPerEntry: 768, chunkSize: 512 };
  // FullKV keeps every prefilled token: the chunk bounds nothing it holds.
  assert.equal(prefillPeakBytes(g, 3000, "full", 8192), 30 * 3000 * 768);
  assert.equal(prefillPeakBytes(g, 10_000, "full", 8192 - 1000), 30 * 7192 * 768, "no more than the context left");
  assert.equal(prefillPeakBytes(g, 10_000, "full", 0), 0);
  // open_session.prompt_bytes bounds the first append's tokens (plus its template), up to n_ctx.
  assert.equal(promptTokenBound(undefined, undefined, 8192), 0);
  assert.equal(promptTokenBound(32, undefined, 8192), 32);
  assert.ok(promptTokenBound(undefined, 1000, 8192) >= 1000);
  assert.ok(promptTokenBound(5000, 1000, 8192) >= 5000, "the larger of the two hints");
  assert.equal(promptTokenBound(undefined, 50_000, 8192), 8192);
  assert.equal(
    openReservationBytes(g, "full", 128, promptTokenBound(undefined, 12_210, 8192)),
    30 * 8192 * 768,
    "a 12 kB prompt may be up to the whole context",
  );
  assert.equal(
    openReservationBytes(g, "pyramidkv", 128, promptTokenBound(undefined, 12_210, 8192)),
    30 * (128 + 512) * 768,
  );
});

test("config: flags and env, tenants JSON with defaults, errors name the parameter", () => {
  const c = parseHostConfig(
    [
      "--port",
      "0",
      "--session-ttl-seconds",
      "60",
      "--tenants",
      '{"*": {"max_sessions": 5}, "a": {"kv_quota_bytes": 100, "policy": "auto", "max_stored_bytes": 9}}',
    ],
    { ...EDGE_ENV, PKV_IDLE_SECONDS: "7" },
  );
  assert.equal(c.listen, "127.0.0.1");
  assert.equal(c.idleMs, 7000);
  assert.deepEqual(c.tenants.a, {
    kvQuotaBytes: 100,
    maxSessions: 5,
    policy: "auto",
    sessionTtlS: 60,
    maxStoredBytes: 9,
  });
  assert.equal(c.defaultTenant.maxStoredBytes, 1 << 30);
  assert.throws(
    () => parseHostConfig(["--decode-lanes", "4", "--tenant-decode-lanes", "8"], EDGE_ENV),
    /--tenant-decode-lanes: 8 .* 1\.\.4/,
  );
  assert.equal(c.defaultTenant.maxSessions, 5);
  assert.throws(() => parseHostConfig([], {}), /--connect \(or PKV_EDGE_URL\): required/);
  assert.throws(
    () => parseHostConfig([], { PKV_EDGE_URL: "http://e" }),
    /--host-token \(or PKV_HOST_TOKEN\): required/,
  );
  assert.throws(
    () => parseHostConfig(["--host-token", "pkv2.abc"], { PKV_EDGE_URL: "http://e" }),
    /--host-token .*expected pkvh\.<name>\.<64 hex digits>/,
  );
  assert.throws(
    () => parseHostConfig(["--connect", "ftp://e"], EDGE_ENV),
    /--connect: scheme 'ftp:' .* http, https, ws, wss/,
  );
  assert.throws(() => parseHostConfig(["--connect", "nope"], EDGE_ENV), /--connect: 'nope' is not a URL/);
  assert.throws(() => parseHostConfig(["--heartbeat-seconds", "0"], EDGE_ENV), /--heartbeat-seconds: '0'/);
  assert.equal(parseHostConfig([], EDGE_ENV).drainMs, 10_000);
  assert.equal(parseHostConfig(["--drain-seconds", "90"], EDGE_ENV).drainMs, 90_000);
  const edge = parseHostConfig(["--connect", "https://pkv.example.dev/", "--heartbeat-seconds", "2"], EDGE_ENV);
  assert.deepEqual(
    [edge.connect, edge.heartbeatMs, edge.hostToken],
    ["https://pkv.example.dev", 2000, hostToken("h0")],
  );
  assert.throws(() => parseHostConfig(["--port", "70000"], EDGE_ENV), /--port: '70000'/);
  assert.throws(() => parseTenants('{"a/b": {}}'), /tenant name 'a\/b'/);
  assert.throws(() => parseTenants('{"a": {"policy": "maybe"}}'), /policy: 'maybe'/);
});

test("backpressure: a slow channel gets its tokens coalesced, in order, and is dropped past the bound (the socket stays)", async () => {
  const { Channel } = await import("../src/host/edge-link.js");
  const { decodeHostMessage, splitChannelFrame } = await import("@pyramidkv/shared");
  const sent: unknown[] = [];
  const fake = { readyState: 1, bufferedAmount: 0, terminated: false };
  const config = parseHostConfig([], EDGE_ENV);
  let dropped = 0;
  const socket = {
    ws: fake,
    options: config,
    sendRaw(b: Uint8Array) {
      const d = decodeHostMessage(splitChannelFrame(b)!.payload);
      sent.push(d.ok ? d.message : d);
      return true;
    },
    drop(c: InstanceType<typeof Channel>) {
      dropped++;
      c.closed = true;
    },
  };
  const conn = new Channel(socket, 3, "t");
  conn.sendToken(1, "s", 10, "a");
  fake.bufferedAmount = config.highWaterBytes + 1; // the client stopped reading
  conn.sendToken(1, "s", 11, "b");
  conn.sendToken(1, "s", 12, "c");
  assert.equal(sent.length, 1);
  conn.send({ type: "done", id: 1, session: "s", reason: "length", new_tokens: 3, text: "abc" }); // flushes first
  assert.deepEqual(
    sent.slice(1).map((m) => (m as { type: string }).type),
    ["token", "done"],
  );
  assert.deepEqual((sent[1] as { tokens: number[]; text: string }).tokens, [11, 12]);
  assert.equal((sent[1] as { text: string }).text, "bc");
  fake.bufferedAmount = config.maxBufferedBytes + 1;
  conn.send({ type: "cancelled", id: 2, session: "s" });
  assert.equal(dropped, 1, "the channel is dropped (channel_drop)");
  assert.equal(fake.terminated, false, "the socket and its other channels go on");
  assert.equal(conn.open, false);
  const before = sent.length;
  conn.send({ type: "cancelled", id: 3, session: "s" });
  assert.equal(sent.length, before, "nothing more on a dropped channel");
  conn.stopFlushing();
});
