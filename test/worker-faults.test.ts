// End to end, the faults of issue 12 through the real edge worker (Miniflare) and two real GPU
// hosts (pkv host + the engine + the embedded model): the edge killed mid-stream, two messages at
// once on one session, one tenant flooding while another streams, the engine killed during a
// checkpoint, an offload directory that cannot be written. One stack for the file; the test that
// kills the worker runs last.
import assert from "node:assert/strict";
import { existsSync, mkdtempSync, readFileSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";

import {
  DEFAULT_NEEDLE,
  directoryHaystack,
  essaysDir,
  generatedFiller,
  insertNeedle,
} from "@pyramidkv/gpu-host/haystack";
import { enginePidOf, killTree, metricSum, sessionsByTenant, signal, until } from "@pyramidkv/gpu-host/soak";
import { readSse } from "@pyramidkv/gpu-host/sse";
import { type Proc, type Stack, startStack } from "@pyramidkv/gpu-host/stack";

const MODEL = "SmolLM2-135M-Instruct.Q4_1";
/** the tenant whose sessions expire after 3 s idle (the others keep the default hour) */
const TTL_S = 3;
const DECODE_LANES = 4;
const TENANT_DECODE_LANES = 2;

let stack: Stack;
let dir: string;
const offloadDirs: string[] = [];
const keys: Record<string, string> = {};
let base: string;

before(async () => {
  dir = mkdtempSync(join(tmpdir(), "pkv-faults-"));
  for (let i = 0; i < 2; i++) offloadDirs.push(join(dir, `offload-${i}`));
  stack = await startStack({
    hosts: 2,
    kvPoolBytes: 512 << 20,
    persistDir: join(dir, "state"),
    threads: 2,
    hostArgs: [
      "--decode-lanes",
      String(DECODE_LANES),
      "--tenant-decode-lanes",
      String(TENANT_DECODE_LANES),
      "--tenants",
      JSON.stringify({ ttl: { session_ttl_s: TTL_S } }),
    ],
    hostArgsEach: (i) => ["--offload-dir", offloadDirs[i]!],
  });
  base = stack.worker.url;
  const tenants: Record<string, Record<string, number | string>> = {
    ttl: { session_ttl_s: TTL_S },
    eph: {},
    par: {},
    flood: { kv_quota_bytes: 128 << 20 },
    calm: { kv_quota_bytes: 64 << 20 },
    ckpt: { kv_quota_bytes: 400 << 20 },
    disk: {},
  };
  for (const [name, limits] of Object.entries(tenants)) {
    await setTenant(name, { max_sessions: 8, requests_per_minute: 1000, ...limits });
    keys[name] = await stack.admin.createKey(name);
  }
});

after(async () => {
  await stack?.stop();
  rmSync(dir, { recursive: true, force: true });
});

/** PUT /admin/tenants/{name}; an edge that does not know session_ttl_s yet gets the rest (the host
 * has the TTL from --tenants). */
async function setTenant(name: string, limits: Record<string, number | string>): Promise<void> {
  try {
    await stack.admin.call("PUT", `/admin/tenants/${name}`, limits);
  } catch (e) {
    if (!("session_ttl_s" in limits) || !/session_ttl_s/.test(String(e))) throw e;
    const { session_ttl_s: _ttl, ...rest } = limits;
    await stack.admin.call("PUT", `/admin/tenants/${name}`, rest);
  }
}

function api(tenant: string, method: string, path: string, body?: unknown, signal?: AbortSignal): Promise<Response> {
  return fetch(`${base}${path}`, {
    method,
    headers: { authorization: `Bearer ${keys[tenant]}`, "content-type": "application/json" },
    ...(body === undefined ? {} : { body: JSON.stringify(body) }),
    signal,
  });
}

const logs = () =>
  `\nworker:\n${stack.worker.log().slice(-2000)}\n${stack.hosts.map((h, i) => `host ${i}:\n${h.log().slice(-3000)}`).join("\n")}`;

async function createSession(tenant: string, document: string, extra: Record<string, unknown> = {}) {
  const r = await api(tenant, "POST", "/v1/sessions", { document, ...extra });
  const j = (await r.json()) as { id: string; host: string; tokens: number };
  assert.equal(r.status, 201, `${JSON.stringify(j)}${logs()}`);
  return j;
}

type Whole = {
  status: number;
  text: string;
  code: string | null;
  promptTokens?: number;
  completionTokens?: number;
  body: unknown;
};

/** A non-streamed message on a session (greedy). */
async function message(tenant: string, id: string, content: string, maxTokens = 12): Promise<Whole> {
  const r = await api(tenant, "POST", `/v1/sessions/${id}/messages`, {
    content,
    max_tokens: maxTokens,
    temperature: 0,
    stream: false,
  });
  const j = (await r.json()) as {
    error?: { code: string | null };
    choices?: { message: { content: string | null } }[];
    usage?: { prompt_tokens: number; completion_tokens: number };
  };
  return {
    status: r.status,
    text: j.choices?.[0]?.message.content ?? "",
    code: j.error?.code ?? null,
    promptTokens: j.usage?.prompt_tokens,
    completionTokens: j.usage?.completion_tokens,
    body: j,
  };
}

type TokenLp = { token: string; logprob: number; top_logprobs: { token: string; logprob: number }[] };
type Streamed = {
  status: number;
  text: string;
  finish: string | null;
  error?: { code?: string; message?: string };
  /** the streamed tokens' logprobs, when the request asked for them */
  logprobs: TokenLp[];
};

/** Reads a chat-completion stream (sessions messages or /v1/chat/completions); onText sees each piece. */
async function streamed(res: Response, onText?: (text: string) => void): Promise<Streamed> {
  if (res.status !== 200) {
    const j = (await res.json()) as { error?: { code?: string; message?: string } };
    return { status: res.status, text: "", finish: null, error: j.error, logprobs: [] };
  }
  const logprobs: TokenLp[] = [];
  let text = "";
  let finish: string | null = null;
  let error: Streamed["error"];
  try {
    for await (const ev of readSse(res)) {
      if (ev.data === "[DONE]") continue;
      const j = JSON.parse(ev.data) as {
        error?: { code?: string; message?: string };
        choices?: {
          delta: { content?: string };
          finish_reason: string | null;
          logprobs?: { content?: TokenLp[] } | null;
        }[];
      };
      if (j.error) error = j.error;
      const c = j.choices?.[0];
      logprobs.push(...(c?.logprobs?.content ?? []));
      if (c?.delta.content) {
        text += c.delta.content;
        onText?.(c.delta.content);
      }
      if (c?.finish_reason) finish = c.finish_reason;
    }
  } catch (e) {
    error ??= { code: "stream_broken", message: e instanceof Error ? e.message : String(e) };
  }
  return { status: 200, text, finish, error, logprobs };
}

/** The greedy tokens two runs must share: up to the first step where either run's top-2 margin is
 * below `margin` (batched decode differs from a session alone by a bounded rounding only:
 * docs/ENGINE.md "Tests on any CPU"), so a near-tie on some CPU cannot fail the comparison. */
function decisivePrefix(a: TokenLp[], b: TokenLp[], margin = 0.1): { a: string[]; b: string[] } {
  const gap = (t: TokenLp) =>
    t.top_logprobs.length < 2 ? Number.POSITIVE_INFINITY : t.top_logprobs[0]!.logprob - t.top_logprobs[1]!.logprob;
  const n = Math.min(a.length, b.length);
  let k = 0;
  while (k < n && gap(a[k]!) >= margin && gap(b[k]!) >= margin) k++;
  return { a: a.slice(0, k).map((t) => t.token), b: b.slice(0, k).map((t) => t.token) };
}

function metrics(h: Proc): Promise<string> {
  return stack.metrics(h);
}

/** The host a session object names (an opaque id, mapped to its name by the admin's host list). */
async function hostOf(session: { host: string }): Promise<{ proc: Proc; index: number }> {
  const h = await stack.hostById(session.host);
  const index = h === undefined ? -1 : stack.hosts.indexOf(h);
  assert.ok(index >= 0, `the session's host ${session.host} is one of the stack's`);
  return { proc: stack.hosts[index]!, index };
}

/** Open sessions of `tenant` on every host (from /metrics). */
async function hostSessions(tenant: string): Promise<number> {
  let n = 0;
  for (const h of stack.hosts) n += sessionsByTenant(await metrics(h))[tenant] ?? 0;
  return n;
}

const SHORT_DOC = "A short note: the meeting is on Tuesday at the library. Bring the blue folder and two pens.";

// ---- (b) issue 12 item 6 ----------------------------------------------------------------------------

test("two messages at once on one session: each is its answer alone (in some order) or 409 session_busy", {
  timeout: 300_000,
}, async () => {
  const M1 = "When is the meeting?";
  const M2 = "What should I bring?";
  // Uninterrupted twins, one per order: what each message answers first, and after the other.
  const ta = await createSession("par", SHORT_DOC, { kv_budget: 32 });
  const a1 = await message("par", ta.id, M1);
  const a2 = await message("par", ta.id, M2);
  const tb = await createSession("par", SHORT_DOC, { kv_budget: 32 });
  const b2 = await message("par", tb.id, M2);
  const b1 = await message("par", tb.id, M1);
  for (const w of [a1, a2, b1, b2]) assert.equal(w.status, 200, JSON.stringify(w.body));

  const s = await createSession("par", SHORT_DOC, { kv_budget: 32 });
  const [r1, r2] = await Promise.all([message("par", s.id, M1), message("par", s.id, M2)]);
  const busy = (r: Whole) => r.status === 409 && r.code === "session_busy";
  const outcome = `M1 → ${r1.status} ${r1.code ?? JSON.stringify(r1.text)}, M2 → ${r2.status} ${r2.code ?? JSON.stringify(r2.text)}; alone: M1 ${JSON.stringify(a1.text)} then M2 ${JSON.stringify(a2.text)}, or M2 ${JSON.stringify(b2.text)} then M1 ${JSON.stringify(b1.text)}`;
  for (const r of [r1, r2]) assert.ok(r.status === 200 || busy(r), `200 or 409 session_busy: ${outcome}`);
  assert.ok(!(busy(r1) && busy(r2)), `one of them gets the turn: ${outcome}`);
  if (r1.status === 200 && r2.status === 200)
    assert.ok(
      (r1.text === a1.text && r2.text === a2.text) || (r2.text === b2.text && r1.text === b1.text),
      `serialised whole turns, never interleaved: ${outcome}`,
    );
  else if (r1.status === 200) assert.equal(r1.text, a1.text, `the winner's answer is its answer alone: ${outcome}`);
  else assert.equal(r2.text, b2.text, `the winner's answer is its answer alone: ${outcome}`);

  // The session is not corrupted: a later message works, and its prompt is accounted as in a twin.
  const later = await message("par", s.id, "Where is the meeting?");
  assert.equal(later.status, 200, JSON.stringify(later.body));
  const twin = await message("par", ta.id, "Where is the meeting?");
  assert.equal(later.promptTokens, twin.promptTokens, "the later message's prompt tokens as in the twin");
  for (const id of [ta.id, tb.id, s.id]) await api("par", "DELETE", `/v1/sessions/${id}`);
});

// ---- (c) issue 12 item 7 ----------------------------------------------------------------------------

test("tenant A floods while tenant B streams: B's text as alone, A's extra generations wait for a decode lane", {
  timeout: 400_000,
}, async () => {
  // One host for this test: both tenants meet on it (the other is stopped, started again after).
  const host = stack.hosts[0]!;
  const other = stack.hosts[1]!;
  await stack.killHost(1);
  assert.ok(
    await until(async () => !(await stack.listHosts()).hosts.some((h) => h.name === other.name && h.live), 30_000),
    "the other host is out of routing",
  );
  try {
    const chat = (tenant: string, content: string, maxTokens: number, signal?: AbortSignal) =>
      api(
        tenant,
        "POST",
        "/v1/chat/completions",
        {
          model: MODEL,
          messages: [{ role: "user", content }],
          max_tokens: maxTokens,
          temperature: 0,
          stream: true,
          logprobs: true,
          top_logprobs: 2,
        },
        signal,
      );
    const B = "Name three colours of the rainbow.";
    const alone = await streamed(await chat("calm", B, 16));
    assert.equal(alone.error, undefined, JSON.stringify(alone));
    assert.ok(alone.text.length > 0);

    const FLOOD = 8;
    const ctl = new AbortController();
    let peakQueued = 0;
    let sampling = true;
    const sampler = (async () => {
      while (sampling) {
        const m = await metrics(host).catch(() => "");
        peakQueued = Math.max(peakQueued, metricSum(m, "pkv_host_queue_length", { kind: "decode" }));
        await new Promise((r) => setTimeout(r, 100));
      }
    })();
    // Each flood stream's first and last token times: a stream receives tokens only while it
    // holds a decode lane, so no more of these intervals overlap than the tenant has lanes.
    const spans: { first: number; last: number }[] = [];
    const flood = Array.from({ length: FLOOD }, () => {
      const span = { first: 0, last: 0 };
      spans.push(span);
      return chat("flood", "Count from 1 to 200, separated by commas.", 64, ctl.signal)
        .then((r) =>
          streamed(r, () => {
            span.last = performance.now();
            span.first ||= span.last;
          }),
        )
        .catch((e: unknown) => ({ status: 0, text: "", finish: null, error: { message: String(e) }, logprobs: [] }));
    });
    // B starts once A's generations are decoding.
    const generated = () =>
      metrics(host).then((m) => metricSum(m, "pkv_host_generated_tokens_total", { tenant: "flood" }));
    const floodBefore = await generated();
    assert.ok(await until(async () => (await generated()) > floodBefore, 120_000), `tenant A decodes${logs()}`);
    const during = await streamed(await chat("calm", B, 16));
    sampling = false;
    await sampler;
    ctl.abort();
    await Promise.all(flood);
    assert.equal(during.error, undefined, JSON.stringify(during));
    const shared = decisivePrefix(during.logprobs, alone.logprobs);
    assert.deepEqual(
      shared.a,
      shared.b,
      "B's greedy answer while A floods = B's answer alone (where the margin allows)",
    );
    const started = spans.filter((x) => x.first > 0);
    const overlap = Math.max(
      ...started.map((x) => started.filter((y) => y.first <= x.first && y.last >= x.first).length),
    );
    // one more than the lanes: a stream's last token may be delivered after the next one's first
    assert.ok(
      overlap <= TENANT_DECODE_LANES + 1,
      `tenant A's streams decoding at once (${overlap}) stay within its ${TENANT_DECODE_LANES} lanes`,
    );
    assert.ok(
      peakQueued >= 1,
      `${FLOOD} generations of one tenant with ${TENANT_DECODE_LANES} lanes each: the extra ones queue (peak decode queue ${peakQueued})`,
    );
  } finally {
    await stack.startHost(1);
  }
});

// ---- (d) issue 12 item 3 ----------------------------------------------------------------------------

const RETRYABLE = ["checkpoint_failed", "engine_restarted", "timeout", "busy", "pool_full", "host_unavailable"];

test("the engine killed -9 during a checkpoint: the turn fails typed or the session answers as its uninterrupted twin", {
  timeout: 600_000,
}, async (tc) => {
  const t0 = Date.now();
  const step = (what: string) => tc.diagnostic(`${((Date.now() - t0) / 1000).toFixed(1)} s: ${what}`);
  const hay = existsSync(essaysDir()) ? directoryHaystack(essaysDir(), 5_000) : generatedFiller(5_000);
  const document = insertNeedle(hay, DEFAULT_NEEDLE, 40);
  const questions = [
    "What is the best thing to do in San Francisco?",
    "Summarise the document in one sentence.",
    "Who wrote the document?",
    "What is the main topic of the document?",
  ];
  // FullKV: a ~1.2k-token state (~28 MB) whose checkpoint takes a while to save.
  const s = await createSession("ckpt", document, { kv_method: "full" });
  const t = await createSession("ckpt", document, { kv_method: "full" });
  assert.equal(s.tokens, t.tokens);
  step(`two FullKV sessions of ${s.tokens} tokens`);
  // The uninterrupted twin answers each question just before the session does.
  const twin: Whole[] = [];
  const twinAnswer = async (k: number) => {
    const w = await message("ckpt", t.id, questions[k]!, 16);
    assert.equal(w.status, 200, JSON.stringify(w.body));
    twin[k] = w;
    return w;
  };
  const victim = (await hostOf(s)).proc;

  // Ask question k; once its last token arrives the turn's checkpoint is being written: stop the
  // engine there (SIGSTOP), make sure the turn is still unanswered, then kill -9 it.
  let hit = -1;
  let killed: Streamed | undefined;
  for (let k = 0; k < questions.length - 1 && hit < 0; k++) {
    const expected = (await twinAnswer(k)).text;
    let stopped: number | undefined;
    let onStopped: (() => void) | undefined;
    const stoppedP = new Promise<void>((r) => (onStopped = r));
    const res = await api("ckpt", "POST", `/v1/sessions/${s.id}/messages`, {
      content: questions[k],
      max_tokens: 16,
      temperature: 0,
      stream: true,
    });
    let acc = "";
    const reading = streamed(res, (piece) => {
      acc += piece;
      if (stopped === undefined && acc.length >= expected.length) {
        stopped = enginePidOf(victim);
        if (stopped !== undefined) signal(stopped, "SIGSTOP");
        onStopped!();
      }
    });
    const first = await Promise.race([reading.then(() => "ended" as const), stoppedP.then(() => "stopped" as const)]);
    step(`question ${k}: ${first}`);
    if (first === "stopped" && stopped !== undefined) {
      // Still unanswered a while after the engine stopped: the host waits on the checkpoint.
      const ended = await Promise.race([
        reading.then(() => true),
        new Promise<false>((r) => setTimeout(() => r(false), 1500)),
      ]);
      signal(stopped, "SIGKILL");
      signal(stopped, "SIGCONT");
      if (!ended) {
        hit = k;
        killed = await reading;
        break;
      }
    }
    const r = await reading;
    assert.equal(r.error, undefined, `an uninterrupted turn: ${JSON.stringify(r)}`);
    assert.equal(r.text, expected, "an uninterrupted turn answers as the twin");
    if (stopped !== undefined) {
      // The kill came after the checkpoint: wait for the engine to come back before the next try.
      await until(async () => enginePidOf(victim) !== undefined && enginePidOf(victim) !== stopped, 60_000);
    }
  }
  assert.ok(hit >= 0, "the kill landed inside a turn's checkpoint");
  const turn = killed!;
  step(`killed in question ${hit}'s checkpoint: ${JSON.stringify(turn.error ?? "answered")}`);
  await twinAnswer(hit + 1);
  const next = await message("ckpt", s.id, questions[hit + 1]!, 16);
  step(`the next question: ${next.status}`);
  const story = `turn ${hit}: ${JSON.stringify(turn)}; next: ${next.status} ${JSON.stringify(next.body)}; twin next: ${JSON.stringify(twin[hit + 1]!.text)}`;
  if (turn.error === undefined) {
    // Answered: then it was kept, and the session goes on exactly as its twin.
    assert.equal(turn.text, twin[hit]!.text, story);
    assert.equal(next.status, 200, story);
    assert.equal(next.text, twin[hit + 1]!.text, `no silent rollback: the next answer is the twin's (${story})`);
    assert.equal(next.promptTokens, twin[hit + 1]!.promptTokens, `tokens accounted as in the twin (${story})`);
  } else {
    // Failed: then it is not in the session; the next answer is that of a twin without it.
    assert.ok(RETRYABLE.includes(turn.error.code ?? ""), `a typed, retryable error: ${story}`);
    if (next.status === 200) {
      const r = await createSession("ckpt", document, { kv_method: "full" });
      for (let j = 0; j < hit; j++) await message("ckpt", r.id, questions[j]!, 16);
      const without = await message("ckpt", r.id, questions[hit + 1]!, 16);
      await api("ckpt", "DELETE", `/v1/sessions/${r.id}`);
      const also = `${story}; twin without the failed turn: ${JSON.stringify(without.text)}`;
      assert.equal(next.text, without.text, `the failed turn was rolled back whole (${also})`);
      assert.equal(next.promptTokens, without.promptTokens, `tokens accounted as in that twin (${also})`);
    } else assert.ok(RETRYABLE.includes(next.code ?? ""), `a typed, retryable error: ${story}`);
  }
  for (const id of [s.id, t.id]) await api("ckpt", "DELETE", `/v1/sessions/${id}`);
});

// ---- (e) issue 12 items 3, 4 --------------------------------------------------------------------------

test("an offload directory that cannot be written: the turn fails checkpoint_failed, the host lives, then it recovers", {
  timeout: 300_000,
}, async () => {
  const s = await createSession("disk", SHORT_DOC, { kv_budget: 32 });
  const t = await createSession("disk", SHORT_DOC, { kv_budget: 32 });
  const twin = await message("disk", t.id, "When is the meeting?");
  assert.equal(twin.status, 200);
  const { proc: host, index } = await hostOf(s);
  const od = offloadDirs[index]!;
  const indexed = () =>
    (JSON.parse(readFileSync(join(od, "index.json"), "utf8")) as { session: string; tokens_seen: number }[]).find(
      (e) => e.session === s.id,
    )?.tokens_seen;
  const before = indexed();
  assert.ok(before !== undefined && before > 0, "the document's checkpoint is indexed");
  // Root ignores permissions: a plain file in the directory's place makes every write ENOTDIR.
  renameSync(od, `${od}.away`);
  writeFileSync(od, "not a directory");
  let broken: Whole;
  try {
    broken = await message("disk", s.id, "When is the meeting?");
  } finally {
    rmSync(od);
    renameSync(`${od}.away`, od);
  }
  assert.notEqual(
    broken.status,
    200,
    `a turn whose checkpoint failed is not answered as if saved: ${JSON.stringify(broken.body)}`,
  );
  assert.equal(broken.code, "checkpoint_failed", JSON.stringify(broken.body));
  const health = await fetch(`${host.url}/health`);
  assert.ok(health.status === 200, "the host lives");
  // Rolled back to the last checkpoint: the retry answers as the twin and is saved again.
  const retry = await message("disk", s.id, "When is the meeting?");
  assert.equal(retry.status, 200, JSON.stringify(retry.body));
  assert.equal(retry.text, twin.text, "the retry answers as its twin");
  assert.equal(retry.promptTokens, twin.promptTokens);
  // One failed write does not stop later ones: the retry's checkpoint is indexed.
  const after = indexed();
  assert.ok(after !== undefined && after > before, `the retry's checkpoint is indexed (${before} → ${after} tokens)`);
  for (const id of [s.id, t.id]) await api("disk", "DELETE", `/v1/sessions/${id}`);
});

// ---- (a) issue 12 item 1 (last: it kills the worker) -----------------------------------------------------

test("the edge killed mid-stream: its chat session goes at once, a forgotten session after its TTL", {
  timeout: 300_000,
}, async () => {
  // tenant ttl: a sessions-API session nobody deletes; tenant eph (an hour's TTL): a chat stream.
  await createSession("ttl", SHORT_DOC, { kv_budget: 32 });
  assert.ok((await hostSessions("ttl")) >= 1);
  const res = await api("eph", "POST", "/v1/chat/completions", {
    model: MODEL,
    messages: [{ role: "user", content: "Write the numbers from 1 to 300, separated by commas." }],
    max_tokens: 300,
    stream: true,
  });
  assert.equal(res.status, 200);
  let ephOpen = 0;
  let killed: Promise<void> | undefined;
  await streamed(res, () => {
    killed ??= (async () => {
      ephOpen = await hostSessions("eph");
      await killTree(stack.worker);
    })();
  });
  await killed;
  assert.ok(ephOpen >= 1, `the chat's session was open on a host while it streamed (${ephOpen})`);
  const ephGone = await until(async () => (await hostSessions("eph")) === 0, 60_000);
  const ttlGone = await until(async () => (await hostSessions("ttl")) === 0, 60_000);
  assert.ok(ephGone, `the chat session closed with its connection (eph: ${await hostSessions("eph")} open)${logs()}`);
  assert.ok(ttlGone, `the idle session expired after ${TTL_S} s (ttl: ${await hostSessions("ttl")} open)${logs()}`);
});
