// The compressed prompt cache, request side (prompt-cache.ts), against fake hosts of protocol 3.1
// that share their cached states (as hosts share the edge's store): what each turn sends the host
// (a copy of the longest cached prefix, only the new messages appended), the keys as docs/WORKER.md
// defines them, cached_tokens, misses (a changed message, another tenant, a host without the copy),
// one prefill per shared document, snapshot failures that fail nothing, kv_cache and its validation,
// and the path with the cache off (or a 3.0 host) unchanged; the review's fixes: claims released
// "not_stored" / "failed" and renewed, entries never stored (another budget granted, a stop
// string), copies the host cannot take, the document's snapshot off the question's path, the next
// prefix after a miss. Timeouts are generous (a loaded CI box).
import { ENGINE_DEFAULTS, type ToHostMessage } from "@pyramidkv/shared";
import { afterAll, beforeAll, beforeEach, describe, expect, it } from "vitest";

import { claimRenewal } from "../src/prompt-cache.js";
import { DEFAULT_SYSTEM } from "../src/routes/sessions.js";
import { TenantState } from "../src/tenant.js";
import { as, call, contractKey, error, hostRow, type Msg, makeTenant, readSse } from "./client.js";
import { eventuallyAsync, FakeHost, type StateCache } from "./fake-host.js";

const MODEL_FILE = "cache-model.gguf";
const MODEL = "cache-model";
const states: StateCache = new Map();
const one = new FakeHost("pc-one", MODEL_FILE, { protocol_minor: 1 }, states);
const two = new FakeHost("pc-two", MODEL_FILE, { protocol_minor: 1 }, states);
/** a host of protocol 3.0 (no cache) */
const old = new FakeHost("pc-old", "old-model.gguf", { protocol_minor: 0 });
const hosts = [one, two, old];
let key: string;
let other: string;
let off: string;

const MiB = 1 << 20;
/**
 * Routes new sessions to `h` (the most free KV; the other host reports `otherMiB`, 0: no room even
 * for a request whose cached prefix it holds) and waits until the routing table knows.
 */
async function prefer(h: FakeHost, otherMiB = 100) {
  for (const x of [one, two]) x.heartbeat({ free_bytes: (x === h ? 900 : otherMiB) * MiB });
  for (const x of [one, two])
    await eventuallyAsync(
      async () => (await hostRow(x.name))?.free_bytes === (x === h ? 900 : otherMiB) * MiB,
      `${x.name}'s heartbeat in the table`,
    );
}

beforeAll(async () => {
  key = await makeTenant("pc-a", { max_sessions: 16, requests_per_minute: 10_000 });
  other = await makeTenant("pc-b", { max_sessions: 16, requests_per_minute: 10_000 });
  off = await makeTenant("pc-off", { max_sessions: 16, requests_per_minute: 10_000, kv_cache: "off" });
  for (const h of hosts) await h.connect();
});
afterAll(async () => {
  for (const h of hosts) await h.disconnect();
});
beforeEach(async () => {
  for (const h of hosts) {
    await h.settle();
    h.reset();
  }
});

const cacheKey = (kind: "doc" | "reply", messages: Msg[], model = MODEL_FILE) => contractKey(kind, messages, model);

type Frame<T extends ToHostMessage["type"]> = Extract<ToHostMessage, { type: T }>;
/** The frames of each request's channel (those that opened a session), on both hosts of the model. */
const requests = () =>
  [...one.connections, ...two.connections, ...old.connections].filter((ch) =>
    ch.some((f) => f.type === "open_session"),
  );
const only = () => {
  const r = requests();
  expect(r).toHaveLength(1);
  return r[0]!;
};
const ofType = <T extends ToHostMessage["type"]>(frames: ToHostMessage[], type: T) =>
  frames.filter((f) => f.type === type) as Frame<T>[];
/** A channel's frames after set_tenant, by type, the close (sent by the lease after the response) left out. */
const steps = (frames: ToHostMessage[]) => frames.map((f) => f.type).filter((t) => t !== "set_tenant" && t !== "close");

interface ChatBody {
  choices: { message: { content: string }; finish_reason: string }[];
  usage: { prompt_tokens: number; prompt_tokens_details: { cached_tokens: number } };
}
async function chat(k: string, messages: Msg[], extra: Record<string, unknown> = {}) {
  const r = await call("/v1/chat/completions", as(k, { model: MODEL, messages, ...extra }));
  expect(r.status, await r.clone().text()).toBe(200);
  return (await r.json()) as ChatBody;
}

/**
 * The answer as the client received it: the key of a turn's reply is over exactly this text. (The
 * fake host always answers "Hello", but the test pool now and then delivers a channel's `done`
 * before its `token`, and then the client gets ""; the keys follow what was received.)
 */
