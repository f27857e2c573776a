// A session that moved between hosts (issue 13) is continued from the edge's copy only, never from
// a former host's stale one: a host restarted with --offload-dir does not push the copies it did
// not check against the edge (the drain); a former host's memory of having expired a session does
// not answer for it while connected (the edge owns the TTL); a local copy the edge says it does not
// have for this host (the edge's fence: recorded on another host) is dropped, on the first use in a
// new connection epoch as on a refused checkpoint. DirectEdges and the fake engine.
import assert from "node:assert/strict";
import { test } from "node:test";

import type { FromHostMessage } from "@pyramidkv/shared";

import { DirectEdge } from "../src/host/direct-edge.js";
import { decodeStateFile } from "../src/host/store.js";
import { expectType, HostClient, type TestHost, fakeHost, testDir, until } from "./host-client.js";

const tmp = () => testDir("pkv-fence-");

const open = (c: HostClient, session: string) =>
  c.call({ type: "open_session", tenant: "t", session, budget: 16 }).then((m) => expectType(m, "opened"));
const append = (c: HostClient, session: string, text: string) => c.call({ type: "append", tenant: "t", session, text });
const sessionsOf = async (c: HostClient) =>
  expectType(await c.call({ type: "stats", tenant: "t" }), "stats_result").sessions;
const codeOf = (m: FromHostMessage) => (m.type === "error" ? m.code : m.type);
const edgeTokens = (edge: DirectEdge, session: string) => {
  const st = edge.state("t", session);
  return st && decodeStateFile(st.file, "t", session).meta.tokens_seen;
};
const putsBy = (edge: DirectEdge, host: string) =>
  edge.controls.filter((m) => m.type === "state_put" && m.host === host).length;

async function stopAll(...hosts: TestHost[]): Promise<void> {
  for (const h of hosts) await h.stop();
}

test("a host restarted with --offload-dir: its drain does not overwrite the edge's copy of a session continued elsewhere", {
  timeout: 60_000,
}, async () => {
  const edge = await DirectEdge.start({ tokens: [] });
  const dir = tmp();
  try {
    const a = await fakeHost(["--offload-dir", dir], { edge });
    const ca = await HostClient.connect(edge.url, { host: a.name });
    await open(ca, "m");
    expectType(await append(ca, "m", "hello"), "appended");
    ca.close();
    await a.stop(); // its copy (5 tokens) stays in the offload directory
    const b = await fakeHost([], { edge });
    const cb = await HostClient.connect(edge.url, { host: b.name });
    assert.equal(expectType(await append(cb, "m", "world"), "appended").tokens_seen, 10, "continued on b");
    cb.close();
    await b.stop();
    const again = await fakeHost(["--offload-dir", dir], { edge }); // adopts its old copy from the directory
    await until(() => again.link.connected, "the restarted host welcomed");
    await again.stop(); // SIGTERM's drain at once
    assert.equal(edgeTokens(edge, "m"), 10, "the edge's copy is b's, not the restarted host's old one");
    assert.equal(putsBy(edge, again.name), 0, "no put of a copy the edge's does not match");
  } finally {
    await edge.close();
  }
});

test("a former host that expired its stale copy does not answer session_expired for a session live elsewhere", {
  timeout: 60_000,
}, async () => {
  const edge = await DirectEdge.start({ tokens: [] });
  const a = await fakeHost([], { edge });
  const b = await fakeHost([], { edge });
  const ca = await HostClient.connect(edge.url, { host: a.name });
  const cb = await HostClient.connect(edge.url, { host: b.name });
  try {
    await open(ca, "x");
    expectType(await append(ca, "x", "hello"), "appended");
    assert.equal(expectType(await append(cb, "x", "world"), "appended").tokens_seen, 10, "moved to b");
    expectType(await ca.call({ type: "set_tenant", tenant: "t", session_ttl_s: 1 }), "tenant_set");
    await until(() => a.metrics.sessionsExpired.get({ tenant: "t" }) === 1, "a's stale copy to expire");
    expectType(await ca.call({ type: "set_tenant", tenant: "t", session_ttl_s: 3600 }), "tenant_set");
    // The session routes back to a: the edge's copy (b's, 10 tokens) is adopted.
    const m = await append(ca, "x", "again");
    assert.equal(codeOf(m), "appended", JSON.stringify(m));
    assert.equal(expectType(m, "appended").tokens_seen, 15);
    assert.equal(edgeTokens(edge, "x"), 15);
    // A session the edge has no copy of either is still session_expired (the edge deleted it).
    await open(ca, "gone");
    expectType(await append(ca, "gone", "hello"), "appended");
    expectType(await ca.call({ type: "set_tenant", tenant: "t", session_ttl_s: 1 }), "tenant_set");
    await until(() => a.metrics.sessionsExpired.get({ tenant: "t" }) >= 3, "both to expire");
    edge.states.delete("t\0gone");
    assert.equal(codeOf(await append(ca, "gone", "x")), "session_expired");
  } finally {
    ca.close();
    cb.close();
    await stopAll(a, b);
    await edge.close();
  }
});

