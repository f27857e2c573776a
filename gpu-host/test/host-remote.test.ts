// The store's remote tier (issue 13; residency.ts, edge-link.ts), against DirectEdges and the fake
// engine: every checkpoint of a session that is not ephemeral reaches the edge's store before
// its appended/done; the edge refusing it (stored quota, another host's newer copy, a socket gone
// meanwhile) fails the request with its code and the session goes back to the edge's checkpoint;
// a session this host does not know is adopted from the edge's store; a local copy the edge's
// newer one replaced after a reconnect is not used; the drain sends every session to the edge.
import assert from "node:assert/strict";
import { test } from "node:test";

import type { FromHostMessage } from "@pyramidkv/shared";

import { DirectEdge } from "../src/host/direct-edge.js";
import { decodeStateFile, encodeStateFile, type StateIdentity } from "../src/host/store.js";
import { expectType, HostClient, type TestHost, fakeHost, testDir, until } from "./host-client.js";

const tmp = () => testDir("pkv-remote-");

const open = async (c: HostClient, session: string, extra: Record<string, unknown> = {}) =>
  expectType(await c.call({ type: "open_session", tenant: "t", session, budget: 16, ...extra }), "opened");
const append = (c: HostClient, session: string, text: string) => c.call({ type: "append", tenant: "t", session, text });
const tokensSeen = async (c: HostClient, session: string) =>
  expectType(await c.call({ type: "stats", tenant: "t", session }), "stats_result").tokens_seen;
const codeOf = (m: FromHostMessage) => expectType(m, "error").code;
/** tokens_seen of the edge's copy of t/session (from its state file) */
const edgeTokens = (edge: DirectEdge, session: string) => {
  const st = edge.state("t", session);
  return st && decodeStateFile(st.file, "t", session).meta.tokens_seen;
};

async function stopAll(...hosts: TestHost[]): Promise<void> {
  for (const h of hosts) await h.stop();
}

test("a checkpoint reaches the edge's store before appended and done; ephemeral sessions stay local", {
  timeout: 60_000,
}, async () => {
  const host = await fakeHost();
  const c = await HostClient.connect(host.url);
  try {
    await open(c, "s");
    let release!: () => void;
    host.edge.holdPuts = new Promise((r) => (release = r));
    const frames: FromHostMessage[] = [];
    const answered = c.request({ type: "append", tenant: "t", session: "s", text: "hello" }, (f) => frames.push(f));
    await until(() => host.edge.controls.some((m) => m.type === "state_put" && m.session === "s"), "the state_put");
    await new Promise((r) => setTimeout(r, 200));
    assert.equal(
      frames.some((f) => f.type === "appended"),
      false,
      "no appended before the edge stored the checkpoint",
    );
    release();
    host.edge.holdPuts = undefined;
    expectType((await answered).at(-1)!, "appended");
    assert.equal(edgeTokens(host.edge, "s"), 5);
    const st = host.edge.state("t", "s")!;
    assert.deepEqual(
      [st.meta.model, st.meta.n_layer, st.meta.tokens_seen, st.meta.format],
      ["fake-model", "2", "5", "pkvf1"],
    );
    expectType(await c.call({ type: "generate", tenant: "t", session: "s", max_tokens: 3 }), "done");
    assert.equal(edgeTokens(host.edge, "s"), 8, "the generate's checkpoint too");
    const puts = host.edge.controls.filter((m) => m.type === "state_put" && m.session === "s");
    assert.equal(puts[0]!.if_etag, undefined, "a new session's first put has no if_etag");
    assert.equal(puts[1]!.if_etag, host.edge.puts[0]!.etag, "the next one names the etag stored");
    await open(c, "eph", { ephemeral: true });
    expectType(await append(c, "eph", "local only"), "appended");
    assert.equal(host.edge.state("t", "eph"), undefined, "an ephemeral session never goes to the edge");
  } finally {
    c.close();
    await host.stop();
  }
});