const said = (b: ChatBody) => b.choices[0]!.message.content;
const sys = (s: string) => ({ role: "system", content: s });
const user = (s: string) => ({ role: "user", content: s });
const assistant = (s: string) => ({ role: "assistant", content: s });
/**
 * The tokens a cached state holds as the fake host took it. The document's snapshot and the
 * question's append go out back to back (the snapshot not awaited); a host takes them in that
 * order, but the test pool, loaded, now and then delivers two frames out of order.
 */
const stateTokens = (k: string, tenant = "pc-a") => states.get(`${tenant}/${k}`)?.tokens;
/** a document of at least PKV_CACHE_MIN_BYTES (1024) */
const doc = (tag: string) => `${tag}: ${"The quick brown fox jumps over the lazy dog. ".repeat(30)}`;

describe("a conversation continues a copy of its last turn", { timeout: 30_000 }, () => {
  it("turn 2 opens a copy of turn 1's reply (its key over the messages and the answer) and appends only the new user message", async () => {
    const t1 = [sys("Be brief."), user("Hi, 2-turn")];
    const a = await chat(key, t1);
    expect(a.usage.prompt_tokens_details).toEqual({ cached_tokens: 0 });
    const ch1 = only();
    // below PKV_CACHE_MIN_BYTES: no document step, the whole prompt in one append as without the cache
    expect(steps(ch1)).toEqual(["open_session", "append", "generate", "snapshot", "stats"]);
    expect(ofType(ch1, "open_session")[0]!.from_cache).toBeUndefined();
    const replyKey = await cacheKey("reply", [...t1, assistant(said(a))]);
    // an entry's bound: PKV_CACHE_MAX_ENTRY_BYTES (64 MiB), below the tenant's cache_max_bytes (1 GiB by default)
    expect(ofType(ch1, "snapshot")[0]).toMatchObject({ key: replyKey, max_bytes: 64 * MiB });

    for (const h of hosts) h.reset();
    const t2 = [...t1, assistant(said(a)), user("And then?")];
    const b = await chat(key, t2);
    const ch2 = only();
    expect(ofType(ch2, "open_session")[0]!.from_cache).toBe(replyKey);
    const appends = ofType(ch2, "append");
    expect(appends).toHaveLength(1);
    expect(appends[0]).toMatchObject({ messages: [user("And then?")], add_generation_prompt: true });
    // the fake host: 10 tokens per append, 1 per answer
    expect(b.usage.prompt_tokens_details).toEqual({ cached_tokens: 11 });
    expect(b.usage.prompt_tokens).toBe(21);
    expect(ofType(ch2, "snapshot")[0]!.key).toBe(await cacheKey("reply", [...t2, assistant(said(b))]));
  });

  it("a streamed turn's entry exists when its response ends (the snapshot is awaited before the finish chunk), and the next turn copies it on another host (the one that stored it has no room)", async () => {
    await prefer(one);
    // a slow snapshot: a response that ended before it would leave turn 2 without an entry
    one.on.snapshot = (m, reply, ws) => setTimeout(() => one.answer(m, reply, ws), 300);
    const t1 = [sys("Be brief."), user("Hi, streamed")];
    const r = await call(
      "/v1/chat/completions",
      as(key, { model: MODEL, messages: t1, stream: true, stream_options: { include_usage: true } }),
    );
    const chunks = [];
    for await (const ev of readSse(r)) if (ev.data !== "[DONE]") chunks.push(JSON.parse(ev.data));
    const answer = chunks.map((c) => c.choices[0]?.delta?.content ?? "").join("");
    expect(chunks.at(-2).choices[0].finish_reason).toBe("stop");
    expect(chunks.at(-1).usage.prompt_tokens_details).toEqual({ cached_tokens: 0 });
    expect(steps(one.connections.find((ch) => ch.some((f) => f.type === "open_session"))!)).toEqual([
      "open_session",
      "append",
      "generate",
      "snapshot",
      "stats",
    ]);

    // a turn goes to the host that stored its prefix while that one has room (cache-routing.test.ts): here it has none
    await prefer(two, 0);
    const b = await chat(key, [...t1, assistant(answer), user("More?")]);
    const ch2 = two.connections.find((ch) => ch.some((f) => f.type === "open_session"))!;
    expect(ofType(ch2, "open_session")[0]!.from_cache).toBe(await cacheKey("reply", [...t1, assistant(answer)]));
    expect(b.usage.prompt_tokens_details.cached_tokens).toBe(11);
    await prefer(one);
  });

  it("a changed earlier message (or system prompt) is a miss: the whole conversation is prefilled", async () => {
    const t1 = [sys("Be brief."), user("Hi, changed")];
    const a = said(await chat(key, t1));
    for (const changed of [
      [...t1, assistant(`${a}!`), user("And?")],
      [sys("Be very brief."), user("Hi, changed"), assistant(a), user("And?")],
    ]) {
      for (const h of hosts) h.reset();
      const b = await chat(key, changed);
      const ch = only();
      expect(ofType(ch, "open_session")[0]!.from_cache).toBeUndefined();
      expect(ofType(ch, "append").map((f) => f.messages)).toEqual([changed]);
      expect(b.usage.prompt_tokens_details.cached_tokens).toBe(0);
    }
  });

  it("two tenants with the same conversation never hit each other's entries", async () => {
    const t1 = [sys("Be brief."), user("Hi, tenants")];
    const answer = said(await chat(key, t1));
    const t2 = [...t1, assistant(answer), user("And?")];
    for (const h of hosts) h.reset();
    const b = await chat(other, t2);
    expect(ofType(only(), "open_session")[0]!.from_cache).toBeUndefined();
    expect(b.usage.prompt_tokens_details.cached_tokens).toBe(0);
    expect(ofType(only(), "snapshot")[0]!.tenant).toBe("pc-b");
    // the same turn of the tenant that answered turn 1 does hit
    for (const h of hosts) h.reset();
    const a = await chat(key, t2);
    expect(ofType(only(), "open_session")[0]!.from_cache).toBe(await cacheKey("reply", [...t1, assistant(answer)]));
    expect(a.usage.prompt_tokens_details.cached_tokens).toBe(11);
  });

  it("a host without the copy answers cache_miss: the request opens again from nothing and the answer still comes", async () => {
    const t1 = [sys("Be brief."), user("Hi, cache_miss")];
    const a = said(await chat(key, t1));
    states.clear(); // the entry is recorded at the edge, but no host can read its state
    for (const h of hosts) h.reset();
    const t2 = [...t1, assistant(a), user("And?")];
    const b = await chat(key, t2);
    expect(b.choices[0]!.finish_reason).toBe("stop");
    const ch = only();
    const opens = ofType(ch, "open_session");
    expect(opens).toHaveLength(2);
    expect(opens[0]!.from_cache).toBe(await cacheKey("reply", [...t1, assistant(a)]));
    expect(opens[1]!.from_cache).toBeUndefined();
    expect(opens[1]!.session).toBe(opens[0]!.session);
    expect(ofType(ch, "append").map((f) => f.messages)).toEqual([t2]);
    expect(b.usage.prompt_tokens_details.cached_tokens).toBe(0);
    // its own turn is stored again
    expect(ofType(ch, "snapshot")[0]!.key).toBe(await cacheKey("reply", [...t2, assistant(said(b))]));
  });

  it("a snapshot that fails fails nothing: the answer comes, the entry is absent", async () => {
    for (const h of [one, two])
      h.on.snapshot = (m, reply) =>
        reply({ type: "error", id: m.id, code: "checkpoint_failed", message: "edge refused" });
    const t1 = [sys("Be brief."), user("Hi, failing snapshot")];
    const a = await chat(key, t1);
    expect(a.choices[0]!.finish_reason).toBe("stop");
    for (const h of hosts) h.reset();
    const b = await chat(key, [...t1, assistant(said(a)), user("And?")]);
    expect(ofType(only(), "open_session")[0]!.from_cache).toBeUndefined();
    expect(b.usage.prompt_tokens_details.cached_tokens).toBe(0);
  });
});

