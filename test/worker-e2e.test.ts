// End to end: the edge worker in Miniflare (wrangler dev) + two real GPU hosts (pkv host + the
// engine + the embedded model) dialling in with host tokens, driven by the official openai client
// and by plain fetch.
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

/** The stack's host a session object names by its opaque id (the admin's host list maps them). */
function hostOf(id: string) {
  return stack.hostById(id);
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
  const bound = await hostOf(session.host as string);
  assert.ok(bound && stack.hosts.includes(bound), `bound to one of the hosts (${String(session.host)})`);
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
    [{ model: MODEL, messages: [{ role: "user", content: "x" }], max_tokens: 0 }, "max_tokens", /\[1, 1048576\]/],
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
      const m = /pkv_host_generated_tokens_total\{tenant="beta"\} (\d+)/.exec(await stack.metrics(h));
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
          (await stack.metrics(h)).match(/pkv_host_sessions\{tenant="beta",state="active"\} (\d+)/)?.[1] ?? "0",
      ),
    );
    if (sessions.every((s) => s === "0")) break;
    await new Promise((r) => setTimeout(r, 100));
  }
  assert.ok(cancelled < natural, `the cancelled generation stopped early (${cancelled} tokens vs ${natural})`);
});

test("a host killed mid-stream: a clean error; the session continues on the live host; new work goes there", {
  timeout: 300_000,
}, async () => {
  const made = await api("alpha", "POST", "/v1/sessions", {
    document: "Numbers are fun to write down.",
    kv_budget: 32,
  });
  const s = (await made.json()) as { id: string; host: string };
  const victim = (await hostOf(s.host))!;
  const survivor = stack.hosts.find((h) => h !== victim)!;
  let killed: Promise<void> | undefined;
  const answer = await ask("alpha", s.id, "Write the numbers from 1 to 300, separated by commas.", 300, () => {
    killed ??= victim.kill();
  });
  await killed;
  assert.equal(answer.error?.code, "host_unavailable", JSON.stringify(answer));
  assert.match(answer.error?.message ?? "", /went away/);
  // Dial-in (0.9.0): the dead host's session is restored from R2 on the survivor (it was a 503).
  const moved = await api("alpha", "GET", `/v1/sessions/${s.id}`);
  assert.equal(moved.status, 200, await moved.clone().text());
  assert.equal(await hostOf(((await moved.json()) as { host: string }).host), survivor);
  // New work goes to the survivor.
  const next = await client("alpha").chat.completions.create({
    model: MODEL,
    messages: [{ role: "user", content: "Say hello." }],
    max_tokens: 4,
  });
  assert.ok((next.choices[0]!.message.content ?? "").length > 0);
  const made2 = await api("alpha", "POST", "/v1/sessions", { document: "Another short note.", kv_budget: 32 });
  assert.equal(await hostOf(((await made2.json()) as { host: string }).host), survivor);
  const row = (await stack.listHosts()).hosts.find((h) => h.name === victim.name);
  assert.ok(row && !row.live, `the dead host is out of routing: ${JSON.stringify(row)}`);
  await stack.startHost(stack.hosts.indexOf(victim));
});

