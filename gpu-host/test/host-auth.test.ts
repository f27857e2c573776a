// Who may connect and what a connection may do (issue 12, item 9): the edge token binds a tenant
// and a host, lives at most 300 s and is good for one upgrade; a connection serves only its
// token's tenant; /metrics needs the scrape token; /health tells routing what it needs, nothing
// per tenant. Against the fake engine (fake-engine.ts): nothing here needs a model.
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";

import { encodeHostMessage } from "@pyramidkv/shared";
import { WebSocket } from "ws";

import { bearerMatches, EdgeAuth, MAX_TOKEN_TTL_S, makeEdgeToken, normaliseHost } from "../src/host/auth.js";
import { fakeEngineBin } from "./fake-engine.js";
import { expectType, HostClient, METRICS_TOKEN, SECRET, startTestHost, tokenFor } from "./host-client.js";

let dir: string;
let host: Awaited<ReturnType<typeof startTestHost>>;
let bare: Awaited<ReturnType<typeof startTestHost>>; // no --metrics-token

before(async () => {
  dir = mkdtempSync(join(tmpdir(), "pkv-auth-"));
  host = await startTestHost({ engineBin: fakeEngineBin(join(dir, "engine.log")) }, ["--checkpoint", "off"]);
  bare = await startTestHost({ engineBin: fakeEngineBin(join(dir, "bare.log")), metricsToken: undefined }, [
    "--checkpoint",
    "off",
  ]);
});
after(async () => {
  await Promise.all([host?.stop(), bare?.stop()]);
  rmSync(dir, { recursive: true, force: true });
});

const NOW = 1_800_000_000_000;
const bearer = (t: string) => `Bearer ${t}`;

test("a token names its tenant and host, at most 300 s ahead, once", () => {
  const auth = new EdgeAuth(SECRET);
  const at = (o: Partial<Parameters<typeof makeEdgeToken>[1]> = {}) =>
    bearer(makeEdgeToken(SECRET, { tenant: "acme.eu", host: "gpu-a:8790", nowMs: NOW, ...o }));
  assert.deepEqual(auth.verify(at(), "gpu-a:8790", NOW), { ok: true, tenant: "acme.eu" });
  const refused = (header: string, hostHeader: string, why: RegExp, nowMs = NOW) => {
    const v = auth.verify(header, hostHeader, nowMs);
    assert.equal(v.ok, false, `${header} at ${hostHeader} must be refused`);
    if (!v.ok) assert.match(v.message, why);
  };
  refused(
    at({ nonce: "a".repeat(32) }),
    "gpu-b:8790",
    /another edge secret, or a token for a host other than 'gpu-b:8790'/,
  );
  refused(
    bearer(makeEdgeToken(`${SECRET}x`, { tenant: "t", host: "gpu-a:8790", nowMs: NOW })),
    "gpu-a:8790",
    /signature/,
  );
  refused(at({ ttlSeconds: MAX_TOKEN_TTL_S + 1 }), "gpu-a:8790", /more than 300 s/);
  refused(at({ nowMs: NOW - 121_000 }), "gpu-a:8790", /expired/);
  assert.equal(auth.verify(at({ ttlSeconds: MAX_TOKEN_TTL_S }), "gpu-a:8790", NOW).ok, true);
  // The tenant is signed: another tenant's name on a valid token breaks the MAC.
  const stolen = at({ nonce: "b".repeat(32) }).replace(/\.acme\.eu$/, ".other");
  refused(stolen, "gpu-a:8790", /signature/);
  // One upgrade per token.
  const once = at({ nonce: "c".repeat(32) });
  assert.equal(auth.verify(once, "gpu-a:8790", NOW).ok, true);
  refused(once, "gpu-a:8790", /already used/);
  // The format of pyramidkv before 0.8.0, and garbage.
  refused(bearer(`${NOW / 1000 + 60}.${"0".repeat(64)}`), "gpu-a:8790", /before 0\.8\.0.*upgrade the edge/);
  refused(bearer("pkv2.123.abc"), "gpu-a:8790", /malformed edge token: expected Bearer pkv2\./);
  refused("", "gpu-a:8790", /missing/);
  // The Host header as dialled: case, a trailing dot and a default port do not matter.
  assert.equal(normaliseHost("GPU-A.Example.com.:443"), "gpu-a.example.com");
  assert.equal(normaliseHost("[::1]:8790"), "[::1]:8790");
  assert.equal(auth.verify(at({ host: "gpu-a:80", nonce: "d".repeat(32) }), "GPU-A", NOW).ok, true);
});

test("nonces are remembered until their token expires, and no more than the bound", () => {
  const auth = new EdgeAuth(SECRET, 2);
  const tok = (nowMs: number) => bearer(makeEdgeToken(SECRET, { tenant: "t", host: "h:1", nowMs, ttlSeconds: 60 }));
  assert.equal(auth.verify(tok(NOW), "h:1", NOW).ok, true);
  assert.equal(auth.verify(tok(NOW), "h:1", NOW).ok, true);
  const full = auth.verify(tok(NOW), "h:1", NOW);
  assert.deepEqual(full.ok ? 0 : full.status, 503);
  // 61 s later both have expired: forgotten, room again.
  assert.equal(auth.verify(tok(NOW + 61_000), "h:1", NOW + 61_000).ok, true);
  assert.equal(auth.remembered, 1);
});