describe("documents: the messages before the last user message", { timeout: 30_000 }, () => {
  it("a long system prompt is a document step of its own (doc entry); the next question copies it, the next turn the reply", async () => {
    const d = sys(doc("manual"));
    const a = await chat(key, [d, user("Q1?")]);
    expect(a.usage.prompt_tokens_details.cached_tokens).toBe(0);
    const ch = only();
    // the document's snapshot is sent right after its append, before the question's (not awaited: stateTokens)
    expect(steps(ch).filter((t) => t !== "snapshot")).toEqual([
      "open_session",
      "append",
      "append",
      "generate",
      "stats",
    ]);
    expect(steps(ch).slice(0, 2)).toEqual(["open_session", "append"]);
    const [docAppend, rest] = ofType(ch, "append");
    expect(docAppend).toMatchObject({ messages: [d], add_generation_prompt: false });
    expect(rest).toMatchObject({ messages: [user("Q1?")], add_generation_prompt: true });
    const docKey = await cacheKey("doc", [d]);
    expect(ofType(ch, "snapshot").map((f) => f.key)).toEqual([
      docKey,
      await cacheKey("reply", [d, user("Q1?"), assistant(said(a))]),
    ]);

    // another question on the same document: a copy of the document's state
    for (const h of hosts) h.reset();
    const b = await chat(key, [d, user("Q2?")]);
    const ch2 = only();
    expect(ofType(ch2, "open_session")[0]!.from_cache).toBe(docKey);
    expect(ofType(ch2, "append").map((f) => f.messages)).toEqual([[user("Q2?")]]);
    expect(b.usage.prompt_tokens_details.cached_tokens).toBe(stateTokens(docKey));

    // the next turn of the first conversation: a copy of its reply, no document step
    for (const h of hosts) h.reset();
    const c = await chat(key, [d, user("Q1?"), assistant(said(a)), user("Q3?")]);
    const ch3 = only();
    expect(ofType(ch3, "open_session")[0]!.from_cache).toBe(
      await cacheKey("reply", [d, user("Q1?"), assistant(said(a))]),
    );
    expect(ofType(ch3, "append").map((f) => [f.messages, f.add_generation_prompt])).toEqual([[[user("Q3?")], true]]);
    expect(c.usage.prompt_tokens_details.cached_tokens).toBe(21);
  });

  it("a hit shorter than the document gets the document step from there (the sessions API on the same turns)", async () => {
    const system = "Answer from the document.";
    const document = doc("shorter hit");
    const s = await call("/v1/sessions", as(key, { model: MODEL, system, document }));
    expect(s.status).toBe(201);
    const docKey2 = await cacheKey("doc", [sys(system), user(document)]);
    expect(ofType(only(), "snapshot")[0]!.key).toBe(docKey2);

    for (const h of hosts) h.reset();
    const msgs = [sys(system), user(document), assistant("Understood."), user("Q?")];
    const b = await chat(key, msgs);
    const ch = only();
    expect(ofType(ch, "open_session")[0]!.from_cache).toBe(docKey2);
    expect(ofType(ch, "append").map((f) => [f.messages, f.add_generation_prompt])).toEqual([
      [[assistant("Understood.")], false],
      [[user("Q?")], true],
    ]);
    expect(ofType(ch, "snapshot")[0]!.key).toBe(await cacheKey("doc", msgs.slice(0, 3)));
    expect(b.usage.prompt_tokens_details.cached_tokens).toBe(10);
  });

  it("a document opened by several sessions at once is prefilled once; the others start from copies", async () => {
    // the document's prefill is slow: the other sessions' lookups wait for its entry instead of prefilling too
    for (const h of [one, two])
      h.on.append = (m, reply, ws) => {
        const a = m as Frame<"append">;
        if (a.add_generation_prompt === false) setTimeout(() => h.answer(m, reply, ws), 300);
        else h.answer(m, reply, ws);
      };
    const system = "Answer from the shared manual.";
    const document = doc("shared manual");
    const rs = await Promise.all(
      [0, 1, 2, 3].map(() => call("/v1/sessions", as(key, { model: MODEL, system, document }))),
    );
    const bodies = await Promise.all(
      rs.map(async (r) => {
        expect(r.status).toBe(201);
        return (await r.json()) as { id: string; cached_tokens: number };
      }),
    );
    const docKey = await cacheKey("doc", [sys(system), user(document)]);
    const opens = requests().flatMap((ch) => ofType(ch, "open_session"));
    expect(opens).toHaveLength(4);
    expect(opens.filter((o) => o.from_cache === docKey)).toHaveLength(3);
    expect(requests().flatMap((ch) => ofType(ch, "append"))).toHaveLength(1);
    expect(bodies.map((b) => b.cached_tokens).sort()).toEqual([0, 10, 10, 10]);
    // a copy opened is a session like any: its questions are answered, each on its own copy
    for (const b of bodies) {
      const q = await call(`/v1/sessions/${b.id}/messages`, as(key, { content: "What is it?", stream: false }));
      expect(q.status).toBe(200);
    }
    // a chat completion on the same document starts from the same state
    for (const h of hosts) h.reset();
    const c = await chat(key, [sys(system), user(document), user("Q?")]);
    expect(ofType(only(), "open_session")[0]!.from_cache).toBe(docKey);
    expect(c.usage.prompt_tokens_details.cached_tokens).toBe(10);
    for (const b of bodies)
      expect((await call(`/v1/sessions/${b.id}`, { ...as(key), method: "DELETE" })).status).toBe(200);
  });

  it("a document whose snapshot failed is not waited for: the next session prefills it and stores it", async () => {
    one.on.snapshot = two.on.snapshot = (m, reply) =>
      reply({ type: "error", id: m.id, code: "too_large", message: "over max_bytes" });
    const body = { model: MODEL, document: doc("failed snapshot") };
    const a = await call("/v1/sessions", as(key, body));
    expect(a.status).toBe(201);
    expect(((await a.json()) as { cached_tokens: number }).cached_tokens).toBe(0);
    delete one.on.snapshot;
    delete two.on.snapshot;
    const b = await call("/v1/sessions", as(key, { ...body, stream: true }));
    const events = [];
    for await (const ev of readSse(b)) if (ev.data !== "[DONE]") events.push(JSON.parse(ev.data));
    expect(events.at(-1)).toMatchObject({ object: "session", cached_tokens: 0 });
    expect(requests().flatMap((ch) => ofType(ch, "append"))).toHaveLength(2);
    // now stored: a third opens a copy, streamed
    for (const h of hosts) h.reset();
    const c = await call("/v1/sessions", as(key, { ...body, stream: true }));
    const cev = [];
    for await (const ev of readSse(c)) if (ev.data !== "[DONE]") cev.push(JSON.parse(ev.data));
    expect(cev).toEqual([expect.objectContaining({ object: "session", cached_tokens: 10 })]);
    expect(ofType(only(), "open_session")[0]!.from_cache).toBe(
      await cacheKey("doc", [sys(DEFAULT_SYSTEM), user(body.document)]),
    );
  });
});

