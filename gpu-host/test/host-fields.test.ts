// Pure parts of host protocol 2.1, without an engine: logprobs through the coalescing of a slow
// channel, the bound on a coalesced frame, --kv-type and --ctx-size, the entry size of each KV
// type, the admission bound of messages, request ids in log lines.
import assert from "node:assert/strict";
import { test } from "node:test";

import { decodeHostMessage, type FromHostMessage, HOST_MAX_FRAME_BYTES, splitChannelFrame } from "@pyramidkv/shared";

import { parseHostConfig } from "../src/host/config.js";
import { requestTag } from "../src/host/log.js";
import { hostToken } from "../src/host/direct-edge.js";
import { COALESCED_FLUSH_BYTES, Channel } from "../src/host/edge-link.js";
import { appendTokenBound, bytesPerEntryOf, measuredBytesPerEntry } from "../src/host/tenants.js";

const ENV = { PKV_EDGE_URL: "http://127.0.0.1:9", PKV_HOST_TOKEN: hostToken("h0") };

/** A channel (edge-link.ts) on a fake socket whose unsent bytes the test sets. */
function fakeSocket() {
  const sent: FromHostMessage[] = [];
  const sizes: number[] = [];
  const ws = { readyState: 1, bufferedAmount: 0 };
  const config = parseHostConfig([], ENV);
  const socket = {
    ws,
    options: config,
    sendRaw(b: Uint8Array) {
      const split = splitChannelFrame(b)!;
      assert.equal(split.ch, 7);
      const d = decodeHostMessage(split.payload, "from_host");
      if (!d.ok) throw new Error(d.error);
      sent.push(d.message);
      sizes.push(split.payload.length);
      return true;
    },
    drop() {},
  };
  return { ws, sent, sizes, conn: new Channel(socket, 7, "t") };
}

const lp = (i: number, top = 0) => ({
  logprob: -i - 0.5,
  bytes: new TextEncoder().encode(`t${i}`),
  ...(top > 0
    ? {
        top_logprobs: Array.from({ length: top }, (_, j) => ({
          token: j,
          bytes: new TextEncoder().encode(`alt${j}`),
          logprob: -i - j,
        })),
      }
    : {}),
});

test("coalesced tokens keep one logprobs map per token, in order", () => {
  const { ws, sent, conn } = fakeSocket();
  const config = parseHostConfig([], ENV);
  conn.sendToken(1, "s", 10, "a", lp(0));
  ws.bufferedAmount = config.highWaterBytes + 1;
  conn.sendToken(1, "s", 11, "b", lp(1));
  conn.sendToken(1, "s", 12, "c", lp(2));
  conn.sendToken(2, "s2", 20, "x"); // another request, without logprobs
  conn.sendToken(2, "s2", 21, "y");
  conn.send({ type: "done", id: 1, session: "s", reason: "length", new_tokens: 3, text: "abc" });
  conn.send({ type: "done", id: 2, session: "s2", reason: "length", new_tokens: 2, text: "xy" });
  const tokens = sent.filter((m) => m.type === "token") as Extract<FromHostMessage, { type: "token" }>[];
  assert.deepEqual(
    tokens.map((t) => [t.id, t.tokens, t.text, t.logprobs?.map((l) => l.logprob)]),
    [
      [1, [10], "a", [-0.5]],
      [1, [11, 12], "bc", [-1.5, -2.5]],
      [2, [20, 21], "xy", undefined],
    ],
  );
  assert.deepEqual(
    tokens[1]!.logprobs!.map((l) => new TextDecoder().decode(l.bytes as Uint8Array)),
    ["t1", "t2"],
  );
  conn.stopFlushing();
});

