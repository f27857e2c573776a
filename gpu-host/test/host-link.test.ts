// The host's one socket to the edge (issue 13; edge-link.ts), against a DirectEdge and the fake
// engine: host_hello then heartbeats; the socket dropped by the edge is dialled again with backoff
// and the sessions survive it; a token the edge refuses (401, or revoked while connected) ends the
// host with exit code 1 and a line naming --host-token; channels of two tenants on one socket stay
// apart; the drain.
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { test } from "node:test";

import { encodeHostMessage } from "@pyramidkv/shared";

import { repoRoot } from "../src/engine/engine-path.js";
import { DirectEdge, hostToken } from "../src/host/direct-edge.js";
import { EdgeLink, STATE_BYTES_IN_FLIGHT } from "../src/host/edge-link.js";
import { fakeEngineBin } from "./fake-engine.js";
import { expectType, HostClient, METRICS_TOKEN, newHostName, scrape, fakeHost, testDir, until } from "./host-client.js";

const tmp = () => testDir("pkv-link-");

/** `pkv host` as a child process on the fake engine, without waiting for anything. */
function spawnHost(args: string[]) {
  const cli = resolve(repoRoot(), "gpu-host", "dist", "src", "cli.js");
  const child = spawn(
    process.execPath,
    [cli, "host", "--port", "0", "--engine", fakeEngineBin(join(tmp(), "engine.log")), ...args],
    { stdio: ["ignore", "pipe", "pipe"] },
  );
  let out = "";
  let err = "";
  child.stdout!.setEncoding("utf8").on("data", (d: string) => (out += d));
  child.stderr!.setEncoding("utf8").on("data", (d: string) => (err += d));
  const exit = new Promise<number | null>((r) => child.on("exit", (code) => r(code)));
  return { child, exit, out: () => out, err: () => err };
}

test("host_hello first, then heartbeats with the host's load every --heartbeat-seconds", {
  timeout: 60_000,
}, async () => {
  const host = await fakeHost(["--heartbeat-seconds", "1"]);
  try {
    const sock = await host.edge.waitHost(host.name);
    const first = host.edge.controls.find((m) => m.host === host.name)!;
    assert.equal(first.type, "host_hello", "the first frame is host_hello");
    assert.deepEqual(
      [sock.hello!.protocol, sock.hello!.model, sock.hello!.n_layer, sock.hello!.heartbeat_ms],
      [3, "fake-model", 2, 1000],
    );
    assert.ok(sock.hello!.bytes_per_entry > 0 && sock.hello!.pool_bytes > 0);
    assert.match(sock.hello!.host_version ?? "", /^\d+\.\d+\.\d+$/);
    const c = await HostClient.connect(host.url);
    expectType(await c.call({ type: "open_session", tenant: "t", session: "a", budget: 16 }), "opened");
    await until(() => sock.heartbeats.some((h) => h.sessions === 1), "a heartbeat counting the session");
    const hb = sock.heartbeats[sock.heartbeats.length - 1]!;
    assert.equal(hb.draining, false);
    assert.equal(hb.pool_bytes, sock.hello!.pool_bytes);
    assert.equal(hb.free_bytes, hb.pool_bytes - hb.kv_used_bytes);
    await until(() => sock.heartbeats.length >= 3, "three heartbeats");
    const health = (await (await fetch(`http://127.0.0.1:${host.address.port}/health`)).json()) as {
      edge: { connected: boolean; name: string; epoch: number; draining: boolean; channels: number };
    };
    assert.deepEqual(health.edge, { connected: true, name: host.name, epoch: 1, draining: false, channels: 1 });
    assert.deepEqual(host.edge.protocolErrors, []);
    const metrics = await scrape(host.address.port);
    assert.match(metrics, /pkv_host_edge_connected 1/);
    assert.match(metrics, /pkv_host_edge_connections_total 1/);
    assert.match(metrics, /pkv_host_connections 1/);
    c.close();
  } finally {
    await host.stop();
  }
});

