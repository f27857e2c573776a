// End to end: the edge worker in Miniflare (wrangler dev) + two real GPU hosts (pkv host + the
// engine + the embedded model), driven by the official openai client and by plain fetch.
import assert from "node:assert/strict";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";

import { runAdmin } from "@pyramidkv/gpu-host/admin";
import {
  DEFAULT_NEEDLE,
  directoryHaystack,
  essaysDir,
  generatedFiller,
  insertNeedle,
} from "@pyramidkv/gpu-host/haystack";
import { type Stack, startStack } from "@pyramidkv/gpu-host/stack";
import { readSse } from "@pyramidkv/gpu-host/sse";
import OpenAI from "openai";

const PIECE_BYTES = 4096;
const MAX_BODY = 1 << 20;

let stack: Stack;
let dir: string;
const keys: Record<string, string> = {};
let base: string;

before(async () => {
  dir = mkdtempSync(join(tmpdir(), "pkv-e2e-"));
  stack = await startStack({
    hosts: 2,
    kvPoolBytes: 512 << 20,
    persistDir: join(dir, "state"),
    threads: 2,
    vars: { PKV_PIECE_BYTES: String(PIECE_BYTES), PKV_MAX_BODY_BYTES: String(MAX_BODY) },
  });
  base = stack.worker.url;
  const tenants: Record<string, Record<string, number | string>> = {
    alpha: { max_sessions: 4, requests_per_minute: 1000 },
    beta: { max_sessions: 4, requests_per_minute: 1000 },
    limited: { max_sessions: 1, requests_per_minute: 4 },
    small: { kv_quota_bytes: 200_000, requests_per_minute: 1000 },
  };
  for (const [name, limits] of Object.entries(tenants)) {
    await stack.admin.setTenant(name, limits);
    keys[name] = await stack.admin.createKey(name);
  }
});

after(async () => {
  await stack?.stop();
  rmSync(dir, { recursive: true, force: true });
});

const client = (tenant: string) =>
  new OpenAI({ baseURL: `${base}/v1`, apiKey: keys[tenant] ?? "pkv-wrong", maxRetries: 0 });
const MODEL = "SmolLM2-135M-Instruct.Q4_1";

function api(tenant: string, method: string, path: string, body?: unknown): Promise<Response> {
  return fetch(`${base}${path}`, {
    method,
    headers: { authorization: `Bearer ${keys[tenant] ?? "pkv-wrong"}`, "content-type": "application/json" },
    ...(body === undefined ? {} : { body: typeof body === "string" ? body : JSON.stringify(body) }),
  });
}

async function errorOf(
  res: Response,
): Promise<{ status: number; type: string; code: string | null; param: string | null; message: string }> {
  const j = (await res.json()) as {
    error: { type: string; code: string | null; param: string | null; message: string };
  };
  assert.ok(j.error, `an OpenAI-style error body: ${JSON.stringify(j)}`);
  return { status: res.status, ...j.error };
}

/** Streams a session answer; returns its text, finish reason and any error event. */
async function ask(tenant: string, id: string, content: string, maxTokens: number, onText?: (t: string) => void) {
  const res = await api(tenant, "POST", `/v1/sessions/${id}/messages`, {
    content,
    max_tokens: maxTokens,
    stream: true,
  });
  if (res.status !== 200) assert.fail(`HTTP ${res.status}: ${await res.text()}`);
  let text = "";
  let finish: string | null = null;
  let error: { code?: string; message?: string } | undefined;
  let sawDone = false;
  for await (const ev of readSse(res)) {
    if (ev.data === "[DONE]") {
      sawDone = true;
      continue;
    }
    const j = JSON.parse(ev.data) as {
      error?: { code?: string; message?: string };
      object?: string;
      choices?: { delta: { content?: string }; finish_reason: string | null }[];
    };
    if (j.error) error = j.error;
    else {
      assert.equal(j.object, "chat.completion.chunk");
      const c = j.choices![0]!;
      if (c.delta.content) {
        text += c.delta.content;
        onText?.(c.delta.content);
      }
      finish = c.finish_reason ?? finish;
    }
  }
  return { text, finish, error, sawDone };
}