test("a coalesced frame is sent once it reaches COALESCED_FLUSH_BYTES, far below the frame limit", () => {
  const { ws, sent, sizes, conn } = fakeSocket();
  const config = parseHostConfig([], ENV);
  ws.bufferedAmount = config.highWaterBytes + 1; // never drains
  const n = 5000;
  for (let i = 0; i < n; i++) conn.sendToken(1, "s", i, "word ", lp(i, 20));
  assert.ok(sent.length >= 2, `flushed ${sent.length} frames while the socket stayed full`);
  assert.ok(Math.max(...sizes) <= 2 * COALESCED_FLUSH_BYTES && 2 * COALESCED_FLUSH_BYTES < HOST_MAX_FRAME_BYTES);
  conn.send({ type: "done", id: 1, session: "s", reason: "length", new_tokens: n, text: "" });
  const tokens = sent.filter((m) => m.type === "token") as Extract<FromHostMessage, { type: "token" }>[];
  const ids = tokens.flatMap((t) => t.tokens);
  assert.deepEqual(
    ids,
    Array.from({ length: n }, (_, i) => i),
    "every token once, in order",
  );
  assert.deepEqual(
    tokens.flatMap((t) => t.logprobs!.map((l) => l.logprob)),
    ids.map((i) => -i - 0.5),
  );
  conn.stopFlushing();
});

test("config: --kv-type and --ctx-size (and their variables), errors naming the flag and the choices", () => {
  const c = parseHostConfig(["--kv-type", "q4_0", "--ctx-size", "512"], ENV);
  assert.deepEqual([c.kvType, c.ctxSize], ["q4_0", 512]);
  const env = parseHostConfig([], { ...ENV, PKV_KV_TYPE: "q8_0", PKV_CTX_SIZE: "64" });
  assert.deepEqual([env.kvType, env.ctxSize], ["q8_0", 64]);
  assert.deepEqual([parseHostConfig([], ENV).kvType, parseHostConfig([], ENV).ctxSize], [undefined, undefined]);
  assert.throws(() => parseHostConfig(["--kv-type", "q5_1"], ENV), /--kv-type: 'q5_1' is not one of f16, q8_0, q4_0/);
  assert.throws(() => parseHostConfig(["--ctx-size", "99999999"], ENV), /--ctx-size: '99999999'/);
});

test("entry bytes per KV type: ggml's blocks before a measurement, the engine's stats after", () => {
  // SmolLM2-135M: 3 KV heads x 64 dims: f16 768 bytes; q8_0 2 x 3 x 2 blocks x 34; q4_0 x 18.
  assert.equal(bytesPerEntryOf(768, "f16"), 768);
  assert.equal(bytesPerEntryOf(768, "q8_0"), 2 * 3 * 2 * 34);
  assert.equal(bytesPerEntryOf(768, "q4_0"), 2 * 3 * 2 * 18);
  assert.equal(measuredBytesPerEntry({ kv_bytes: 3 * 408 * 10, layer_kv_lengths: [10, 10, 10] }, 3), 408);
  assert.equal(measuredBytesPerEntry({ full_kv_bytes: 768 * 30 * 5, tokens_seen: 5 }, 30), 768);
  assert.equal(measuredBytesPerEntry({ kv_bytes: 0, layer_kv_lengths: [0, 0] }, 2), 0);
});

test("the admission bound of messages covers their text and the template around each", () => {
  const messages = [
    { role: "system", content: "Be brief." },
    { role: "user", content: "héllo" },
  ];
  const bound = appendTokenBound(undefined, undefined, undefined, messages);
  const text = Buffer.byteLength("systemBe brief.userhéllo", "utf8");
  assert.ok(bound >= text + 2 * 16, String(bound));
  assert.ok(appendTokenBound(undefined, undefined, undefined, [...messages, { role: "user", content: "x" }]) > bound);
});

test("request tags: the id in brackets, control characters replaced, length bounded", () => {
  assert.equal(requestTag(undefined), "");
  assert.equal(requestTag(""), "");
  assert.equal(requestTag("abc-123"), "[abc-123] ");
  assert.equal(requestTag("a\r\nb\x7f"), "[a??b?] ");
  assert.equal(requestTag("x".repeat(1000)).length, 128 + 3);
});