describe("bounds and failures", { timeout: 30_000 }, () => {
  it("snapshots are bounded by the tenant's cache_max_bytes (0: none taken)", async () => {
    const small = await makeTenant("pc-small", { requests_per_minute: 10_000, cache_max_bytes: 2048 });
    const none = await makeTenant("pc-none", { requests_per_minute: 10_000, cache_max_bytes: 0 });
    const t1 = [sys("Be brief."), user("Hi, bounded")];
    const a = said(await chat(small, t1));
    // the fake state (4096 bytes) is over the bound: too_large, no entry, the answer unharmed
    expect(ofType(only(), "snapshot")[0]!.max_bytes).toBe(2048);
    for (const h of hosts) h.reset();
    const b = await chat(small, [...t1, assistant(a), user("And?")]);
    expect(b.usage.prompt_tokens_details.cached_tokens).toBe(0);
    for (const h of hosts) h.reset();
    await chat(none, t1);
    expect(steps(only())).toEqual(["open_session", "append", "generate", "stats"]);
  });

  it("a request that fails while building a document gives its claim up: the next one builds it at once", async () => {
    let first = true;
    for (const h of [one, two])
      h.on.append = (m, reply, ws) => {
        const a = m as Frame<"append">;
        if (a.add_generation_prompt !== false || !first) return h.answer(m, reply, ws);
        first = false;
        setTimeout(
          () => reply({ type: "error", id: a.id, session: a.session, code: "context_full", message: "too long" }),
          300,
        );
      };
    const body = { model: MODEL, system: "Claims.", document: doc("claimed, then failed") };
    const rs = await Promise.all([0, 1].map(() => call("/v1/sessions", as(key, body))));
    expect(rs.map((r) => r.status).sort()).toEqual([201, 400]);
    const [failed, ok] = rs[0]!.status === 400 ? rs : [rs[1]!, rs[0]!];
    expect(await error(failed!)).toMatchObject({ code: "context_length_exceeded", param: "document" });
    expect(((await ok!.json()) as { cached_tokens: number }).cached_tokens).toBe(0);
    expect(requests().flatMap((ch) => ofType(ch, "append"))).toHaveLength(2);
  });
});