test("npx pkv admin --remote: tenants, keys and hosts of a running worker", { timeout: 60_000 }, async () => {
  const lines: string[] = [];
  const admin = (...args: string[]) =>
    runAdmin(["--remote", base, "--admin-token", stack.admin.token, ...args], (s) => lines.push(s));
  assert.equal(
    await admin(
      "tenant",
      "set",
      "gamma",
      "--kv-quota-bytes",
      "1048576",
      "--max-sessions",
      "2",
      "--rpm",
      "30",
      "--session-ttl-seconds",
      "600",
      "--max-stored-bytes",
      "67108864",
    ),
    0,
  );
  assert.deepEqual(JSON.parse(lines.pop()!), {
    name: "gamma",
    kv_quota_bytes: 1048576,
    max_sessions: 2,
    requests_per_minute: 30,
    policy: "refuse",
    session_ttl_s: 600,
    max_stored_bytes: 67108864,
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
  const listed = JSON.parse(lines.pop()!) as { hosts: { name: string; live: boolean }[]; routing: object };
  assert.deepEqual(listed.hosts.map((h) => [h.name, h.live]).sort(), [
    ["host-0", true],
    ["host-1", true],
  ]);
  assert.ok("routes" in listed.routing && "storage_reads" in listed.routing, JSON.stringify(listed.routing));
  // Host tokens: created once (the token shown then only), revoked; hosts dial in, no URLs.
  assert.equal(await admin("host", "create", "e2e-spare"), 0);
  const made = JSON.parse(lines.pop()!) as { name: string; token: string };
  assert.equal(made.name, "e2e-spare");
  assert.match(made.token, /^pkvh\.e2e-spare\.[0-9a-f]{64}$/);
  await assert.rejects(admin("host", "create", "e2e-spare"), /HTTP 409/);
  assert.equal(await admin("host", "revoke", "e2e-spare"), 0);
  lines.pop();
  assert.equal(await admin("host", "list"), 0);
  assert.ok(!(JSON.parse(lines.pop()!) as typeof listed).hosts.some((h) => h.name === "e2e-spare"));
  await assert.rejects(admin("host", "add", "http://127.0.0.1:8790"), /hosts dial in now/);
  await assert.rejects(admin("tenant", "set", "gamma", "--rpm", "1.5"), /--rpm: '1.5' is not an integer >= 0/);
  await assert.rejects(
    runAdmin(["--remote", base, "--admin-token", "wrong", "tenant", "list"], () => {}),
    /HTTP 401/,
  );
});

// ---- Issue 11: what a user of the official openai client expects (compare llama-server / vLLM) ----

const user = (content: string) => [{ role: "user" as const, content }];
const COUNT = "Count from 1 to 30, separated by commas.";

async function streamedText(
  params: Omit<OpenAI.ChatCompletionCreateParamsStreaming, "stream">,
  tenant = "alpha",
): Promise<{ text: string; finish: string | null; logprobs: OpenAI.ChatCompletionTokenLogprob[] }> {
  const stream = await client(tenant).chat.completions.create({ ...params, stream: true });
  let text = "";
  let finish: string | null = null;
  const logprobs: OpenAI.ChatCompletionTokenLogprob[] = [];
  for await (const chunk of stream) {
    const c = chunk.choices[0];
    if (!c) continue;
    text += c.delta.content ?? "";
    logprobs.push(...(c.logprobs?.content ?? []));
    finish = c.finish_reason ?? finish;
  }
  return { text, finish, logprobs };
}

test("chat goes through the model's own template: the same tokens and answer as the raw prompt it renders to", {
  timeout: 300_000,
}, async () => {
  const models = await client("alpha").models.list();
  const m = models.data[0] as OpenAI.Model & { chat_template?: string; context_length?: number };
  assert.equal(m.chat_template, "gguf", "the embedded SmolLM2 GGUF carries its template");
  assert.ok((m.context_length ?? 0) >= 2048, JSON.stringify(m));
  const chat = await client("alpha").chat.completions.create({
    model: MODEL,
    max_tokens: 12,
    messages: [
      { role: "system", content: "You are a concise assistant." },
      { role: "user", content: "Name a colour." },
    ],
  });
  // SmolLM2's template is ChatML (libllama renders it so for a conversation that has a system turn).
  const raw = await client("alpha").completions.create({
    model: MODEL,
    max_tokens: 12,
    prompt:
      "<|im_start|>system\nYou are a concise assistant.<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n",
  });
  assert.equal(chat.usage!.prompt_tokens, raw.usage!.prompt_tokens, "the same prompt tokens");
  assert.equal(chat.choices[0]!.message.content, raw.choices[0]!.text, "the same greedy answer");
  // Template markup inside content is text, not a turn: it tokenises to several ordinary tokens.
  const marker = await client("alpha").chat.completions.create({
    model: MODEL,
    max_tokens: 1,
    messages: user("<|im_start|>system"),
  });
  const empty = await client("alpha").chat.completions.create({ model: MODEL, max_tokens: 1, messages: user("") });
  assert.ok(
    marker.usage!.prompt_tokens - empty.usage!.prompt_tokens >= 4,
    `'<|im_start|>system' as text is several tokens (${marker.usage!.prompt_tokens} vs ${empty.usage!.prompt_tokens})`,
  );
});

test("sampling: seed repeats, no seed varies, top_k 1 and min_p 1 are greedy, penalties change the text", {
  timeout: 900_000,
}, async () => {
  const ask = (extra: Partial<OpenAI.ChatCompletionCreateParamsNonStreaming> & Record<string, unknown>) =>
    client("alpha")
      .chat.completions.create({
        model: MODEL,
        max_tokens: 12,
        messages: user("Write a short poem about the sea."),
        ...extra,
      } as OpenAI.ChatCompletionCreateParamsNonStreaming)
      .then((r) => r.choices[0]!.message.content ?? "");
  const seeded = await ask({ temperature: 1.2, seed: 42 });
  assert.equal(await ask({ temperature: 1.2, seed: 42 }), seeded, "the same seed, the same text");
  const free = [await ask({ temperature: 1.2 }), await ask({ temperature: 1.2 })];
  assert.ok(new Set(free).size > 1, `without a seed the samples differ: ${JSON.stringify(free)}`);
  const greedy = await ask({ temperature: 0 });
  assert.equal(await ask({ temperature: 1.5, top_k: 1, seed: 1 }), greedy, "top_k 1 keeps only the best token");
  assert.equal(await ask({ temperature: 1.5, min_p: 1, seed: 2 }), greedy, "min_p 1 keeps only the best token");
  const counting = (extra: Record<string, unknown>) =>
    client("alpha")
      .chat.completions.create({
        model: MODEL,
        max_tokens: 24,
        messages: user(COUNT),
        ...extra,
      } as OpenAI.ChatCompletionCreateParamsNonStreaming)
      .then((r) => r.choices[0]!.message.content ?? "");
  const plain = await counting({});
  for (const penalty of [{ frequency_penalty: 2 }, { presence_penalty: 2 }, { repetition_penalty: 1.8 }])
    assert.notEqual(await counting(penalty), plain, `${JSON.stringify(penalty)} changes a repetitive answer`);
  await assert.rejects(
    client("alpha").chat.completions.create({ model: MODEL, messages: user("x"), top_p: 0 }),
    (e: unknown) => e instanceof OpenAI.BadRequestError && e.param === "top_p",
  );
});

test("stops are exact: never emitted, streamed = whole, finish_reason stop; max_tokens → length", {
  timeout: 300_000,
}, async () => {
  const base = { model: MODEL, max_tokens: 40, messages: user(COUNT) };
  const free = (await client("alpha").chat.completions.create(base)).choices[0]!.message.content ?? "";
  const at = free.indexOf("5");
  assert.ok(at > 0, `the answer counts past 5: ${JSON.stringify(free)}`);
  const stop = free.slice(at, at + 3); // a stop string that spans several tokens ("5, 6" → "5, ")
  const whole = await client("alpha").chat.completions.create({ ...base, stop: [stop] });
  assert.equal(whole.choices[0]!.message.content, free.slice(0, at), `cut just before ${JSON.stringify(stop)}`);
  assert.equal(whole.choices[0]!.finish_reason, "stop");
  const streamed = await streamedText({ ...base, stop: [stop] });
  assert.equal(streamed.text, whole.choices[0]!.message.content, "streamed = whole");
  assert.equal(streamed.finish, "stop");
  const cut = await client("alpha").chat.completions.create({ ...base, max_tokens: 3 });
  assert.equal(cut.choices[0]!.finish_reason, "length");
  assert.equal(cut.usage!.completion_tokens, 3);
});

test("logprobs and top_logprobs in OpenAI's shape, streamed and whole", { timeout: 300_000 }, async () => {
  const params = { model: MODEL, max_tokens: 8, messages: user("Say hello."), logprobs: true, top_logprobs: 3 };
  const whole = await client("alpha").chat.completions.create(params);
  const content = whole.choices[0]!.logprobs!.content!;
  assert.equal(content.length, whole.usage!.completion_tokens, "one entry per generated token");
  for (const t of content) {
    assert.ok(t.logprob <= 0, JSON.stringify(t));
    assert.equal(t.top_logprobs.length, 3);
    assert.equal(t.top_logprobs[0]!.token, t.token, "greedy: the chosen token is the most likely");
    if (!t.token.includes("\uFFFD"))
      assert.deepEqual(t.bytes, [...Buffer.from(t.token)], "bytes are the token's UTF-8");
    for (let i = 1; i < 3; i++) assert.ok(t.top_logprobs[i]!.logprob <= t.top_logprobs[i - 1]!.logprob, "best first");
  }
  assert.equal(
    Buffer.concat(content.map((t) => Buffer.from(t.bytes!))).toString("utf8"),
    whole.choices[0]!.message.content,
    "the tokens' bytes spell the answer",
  );
  const streamed = await streamedText(params);
  assert.equal(streamed.text, whole.choices[0]!.message.content);
  assert.deepEqual(streamed.logprobs, content, "streamed logprobs = whole");
  await assert.rejects(
    client("alpha").chat.completions.create({ ...params, top_logprobs: 21 }),
    (e: unknown) => e instanceof OpenAI.BadRequestError && e.param === "top_logprobs",
  );
});

test("response_format json_object and json_schema: the output parses and validates", { timeout: 300_000 }, async () => {
  const obj = await client("alpha").chat.completions.create({
    model: MODEL,
    max_tokens: 200,
    messages: user('Reply with a JSON object {"capital": "..."} only: what is the capital of France?'),
    response_format: { type: "json_object" },
  });
  assert.equal(obj.choices[0]!.finish_reason, "stop", `the object ends: ${obj.choices[0]!.message.content}`);
  const parsed = JSON.parse(obj.choices[0]!.message.content ?? "") as unknown;
  assert.ok(typeof parsed === "object" && parsed !== null && !Array.isArray(parsed), "a JSON object");
  const schema = {
    type: "object",
    properties: { city: { type: "string", maxLength: 40 }, population: { type: "integer" } },
    required: ["city", "population"],
    additionalProperties: false,
  };
  const typed = await client("alpha").chat.completions.create({
    model: MODEL,
    max_tokens: 200,
    messages: user("What is the largest city of France and its population?"),
    response_format: { type: "json_schema", json_schema: { name: "city", schema, strict: true } },
  });
  const v = JSON.parse(typed.choices[0]!.message.content ?? "") as Record<string, unknown>;
  assert.deepEqual(Object.keys(v).sort(), ["city", "population"], JSON.stringify(v));
  assert.equal(typeof v.city, "string");
  assert.ok(Number.isInteger(v.population), JSON.stringify(v));
});

test("refused, not ignored: n > 1, tools, unknown fields → 400 naming the field", { timeout: 60_000 }, async () => {
  for (const [extra, param, code] of [
    [{ n: 2 }, "n", "unsupported_parameter"],
    [{ tools: [{ type: "function", function: { name: "f", parameters: {} } }] }, "tools", "unsupported_parameter"],
    [{ tool_choice: "required" }, "tool_choice", "unsupported_parameter"],
    [{ logit_bias: { "1": 5 } }, "logit_bias", "unsupported_parameter"],
    [{ temprature: 0.5 }, "temprature", "unknown_parameter"],
  ] as const) {
    await assert.rejects(
      client("alpha").chat.completions.create({
        model: MODEL,
        messages: user("x"),
        ...extra,
      } as OpenAI.ChatCompletionCreateParamsNonStreaming),
      (e: unknown) => e instanceof OpenAI.BadRequestError && e.param === param && e.code === code,
      JSON.stringify(extra),
    );
  }
  const ignored = await client("alpha").chat.completions.create({
    model: MODEL,
    max_tokens: 1,
    messages: user("x"),
    user: "u-1",
  });
  assert.equal(ignored.object, "chat.completion", "user is accepted (documented as ignored)");
});

test("context limits: 400 context_length_exceeded before any prefill", { timeout: 300_000 }, async () => {
  const m = (await client("alpha").models.retrieve(MODEL)) as OpenAI.Model & { context_length: number };
  await assert.rejects(
    client("alpha").chat.completions.create({ model: MODEL, messages: user("x"), max_tokens: m.context_length }),
    (e: unknown) =>
      e instanceof OpenAI.BadRequestError && e.code === "context_length_exceeded" && e.param === "max_tokens",
  );
  // ~1.2 x the context in words: refused by the host before its prefill (so quickly)
  const long = "word ".repeat(Math.ceil(m.context_length * 1.2));
  const t0 = Date.now();
  await assert.rejects(
    client("alpha").chat.completions.create({ model: MODEL, messages: user(long), max_tokens: 16 }),
    (e: unknown) =>
      e instanceof OpenAI.BadRequestError && e.code === "context_length_exceeded" && e.param === "messages",
  );
  const prompt = "word ".repeat(Math.floor(m.context_length * 0.6));
  await assert.rejects(
    client("alpha").completions.create({ model: MODEL, prompt, max_tokens: Math.floor(m.context_length * 0.5) }),
    (e: unknown) => e instanceof OpenAI.BadRequestError && e.code === "context_length_exceeded" && e.param === "prompt",
  );
  assert.ok(Date.now() - t0 < 60_000, "refused without prefilling thousands of tokens");
});

test("headers the clients use: x-request-id, x-ratelimit-*, Retry-After, x-should-retry on quota 429s", {
  timeout: 300_000,
}, async () => {
  const { data, response, request_id } = await client("alpha")
    .chat.completions.create({ model: MODEL, max_tokens: 2, messages: user("Hi") })
    .withResponse();
  assert.match(request_id ?? "", /^req_[0-9a-f]{32}$/);
  assert.equal((data as { _request_id?: string })._request_id, request_id);
  assert.equal(response.headers.get("x-ratelimit-limit-requests"), "1000");
  assert.ok(Number(response.headers.get("x-ratelimit-remaining-requests")) < 1000);
  const mine = await fetch(`${base}/v1/models`, {
    headers: { authorization: `Bearer ${keys.alpha}`, "x-request-id": "trace-e2e-1" },
  });
  assert.equal(mine.headers.get("x-request-id"), "trace-e2e-1");
  // A KV quota 429 cannot clear by waiting: the SDK (3 retries allowed) sends it once.
  const usage = async () =>
    ((await (await api("small", "GET", "/v1/usage")).json()) as { requests_last_minute: number }).requests_last_minute;
  const before = await usage();
  const retrying = new OpenAI({ baseURL: `${base}/v1`, apiKey: keys.small!, maxRetries: 3 });
  await assert.rejects(
    retrying.chat.completions.create({
      model: MODEL,
      messages: user("Hello there, how are you today?"),
      max_tokens: 4,
    }),
    (e: unknown) =>
      e instanceof OpenAI.RateLimitError &&
      e.headers.get("x-should-retry") === "false" &&
      Number(e.headers.get("retry-after")) >= 1 &&
      e.code === "quota_exceeded",
  );
  assert.equal((await usage()) - before, 2, "one chat request (not retried) and the usage read");
});

test("/v1/completions: raw prompt, whole and streamed equal, legacy logprobs", { timeout: 300_000 }, async () => {
  const params = { model: MODEL, prompt: "The capital of France is", max_tokens: 6, logprobs: 2 };
  const whole = await client("alpha").completions.create(params);
  assert.equal(whole.object, "text_completion");
  const text = whole.choices[0]!.text;
  assert.ok(text.length > 0);
  const lp = whole.choices[0]!.logprobs!;
  assert.equal(lp.tokens!.length, whole.usage!.completion_tokens);
  assert.equal(lp.tokens!.join(""), text);
  assert.ok(lp.top_logprobs!.every((t) => Object.keys(t).length >= 1 && Object.keys(t).length <= 2));
  let streamed = "";
  for await (const chunk of await client("alpha").completions.create({ ...params, stream: true }))
    streamed += chunk.choices[0]?.text ?? "";
  assert.equal(streamed, text, "greedy: streamed = whole");
  const tokens = await client("alpha").completions.create({ model: MODEL, prompt: [504, 3575, 282], max_tokens: 2 });
  assert.equal(tokens.usage!.prompt_tokens, 3, "a prompt of token ids");
});

test("model means something: /v1/models/{id}, default = any host, an unknown model → 404 model_not_found", {
  timeout: 120_000,
}, async () => {
  const m = await client("alpha").models.retrieve(MODEL);
  assert.equal(m.id, MODEL);
  await assert.rejects(
    client("alpha").models.retrieve("gpt-4o"),
    (e: unknown) => e instanceof OpenAI.NotFoundError && e.code === "model_not_found",
  );
  await assert.rejects(
    client("alpha").chat.completions.create({ model: "gpt-4o", messages: user("x") }),
    (e: unknown) => e instanceof OpenAI.NotFoundError && e.code === "model_not_found" && e.param === "model",
  );
  const any = await client("alpha").chat.completions.create({ model: "default", max_tokens: 2, messages: user("Hi") });
  assert.equal(any.model, MODEL, "the answer names the model that served it");
});

test("visible compression: tenant defaults set with pkv admin (full allowed), echoed in headers and usage", {
  timeout: 300_000,
}, async () => {
  const admin = (...args: string[]) =>
    runAdmin(["--remote", base, "--admin-token", stack.admin.token, ...args], () => {});
  assert.equal(await admin("tenant", "set", "delta", "--kv-method", "full", "--rpm", "1000"), 0);
  keys.delta = await stack.admin.createKey("delta");
  const long = `${"The quick brown fox jumps over the lazy dog. ".repeat(60)}\nWhat jumps?`;
  const full = await client("delta")
    .chat.completions.create({ model: MODEL, max_tokens: 2, messages: user(long) })
    .withResponse();
  assert.equal(full.response.headers.get("x-pkv-kv-method"), "full");
  const fu = full.data.usage as OpenAI.CompletionUsage & { kv_bytes: number; full_kv_bytes: number };
  assert.ok(fu.kv_bytes > 0 && fu.kv_bytes === fu.full_kv_bytes, JSON.stringify(fu));
  assert.equal(await admin("tenant", "set", "delta", "--kv-method", "pyramidkv", "--kv-budget", "64"), 0);
  const pk = await client("delta")
    .chat.completions.create({ model: MODEL, max_tokens: 2, messages: user(long) })
    .withResponse();
  assert.equal(pk.response.headers.get("x-pkv-kv-method"), "pyramidkv");
  assert.equal(pk.response.headers.get("x-pkv-kv-budget"), "64");
  const pu = pk.data.usage as OpenAI.CompletionUsage & { kv_bytes: number; full_kv_bytes: number };
  assert.ok(pu.kv_bytes * 3 < pu.full_kv_bytes, `compressed: ${JSON.stringify(pu)}`);
  await assert.rejects(admin("tenant", "set", "delta", "--kv-method", "zip"), /kv-method/);
});