test("chat completions through the openai client: whole and streamed give the same greedy answer", {
  timeout: 300_000,
}, async () => {
  const messages = [
    { role: "system" as const, content: "You are a concise assistant." },
    { role: "user" as const, content: "What is the capital of France?" },
  ];
  const whole = await client("alpha").chat.completions.create({
    model: MODEL,
    messages,
    max_tokens: 10,
    temperature: 0,
  });
  assert.equal(whole.object, "chat.completion");
  const text = whole.choices[0]!.message.content ?? "";
  assert.ok(text.length > 0, "an answer");
  assert.ok(whole.usage!.completion_tokens >= 1 && whole.usage!.completion_tokens <= 10, JSON.stringify(whole.usage));
  assert.ok(whole.usage!.prompt_tokens > 10, JSON.stringify(whole.usage));
  assert.ok(["stop", "length"].includes(whole.choices[0]!.finish_reason));

  const stream = await client("alpha").chat.completions.create({
    model: MODEL,
    messages,
    max_tokens: 10,
    temperature: 0,
    stream: true,
    stream_options: { include_usage: true },
  });
  let streamed = "";
  let chunks = 0;
  let finish: string | null = null;
  let usage: OpenAI.CompletionUsage | undefined;
  for await (const chunk of stream) {
    assert.equal(chunk.object, "chat.completion.chunk");
    if (chunk.usage) usage = chunk.usage;
    const c = chunk.choices[0];
    if (!c) continue;
    if (c.delta.content) {
      streamed += c.delta.content;
      chunks++;
    }
    finish = c.finish_reason ?? finish;
  }
  assert.equal(streamed, text, "greedy: the streamed answer equals the whole one");
  assert.ok(chunks >= 2, `tokens arrive one by one (${chunks} chunks)`);
  assert.equal(finish, whole.choices[0]!.finish_reason);
  assert.equal(usage?.completion_tokens, whole.usage!.completion_tokens);
  // A multi-turn conversation: an assistant turn in the history is accepted.
  const multi = await client("alpha").chat.completions.create({
    model: MODEL,
    max_tokens: 4,
    messages: [...messages, { role: "assistant", content: "Paris." }, { role: "user", content: "And of Italy?" }],
  });
  assert.ok((multi.choices[0]!.message.content ?? "").length > 0);
  const models = await client("alpha").models.list();
  assert.deepEqual(
    models.data.map((m) => m.id),
    [MODEL],
  );
});