describe("kv_cache", { timeout: 30_000 }, () => {
  it("off (the request's or the tenant's) is today's path: nothing looked up, nothing snapshotted", async () => {
    const t1 = [sys("Be brief."), user("Hi, off")];
    const t2 = [...t1, assistant(said(await chat(key, t1))), user("And?")];
    for (const [k, extra] of [
      [key, { kv_cache: "off" }],
      [off, {}],
    ] as const) {
      for (const h of hosts) h.reset();
      const b = await chat(k, t2, extra);
      const ch = only();
      expect(steps(ch)).toEqual(["open_session", "append", "generate", "stats"]);
      expect(ofType(ch, "open_session")[0]!.from_cache).toBeUndefined();
      expect(ofType(ch, "append").map((f) => f.messages)).toEqual([t2]);
      expect(b.usage.prompt_tokens_details).toEqual({ cached_tokens: 0 });
    }
    // the request's on wins over the tenant's off
    for (const h of hosts) h.reset();
    await chat(off, t1, { kv_cache: "on" });
    expect(ofType(only(), "snapshot")).toHaveLength(1);
    // sessions: off opens and prefills as before, and says cached_tokens 0
    for (const h of hosts) h.reset();
    const s = await call("/v1/sessions", as(key, { model: MODEL, document: doc("off session"), kv_cache: "off" }));
    expect(((await s.json()) as { cached_tokens: number }).cached_tokens).toBe(0);
    expect(steps(only())).toEqual(["open_session", "append", "stats"]);
  });

  it("a host of protocol 3.0 is served without the cache", async () => {
    const r = await call(
      "/v1/chat/completions",
      as(key, { model: "old-model", messages: [sys(doc("old host")), user("Q?")] }),
    );
    const body = (await r.json()) as ChatBody;
    expect(body.usage.prompt_tokens_details).toEqual({ cached_tokens: 0 });
    expect(steps(only())).toEqual(["open_session", "append", "generate", "stats"]);
  });

  it('anything but "on" or "off" is 400 naming kv_cache and the accepted values', async () => {
    for (const v of ["maybe", true, 1, ""]) {
      for (const [path, body] of [
        ["/v1/chat/completions", { model: MODEL, messages: [user("hi")], kv_cache: v }],
        ["/v1/sessions", { model: MODEL, document: "d", kv_cache: v }],
      ] as const) {
        const e = await error(await call(path, as(key, body)));
        expect(e).toMatchObject({ status: 400, type: "invalid_request_error", param: "kv_cache" });
        expect(e.message).toContain('"on", "off"');
        expect(e.message).toContain(JSON.stringify(v));
      }
    }
    expect(requests()).toHaveLength(0);
  });
});