test("the edge's stored quota refuses a checkpoint: stored_quota_exceeded, the session back at the edge's checkpoint", {
  timeout: 60_000,
}, async () => {
  const host = await fakeHost();
  const c = await HostClient.connect(host.url);
  try {
    await open(c, "q");
    expectType(await append(c, "q", "hello"), "appended");
    const stored = host.edge.state("t", "q")!.file.length;
    host.edge.maxStoredBytes.set("t", stored + 2); // the next, longer state does not fit
    const refused = expectType(await append(c, "q", "world, and more"), "error");
    assert.equal(refused.code, "stored_quota_exceeded", refused.message);
    assert.match(refused.message, /back at its last checkpoint \(5 tokens seen\)/);
    assert.equal(await tokensSeen(c, "q"), 5, "rolled back");
    assert.equal(edgeTokens(host.edge, "q"), 5, "the edge's copy is the checkpoint");
    assert.equal(host.metrics.statePuts.get({ result: "stored_quota_exceeded" }), 1);
    host.edge.maxStoredBytes.delete("t");
    assert.equal(expectType(await append(c, "q", "world"), "appended").tokens_seen, 10, "a retry is clean");
    assert.equal(edgeTokens(host.edge, "q"), 10);
  } finally {
    c.close();
    await host.stop();
  }
});

test("another host continued the session (state_conflict): checkpoint_failed, the copy here dropped, a retry continues the edge's", {
  timeout: 60_000,
}, async () => {
  const edge = await DirectEdge.start({ tokens: [] });
  const a = await fakeHost([], { edge });
  const b = await fakeHost([], { edge });
  const ca = await HostClient.connect(edge.url, { host: a.name });
  const cb = await HostClient.connect(edge.url, { host: b.name });
  try {
    await open(ca, "m");
    expectType(await append(ca, "m", "hello"), "appended");
    // b does not know m: it is adopted from the edge's store, and continued there.
    assert.equal(expectType(await append(cb, "m", "world"), "appended").tokens_seen, 10);
    assert.equal(edgeTokens(edge, "m"), 10);
    // a still holds its copy (5 tokens) in the same connection epoch: its checkpoint is refused.
    const stale = expectType(await append(ca, "m", "again"), "error");
    assert.equal(stale.code, "checkpoint_failed");
    assert.match(stale.message, /continued on another host/);
    assert.equal(edgeTokens(edge, "m"), 10, "the edge's copy stands");
    // Retried on a: unknown there now, adopted from the edge's store (b's 10 tokens), continued.
    assert.equal(expectType(await append(ca, "m", "again"), "appended").tokens_seen, 15);
    assert.equal(edgeTokens(edge, "m"), 15);
    assert.equal(codeOf(await cb.call({ type: "stats", tenant: "t", session: "nope" })), "unknown_session");
  } finally {
    ca.close();
    cb.close();
    await stopAll(a, b);
    await edge.close();
  }
});

test("after a reconnect, a local copy whose etag the edge's does not match is not used", {
  timeout: 60_000,
}, async () => {
  const edge = await DirectEdge.start({ tokens: [] });
  const a = await fakeHost([], { edge });
  const b = await fakeHost([], { edge });
  try {
    const ca = await HostClient.connect(edge.url, { host: a.name });
    await open(ca, "r");
    expectType(await append(ca, "r", "hello"), "appended");
    ca.close();
    const sock = await edge.waitHost(a.name);
    const heads = () => edge.controls.filter((m) => m.type === "state_head" && m.host === a.name).length;
    const before = heads();
    edge.kill(a.name); // a's socket goes; meanwhile b continues the session
    await sock.closed;
    const cb = await HostClient.connect(edge.url, { host: b.name });
    assert.equal(expectType(await append(cb, "r", "world"), "appended").tokens_seen, 10);
    cb.close();
    await until(() => a.link.connected && a.link.epoch === 2, "a's new connection");
    const ca2 = await HostClient.connect(edge.url, { host: a.name });
    // The new epoch checks the edge's etag once: by this first use, or by the sweep after the
    // welcome — which can run before b's write lands (a redials within 0.5 s), and then the put's
    // if_etag catches the stale copy (checkpoint_failed, the copy dropped) and the retry adopts
    // b's. Either way b's copy (10 tokens) is continued, never a's stale one (5).
    let again = await append(ca2, "r", "again");
    if (again.type === "error" && again.code === "checkpoint_failed") again = await append(ca2, "r", "again");
    assert.equal(expectType(again, "appended").tokens_seen, 15);
    assert.ok(heads() >= before + 1, "the new epoch checked the edge's etag");
    const checked = heads();
    expectType(await append(ca2, "r", "more"), "appended");
    assert.equal(heads(), checked, "once per epoch");
    assert.equal(edgeTokens(edge, "r"), 19);
    ca2.close();
  } finally {
    await stopAll(a, b);
    await edge.close();
  }
});