test("a long document (~3.5k tokens) uploaded in pieces with progress answers two streamed questions", {
  timeout: 600_000,
}, async () => {
  const hay = existsSync(essaysDir()) ? directoryHaystack(essaysDir(), 15_000) : generatedFiller(15_000);
  const document = insertNeedle(hay, DEFAULT_NEEDLE, 50);
  const res = await api("alpha", "POST", "/v1/sessions", {
    document,
    kv_method: "pyramidkv",
    kv_budget: 128,
    stream: true,
  });
  assert.equal(res.status, 200);
  const upload: number[] = [];
  const prefill: number[] = [];
  let session: Record<string, unknown> | undefined;
  for await (const ev of readSse(res)) {
    if (ev.event === "progress") {
      const p = JSON.parse(ev.data) as { phase: string; done: number; total: number };
      (p.phase === "upload" ? upload : prefill).push(p.done);
    } else if (ev.event === "session") session = JSON.parse(ev.data) as Record<string, unknown>;
    else if (ev.data !== "[DONE]") assert.fail(`unexpected event ${ev.event}: ${ev.data}`);
  }
  if (!session) {
    const events = [...upload.map((d) => `upload ${d}`), ...prefill.map((d) => `prefill ${d}`)].join(", ");
    assert.fail(
      `no session event after: ${events}\nworker log:\n${stack.worker.log().slice(-4000)}\nhosts:\n${stack.hosts.map((h) => h.log().slice(-2000)).join("\n")}`,
    );
  }
  const pieces = Math.ceil(Buffer.byteLength(document) / PIECE_BYTES);
  assert.ok(upload.length >= pieces - 1, `upload progress per piece (${upload.length} events, ${pieces} pieces)`);
  assert.deepEqual(
    upload,
    [...upload].sort((a, b) => a - b),
    "upload progress grows",
  );
  assert.ok(prefill.length >= 2, `prefill progress events (${prefill.length})`);
  const tokens = session.tokens as number;
  assert.ok(tokens > 3000 && tokens < 8192, `~3.5k tokens (${tokens})`);
  assert.ok(
    (session.kv_bytes as number) * 5 < (session.full_kv_bytes as number),
    `compressed: ${session.kv_bytes} vs FullKV ${session.full_kv_bytes}`,
  );
  assert.ok(
    stack.hosts.some((h) => h.url === session!.host),
    `bound to a registered host (${String(session.host)})`,
  );
  const id = session.id as string;

  const a1 = await ask("alpha", id, "What is the best thing to do in San Francisco?", 24);
  const a2 = await ask("alpha", id, "Summarise the document in one sentence.", 24);
  for (const a of [a1, a2]) {
    assert.equal(a.error, undefined);
    assert.ok(a.text.trim().length > 0, "an answer");
    assert.ok(a.sawDone && a.finish !== null);
  }
  const after = (await (await api("alpha", "GET", `/v1/sessions/${id}`)).json()) as Record<string, number | string>;
  assert.ok(
    (after.tokens as number) > tokens + 20,
    `the questions and answers were appended (${tokens} → ${after.tokens})`,
  );
  assert.equal(after.host, session.host, "sticks to its host");

  // Routing: the long session holds KV on its host, so a new session goes to the other, emptier one.
  const small = await api("beta", "POST", "/v1/sessions", { document: "A short note.", kv_budget: 32 });
  const smallSession = (await small.json()) as { id: string; host: string };
  assert.notEqual(smallSession.host, session.host, "a new session goes to the host with the most free KV");
  assert.equal((await api("beta", "DELETE", `/v1/sessions/${smallSession.id}`)).status, 200);

  const del = await api("alpha", "DELETE", `/v1/sessions/${id}`);
  assert.equal(((await del.json()) as { deleted: boolean }).deleted, true);
  assert.equal((await errorOf(await api("alpha", "GET", `/v1/sessions/${id}`))).status, 404);
});

test("wrong key → 401; another tenant's session → 404", { timeout: 300_000 }, async () => {
  await assert.rejects(
    client("nobody").chat.completions.create({ model: MODEL, messages: [{ role: "user", content: "hi" }] }),
    (e: unknown) => e instanceof OpenAI.AuthenticationError && e.status === 401,
  );
  const noKey = await fetch(`${base}/v1/models`);
  assert.equal((await errorOf(noKey)).status, 401);

  const made = await api("alpha", "POST", "/v1/sessions", {
    document: "A short note: the meeting is on Tuesday.",
    kv_budget: 32,
  });
  assert.equal(made.status, 201);
  const { id } = (await made.json()) as { id: string };
  for (const [method, path, body] of [
    ["GET", `/v1/sessions/${id}`],
    ["DELETE", `/v1/sessions/${id}`],
    ["POST", `/v1/sessions/${id}/messages`, { content: "When is the meeting?" }],
  ] as const) {
    const e = await errorOf(await api("beta", method, path, body));
    assert.equal(e.status, 404, `${method} ${path}`);
    assert.equal(e.type, "not_found_error");
  }
  const mine = await api("alpha", "POST", `/v1/sessions/${id}/messages`, {
    content: "When is the meeting?",
    max_tokens: 6,
    stream: false,
  });
  assert.equal(mine.status, 200, "the owner still reaches it");
  assert.equal((await api("alpha", "DELETE", `/v1/sessions/${id}`)).status, 200);
});

