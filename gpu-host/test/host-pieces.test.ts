// Host protocol v2: an append sent in pieces (more: true) is buffered, acknowledged piece by piece
// and prefilled as one engine append, so the session is exactly the one-shot session; a closed
// connection cancels its generation.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { expectType, HostClient, startTestHost } from "./host-client.js";

let host: Awaited<ReturnType<typeof startTestHost>>;

before(async () => {
  host = await startTestHost({}, ["--kv-pool-bytes", String(64 << 20)]);
});
after(async () => {
  await host.stop();
});

const TEXT =
  "The lighthouse keeper counted ships every night. On Tuesday he saw nine ships, and on Friday he saw four ships. ".repeat(
    3,
  );

test("pieces (more: true) are acknowledged with 'buffered' and prefill exactly like one append", {
  timeout: 60_000,
}, async () => {
  const c = await HostClient.connect(host.url);
  for (const s of ["whole", "pieces"])
    expectType(await c.call({ type: "open_session", tenant: "t", session: s, budget: 64 }), "opened");
  const whole = expectType(await c.call({ type: "append", tenant: "t", session: "whole", text: TEXT }), "appended");
  const cuts = [0, 101, 250, TEXT.length];
  let buffered = 0;
  for (let i = 0; i + 1 < cuts.length - 1; i++) {
    const piece = TEXT.slice(cuts[i], cuts[i + 1]);
    const ack = expectType(
      await c.call({ type: "append", tenant: "t", session: "pieces", text: piece, more: true }),
      "buffered",
    );
    buffered += Buffer.byteLength(piece);
    assert.equal(ack.buffered_bytes, buffered);
  }
  const frames = await c.request({ type: "append", tenant: "t", session: "pieces", text: TEXT.slice(cuts[2]) });
  const last = expectType(frames[frames.length - 1]!, "appended");
  assert.equal(last.tokens_seen, whole.tokens_seen);
  assert.equal(last.kv_bytes, whole.kv_bytes);
  for (const s of ["whole", "pieces"])
    expectType(
      await c.call({ type: "append", tenant: "t", session: s, text: "How many ships on Friday?", chat: true }),
      "appended",
    );
  const a = expectType(await c.call({ type: "generate", tenant: "t", session: "whole", max_tokens: 12 }), "done");
  const b = expectType(await c.call({ type: "generate", tenant: "t", session: "pieces", max_tokens: 12 }), "done");
  assert.equal(b.text, a.text);
  // A piece with tokens is invalid; buffered pieces over the bound are too_large and dropped.
  assert.equal(
    expectType(await c.call({ type: "append", tenant: "t", session: "pieces", tokens: [1], more: true }), "error").code,
    "invalid",
  );
  expectType(
    await c.call({ type: "append", tenant: "t", session: "pieces", text: "x".repeat(1000), more: true }),
    "buffered",
  );
  const big = expectType(
    await c.call({ type: "append", tenant: "t", session: "pieces", text: "y".repeat(16 << 20), more: true }),
    "error",
  );
  assert.equal(big.code, "too_large");
  assert.match(big.message, /16777216/);
  const again = expectType(
    await c.call({ type: "append", tenant: "t", session: "pieces", text: "z", more: true }),
    "buffered",
  );
  assert.equal(again.buffered_bytes, 1, "the dropped pieces are gone");
  c.close();
});

test("closing the connection cancels its generation", { timeout: 60_000 }, async () => {
  const prompt = "Write the numbers from 1 to 300, separated by commas.";
  const c = await HostClient.connect(host.url);
  const d = await HostClient.connect(host.url);
  // Each session's turn (append, generate) is one connection's: "cut" is d's.
  for (const [s, conn] of [
    ["free", c],
    ["cut", d],
  ] as const) {
    expectType(await conn.call({ type: "open_session", tenant: "t", session: s, budget: 64 }), "opened");
    expectType(await conn.call({ type: "append", tenant: "t", session: s, text: prompt, chat: true }), "appended");
  }
  const base = expectType(await c.call({ type: "stats", tenant: "t", session: "cut" }), "stats_result").tokens_seen!;
  const free = expectType(await c.call({ type: "generate", tenant: "t", session: "free", max_tokens: 150 }), "done");
  assert.ok(free.new_tokens >= 60, `the uncancelled generation runs long (${free.new_tokens} tokens)`);
  await new Promise<void>((resolve) => {
    void d.request({ type: "generate", tenant: "t", session: "cut", max_tokens: 150 }, (f) => {
      if (f.type === "token") {
        d.close();
        resolve();
      }
    });
  });
  // The closed connection's turn ends once the host sees the close: until then session_busy.
  let next = await c.call({ type: "generate", tenant: "t", session: "cut", max_tokens: 1 });
  for (let i = 0; i < 600 && next.type === "error" && next.code === "session_busy"; i++) {
    await new Promise((r) => setTimeout(r, 50));
    next = await c.call({ type: "generate", tenant: "t", session: "cut", max_tokens: 1 });
  }
  expectType(next, "done");
  const seen = expectType(await c.call({ type: "stats", tenant: "t", session: "cut" }), "stats_result").tokens_seen!;
  assert.ok(seen - base < free.new_tokens, `cancelled after ${seen - base} tokens, uncancelled ${free.new_tokens}`);
  c.close();
});