test("the edge drops the socket: the host dials again with backoff, its sessions survive, the next request works", {
  timeout: 60_000,
}, async () => {
  const host = await fakeHost();
  try {
    const c = await HostClient.connect(host.url);
    expectType(await c.call({ type: "open_session", tenant: "t", session: "s", budget: 16 }), "opened");
    expectType(await c.call({ type: "append", tenant: "t", session: "s", text: "hello" }), "appended");
    const before = await host.edge.waitHost(host.name);
    assert.equal(host.link.epoch, 1);
    host.edge.kill(host.name); // a deploy: the socket vanishes
    await before.closed;
    const again = await host.edge.waitHost(host.name);
    assert.notEqual(again, before);
    await until(() => host.link.connected, "the host's welcome");
    assert.equal(host.link.epoch, 2, "a new connection epoch");
    assert.ok(host.link.dials >= 2);
    const d = await HostClient.connect(host.url);
    const st = expectType(await d.call({ type: "stats", tenant: "t", session: "s" }), "stats_result");
    assert.equal(st.tokens_seen, 5, "the session survived the reconnect");
    const next = expectType(await d.call({ type: "append", tenant: "t", session: "s", text: "world" }), "appended");
    assert.equal(next.tokens_seen, 10);
    // A request of the old socket's channel is not answered on the new one.
    assert.equal(c.unsolicited.length, 0);
    d.close();
  } finally {
    await host.stop();
  }
});

test("a token the edge refuses (401): one line naming --host-token, exit code 1, never dialled again", {
  timeout: 60_000,
}, async () => {
  const edge = await DirectEdge.start({ tokens: [] });
  try {
    const h = spawnHost(["--connect", edge.url, "--host-token", hostToken(newHostName())]);
    assert.equal(await h.exit, 1, h.err());
    const lines = h.err().trim().split("\n");
    assert.match(lines[lines.length - 1]!, /HTTP 401.*--host-token \(or PKV_HOST_TOKEN\)/);
    assert.equal(edge.hosts.size, 0);
  } finally {
    await edge.close();
  }
});

test("a token revoked while connected: the socket closes 4003, the redial gets 401, the host exits 1", {
  timeout: 60_000,
}, async () => {
  const name = newHostName();
  const edge = await DirectEdge.start({ tokens: [hostToken(name)] });
  try {
    const h = spawnHost(["--connect", edge.url, "--host-token", hostToken(name)]);
    const sock = await edge.waitHost(name);
    edge.revoke(hostToken(name));
    assert.equal(await sock.closed, 4003);
    assert.equal(await h.exit, 1, h.err());
    assert.match(h.err(), /--host-token/);
  } finally {
    await edge.close();
  }
});

test("an edge that is down: the host keeps dialling (backoff); SIGTERM before any connection exits 0", {
  timeout: 60_000,
}, async () => {
  // The first edge is closed before the host starts: nothing listens at its URL for a while.
  const name = newHostName();
  const probe = await DirectEdge.start({ tokens: [] });
  const port = new URL(probe.url).port;
  await probe.close();
  const h = spawnHost(["--connect", `http://127.0.0.1:${port}`, "--host-token", hostToken(name)]);
  try {
    const ceilings = () => [
      ...h.err().matchAll(/could not be opened.*dialling again in (\d+) ms \(backoff up to (\d+) ms\)/g),
    ];
    await until(() => ceilings().length >= 3, "three failed dials and their retries");
    // delay = random(0, min(30 s, 0.5 s × 2^attempt)): the ceiling doubles, each delay under it
    const got = ceilings().slice(0, 3);
    assert.deepEqual(
      got.map((m) => Number(m[2])),
      [500, 1000, 2000],
    );
    for (const m of got) assert.ok(Number(m[1]) <= Number(m[2]), m[0]);
    assert.equal(h.child.exitCode, null, "still running");
  } finally {
    h.child.kill("SIGTERM");
    assert.equal(await h.exit, 0, "SIGTERM before any connection: exit 0");
  }
});

test("channels of two tenants share the socket and stay apart; a closed channel's ephemeral session goes", {
  timeout: 60_000,
}, async () => {
  const host = await fakeHost();
  try {
    const a = await HostClient.connect(host.url, { tenant: "a" });
    const b = await HostClient.connect(host.url, { tenant: "b" });
    await until(() => host.link.channelCount === 2, "two channels on the one socket");
    expectType(await a.call({ type: "open_session", tenant: "a", session: "x", budget: 16 }), "opened");
    expectType(await b.call({ type: "open_session", tenant: "b", session: "x", budget: 16 }), "opened");
    const stolen = expectType(
      await b.raw(encodeHostMessage({ type: "append", id: 77, tenant: "a", session: "x", text: "hi" })),
      "error",
    );
    assert.deepEqual([stolen.code, stolen.id], ["unauthorized", 77]);
    expectType(await a.call({ type: "append", tenant: "a", session: "x", text: "abc" }), "appended");
    const sb = expectType(await b.call({ type: "stats", tenant: "b", session: "x" }), "stats_result");
    assert.equal(sb.tokens_seen, 0, "b's session x is not a's");
    const e = await HostClient.connect(host.url, { tenant: "a" });
    expectType(
      await e.call({ type: "open_session", tenant: "a", session: "eph", budget: 16, ephemeral: true }),
      "opened",
    );
    e.close();
    await until(
      async () => (await a.call({ type: "stats", tenant: "a", session: "eph" })).type === "error",
      "the ephemeral session's close",
    );
    a.close();
    b.close();
    await until(() => host.link.channelCount === 0, "every channel closed");
  } finally {
    await host.stop();
  }
});