test("malformed or invalid bodies → 400 naming the parameter; too large → 413", { timeout: 60_000 }, async () => {
  const cases: [unknown, string | null, RegExp][] = [
    ["{not json", "body", /not valid JSON/],
    [{ model: MODEL, messages: [] }, "messages", /non-empty array/],
    [{ model: MODEL, messages: [{ role: "robot", content: "x" }] }, "messages[0].role", /one of system/],
    [
      { model: MODEL, messages: [{ role: "user", content: "x" }], kv_method: "magic" },
      "kv_method",
      /full, streamingllm, h2o, snapkv, pyramidkv/,
    ],
    [{ model: MODEL, messages: [{ role: "user", content: "x" }], kv_budget: 3 }, "kv_budget", /\[16, /],
    [{ model: MODEL, messages: [{ role: "user", content: "x" }], max_tokens: 0 }, "max_tokens", /\[1, 4096\]/],
    [{ messages: [{ role: "user", content: "x" }] }, "model", /required/],
  ];
  for (const [body, param, message] of cases) {
    const e = await errorOf(await api("alpha", "POST", "/v1/chat/completions", body));
    assert.equal(e.status, 400, JSON.stringify(body));
    assert.equal(e.type, "invalid_request_error");
    assert.equal(e.param, param);
    assert.match(e.message, message);
  }
  await assert.rejects(
    client("alpha").chat.completions.create({
      model: MODEL,
      messages: [{ role: "user", content: "x" }],
      temperature: 9,
    }),
    (e: unknown) => e instanceof OpenAI.BadRequestError && /temperature/.test(e.message),
  );
  const s = await errorOf(await api("alpha", "POST", "/v1/sessions", { document: "x", kv_method: "nope" }));
  assert.equal(s.param, "kv_method");
  const big = await errorOf(await api("alpha", "POST", "/v1/sessions", { document: "x".repeat(MAX_BODY + 10) }));
  assert.equal(big.status, 413);
});

test("quotas: requests per minute and sessions at the edge, KV bytes on the host → 429", {
  timeout: 300_000,
}, async () => {
  // limited: 1 session, 4 requests per minute.
  const first = await api("limited", "POST", "/v1/sessions", { document: "Note one.", kv_budget: 32 });
  assert.equal(first.status, 201);
  const second = await errorOf(await api("limited", "POST", "/v1/sessions", { document: "Note two.", kv_budget: 32 }));
  assert.equal(second.status, 429);
  assert.equal(second.code, "session_limit");
  let limited: Response | undefined;
  for (let i = 0; i < 4 && !limited; i++) {
    const r = await api("limited", "GET", "/v1/usage");
    if (r.status === 429) limited = r;
  }
  assert.ok(limited, "the 5th request of the minute is refused");
  assert.ok(Number(limited.headers.get("retry-after")) >= 1);
  const e = await errorOf(limited);
  assert.equal(e.code, "rate_limit_exceeded");
  // small: 200 kB of KV on each host; a prompt needs more at admission.
  await assert.rejects(
    client("small").chat.completions.create({
      model: MODEL,
      messages: [{ role: "user", content: "Hello there, how are you today?" }],
      max_tokens: 4,
    }),
    (err: unknown) => err instanceof OpenAI.RateLimitError && /quota/.test(err.message),
  );
});

test("a client disconnect cancels the generation on the host", { timeout: 400_000 }, async () => {
  const messages = [{ role: "user" as const, content: "Write the numbers from 1 to 300, separated by commas." }];
  const full = await client("beta").chat.completions.create({ model: MODEL, messages, max_tokens: 80 });
  const natural = full.usage!.completion_tokens;
  assert.ok(natural >= 40, `the uncancelled answer runs long (${natural} tokens)`);
  const generated = async () => {
    let n = 0;
    for (const h of stack.hosts) {
      const m = /pkv_host_generated_tokens_total\{tenant="beta"\} (\d+)/.exec(
        await (await fetch(`${h.url}/metrics`)).text(),
      );
      n += Number(m?.[1] ?? 0);
    }
    return n;
  };
  const before = await generated();
  const ctl = new AbortController();
  const stream = await client("beta").chat.completions.create(
    { model: MODEL, messages, max_tokens: 80, stream: true },
    { signal: ctl.signal },
  );
  let seen = 0;
  try {
    for await (const chunk of stream) {
      if (chunk.choices[0]?.delta.content) seen++;
      if (seen === 1) ctl.abort();
    }
  } catch {
    // an abort may surface as an error or end the iteration
  }
  assert.ok(seen >= 1 && seen < natural, `the client stopped reading after ${seen} chunks`);
  // A request behind it on the same tenant completes; then the count is final.
  await client("beta").chat.completions.create({
    model: MODEL,
    messages: [{ role: "user", content: "Hi" }],
    max_tokens: 1,
  });
  let cancelled = 0;
  for (let i = 0; i < 50; i++) {
    cancelled = (await generated()) - before - 1;
    const sessions = await Promise.all(
      stack.hosts.map(
        async (h) =>
          (await (await fetch(`${h.url}/metrics`)).text()).match(
            /pkv_host_sessions\{tenant="beta",state="active"\} (\d+)/,
          )?.[1] ?? "0",
      ),
    );
    if (sessions.every((s) => s === "0")) break;
    await new Promise((r) => setTimeout(r, 100));
  }
  assert.ok(cancelled < natural, `the cancelled generation stopped early (${cancelled} tokens vs ${natural})`);
});

test("a host killed mid-stream: a clean error, the next request goes to the live host", {
  timeout: 300_000,
}, async () => {
  const made = await api("alpha", "POST", "/v1/sessions", {
    document: "Numbers are fun to write down.",
    kv_budget: 32,
  });
  const s = (await made.json()) as { id: string; host: string };
  const victim = stack.hosts.find((h) => h.url === s.host)!;
  const survivor = stack.hosts.find((h) => h !== victim)!;
  let killed: Promise<void> | undefined;
  const answer = await ask("alpha", s.id, "Write the numbers from 1 to 300, separated by commas.", 300, () => {
    killed ??= victim.kill();
  });
  await killed;
  assert.equal(answer.error?.code, "host_unavailable", JSON.stringify(answer));
  assert.match(answer.error?.message ?? "", /went away/);
  // The dead host's session: 503, not a hang.
  assert.equal((await errorOf(await api("alpha", "GET", `/v1/sessions/${s.id}`))).status, 503);
  // New work goes to the survivor.
  const next = await client("alpha").chat.completions.create({
    model: MODEL,
    messages: [{ role: "user", content: "Say hello." }],
    max_tokens: 4,
  });
  assert.ok((next.choices[0]!.message.content ?? "").length > 0);
  const made2 = await api("alpha", "POST", "/v1/sessions", { document: "Another short note.", kv_budget: 32 });
  assert.equal(((await made2.json()) as { host: string }).host, survivor.url);
  const hosts = await stack.admin.hosts();
  assert.ok(hosts.data.find((h) => h.url === victim.url)!.down_until > 0, "the dead host is out of routing");
});

test("npx pkv admin --remote: tenants, keys and hosts of a running worker", { timeout: 60_000 }, async () => {
  const lines: string[] = [];
  const admin = (...args: string[]) =>
    runAdmin(["--remote", base, "--admin-token", stack.admin.token, ...args], (s) => lines.push(s));
  assert.equal(
    await admin("tenant", "set", "gamma", "--kv-quota-bytes", "1048576", "--max-sessions", "2", "--rpm", "30"),
    0,
  );
  assert.deepEqual(JSON.parse(lines.pop()!), {
    name: "gamma",
    kv_quota_bytes: 1048576,
    max_sessions: 2,
    requests_per_minute: 30,
    policy: "refuse",
  });
  assert.equal(await admin("key", "create", "gamma"), 0);
  const { key } = JSON.parse(lines.pop()!) as { key: string };
  keys.gamma = key;
  const usage = (await (await api("gamma", "GET", "/v1/usage")).json()) as {
    tenant: string;
    limits: { requests_per_minute: number };
  };
  assert.equal(usage.tenant, "gamma");
  assert.equal(usage.limits.requests_per_minute, 30);
  assert.equal(await admin("host", "list"), 0);
  assert.equal((JSON.parse(lines.pop()!) as { data: unknown[] }).data.length, 2);
  await assert.rejects(admin("tenant", "set", "gamma", "--rpm", "1.5"), /--rpm: '1.5' is not an integer >= 0/);
  await assert.rejects(
    runAdmin(["--remote", base, "--admin-token", "wrong", "tenant", "list"], () => {}),
    /HTTP 401/,
  );
});