test("bearerMatches compares whole tokens", () => {
  assert.ok(bearerMatches(`Bearer ${METRICS_TOKEN}`, METRICS_TOKEN));
  assert.ok(!bearerMatches(`Bearer ${METRICS_TOKEN}x`, METRICS_TOKEN));
  assert.ok(!bearerMatches(`Bearer ${METRICS_TOKEN.slice(0, 5)}`, METRICS_TOKEN));
  assert.ok(!bearerMatches(METRICS_TOKEN, METRICS_TOKEN));
  assert.ok(!bearerMatches(undefined, METRICS_TOKEN));
});

function upgrade(url: string, headers: Record<string, string>): Promise<{ status: number; body: string }> {
  return new Promise((resolve) => {
    const ws = new WebSocket(url, { headers });
    ws.on("unexpected-response", (_req, res) => {
      let body = "";
      res.setEncoding("utf8").on("data", (d: string) => (body += d));
      res.on("end", () => resolve({ status: res.statusCode ?? 0, body }));
    });
    ws.on("open", () => {
      ws.close();
      resolve({ status: 101, body: "" });
    });
    ws.on("error", () => {});
  });
}

test("the upgrade: 401 with a reason for a missing, old, foreign or replayed token", { timeout: 30_000 }, async () => {
  const port = new URL(host.url).port;
  assert.match((await upgrade(host.url, {})).body, /edge token is missing/);
  const old = await upgrade(host.url, {
    authorization: bearer(`${Math.floor(Date.now() / 1000) + 60}.${"0".repeat(64)}`),
  });
  assert.equal(old.status, 401);
  assert.match(old.body, /before 0\.8\.0/);
  const foreign = await upgrade(host.url, { authorization: bearer(tokenFor(`ws://10.1.2.3:${port}`)) });
  assert.equal(foreign.status, 401);
  assert.match(foreign.body, /a host other than '127\.0\.0\.1:\d+'/);
  const token = tokenFor(host.url, "t");
  assert.equal((await upgrade(host.url, { authorization: bearer(token) })).status, 101);
  const replay = await upgrade(host.url, { authorization: bearer(token) });
  assert.equal(replay.status, 401);
  assert.match(replay.body, /already used/);
});

test("a connection serves only its token's tenant: another's frames get 'unauthorized', the connection stays", {
  timeout: 30_000,
}, async () => {
  const c = await HostClient.connect(host.url, { tenant: "acme.eu" });
  try {
    expectType(await c.call({ type: "open_session", tenant: "acme.eu", session: "s1", budget: 32 }), "opened");
    for (const frame of [
      { type: "open_session", id: 901, tenant: "bob", session: "s1", budget: 32 },
      { type: "append", id: 902, tenant: "bob", session: "s1", text: "hi" },
      { type: "generate", id: 903, tenant: "bob", session: "s1", max_tokens: 1 },
      { type: "stats", id: 904, tenant: "bob" },
      { type: "close", id: 905, tenant: "bob", session: "s1" },
      { type: "set_tenant", id: 906, tenant: "bob", max_sessions: 1000 },
    ]) {
      const e = expectType(await c.raw(encodeHostMessage(frame as never)), "error");
      assert.equal(e.code, "unauthorized", JSON.stringify(e));
      assert.equal(e.id, frame.id);
      assert.match(e.message, /edge token is for tenant 'acme\.eu', not 'bob'/);
    }
    const stats = expectType(await c.call({ type: "stats", tenant: "acme.eu", session: "s1" }), "stats_result");
    assert.equal(stats.session, "s1");
    // bob has no session: the refused open made none.
    const b = await HostClient.connect(host.url, { tenant: "bob" });
    assert.equal(expectType(await b.call({ type: "stats", tenant: "bob" }), "stats_result").sessions, 0);
    b.close();
    expectType(await c.call({ type: "close", tenant: "acme.eu", session: "s1" }), "closed");
  } finally {
    c.close();
  }
});

test("/metrics needs the scrape token; /health needs none and names no tenant", { timeout: 30_000 }, async () => {
  const base = `http://127.0.0.1:${host.address.port}`;
  const c = await HostClient.connect(host.url, { tenant: "secret-tenant" });
  expectType(await c.call({ type: "open_session", tenant: "secret-tenant", session: "m", budget: 32 }), "opened");
  const none = await fetch(`${base}/metrics`);
  assert.equal(none.status, 401);
  assert.match(none.headers.get("www-authenticate") ?? "", /^Bearer/);
  assert.match(await none.text(), /Authorization: Bearer/);
  assert.equal((await fetch(`${base}/metrics`, { headers: { authorization: "Bearer wrong" } })).status, 401);
  const edge = await fetch(`${base}/metrics`, { headers: { authorization: bearer(tokenFor(host.url)) } });
  assert.equal(edge.status, 401, "an edge token is no scrape token");
  const ok = await fetch(`${base}/metrics`, { headers: { authorization: bearer(METRICS_TOKEN) } });
  assert.equal(ok.status, 200);
  assert.match(await ok.text(), /pkv_host_sessions\{tenant="secret-tenant",state="active"\} 1/);

  const off = await fetch(`http://127.0.0.1:${bare.address.port}/metrics`, {
    headers: { authorization: bearer(METRICS_TOKEN) },
  });
  assert.equal(off.status, 403);
  assert.match(await off.text(), /--metrics-token/);

  const health = await fetch(`${base}/health`);
  assert.equal(health.status, 200);
  const text = await health.text();
  const h = JSON.parse(text) as Record<string, unknown>;
  // what routing (worker/src/routing.ts probe) reads
  for (const k of ["status", "model", "n_ctx", "pool_bytes", "kv_used_bytes", "protocol"]) assert.ok(k in h, k);
  assert.ok(!text.includes("secret-tenant"), text);
  assert.ok(!("connections" in h), "the connection count is a metric, not health");
  c.close();
});
