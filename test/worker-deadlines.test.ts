// End to end, the edge's deadlines and credentials (issue 12 items 5 and 9; dial-in since 0.9.0)
// through the real edge worker (Miniflare): a real GPU host connects with its host token and
// serves the tenant; a host that connects and then never answers a call ends the request with a
// retryable 503 (Retry-After) after the idle deadline set by the worker's var, its channel closed
// (the host cancels the work); a host whose heartbeats stop is out of routing at once, its socket
// closed, and the session's next request goes to a live host. The fake hosts are small ws clients
// in this process (test/dial-host.ts).
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";

import { type Stack, startStack } from "@pyramidkv/gpu-host/stack";

import { DialHost, type DialHostOptions } from "./dial-host.js";

const IDLE_MS = 8000;
/** a request that the deadlines do not end waits for ever: give up on it (and fail) long after them */
const GIVE_UP_MS = 90_000;

let stack: Stack;
let dir: string;
let key: string;
const fakes: DialHost[] = [];

before(async () => {
  dir = mkdtempSync(join(tmpdir(), "pkv-deadlines-"));
  stack = await startStack({
    hosts: 1,
    kvPoolBytes: 64 << 20,
    persistDir: join(dir, "state"),
    threads: 2,
    vars: { PKV_HOST_IDLE_TIMEOUT_MS: String(IDLE_MS) },
  });
  await stack.admin.setTenant("acme.eu", { requests_per_minute: 1000, max_sessions: 8 });
  key = await stack.admin.createKey("acme.eu");
});

after(async () => {
  for (const f of fakes) await f.close().catch(() => {});
  await stack?.stop();
  rmSync(dir, { recursive: true, force: true });
});

function api(method: string, path: string, body?: unknown): Promise<Response> {
  return fetch(`${stack.worker.url}${path}`, {
    method,
    headers: { authorization: `Bearer ${key}`, "content-type": "application/json" },
    ...(body === undefined ? {} : { body: JSON.stringify(body) }),
    signal: AbortSignal.timeout(GIVE_UP_MS),
  });
}

async function fakeHost(name: string, opts: DialHostOptions = {}): Promise<DialHost> {
  const { token } = await stack.admin.createHost(name);
  const h = await DialHost.connect(stack.worker.url, token, opts);
  fakes.push(h);
  await until(async () => (await stack.listHosts()).hosts.some((x) => x.name === name && x.live), `${name} to be live`);
  return h;
}

async function until(check: () => boolean | Promise<boolean>, what: string, ms = 30_000): Promise<void> {
  const end = Date.now() + ms;
  while (!(await check())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

test("a real GPU host dials in with its host token and serves tenant 'acme.eu'", {
  timeout: 300_000,
}, async () => {
  const r = await api("POST", "/v1/chat/completions", {
    model: "default",
    max_tokens: 2,
    messages: [{ role: "user", content: "Hi" }],
  });
  assert.equal(r.status, 200, await r.clone().text());
  const metrics = await stack.metrics(stack.hosts[0]!);
  assert.match(metrics, /pkv_host_generated_tokens_total\{tenant="acme\.eu"\} [1-9]/);
});

test("a host that connects and never answers a call: 503 with Retry-After after the idle deadline, its channel closed", {
  timeout: 300_000,
}, async () => {
  const host = await fakeHost("silent-0", { model: "silent.gguf", serve: true, silent: ["generate"] });
  const r = await api("POST", "/v1/chat/completions", {
    model: "silent",
    max_tokens: 4,
    messages: [{ role: "user", content: "Hi" }],
  });
  assert.ok(host.seen.includes("generate"), `the host got the generate (${host.seen.join(", ")})`);
  assert.equal(r.status, 503, await r.clone().text());
  assert.ok(Number(r.headers.get("retry-after")) > 0, "Retry-After");
  const e = ((await r.json()) as { error: { code: string; message: string } }).error;
  assert.equal(e.code, "host_unavailable");
  assert.match(e.message, new RegExp(`no answer from the host for ${IDLE_MS} ms`));
  await until(() => host.closedChannels.length >= 1, "the edge to close the channel (cancelling the work on the host)");
});

test("a host whose heartbeats stop: out of routing at once, its socket closed 4002; the session's next request goes to a live host", {
  timeout: 300_000,
}, async () => {
  // Both serve the model "hang"; the session opens on one of them, which then hangs.
  const a = await fakeHost("hang-0", { model: "hang.gguf", serve: true, heartbeatMs: 1000 });
  const b = await fakeHost("hang-1", { model: "hang.gguf", serve: true, heartbeatMs: 1000 });
  const made = await api("POST", "/v1/sessions", { model: "hang", document: "The meeting is on Tuesday." });
  assert.equal(made.status, 201, await made.clone().text());
  const s = (await made.json()) as { id: string; host: string };
  const rows = (await stack.listHosts()).hosts;
  const onA = rows.find((h) => h.id === s.host)?.name === "hang-0";
  const [hung, other] = onA ? [a, b] : [b, a];
  const hungName = onA ? "hang-0" : "hang-1";
  hung.stopHeartbeats();
  const t0 = Date.now();
  await until(
    async () => !(await stack.listHosts()).hosts.some((h) => h.name === hungName && h.live),
    "the hung host out of routing",
  );
  const outAfter = Date.now() - t0;
  assert.equal(await Promise.race([hung.closed, new Promise((r) => setTimeout(() => r("open"), 60_000))]), 4002);
  const hungSeen = hung.seen.length;
  const r = await api("POST", `/v1/sessions/${s.id}/messages`, { content: "When?", stream: false, max_tokens: 4 });
  assert.equal(r.status, 200, await r.clone().text());
  assert.ok(other.seen.includes("generate"), `the live host answered it (${other.seen.join(", ")})`);
  assert.equal(hung.seen.length, hungSeen, "the hung host got nothing more");
  assert.ok(outAfter < 30_000, `out of routing ${outAfter} ms after the last heartbeat`);
});
