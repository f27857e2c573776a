// End to end, a fleet (issue 13): the edge worker in Miniflare (Durable Objects, local R2) and three
// real GPU hosts (pkv host + the engine + the embedded model) that dial in with host tokens. A
// session outlives its host: killed between turns, killed mid-stream, drained, or the worker
// restarted (a deploy), its next turn answers as an uninterrupted twin's (greedy; each twin answers
// before the fault, alone on its host, so no batch rounds it differently). A revoked token cannot
// connect; 50 fake hosts that speak only host_hello + heartbeat leave routing in the table (the
// registry's storage reads per request shown and bounded); a host whose heartbeats stop is out.
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";

import { metricSum } from "@pyramidkv/gpu-host/soak";
import { readSse } from "@pyramidkv/gpu-host/sse";
import { exitCodeOf, type Stack, spawnHostProcess, startStack, until } from "@pyramidkv/gpu-host/stack";

import { DialHost } from "./dial-host.js";

const MODEL = "SmolLM2-135M-Instruct.Q4_1";
const TENANT = "fleet";
const DOC =
  "Meeting notes. The team meets on Tuesday at the library on Elm Street. Bring the blue folder, " +
  "two pens and the budget sheet. Maria chairs the meeting; Tom takes the minutes. The next review is in March.";
const QUESTIONS = [
  "When is the meeting?",
  "What should I bring?",
  "Who takes the minutes?",
  "Where is the library?",
  "When is the next review?",
];

let stack: Stack;
let dir: string;
let key: string;
let base: string;

before(async () => {
  dir = mkdtempSync(join(tmpdir(), "pkv-fleet-"));
  stack = await startStack({
    hosts: 3,
    kvPoolBytes: 256 << 20,
    persistDir: join(dir, "state"),
    threads: 2,
    hostPrefix: "gpu",
  });
  base = stack.worker.url;
  await stack.admin.setTenant(TENANT, { max_sessions: 64, requests_per_minute: 100_000 });
  key = await stack.admin.createKey(TENANT);
});

after(async () => {
  await stack?.stop();
  rmSync(dir, { recursive: true, force: true });
});

/** A response's JSON body; a body that is not JSON (a worker that failed to load) fails naming it. */
async function jsonOf<T>(r: Response): Promise<T> {
  const text = await r.text();
  try {
    return JSON.parse(text) as T;
  } catch {
    return assert.fail(`HTTP ${r.status}, not JSON: ${text.slice(0, 300)}${logs()}`);
  }
}

function api(method: string, path: string, body?: unknown): Promise<Response> {
  return fetch(`${base}${path}`, {
    method,
    headers: { authorization: `Bearer ${key}`, "content-type": "application/json" },
    ...(body === undefined ? {} : { body: JSON.stringify(body) }),
  });
}

const logs = () =>
  `\nworker:\n${stack.worker.log().slice(-2500)}\n${stack.hosts.map((h) => `${h.name}:\n${h.log().slice(-2500)}`).join("\n")}`;

type SessionObject = { id: string; host: string; tokens: number; kv_bytes: number };

async function createSession(extra: Record<string, unknown> = {}): Promise<SessionObject> {
  const r = await api("POST", "/v1/sessions", { document: DOC, kv_budget: 32, ...extra });
  const j = await jsonOf<SessionObject>(r);
  assert.equal(r.status, 201, `${JSON.stringify(j)}${logs()}`);
  return j;
}

async function sessionObject(id: string): Promise<SessionObject> {
  const r = await api("GET", `/v1/sessions/${id}`);
  const j = await jsonOf<SessionObject>(r);
  assert.equal(r.status, 200, `GET ${id}: ${JSON.stringify(j)}${logs()}`);
  return j;
}

type Answer = { status: number; text: string; code: string | null; retryAfter: string | null; body: unknown };

/** A non-streamed, greedy message on a session. */
async function message(id: string, content: string, maxTokens = 12): Promise<Answer> {
  const r = await api("POST", `/v1/sessions/${id}/messages`, {
    content,
    max_tokens: maxTokens,
    temperature: 0,
    stream: false,
  });
  const j = await jsonOf<{
    error?: { code: string | null };
    choices?: { message: { content: string | null } }[];
  }>(r);
  return {
    status: r.status,
    text: j.choices?.[0]?.message.content ?? "",
    code: j.error?.code ?? null,
    retryAfter: r.headers.get("retry-after"),
    body: j,
  };
}

async function answered(id: string, content: string, maxTokens = 12): Promise<string> {
  const a = await message(id, content, maxTokens);
  assert.equal(a.status, 200, `${content}: ${JSON.stringify(a.body)}${logs()}`);
  return a.text;
}