/** Records the calls of a TenantState RPC method while `f` runs (the method still runs). */
async function spying<T>(method: "cacheLookup" | "cacheRelease" | "cacheRenew", f: (calls: unknown[][]) => Promise<T>) {
  const proto = TenantState.prototype as unknown as Record<string, (...a: unknown[]) => unknown>;
  const real = proto[method]!;
  const calls: unknown[][] = [];
  proto[method] = function (...a: unknown[]) {
    calls.push(a);
    return real.apply(this, a);
  };
  try {
    return { result: await f(calls), calls };
  } finally {
    proto[method] = real;
  }
}

/**
 * Holds the fake hosts' document appends (add_generation_prompt false) until `n` have arrived
 * (or `ms` passed): the most held at once says whether they ran concurrently.
 */
function holdDocuments(n: number, ms = 15_000) {
  const held: (() => void)[] = [];
  let most = 0;
  let timer: ReturnType<typeof setTimeout> | undefined;
  const stop = () => {
    if (timer !== undefined) clearTimeout(timer);
  };
  const flush = () => {
    stop();
    for (const go of held.splice(0)) go();
  };
  for (const h of [one, two])
    h.on.append = (m, reply, ws) => {
      const a = m as Frame<"append">;
      if (a.add_generation_prompt !== false || a.more) return h.answer(m, reply, ws);
      held.push(() => h.answer(m, reply, ws));
      most = Math.max(most, held.length);
      if (held.length >= n) flush();
      else {
        stop();
        timer = setTimeout(flush, ms);
      }
    };
  return { most: () => most };
}