test("the edge's fence: a session it records on another host is dropped here at its first use in a new epoch", {
  timeout: 60_000,
}, async () => {
  const edge = await DirectEdge.start({ tokens: [] });
  const a = await fakeHost([], { edge });
  try {
    const ca = await HostClient.connect(edge.url, { host: a.name });
    await open(ca, "f");
    expectType(await append(ca, "f", "hello"), "appended");
    ca.close();
    const sock = await edge.waitHost(a.name);
    edge.recordedOn.set("t\0f", "elsewhere");
    edge.kill(a.name);
    await sock.closed;
    await until(() => a.link.connected && a.link.epoch === 2, "a's new connection");
    const puts = putsBy(edge, a.name);
    const ca2 = await HostClient.connect(edge.url, { host: a.name });
    const m = await append(ca2, "f", "again");
    assert.equal(codeOf(m), "unknown_session", JSON.stringify(m));
    assert.equal(putsBy(edge, a.name), puts, "no put tried on a copy the edge says is not here");
    assert.equal(await sessionsOf(ca2), 0, "the copy here is dropped");
    assert.equal(edgeTokens(edge, "f"), 5, "the edge's copy untouched");
    ca2.close();
  } finally {
    await a.stop();
    await edge.close();
  }
});

test("the edge's fence on a checkpoint (state_conflict): the copy here is dropped, the session unknown here", {
  timeout: 60_000,
}, async () => {
  const edge = await DirectEdge.start({ tokens: [] });
  const a = await fakeHost([], { edge });
  const ca = await HostClient.connect(edge.url, { host: a.name });
  try {
    await open(ca, "g");
    expectType(await append(ca, "g", "hello"), "appended");
    edge.recordedOn.set("t\0g", "elsewhere");
    assert.equal(codeOf(await append(ca, "g", "world")), "checkpoint_failed");
    assert.equal(await sessionsOf(ca), 0, "the copy here is dropped");
    assert.equal(codeOf(await append(ca, "g", "again")), "unknown_session");
    assert.equal(edgeTokens(edge, "g"), 5, "the edge's copy untouched");
  } finally {
    ca.close();
    await a.stop();
    await edge.close();
  }
});

test("a new connection epoch: the copies here the edge's do not match, or that the edge records elsewhere, go in the background", {
  timeout: 60_000,
}, async () => {
  const edge = await DirectEdge.start({ tokens: [] });
  const a = await fakeHost([], { edge });
  try {
    const ca = await HostClient.connect(edge.url, { host: a.name });
    for (const id of ["moved", "fenced", "kept"]) {
      await open(ca, id);
      expectType(await append(ca, id, "hello"), "appended");
    }
    ca.close();
    const sock = await edge.waitHost(a.name);
    edge.states.get("t\0moved")!.etag = "e-other"; // another host's checkpoint since
    edge.recordedOn.set("t\0fenced", "elsewhere");
    edge.kill(a.name);
    await sock.closed;
    await until(() => a.link.connected && a.link.epoch === 2, "a's new connection");
    // No request names them: the sweep after the welcome drops the two stale copies.
    const c = await HostClient.connect(edge.url, { host: a.name });
    await until(async () => (await sessionsOf(c)) === 1, "the stale copies dropped");
    assert.equal(expectType(await append(c, "kept", "again"), "appended").tokens_seen, 10, "its own copy kept");
    c.close();
  } finally {
    await a.stop();
    await edge.close();
  }
});

test("a checkpoint that fails, then a rollback that finds another host's copy at the edge: the copy here goes", {
  timeout: 60_000,
}, async () => {
  const edge = await DirectEdge.start({ tokens: [] });
  const a = await fakeHost([], { edge });
  const ca = await HostClient.connect(edge.url, { host: a.name });
  try {
    await open(ca, "rb");
    expectType(await append(ca, "rb", "hello"), "appended");
    edge.states.get("t\0rb")!.etag = "e-other"; // another host's checkpoint since
    edge.faults.put = { code: "internal", message: "R2 is down" };
    assert.equal(codeOf(await append(ca, "rb", "world")), "checkpoint_failed");
    edge.faults.put = undefined;
    await until(async () => (await sessionsOf(ca)) === 0, "the copy here dropped");
    assert.equal(expectType(await append(ca, "rb", "again"), "appended").tokens_seen, 10, "the edge's copy adopted");
  } finally {
    ca.close();
    await a.stop();
    await edge.close();
  }
});