/** The stack's index of the host a session object names by its opaque id. */
async function hostIndexOf(s: SessionObject): Promise<number> {
  const h = await stack.hostById(s.host);
  assert.ok(h, `the session's host ${s.host} is one of the stack's: ${JSON.stringify(await stack.listHosts())}`);
  return stack.hosts.indexOf(h);
}

async function live(name: string): Promise<boolean> {
  return (await stack.listHosts()).hosts.some((h) => h.name === name && h.live);
}

/** Every host of the stack running and live (an earlier test may have killed or drained one). */
async function allHosts(): Promise<void> {
  for (const [i, h] of stack.hosts.entries()) if (!h.running) await stack.startHost(i);
  await stack.waitLive();
}

/** A session and its twin (same document); the twin answers `n` questions first, uninterrupted. */
async function sessionAndTwin(n: number) {
  const s = await createSession();
  const twin = await createSession();
  const expected: string[] = [];
  for (let k = 0; k < n; k++) expected.push(await answered(twin.id, QUESTIONS[k]!));
  return { s, twin, expected };
}

test("three hosts dial in: the registry lists them live with their model and pool; sessions spread over them", {
  timeout: 300_000,
}, async () => {
  const list = await stack.listHosts();
  assert.deepEqual(list.hosts.map((h) => h.name).sort(), ["gpu-0", "gpu-1", "gpu-2"]);
  for (const h of list.hosts) {
    assert.ok(h.connected && h.live && !h.draining, JSON.stringify(h));
    assert.match(h.model ?? "", /SmolLM2-135M-Instruct/);
    assert.ok((h.pool_bytes ?? 0) > 0 && (h.free_bytes ?? -1) >= 0, JSON.stringify(h));
    assert.match(h.id, /^host-[0-9a-f]{16}$/);
  }
  assert.ok(list.routing.routes >= 0 && list.routing.storage_reads >= 0, JSON.stringify(list.routing));
  // without the prompt cache: with it, sessions on one document go to the host that stored it while it has room
  const off = { kv_cache: "off" };
  const made = [await createSession(off), await createSession(off), await createSession(off)];
  const ids = new Set(made.map((s) => s.host));
  assert.ok(ids.size >= 2, `new sessions go to the host with the most free KV: ${JSON.stringify(made)}`);
  for (const s of made) assert.equal((await api("DELETE", `/v1/sessions/${s.id}`)).status, 200);
});

test("a conversation's host is kill -9'd between turns: the next turn is answered by another host, as its twin", {
  timeout: 400_000,
}, async () => {
  await allHosts();
  const { s, expected } = await sessionAndTwin(2);
  assert.equal(await answered(s.id, QUESTIONS[0]!), expected[0], "turn 1 answers as the twin");
  const victim = await hostIndexOf(await sessionObject(s.id));
  const victimName = stack.hosts[victim]!.name;
  await stack.killHost(victim);
  assert.ok(await until(async () => !(await live(victimName)), 30_000), `${victimName} out of routing${logs()}`);
  const next = await message(s.id, QUESTIONS[1]!);
  assert.equal(next.status, 200, `the next turn after the kill: ${JSON.stringify(next.body)}${logs()}`);
  assert.equal(next.text, expected[1], "restored from R2 on another host: the twin's tokens");
  const moved = await sessionObject(s.id);
  assert.notEqual(await hostIndexOf(moved), victim, "the session's host changed");
  assert.ok(moved.tokens > s.tokens, `the turns are in the session (${s.tokens} → ${moved.tokens} tokens)`);
  await stack.startHost(victim);
});