describe("single flight when nothing is stored, and for long prefills", { timeout: 60_000 }, () => {
  it("a tenant whose cache_max_bytes is 0 claims nothing: sessions on one document prefill at once", async () => {
    const none = await makeTenant("pc-none-flight", { requests_per_minute: 10_000, cache_max_bytes: 0 });
    const held = holdDocuments(2);
    const body = { model: MODEL, document: doc("no claim") };
    const { calls } = await spying("cacheLookup", async () => {
      const rs = await Promise.all([0, 1].map(() => call("/v1/sessions", as(none, body))));
      for (const r of rs) expect(r.status).toBe(201);
    });
    expect(held.most()).toBe(2);
    expect(calls.map((a) => a[1])).toEqual([undefined, undefined]);
    expect(requests().flatMap((ch) => ofType(ch, "snapshot"))).toHaveLength(0);
  });

  it("a document whose snapshot is too_large is released not_stored: the waiter goes on without the claim at once", async () => {
    one.on.snapshot = two.on.snapshot = (m, reply) =>
      reply({ type: "error", id: m.id, code: "too_large", message: "over max_bytes" });
    const held = holdDocuments(2, 300);
    const body = { model: MODEL, document: doc("too large, released") };
    const docKey = await cacheKey("doc", [sys(DEFAULT_SYSTEM), user(body.document)]);
    const { calls } = await spying("cacheRelease", async () => {
      const rs = await Promise.all([0, 1].map(() => call("/v1/sessions", as(key, body))));
      for (const r of rs) expect(r.status).toBe(201);
    });
    // the holder's release only: the waiter did not claim (it would have released too)
    expect(calls).toEqual([[docKey, "not_stored"]]);
    expect(held.most()).toBe(1);
    expect(requests().flatMap((ch) => ofType(ch, "append"))).toHaveLength(2);
  });

  it("a request that fails before building its document releases its claim as failed", async () => {
    for (const h of [one, two])
      h.on.append = (m, reply, ws) => {
        const a = m as Frame<"append">;
        if (a.add_generation_prompt !== false) return h.answer(m, reply, ws);
        reply({ type: "error", id: a.id, session: a.session, code: "context_full", message: "too long" });
      };
    const body = { model: MODEL, document: doc("failed build, released") };
    const { calls } = await spying("cacheRelease", async () => {
      expect((await call("/v1/sessions", as(key, body))).status).toBe(400);
    });
    expect(calls).toEqual([[await cacheKey("doc", [sys(DEFAULT_SYSTEM), user(body.document)]), "failed"]]);
  });

  it("the holder renews its claim on a timer while its document is built (no frames from the host), and stops when the claim ends", async () => {
    const saved = { ...claimRenewal };
    claimRenewal.timerMs = 50;
    try {
      for (const h of [one, two])
        h.on.append = (m, reply, ws) => {
          const a = m as Frame<"append">;
          if (a.add_generation_prompt === false) setTimeout(() => h.answer(m, reply, ws), 600);
          else h.answer(m, reply, ws);
        };
      const d = sys(doc("renewed on a timer"));
      const { calls } = await spying("cacheRenew", async (calls) => {
        await chat(key, [d, user("Q?")]);
        const n = calls.length;
        await new Promise((r) => setTimeout(r, 300));
        expect(calls.length).toBe(n); // the claim ended with the put: no more renewals
      });
      expect(calls.length).toBeGreaterThanOrEqual(2);
      expect(new Set(calls.map((a) => a[0]))).toEqual(new Set([await cacheKey("doc", [d])]));
    } finally {
      Object.assign(claimRenewal, saved);
    }
  });

  it("the holder renews its claim on the document append's progress frames, throttled", async () => {
    const saved = { ...claimRenewal };
    claimRenewal.timerMs = 3_600_000;
    claimRenewal.progressMs = 0;
    try {
      for (const h of [one, two])
        h.on.append = (m, reply, ws) => {
          const a = m as Frame<"append">;
          if (a.add_generation_prompt !== false) return h.answer(m, reply, ws);
          for (let i = 1; i <= 3; i++) reply({ type: "progress", id: a.id, session: a.session, done: i, total: 3 });
          h.answer(m, reply, ws);
        };
      // A document of its own per attempt: a retry must build it again, not find it stored.
      const d = sys(doc(`renewed on progress ${crypto.randomUUID()}`));
      // Renewals are not awaited by the request: the last one may reach the tenant's object after
      // the answer has come.
      const { calls } = await spying("cacheRenew", async (seen) => {
        await chat(key, [d, user("Q?")]);
        await eventuallyAsync(async () => seen.length >= 3, "the third renewal");
      });
      expect(calls.map((a) => a[0])).toEqual(Array(3).fill(await cacheKey("doc", [d])));
      // throttled: progress within claimRenewal.progressMs of the last renewal renews nothing
      claimRenewal.progressMs = 3_600_000;
      for (const h of hosts) h.reset();
      for (const h of [one, two])
        h.on.append = (m, reply, ws) => {
          const a = m as Frame<"append">;
          if (a.add_generation_prompt !== false) return h.answer(m, reply, ws);
          for (let i = 1; i <= 3; i++) reply({ type: "progress", id: a.id, session: a.session, done: i, total: 3 });
          h.answer(m, reply, ws);
        };
      const again = await spying("cacheRenew", () => chat(key, [sys(doc("progress, throttled")), user("Q?")]));
      expect(again.calls).toHaveLength(0);
    } finally {
      Object.assign(claimRenewal, saved);
    }
  });
});