test("--pid-file and pkv host --drain: the host drains (draining, drained, close 1000) and exits 0", {
  timeout: 90_000,
}, async () => {
  const name = newHostName();
  const edge = await DirectEdge.start({ tokens: [hostToken(name)] });
  const pidFile = join(tmp(), "host.pid");
  try {
    const h = spawnHost([
      "--connect",
      edge.url,
      "--host-token",
      hostToken(name),
      "--pid-file",
      pidFile,
      "--metrics-token",
      METRICS_TOKEN,
    ]);
    const sock = await edge.waitHost(name);
    await until(() => /^\d+\n$/.test(safeRead(pidFile)), "the pid file");
    assert.equal(Number(readFileSync(pidFile, "utf8")), h.child.pid);
    const cli = resolve(repoRoot(), "gpu-host", "dist", "src", "cli.js");
    const drainer = spawn(process.execPath, [cli, "host", "--drain", "--pid-file", pidFile], { stdio: "ignore" });
    const drained = new Promise<number | null>((r) => drainer.on("exit", (code) => r(code)));
    assert.equal(await h.exit, 0, h.err());
    assert.equal(await drained, 0);
    assert.equal(await sock.closed, 1000);
    assert.equal(sock.draining, true);
    assert.equal(sock.drained, true);
    const types = edge.controls.filter((m) => m.host === name).map((m) => m.type);
    assert.ok(types.indexOf("draining") < types.indexOf("drained"), types.join(","));
  } finally {
    await edge.close();
  }
});

function safeRead(f: string): string {
  try {
    return readFileSync(f, "utf8");
  } catch {
    return "";
  }
}

test("checkpoints of many sessions at once: at most STATE_BYTES_IN_FLIGHT of state parts unacknowledged", {
  timeout: 60_000,
}, async () => {
  const name = newHostName();
  const edge = await DirectEdge.start({ tokens: [hostToken(name)] });
  const link = new EdgeLink({
    url: edge.url,
    token: hostToken(name),
    heartbeatMs: 5000,
    highWaterBytes: 1 << 20,
    maxBufferedBytes: 64 << 20,
    timeoutMs: 30_000,
    fatal: (line) => assert.fail(line),
  });
  const load = { pool_bytes: 1, kv_used_bytes: 0, free_bytes: 1, sessions: 0, resident: 0, active: 0, queued: 0 };
  link.start({
    handle: () => {},
    connectionClosed: () => {},
    helloFields: () => ({ model: "m", n_layer: 1, n_ctx: 1, pool_bytes: 1, bytes_per_entry: 1 }),
    load: () => load,
  });
  try {
    await link.waitConnected();
    let release!: () => void;
    edge.holdPuts = new Promise((r) => (release = r));
    const size = 5 << 20;
    const puts = [0, 1, 2, 3, 4].map((i) => link.put("t", `s${i}`, new Uint8Array(size).fill(i), {}));
    const sent = () => edge.controls.filter((m) => m.type === "state_put").length;
    await until(() => sent() >= 1, "a first part");
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(sent(), Math.floor(STATE_BYTES_IN_FLIGHT / size), "parts wait for acks beyond the bound");
    release();
    edge.holdPuts = undefined;
    const etags = await Promise.all(puts);
    assert.equal(new Set(etags).size, 5);
    assert.deepEqual(
      [0, 1, 2, 3, 4].map((i) => edge.state("t", `s${i}`)?.file[0]),
      [0, 1, 2, 3, 4],
    );
  } finally {
    await link.close();
    await edge.close();
  }
});

test("an edge that answered pings and stops (a dropped flow): the host gives the socket up and dials again", {
  timeout: 90_000,
}, async () => {
  const host = await fakeHost(["--heartbeat-seconds", "1"]);
  try {
    const sock = await host.edge.waitHost(host.name);
    await until(() => sock.heartbeats.length >= 2, "pings answered a while");
    host.edge.answerPings = false;
    const code = await sock.closed; // 3 heartbeats + 10 s without a pong
    assert.equal(code, 1006, "terminated by the host");
    host.edge.answerPings = true;
    await until(() => host.link.connected && host.link.epoch === 2, "the new socket");
  } finally {
    await host.stop();
  }
});
