// End to end, the compressed prompt cache (issue 14): the edge worker in Miniflare (Durable
// Objects, local R2) and two real GPU hosts (pkv host + the engine + the embedded model) dialling
// in. Chats through the official openai client continue the cached state of their last turn:
// each turn prefills only its new tokens (the hosts' pkv_host_prefilled_tokens_total proves it),
// and its answer and token counts equal the sessions API's on the same turns (greedy; a reference
// session opened with kv_cache "off", answered alone so no batch rounds it differently). A changed
// earlier message is a miss, tenants never share entries, 8 sessions opened at once on one
// document prefill it once, a cached state stored by one host continues on another, and
// kv_cache "off" (request or tenant) prefills everything.
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";

import { generatedFiller } from "@pyramidkv/gpu-host/haystack";
import { metricSum } from "@pyramidkv/gpu-host/soak";
import { type Stack, startStack, until } from "@pyramidkv/gpu-host/stack";
import OpenAI from "openai";

const MODEL = "SmolLM2-135M-Instruct.Q4_1";
const SYSTEM = "You answer questions about the document the user gives you, briefly.";
const MAX_TOKENS = 12;

/** A ~1k-token document (well above PKV_CACHE_MIN_BYTES) opening with facts the questions ask about. */
function documentText(seed: number, facts: string): string {
  return `${facts}\n\n${generatedFiller(4800, seed)}`;
}

const FIVE = {
  doc: documentText(
    11,
    "Harbour report. The ferry leaves at nine. The lighthouse keeper is called Anna. The harbour has 40 boats.",
  ),
  questions: [
    "When does the ferry leave?",
    "Who is the lighthouse keeper?",
    "How many boats are in the harbour?",
    "What is the report about?",
    "Name one thing the report mentions.",
    "Summarise the report in five words.",
  ],
};
const TWO = {
  doc: documentText(
    22,
    "Garden notes. The roses bloom in June. The gardener is called Pedro. The pond holds seven fish.",
  ),
  questions: ["When do the roses bloom?", "Who is the gardener?"],
};
const SHARED = {
  doc: documentText(
    33,
    "Product manual. The device charges in two hours. Its battery lasts ten days. The reset button is red.",
  ),
  questions: ["How long does charging take?", "What colour is the reset button?"],
};

type Msg = OpenAI.ChatCompletionMessageParam;
type Usage = { prompt_tokens: number; completion_tokens: number; cached_tokens: number };

let stack: Stack;
let dir: string;
let base: string;
const keys: Record<string, string> = {};

