// Sessions move between hosts through the edge's store (issue 13), on the real engine with the
// embedded model: a host drained, another host of the same model adopts its sessions from the
// edge's store and continues them exactly (greedy: the same tokens as an uninterrupted twin), a
// FullKV state over HOST_STATE_PART_BYTES travelling in parts both ways; a closed channel cancels
// its generation. One host runs at a time.
import assert from "node:assert/strict";
import { test } from "node:test";

import { HOST_STATE_PART_BYTES } from "@pyramidkv/shared";

import { DirectEdge } from "../src/host/direct-edge.js";
import { expectType, type HostClient, HostClient as Client, startTestHost } from "./host-client.js";

const POOL = ["--kv-pool-bytes", String(160 << 20)];
const DOC = "The quick brown fox jumps over the lazy dog near the river bank today. ".repeat(40);

async function turn(c: HostClient, session: string, text: string, maxTokens: number): Promise<string> {
  expectType(await c.call({ type: "append", tenant: "t", session, text, chat: true }), "appended");
  return expectType(
    await c.call({ type: "generate", tenant: "t", session, max_tokens: maxTokens, temperature: 0 }),
    "done",
  ).text;
}

test("a drained host's sessions continue on another host from the edge's store, exactly as an uninterrupted twin; > 8 MiB in parts", {
  timeout: 300_000,
}, async () => {
  const edge = await DirectEdge.start({ tokens: [] });
  try {
    const a = await startTestHost({}, POOL, { edge });
    const ca = await Client.connect(edge.url, { host: a.name });
    const sessions = [
      { id: "full", open: { method: "full" } },
      { id: "pyr", open: { method: "pyramidkv", budget: 64 } },
    ];
    const reference = new Map<string, string>();
    for (const s of sessions) {
      for (const id of [s.id, `${s.id}-twin`]) {
        expectType(await ca.call({ type: "open_session", tenant: "t", session: id, ...s.open }), "opened");
        await turn(ca, id, DOC, 4);
      }
      reference.set(s.id, await turn(ca, `${s.id}-twin`, "Go on.", 8)); // the twin, uninterrupted
    }
    const full = edge.puts.filter((p) => p.session === "full");
    assert.ok(
      full.length > 0 && full.every((p) => p.bytes > HOST_STATE_PART_BYTES && p.parts >= 2),
      JSON.stringify(full),
    );
    ca.close();
    await a.stop(); // drain: every session checkpointed to the edge, the socket closed
    const b = await startTestHost({}, POOL, { edge });
    const cb = await Client.connect(edge.url, { host: b.name });
    try {
      for (const s of sessions) {
        const moved = await turn(cb, s.id, "Go on.", 8);
        assert.equal(moved, reference.get(s.id), `${s.id}: the moved session's tokens are the twin's`);
      }
      const acks = edge.controls.filter((m) => m.type === "data_ack" && m.host === b.name);
      assert.ok(
        acks.some((m) => m.part === 1),
        "the FullKV state came to the new host in parts, each acknowledged",
      );
      assert.equal(b.metrics.restores.get({ tenant: "t" }) >= 2, true);
    } finally {
      cb.close();
      await b.stop();
    }
  } finally {
    await edge.close();
  }
});

test("a channel closed mid-generation cancels that generation; the session serves the next request", {
  timeout: 120_000,
}, async () => {
  const host = await startTestHost({}, POOL);
  try {
    const c = await Client.connect(host.url);
    expectType(await c.call({ type: "open_session", tenant: "t", session: "x", budget: 64 }), "opened");
    const prompt = expectType(
      await c.call({
        type: "append",
        tenant: "t",
        session: "x",
        text: "Write a long story about a lighthouse keeper and the sea.",
        chat: true,
      }),
      "appended",
    ).tokens_seen;
    let closed = false;
    void c.request({ type: "generate", tenant: "t", session: "x", max_tokens: 400 }, (f) => {
      if (f.type === "token" && !closed) {
        closed = true;
        c.ws.close(); // the request's client left
      }
    });
    for (let i = 0; i < 400 && !closed; i++) await new Promise((r) => setTimeout(r, 25));
    assert.ok(closed, "a token came");
    const d = await Client.connect(host.url);
    const done = expectType(await d.call({ type: "generate", tenant: "t", session: "x", max_tokens: 2 }), "done");
    const seen = expectType(await d.call({ type: "stats", tenant: "t", session: "x" }), "stats_result").tokens_seen!;
    // Uncancelled, this story runs to the 400 tokens; cancelled at its first token, a few at most.
    assert.ok(
      seen - prompt - done.new_tokens < 100,
      `the closed channel's generation was cancelled (${seen - prompt - done.new_tokens} tokens generated)`,
    );
    d.close();
  } finally {
    await host.stop();
  }
});