describe("what is never stored, and copies the host cannot take", { timeout: 60_000 }, () => {
  it("a session the host opened with a smaller budget than asked (policy auto) stores no entry", async () => {
    for (const h of [one, two])
      h.on.open_session = (m, reply, ws) => {
        const o = m as Frame<"open_session">;
        if (o.from_cache !== undefined) return h.answer(m, reply, ws);
        h.answer({ ...o, budget: (o.budget ?? ENGINE_DEFAULTS.budget) / 2 }, reply, ws);
      };
    const d = sys(doc("shrunk"));
    const a = await chat(key, [d, user("Q?")]);
    expect(a.choices[0]!.finish_reason).toBe("stop");
    expect(steps(only())).toEqual(["open_session", "append", "append", "generate", "stats"]);
    for (const h of hosts) h.reset();
    await chat(key, [d, user("Q2?")]);
    expect(ofType(only(), "open_session")[0]!.from_cache).toBeUndefined();
  });

  it("a copy refused with quota_exceeded, pool_full, stored_quota_exceeded or checkpoint_failed opens from nothing; the entry is kept", async () => {
    const t1 = [sys("Be brief."), user("Hi, refused copy")];
    const a = said(await chat(key, t1));
    const replyKey = await cacheKey("reply", [...t1, assistant(a)]);
    const t2 = [...t1, assistant(a), user("And?")];
    for (const code of ["quota_exceeded", "pool_full", "stored_quota_exceeded", "checkpoint_failed"]) {
      for (const h of hosts) h.reset();
      for (const h of [one, two])
        h.on.open_session = (m, reply, ws) => {
          const o = m as Frame<"open_session">;
          if (o.from_cache === undefined) return h.answer(m, reply, ws);
          reply({ type: "error", id: o.id, session: o.session, code, message: "no room for a copy" });
        };
      const b = await chat(key, t2);
      expect(b.usage.prompt_tokens_details.cached_tokens).toBe(0);
      expect(ofType(only(), "open_session").map((o) => o.from_cache)).toEqual([replyKey, undefined]);
    }
    for (const h of hosts) h.reset();
    const c = await chat(key, t2);
    expect(ofType(only(), "open_session").map((o) => o.from_cache)).toEqual([replyKey]);
    expect(c.usage.prompt_tokens_details.cached_tokens).toBe(11);
  });

  it("an answer cut by a stop string stores no reply entry (its state holds the stop string's tokens)", async () => {
    for (const h of [one, two])
      h.on.generate = (m, reply) => {
        const g = m as Frame<"generate">;
        reply({ type: "token", id: g.id, session: g.session, tokens: [1], text: "Hello" });
        reply({ type: "done", id: g.id, session: g.session, reason: "stop", new_tokens: 3, text: "Hello" });
      };
    const t1 = [sys("Be brief."), user("Hi, stopped")];
    const a = await chat(key, t1, { stop: ["!"] });
    expect(a.choices[0]!.finish_reason).toBe("stop");
    expect(steps(only())).toEqual(["open_session", "append", "generate", "stats"]);
  });
});

describe("snapshots off the critical path, and the next prefix after a miss", { timeout: 60_000 }, () => {
  it("the document's snapshot is not awaited before the question's append, and is recorded before the response ends", async () => {
    // the document's snapshot is answered only once the question's append has arrived (15 s at
    // most: an edge that awaited it would send the question after that, and fail below)
    let snapshotAnswered = false;
    let questionArrived = false;
    let questionBeforeSnapshotAnswered = false;
    let pending: (() => void) | undefined;
    for (const h of [one, two]) {
      h.on.snapshot = (m, reply, ws) => {
        const go = () => {
          snapshotAnswered = true;
          h.answer(m, reply, ws);
        };
        if (snapshotAnswered || questionArrived) return go(); // the reply's, or the question came first
        pending = go;
        setTimeout(() => pending?.(), 15_000);
      };
      h.on.append = (m, reply, ws) => {
        const a = m as Frame<"append">;
        if (a.add_generation_prompt === true) {
          questionArrived = true;
          questionBeforeSnapshotAnswered = !snapshotAnswered;
          const go = pending;
          pending = undefined;
          go?.();
        }
        h.answer(m, reply, ws);
      };
    }
    const d = sys(doc("snapshot in the background"));
    await chat(key, [d, user("Q?")]);
    expect(questionBeforeSnapshotAnswered).toBe(true);
    // its entry exists when the response has ended
    for (const h of hosts) h.reset();
    const b = await chat(key, [d, user("Q2?")]);
    const docKey = await cacheKey("doc", [d]);
    expect(ofType(only(), "open_session")[0]!.from_cache).toBe(docKey);
    expect(b.usage.prompt_tokens_details.cached_tokens).toBe(stateTokens(docKey));
  });

  it("after a cache_miss on the longest hit, the next cached prefix is opened (its document step from there)", async () => {
    const d = sys(doc("next prefix"));
    const a = said(await chat(key, [d, user("Q1?")]));
    const reply3 = await cacheKey("reply", [d, user("Q1?"), assistant(a)]);
    states.delete(`pc-a/${reply3}`); // no host can read the reply any more; the document's state is there
    for (const h of hosts) h.reset();
    const msgs = [d, user("Q1?"), assistant(a), user("Q2?")];
    const b = await chat(key, msgs);
    const ch = only();
    const doc1 = await cacheKey("doc", [d]);
    expect(ofType(ch, "open_session").map((o) => o.from_cache)).toEqual([reply3, doc1]);
    expect(ofType(ch, "append").map((f) => [f.messages, f.add_generation_prompt])).toEqual([
      [[user("Q1?"), assistant(a)], false],
      [[user("Q2?")], true],
    ]);
    expect(b.usage.prompt_tokens_details.cached_tokens).toBe(stateTokens(doc1));
    expect(ofType(ch, "snapshot")[0]!.key).toBe(await cacheKey("doc", msgs.slice(0, 3)));
  });
});
