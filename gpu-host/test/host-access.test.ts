// What a channel may do and who may scrape (issue 12 item 9, issue 13): a channel of the host's
// socket serves only the tenant its channel_open named; /metrics needs the scrape token (a host
// token is none); /health names no tenant. (The host token itself is checked by the edge, and a
// refused one ends the host: host-link.test.ts.) Against the fake engine: no model needed.
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";

import { encodeHostMessage } from "@pyramidkv/shared";

import { hostToken } from "../src/host/direct-edge.js";
import { bearerMatches } from "../src/host/server.js";
import { fakeEngineBin } from "./fake-engine.js";
import { expectType, HostClient, METRICS_TOKEN, startTestHost } from "./host-client.js";

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

const bearer = (t: string) => `Bearer ${t}`;

test("bearerMatches compares whole tokens", () => {
  assert.ok(bearerMatches(`Bearer ${METRICS_TOKEN}`, METRICS_TOKEN));
  assert.ok(!bearerMatches(`Bearer ${METRICS_TOKEN}x`, METRICS_TOKEN));
  assert.ok(!bearerMatches(`Bearer ${METRICS_TOKEN.slice(0, 5)}`, METRICS_TOKEN));
  assert.ok(!bearerMatches(METRICS_TOKEN, METRICS_TOKEN));
  assert.ok(!bearerMatches(undefined, METRICS_TOKEN));
});

test("a channel serves only the tenant channel_open named: another's frames get 'unauthorized', the channel stays", {
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
      assert.match(e.message, /this channel is for tenant 'acme\.eu', not 'bob'/);
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
  const edge = await fetch(`${base}/metrics`, { headers: { authorization: bearer(hostToken(host.name)) } });
  assert.equal(edge.status, 401, "a host token is no scrape token");
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