test("the socket closes while a checkpoint waits for the edge: the request fails, the session goes back to the edge's copy", {
  timeout: 60_000,
}, async () => {
  const host = await fakeHost();
  try {
    const c = await HostClient.connect(host.url);
    await open(c, "d");
    expectType(await append(c, "d", "hello"), "appended");
    host.edge.holdPuts = new Promise(() => {}); // never acknowledged
    const lost = c.request({ type: "append", tenant: "t", session: "d", text: "world" });
    await until(() => host.edge.controls.filter((m) => m.type === "state_put").length === 2, "the second put");
    const failedBefore = host.metrics.errors.get({ code: "checkpoint_failed" });
    host.edge.kill(host.name);
    await until(
      () => host.metrics.errors.get({ code: "checkpoint_failed" }) === failedBefore + 1,
      "the append's checkpoint_failed",
    );
    host.edge.holdPuts = undefined;
    void lost;
    await until(() => host.link.connected && host.link.epoch === 2, "the reconnect");
    const d = await HostClient.connect(host.url);
    assert.equal(await tokensSeen(d, "d"), 5, "back at the edge's checkpoint: never a local-only ack");
    assert.equal(expectType(await append(d, "d", "world"), "appended").tokens_seen, 10);
    d.close();
  } finally {
    await host.stop();
  }
});

test("not connected: a checkpoint cannot reach the edge, so the request fails (retryable), never a silent local ack", {
  timeout: 60_000,
}, async () => {
  const host = await fakeHost();
  try {
    const c = await HostClient.connect(host.url);
    await open(c, "n");
    expectType(await append(c, "n", "hello"), "appended");
    // The remote tier while the link is down (what a request in flight meets).
    const s = host.link;
    await host.edge.close();
    await until(() => !s.connected, "the link down");
    await assert.rejects(
      s.put("t", "n", new Uint8Array(10), {}),
      (e: Error & { code?: string }) => e.code === "disconnected" && /not connected to the edge/.test(e.message),
    );
  } finally {
    await host.stop();
  }
});

test("the drain: every session the edge lacks goes there (not the ephemeral ones), then drained and close 1000", {
  timeout: 60_000,
}, async () => {
  const host = await fakeHost(["--checkpoint", "off"]);
  const c = await HostClient.connect(host.url);
  await open(c, "busy");
  expectType(await append(c, "busy", "resident"), "appended");
  await open(c, "idle");
  expectType(await append(c, "idle", "unsaved"), "appended");
  await open(c, "eph", { ephemeral: true });
  expectType(await append(c, "eph", "stays"), "appended");
  assert.equal(host.edge.puts.length, 0, "--checkpoint off: nothing stored yet");
  const sock = await host.edge.waitHost(host.name);
  c.close();
  await host.stop();
  assert.equal(await sock.closed, 1000);
  assert.equal(sock.draining && sock.drained, true);
  assert.equal(edgeTokens(host.edge, "busy"), 8);
  assert.equal(edgeTokens(host.edge, "idle"), 7);
  assert.equal(host.edge.state("t", "eph"), undefined);
  const order = host.edge.controls.map((m) => m.type);
  assert.ok(order.lastIndexOf("state_put") < order.indexOf("drained"), order.join(","));
});

test("the drain: in-flight work finishes and is answered, new channels are dropped 'draining', heartbeats say draining", {
  timeout: 60_000,
}, async () => {
  const host = await fakeHost(["--heartbeat-seconds", "1"]);
  const c = await HostClient.connect(host.url);
  await open(c, "f");
  let release!: () => void;
  host.edge.holdPuts = new Promise((r) => (release = r));
  const inFlight = c.request({ type: "append", tenant: "t", session: "f", text: "hello" });
  await until(() => host.edge.controls.some((m) => m.type === "state_put" && m.session === "f"), "the put");
  const sock = await host.edge.waitHost(host.name);
  const stopped = host.drain(); // as SIGTERM, the request's channel still open
  await until(() => sock.draining, "draining");
  const late = await host.edge.channel("t", host.name);
  assert.equal(await late.closed, "draining", "a new channel is refused while draining");
  await until(() => sock.heartbeats.at(-1)?.draining === true, "a heartbeat saying draining");
  assert.equal(sock.drained, false, "not drained while a request is in flight");
  release();
  host.edge.holdPuts = undefined;
  expectType((await inFlight).at(-1)!, "appended"); // the in-flight request finished, answered
  c.close();
  await stopped;
  assert.equal(sock.drained, true);
  assert.equal(await sock.closed, 1000);
  assert.equal(edgeTokens(host.edge, "f"), 5);
  await host.edge.close();
});