test("a host killed mid-stream: a clean retryable error (SSE error event; 503 + Retry-After when not streamed), the retry continues from the last checkpoint on another host", {
  timeout: 600_000,
}, async () => {
  await allHosts();
  const COUNT = "Write the numbers from 1 to 300, separated by commas.";
  // long enough (300 tokens) that the kill lands while the host generates
  const DOWN = "Write the numbers from 300 down to 1, separated by commas.";
  const s = await createSession();
  const twin = await createSession();
  const twinCount = await answered(twin.id, COUNT, 60);
  const twinDown = await answered(twin.id, DOWN, 300);
  const restarts: Promise<void>[] = [];

  // Streamed: the host dies after the first token.
  const victim = await hostIndexOf(s);
  const res = await api("POST", `/v1/sessions/${s.id}/messages`, {
    content: COUNT,
    max_tokens: 60,
    temperature: 0,
    stream: true,
  });
  assert.equal(res.status, 200);
  let killed: Promise<void> | undefined;
  let error: { code?: string; message?: string } | undefined;
  let text = "";
  for await (const ev of readSse(res)) {
    if (ev.data === "[DONE]") continue;
    const j = JSON.parse(ev.data) as { error?: typeof error; choices?: { delta: { content?: string } }[] };
    if (j.error) error = j.error;
    const piece = j.choices?.[0]?.delta.content;
    if (piece) {
      text += piece;
      killed ??= stack.killHost(victim);
    }
  }
  await killed;
  assert.ok(text.length > 0, "tokens came before the kill");
  assert.equal(error?.code, "host_unavailable", `a typed, retryable error event: ${JSON.stringify(error)}${logs()}`);
  restarts.push(stack.startHost(victim));
  const retry = await message(s.id, COUNT, 60);
  assert.equal(retry.status, 200, `the retry: ${JSON.stringify(retry.body)}${logs()}`);
  assert.equal(retry.text, twinCount, "the retry answers as the twin (the broken turn rolled back whole)");
  const second = await hostIndexOf(await sessionObject(s.id));
  assert.notEqual(second, victim, "the retry ran on another host");

  // Not streamed: the next host dies while it generates; the answer is 503 with Retry-After.
  const host = stack.hosts[second]!;
  const generated = () =>
    stack.metrics(host).then((m) => metricSum(m, "pkv_host_generated_tokens_total", { tenant: TENANT }));
  const before = await generated();
  const pending = message(s.id, DOWN, 300);
  assert.ok(
    await until(async () => (await generated().catch(() => before)) > before, 120_000, 20),
    `the host generates${logs()}`,
  );
  await stack.killHost(second);
  const cut = await pending;
  assert.equal(cut.status, 503, `killed while generating: ${JSON.stringify(cut.body)}${logs()}`);
  assert.equal(cut.code, "host_unavailable");
  assert.ok(Number(cut.retryAfter) >= 1, `Retry-After: ${cut.retryAfter}`);
  restarts.push(stack.startHost(second));
  const again = await message(s.id, DOWN, 300);
  assert.equal(again.status, 200, `the retry: ${JSON.stringify(again.body)}${logs()}`);
  assert.equal(again.text, twinDown, "the retry answers as the twin");
  await Promise.all(restarts);
});

test("drain (SIGTERM): every session checkpointed to R2, the host exits 0, the next turns land elsewhere as their twins'", {
  timeout: 400_000,
}, async () => {
  await allHosts();
  // Sessions until two share a host: the drained one.
  const pairs: Awaited<ReturnType<typeof sessionAndTwin>>[] = [];
  let victim = -1;
  for (let i = 0; i < 6 && victim < 0; i++) {
    pairs.push(await sessionAndTwin(2));
    const at = await Promise.all(pairs.map((p) => hostIndexOf(p.s)));
    victim = at.find((h, k) => at.indexOf(h) !== k) ?? -1;
  }
  assert.ok(victim >= 0, "two sessions on one host");
  const on: typeof pairs = [];
  for (const p of pairs) if ((await hostIndexOf(p.s)) === victim) on.push(p);
  for (const p of on) assert.equal(await answered(p.s.id, QUESTIONS[0]!), p.expected[0]);
  const name = stack.hosts[victim]!.name;
  const oldId = (await sessionObject(on[0]!.s.id)).host;
  const code = await stack.drainHost(victim);
  assert.equal(code, 0, `a drained host exits 0${logs()}`);
  assert.ok(await until(async () => !(await live(name)), 30_000), `${name} out of routing`);
  for (const p of on) {
    const next = await message(p.s.id, QUESTIONS[1]!);
    assert.equal(next.status, 200, JSON.stringify(next.body));
    assert.equal(next.text, p.expected[1], "restored from R2: the twin's tokens");
    const now = await sessionObject(p.s.id);
    assert.notEqual(now.host, oldId, "the session object's host changed");
  }
  await stack.startHost(victim);
});

test("the worker restarted (a deploy): the hosts reconnect by themselves, sessions continue as their twins", {
  timeout: 400_000,
}, async () => {
  await allHosts();
  const { s, expected } = await sessionAndTwin(2);
  assert.equal(await answered(s.id, QUESTIONS[0]!), expected[0]);
  const before = new Map((await stack.listHosts()).hosts.map((h) => [h.name, h.connected_at]));
  await stack.restartWorker();
  // every host dials again by itself: a new connection (connected_at later than before the deploy)
  const reconnected = async () => {
    const rows = (await stack.listHosts().catch(() => ({ hosts: [] }))).hosts;
    return stack.hosts.every((h) => {
      const row = rows.find((r) => r.name === h.name);
      return row?.live === true && (row.connected_at ?? 0) > (before.get(h.name) ?? 0);
    });
  };
  assert.ok(
    await until(reconnected, 60_000),
    `every host reconnected: ${JSON.stringify((await stack.listHosts()).hosts)}${logs()}`,
  );
  for (const h of stack.hosts) assert.ok(h.running, `${h.name} kept running through the deploy`);
  const next = await message(s.id, QUESTIONS[1]!);
  assert.equal(next.status, 200, `${JSON.stringify(next.body)}${logs()}`);
  assert.equal(next.text, expected[1], "the session continues as its twin");
});