before(async () => {
  dir = mkdtempSync(join(tmpdir(), "pkv-cache-"));
  stack = await startStack({
    hosts: 2,
    kvPoolBytes: 512 << 20,
    persistDir: join(dir, "state"),
    threads: 2,
    hostPrefix: "cache",
  });
  base = stack.worker.url;
  const tenants: Record<string, Parameters<Stack["admin"]["setTenant"]>[1]> = {
    alpha: { max_sessions: 64, requests_per_minute: 100_000 },
    beta: { max_sessions: 64, requests_per_minute: 100_000 },
    nocache: { max_sessions: 64, requests_per_minute: 100_000, kv_cache: "off" },
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

const client = (tenant: string) => new OpenAI({ baseURL: `${base}/v1`, apiKey: keys[tenant]!, maxRetries: 0 });

const logs = () =>
  `\nworker:\n${stack.worker.log().slice(-2500)}\n${stack.hosts.map((h) => `${h.name}:\n${h.log().slice(-2500)}`).join("\n")}`;

function api(tenant: string, method: string, path: string, body?: unknown): Promise<Response> {
  return fetch(`${base}${path}`, {
    method,
    headers: { authorization: `Bearer ${keys[tenant]}`, "content-type": "application/json" },
    ...(body === undefined ? {} : { body: JSON.stringify(body) }),
  });
}

/** A response's JSON body, its status asserted; a body that is not JSON fails naming it. */
async function jsonOf<T>(r: Response, status: number, what: string): Promise<T> {
  const text = await r.text();
  let j: T;
  try {
    j = JSON.parse(text) as T;
  } catch {
    return assert.fail(`${what}: HTTP ${r.status}, not JSON: ${text.slice(0, 300)}${logs()}`);
  }
  assert.equal(r.status, status, `${what}: ${text.slice(0, 600)}${logs()}`);
  return j;
}

/** A counter of every running host (0 for one that is down), by the stack's host index. */
async function perHost(name: string, labels: Record<string, string> = {}): Promise<number[]> {
  return Promise.all(
    stack.hosts.map((h) => (h.running ? stack.metrics(h).then((m) => metricSum(m, name, labels)) : 0)),
  );
}
const sum = (xs: number[]) => xs.reduce((a, b) => a + b, 0);
const minus = (a: number[], b: number[]) => a.map((x, i) => x - (b[i] ?? 0));
/** Cache opens from a copy (snapshot memory or the edge's store) of every host. */
const copyOpens = async () =>
  minus(await perHost("pkv_host_cache_opens_total"), await perHost("pkv_host_cache_opens_total", { source: "miss" }));

// ---- the sessions API (the reference) -------------------------------------------------------------

type SessionObject = { id: string; host: string; tokens: number; cached_tokens?: number };

async function openSession(tenant: string, doc: string, kvCache?: "on" | "off"): Promise<SessionObject> {
  const r = await api(tenant, "POST", "/v1/sessions", {
    system: SYSTEM,
    document: doc,
    ...(kvCache ? { kv_cache: kvCache } : {}),
  });
  return jsonOf<SessionObject>(r, 201, "POST /v1/sessions");
}

async function tokensOf(tenant: string, id: string): Promise<number> {
  return (await jsonOf<SessionObject>(await api(tenant, "GET", `/v1/sessions/${id}`), 200, `GET ${id}`)).tokens;
}

/** A greedy, whole answer on a session. */
async function message(tenant: string, id: string, content: string): Promise<string> {
  const r = await api(tenant, "POST", `/v1/sessions/${id}/messages`, {
    content,
    max_tokens: MAX_TOKENS,
    temperature: 0,
    stream: false,
  });
  const j = await jsonOf<{ choices: { message: { content: string | null } }[] }>(r, 200, `message ${content}`);
  return j.choices[0]?.message.content ?? "";
}

/** A reference session (kv_cache "off": prefilled on its own, nothing cached) answering the
 * questions in order; per turn its answer, the session's tokens before the question (what a chat's
 * next turn finds cached) and after appending it (the chat's prompt_tokens). */
async function reference(tenant: string, doc: string, questions: string[]) {
  const s = await openSession(tenant, doc, "off");
  assert.equal(s.cached_tokens ?? 0, 0, "kv_cache off: nothing from the cache");
  const turns: { answer: string; before: number; prompt: number }[] = [];
  for (const q of questions) {
    const before = await tokensOf(tenant, s.id);
    const r = await api(tenant, "POST", `/v1/sessions/${s.id}/messages`, {
      content: q,
      max_tokens: MAX_TOKENS,
      temperature: 0,
      stream: false,
    });
    const j = await jsonOf<{ choices: { message: { content: string | null } }[]; usage: { prompt_tokens: number } }>(
      r,
      200,
      `reference ${q}`,
    );
    // a session message's prompt_tokens are its own (the question's) tokens
    turns.push({ answer: j.choices[0]?.message.content ?? "", before, prompt: before + j.usage.prompt_tokens });
  }
  await api(tenant, "DELETE", `/v1/sessions/${s.id}`);
  return { docTokens: s.tokens, turns };
}

// ---- chat completions --------------------------------------------------------------------------------

type Turn = { text: string; usage: Usage; prefilled: number[]; served: number; ms: number };

/** One greedy chat completion through the openai client (whole, or streamed with its usage chunk),
 * with what every host prefilled meanwhile. */
async function chat(
  tenant: string,
  messages: Msg[],
  o: { stream?: boolean; kvCache?: "on" | "off" } = {},
): Promise<Turn> {
  const before = await perHost("pkv_host_prefilled_tokens_total", { tenant });
  const t0 = Date.now();
  const body = {
    model: MODEL,
    messages,
    max_tokens: MAX_TOKENS,
    temperature: 0,
    ...(o.kvCache ? { kv_cache: o.kvCache } : {}),
  };
  let text = "";
  let usage: OpenAI.CompletionUsage | undefined;
  if (o.stream) {
    const stream = await client(tenant).chat.completions.create({
      ...body,
      stream: true,
      stream_options: { include_usage: true },
    });
    for await (const chunk of stream) {
      if (chunk.usage) usage = chunk.usage;
      text += chunk.choices[0]?.delta.content ?? "";
    }
  } else {
    const r = await client(tenant).chat.completions.create(body);
    text = r.choices[0]?.message.content ?? "";
    usage = r.usage;
  }
  assert.ok(usage, "a usage");
  const cached = usage.prompt_tokens_details?.cached_tokens;
  assert.equal(
    typeof cached,
    "number",
    `usage.prompt_tokens_details.cached_tokens is always there: ${JSON.stringify(usage)}`,
  );
  const prefilled = minus(await perHost("pkv_host_prefilled_tokens_total", { tenant }), before);
  const rose = prefilled.flatMap((d, i) => (d > 0 ? [i] : []));
  assert.ok(rose.length <= 1, `one host prefilled the turn: ${JSON.stringify(prefilled)}`);
  return {
    text,
    usage: { prompt_tokens: usage.prompt_tokens, completion_tokens: usage.completion_tokens, cached_tokens: cached! },
    prefilled,
    served: rose[0] ?? -1,
    ms: Date.now() - t0,
  };
}

/** A chat turn that must have prefilled exactly its new tokens: prompt_tokens − cached_tokens. */
function assertPrefilledNewOnly(t: Turn, what: string) {
  assert.equal(
    sum(t.prefilled),
    t.usage.prompt_tokens - t.usage.cached_tokens,
    `${what}: the hosts prefilled prompt_tokens − cached_tokens (${JSON.stringify(t.usage)}, per host ${JSON.stringify(t.prefilled)})`,
  );
}

const opening = (doc: string, q: string): Msg[] => [
  { role: "system", content: SYSTEM },
  { role: "user", content: doc },
  { role: "user", content: q },
];

/**
 * A chat of `questions.length` turns (each turn sends the whole conversation back with the
 * replies as received); every turn checked against the reference's same turn. Returns the
 * conversation after its last answer and its turns.
 */
async function conversation(
  tenant: string,
  doc: string,
  questions: string[],
  ref: Awaited<ReturnType<typeof reference>>,
  o: { stream?: boolean; diagnostic?: (s: string) => void } = {},
) {
  const messages = opening(doc, questions[0]!);
  const turns: Turn[] = [];
  for (const [k, q] of questions.entries()) {
    if (k > 0) messages.push({ role: "user", content: q });
    const t = await chat(tenant, messages, o);
    const want = ref.turns[k]!;
    const what = `turn ${k + 1} (${q})`;
    o.diagnostic?.(
      `${tenant} ${what}: ${JSON.stringify(t.text)} ${JSON.stringify(t.usage)} prefilled ${JSON.stringify(t.prefilled)}`,
    );
    assert.ok(t.text.length > 0, `${what}: an answer`);
    assert.equal(t.text, want.answer, `${what}: the answer equals the sessions API's on the same turns`);
    assert.equal(
      t.usage.prompt_tokens,
      want.prompt,
      `${what}: prompt_tokens are the session's tokens with the question`,
    );
    // turn 1: nothing cached yet; then the state the last turn stored (its prompt and answer)
    assert.equal(t.usage.cached_tokens, k === 0 ? 0 : want.before, `${what}: cached_tokens`);
    if (k > 0) assert.ok(t.usage.cached_tokens > ref.docTokens, `${what}: the last reply's state, not the document's`);
    assertPrefilledNewOnly(t, what);
    turns.push(t);
    messages.push({ role: "assistant", content: t.text });
  }
  return { messages, turns };
}

// the five-turn conversation, continued by the later tests
let five: { messages: Msg[]; turns: Turn[]; ref: Awaited<ReturnType<typeof reference>> };

test("a five-turn chat through the openai client: each turn prefills only its new tokens and answers as the sessions API on the same turns", {
  timeout: 400_000,
}, async (t) => {
  const ref = await reference("alpha", FIVE.doc, FIVE.questions);
  const c = await conversation("alpha", FIVE.doc, FIVE.questions.slice(0, 5), ref, {
    diagnostic: (s) => t.diagnostic(s),
  });
  five = { ...c, ref };
  const [first, ...rest] = c.turns;
  assert.equal(sum(first!.prefilled), first!.usage.prompt_tokens, "turn 1 (a miss) prefills the whole prompt");
  for (const t of rest)
    assert.ok(
      sum(t.prefilled) < ref.docTokens / 4,
      `a later turn prefills a few tokens, not the document (${ref.docTokens}): ${JSON.stringify(t.usage)}`,
    );
});

test("a two-turn chat streamed (include_usage): turn 2 prefills only its new tokens; another tenant's same chat never hits the first's entries", {
  timeout: 400_000,
}, async (t) => {
  const ref = await reference("alpha", TWO.doc, TWO.questions);
  const diagnostic = (s: string) => t.diagnostic(s);
  const a = await conversation("alpha", TWO.doc, TWO.questions, ref, { stream: true, diagnostic });
  // beta: the same conversation, its first turn a miss (alpha's document and reply entries are alpha's)
  const b = await conversation("beta", TWO.doc, TWO.questions, ref, { stream: true, diagnostic });
  assert.equal(b.turns[0]!.usage.cached_tokens, 0, "tenant beta's first turn: nothing of alpha's");
  assert.equal(sum(b.turns[0]!.prefilled), b.turns[0]!.usage.prompt_tokens, "beta prefills its first turn whole");
  assert.deepEqual(
    b.turns.map((t) => t.text),
    a.turns.map((t) => t.text),
  );
  // alpha's entries are still there: alpha's first turn again starts from its document
  const again = await chat("alpha", opening(TWO.doc, TWO.questions[0]!));
  assert.equal(again.usage.cached_tokens, ref.docTokens, "alpha's first turn again: its document's state");
  assert.equal(again.text, ref.turns[0]!.answer);
  assertPrefilledNewOnly(again, "alpha's first turn again");
});

test("a changed earlier message is a miss: the document's state (or nothing), never the last reply's", {
  timeout: 400_000,
}, async () => {
  assert.ok(five, "the five-turn chat ran");
  const m = five.messages; // [system, document, q1, a1, q2, a2, …]
  const docTokens = five.ref.docTokens;
  const cases: { what: string; messages: Msg[]; cached: number }[] = [
    {
      what: "the first question changed",
      messages: [m[0]!, m[1]!, { role: "user", content: `${FIVE.questions[0]} Please.` }, m[3]!, m[4]!],
      cached: docTokens,
    },
    {
      what: "the first reply changed",
      messages: [m[0]!, m[1]!, m[2]!, { role: "assistant", content: `${five.turns[0]!.text} Indeed.` }, m[4]!],
      cached: docTokens,
    },
    {
      what: "the document changed",
      messages: [m[0]!, { role: "user", content: `${FIVE.doc} The end.` }, m[2]!, m[3]!, m[4]!],
      cached: 0,
    },
    {
      what: "the system prompt changed",
      messages: [{ role: "system", content: `${SYSTEM} Be polite.` }, ...m.slice(1, 5)],
      cached: 0,
    },
  ];
  for (const c of cases) {
    const t = await chat("alpha", c.messages);
    assert.equal(t.usage.cached_tokens, c.cached, `${c.what}: cached_tokens ${JSON.stringify(t.usage)}`);
    assertPrefilledNewOnly(t, c.what);
  }
  // the unchanged conversation still hits the second turn's reply
  const same = await chat("alpha", m.slice(0, 5));
  assert.equal(same.usage.cached_tokens, five.ref.turns[1]!.before, "unchanged: turn 1's reply state");
  assert.equal(same.text, five.ref.turns[1]!.answer);
});

test("a shared document opened by 8 sessions at once is prefilled once; each copy answers as an independent session", {
  timeout: 400_000,
}, async (t) => {
  const prefilled0 = await perHost("pkv_host_prefilled_tokens_total", { tenant: "alpha" });
  const opens0 = await copyOpens();
  const misses0 = await perHost("pkv_host_cache_opens_total", { source: "miss" });
  const opened = await Promise.all(Array.from({ length: 8 }, () => openSession("alpha", SHARED.doc)));
  const prefilled = sum(minus(await perHost("pkv_host_prefilled_tokens_total", { tenant: "alpha" }), prefilled0));
  const copies = sum(minus(await copyOpens(), opens0));
  const misses = sum(minus(await perHost("pkv_host_cache_opens_total", { source: "miss" }), misses0));
  const tokens = opened[0]!.tokens;
  t.diagnostic(
    `8 sessions: tokens ${tokens}, cached ${JSON.stringify(opened.map((s) => s.cached_tokens))}, prefilled ${prefilled}, copies ${copies}, misses ${misses}`,
  );
  assert.ok(tokens > 500, `the document's tokens: ${JSON.stringify(opened[0])}`);
  for (const s of opened) assert.equal(s.tokens, tokens, `every session holds the document: ${JSON.stringify(s)}`);
  const cached = opened.map((s) => s.cached_tokens).sort((a, b) => (a ?? -1) - (b ?? -1));
  assert.deepEqual(cached, [0, ...Array(7).fill(tokens)], "one prefilled it, 7 started from its copy");
  assert.equal(prefilled, tokens, `the document prefilled once (${tokens} tokens), nothing for the 7 copies`);
  assert.equal(copies, 7, "7 opens from a cached copy");
  assert.equal(misses, 0, "no cache_miss");

  const independent = await openSession("alpha", SHARED.doc, "off");
  assert.equal(independent.cached_tokens ?? 0, 0);
  assert.equal(independent.tokens, tokens);
  const [q1, q2] = SHARED.questions as [string, string];
  const want1 = await message("alpha", independent.id, q1);
  for (const s of opened) assert.equal(await message("alpha", s.id, q1), want1, `${s.id} answers as the independent`);
  // copies are independent: a turn in one never shows in another
  const want2 = await message("alpha", independent.id, q2);
  for (const s of opened.slice(0, 2)) assert.equal(await message("alpha", s.id, q2), want2, `${s.id}: second turn`);
  for (const s of [...opened, independent]) await api("alpha", "DELETE", `/v1/sessions/${s.id}`);
});

test("across hosts: the host that stored the last turn is kill -9'd; the next turn continues its cached state on the other host", {
  timeout: 400_000,
}, async (tc) => {
  assert.ok(five, "the five-turn chat ran");
  const last = five.turns[4]!;
  assert.ok(last.served >= 0, "turn 5 was prefilled on a host");
  // the last turn's reply entry was stored by its serving host (snapshot memory + the edge's R2)
  const victim = last.served;
  const name = stack.hosts[victim]!.name;
  await stack.killHost(victim);
  assert.ok(
    await until(async () => !(await stack.listHosts()).hosts.some((h) => h.name === name && h.live), 30_000),
    `${name} out of routing${logs()}`,
  );
  const edgeOpens0 = await perHost("pkv_host_cache_opens_total", { source: "edge" });
  const messages = [...five.messages, { role: "user" as const, content: FIVE.questions[5]! }];
  const t = await chat("alpha", messages);
  const want = five.ref.turns[5]!;
  assert.notEqual(t.served, victim);
  assert.equal(t.usage.cached_tokens, want.before, "turn 6 continues turn 5's state");
  assert.equal(t.text, want.answer, "the uninterrupted (reference) answer");
  assertPrefilledNewOnly(t, "turn 6 on the other host");
  const edgeOpens = minus(await perHost("pkv_host_cache_opens_total", { source: "edge" }), edgeOpens0);
  tc.diagnostic(
    `killed ${name}; turn 6 on ${stack.hosts[t.served]?.name}: ${JSON.stringify(t.usage)}, edge opens ${JSON.stringify(edgeOpens)}`,
  );
  assert.equal(edgeOpens[t.served], 1, `restored from the edge's store: ${JSON.stringify(edgeOpens)}`);
  five.messages = [...messages, { role: "assistant", content: t.text }];
  await stack.startHost(victim);
});

test('kv_cache "off" (the request, or the tenant\'s setting): cached_tokens 0 and the whole prompt prefilled', {
  timeout: 400_000,
}, async () => {
  assert.ok(five, "the five-turn chat ran");
  const off = await chat("alpha", five.messages.slice(0, 9), { kvCache: "off" });
  assert.equal(off.usage.cached_tokens, 0, "off: nothing from the cache");
  assert.equal(sum(off.prefilled), off.usage.prompt_tokens, "off: the whole prompt prefilled");

  // tenant nocache (kv_cache off): nothing looked up or stored, unless a request asks for it
  const short: Msg[] = [{ role: "user", content: "Name a colour." }];
  const t1 = await chat("nocache", short);
  const turn2: Msg[] = [...short, { role: "assistant", content: t1.text }, { role: "user", content: "Another one." }];
  const t2 = await chat("nocache", turn2);
  assert.equal(t2.usage.cached_tokens, 0, "the tenant's kv_cache off: turn 2 is not continued");
  assert.equal(sum(t2.prefilled), t2.usage.prompt_tokens);
  const on2 = await chat("nocache", turn2, { kvCache: "on" });
  assert.equal(on2.usage.cached_tokens, 0, "turn 1 stored nothing under the tenant's off");
  const turn3: Msg[] = [...turn2, { role: "assistant", content: on2.text }, { role: "user", content: "And one more." }];
  const on3 = await chat("nocache", turn3, { kvCache: "on" });
  assert.ok(on3.usage.cached_tokens > 0, `the request's kv_cache on wins: ${JSON.stringify(on3.usage)}`);
  assertPrefilledNewOnly(on3, "nocache turn 3 with kv_cache on");
  const off3 = await chat("nocache", turn3);
  assert.equal(off3.usage.cached_tokens, 0, "without it, the tenant's off again");

  await assert.rejects(
    client("alpha").chat.completions.create({
      model: MODEL,
      messages: short,
      max_tokens: 1,
      kv_cache: "maybe",
    } as OpenAI.ChatCompletionCreateParamsNonStreaming),
    (e: unknown) => {
      assert.ok(e instanceof OpenAI.BadRequestError, String(e));
      assert.equal(e.param, "kv_cache");
      assert.match(e.message, /"on", "off"/);
      return true;
    },
  );
});