test("SIGTERM while the edge is unreachable: the sessions stay in the offload directory, and a new host continues them", {
  timeout: 60_000,
}, async () => {
  const dir = tmp();
  const first = await fakeHost(["--offload-dir", dir, "--checkpoint", "off"]);
  const c = await HostClient.connect(first.url);
  await open(c, "kept");
  expectType(await append(c, "kept", "hello"), "appended");
  c.close();
  await first.edge.close(); // the edge goes away; the host keeps dialling
  await until(() => !first.link.connected, "the link down");
  await first.drain();
  const second = await fakeHost(["--offload-dir", dir]);
  try {
    const d = await HostClient.connect(second.url);
    assert.equal(await tokensSeen(d, "kept"), 5, "saved locally, adopted by the next host");
    assert.equal(expectType(await append(d, "kept", "world"), "appended").tokens_seen, 10);
    assert.equal(edgeTokens(second.edge, "kept"), 10, "and from now on in the edge's store too");
    d.close();
  } finally {
    await second.stop();
  }
});

test("a session in the edge's store written by a host of another model or shape: session_lost, naming both", {
  timeout: 60_000,
}, async () => {
  const host = await fakeHost();
  const c = await HostClient.connect(host.url);
  try {
    await open(c, "o");
    expectType(await append(c, "o", "hello"), "appended");
    const mine = host.edge.state("t", "o")!;
    const { meta, state, identity } = decodeStateFile(mine.file, "t", "o");
    for (const [session, other] of [
      ["other-model", { ...identity, model: "llama-70b.gguf" }],
      ["other-shape", { ...identity, n_layer: 80 }],
    ] as const) {
      host.edge.states.set(`t\0${session}`, {
        file: encodeStateFile({ ...meta, session }, state, other as StateIdentity),
        etag: `x-${session}`,
        meta: {},
      });
      const e = expectType(await append(c, session, "more"), "error");
      assert.equal(e.code, "session_lost", e.message);
      assert.match(
        e.message,
        /stored by a host of model '.*' \(n_layer \d+, bytes_per_entry \d+\); this host serves 'fake-model'/,
      );
    }
    host.edge.states.set("t\0same", {
      file: encodeStateFile({ ...meta, session: "same" }, state, identity as StateIdentity),
      etag: "x-same",
      meta: {},
    });
    assert.equal(
      expectType(await append(c, "same", "more"), "appended").tokens_seen,
      9,
      "the same model and shape: adopted",
    );
  } finally {
    c.close();
    await host.stop();
  }
});

test("the drain meets a dropped socket: it waits for the redial and checkpoints to the edge", {
  timeout: 60_000,
}, async () => {
  const host = await fakeHost(["--checkpoint", "off"]);
  const c = await HostClient.connect(host.url);
  await open(c, "w");
  expectType(await append(c, "w", "hello"), "appended");
  c.close();
  const sock = await host.edge.waitHost(host.name);
  host.edge.kill(host.name);
  await sock.closed;
  await host.drain();
  assert.equal(edgeTokens(host.edge, "w"), 5, "checkpointed over the new socket");
  await host.edge.close();
});

test("adopting a session from the edge's store counts against the tenant's max_sessions here", {
  timeout: 60_000,
}, async () => {
  const edge = await DirectEdge.start({ tokens: [] });
  const a = await fakeHost([], { edge });
  const b = await fakeHost([], { edge });
  const ca = await HostClient.connect(edge.url, { host: a.name });
  const cb = await HostClient.connect(edge.url, { host: b.name });
  try {
    await open(ca, "far");
    expectType(await append(ca, "far", "hello"), "appended");
    expectType(await cb.call({ type: "set_tenant", tenant: "t", max_sessions: 1 }), "tenant_set");
    await open(cb, "near");
    const e = expectType(await append(cb, "far", "more"), "error");
    assert.equal(e.code, "session_limit", e.message);
    assert.equal(codeOf(await cb.call({ type: "stats", tenant: "t", session: "nope" })), "unknown_session");
    expectType(await cb.call({ type: "close", tenant: "t", session: "near" }), "closed");
    assert.equal(expectType(await append(cb, "far", "more"), "appended").tokens_seen, 9, "room again: adopted");
  } finally {
    ca.close();
    cb.close();
    await stopAll(a, b);
    await edge.close();
  }
});