test("a revoked host token cannot connect: the host exits 1 naming --host-token; a live host revoked is disconnected", {
  timeout: 400_000,
}, async () => {
  const { token } = await stack.admin.createHost("revoked-0");
  await stack.admin.revokeHost("revoked-0");
  const refused = spawnHostProcess({ connect: base, token, kvPoolBytes: 64 << 20, threads: 1 });
  const code = await exitCodeOf(refused.child);
  assert.equal(code, 1, refused.logs.join(""));
  assert.match(refused.logs.join(""), /--host-token/);
  assert.ok(!(await stack.listHosts()).hosts.some((h) => h.name === "revoked-0" && h.connected));
  // A fake host with the same revoked token: the upgrade itself is refused (401).
  await assert.rejects(DialHost.connect(base, token), /HTTP 401/);
  // A live host revoked: its socket is closed, it cannot reconnect, it exits 1.
  const spare = await stack.addHost("spare-0", ["--kv-pool-bytes", String(64 << 20)]);
  await stack.admin.revokeHost("spare-0");
  assert.equal(await exitCodeOf(spare.child), 1, spare.log());
  assert.ok(!(await stack.listHosts()).hosts.some((h) => h.name === "spare-0" && h.live));
  stack.hosts.splice(stack.hosts.indexOf(spare), 1);
});

test("50 fake hosts (host_hello + heartbeat only): routing answers from the table, at most 1 storage read per request", {
  timeout: 400_000,
}, async (t) => {
  await allHosts();
  const fakes: DialHost[] = [];
  try {
    const tokens = await Promise.all(
      Array.from({ length: 50 }, (_, i) => stack.admin.createHost(`fake-${i}`).then((r) => r.token)),
    );
    for (const token of tokens)
      fakes.push(await DialHost.connect(base, token, { model: "fake-model.gguf", poolBytes: 1 << 40 }));
    assert.ok(
      await until(async () => (await stack.listHosts()).hosts.filter((h) => h.live).length >= 53, 60_000),
      `53 live hosts (50 fake, 3 real): ${JSON.stringify((await stack.listHosts()).hosts.map((h) => [h.name, h.live]))}`,
    );
    const rows: { request: number; status: number; routes: number; storage_reads: number }[] = [];
    for (let i = 0; i < 10; i++) {
      const r0 = (await stack.listHosts()).routing;
      const r = await api("POST", "/v1/chat/completions", {
        model: MODEL,
        max_tokens: 1,
        messages: [{ role: "user", content: `Say ${i}.` }],
      });
      const body = await r.text();
      const r1 = (await stack.listHosts()).routing;
      const row = {
        request: i,
        status: r.status,
        routes: r1.routes - r0.routes,
        storage_reads: r1.storage_reads - r0.storage_reads,
      };
      rows.push(row);
      t.diagnostic(JSON.stringify(row));
      assert.equal(r.status, 200, body);
    }
    t.diagnostic(`totals after 10 requests: ${JSON.stringify((await stack.listHosts()).routing)}`);
    for (const row of rows) {
      assert.ok(row.routes >= 1, `each new chat session is routed by the registry: ${JSON.stringify(row)}`);
      assert.ok(row.storage_reads <= 1, `O(1) storage reads per request with 53 hosts: ${JSON.stringify(row)}`);
    }
    // None of them went to a fake host: they serve another model (and would not answer).
    for (const f of fakes) assert.deepEqual(f.seen, [], "no request reached a fake host");
  } finally {
    await Promise.all(fakes.map((f) => f.close()));
    await Promise.all(Array.from({ length: 50 }, (_, i) => stack.admin.revokeHost(`fake-${i}`).catch(() => undefined)));
  }
});

test("a host whose heartbeats stop is out of routing at once, and its socket is closed (4002)", {
  timeout: 120_000,
}, async () => {
  const { token } = await stack.admin.createHost("quiet-0");
  const quiet = await DialHost.connect(base, token, { model: "quiet-model.gguf", heartbeatMs: 1000 });
  try {
    assert.ok(await until(() => live("quiet-0"), 30_000), "live after its hello");
    quiet.stopHeartbeats();
    assert.ok(await until(async () => !(await live("quiet-0")), 30_000), "out of routing once heartbeats stop");
    assert.equal(await Promise.race([quiet.closed, new Promise((r) => setTimeout(() => r("open"), 60_000))]), 4002);
  } finally {
    await quiet.close();
    await stack.admin.revokeHost("quiet-0").catch(() => undefined);
  }
});
