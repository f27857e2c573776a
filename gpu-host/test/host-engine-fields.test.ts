// Host protocol 2.1 against the real engine (the shared build, the embedded model): the template
// named in hello, messages rendered and answered, logprobs in OpenAI's shape, seeds honoured and
// reported, the context refused before any prefill (by the host or by the engine), a q8_0 session
// accounted at q8_0's entry size, a grammar that binds the output. host-passthrough.test.ts checks
// the framing of each field against a stand-in engine; this file checks the two agree.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { expectType, HostClient, startTestHost } from "./host-client.js";

const N_CTX = 512;
let host: Awaited<ReturnType<typeof startTestHost>>;
let c: HostClient;
// An engine built before protocol 2.2 lacks the fields under test: then these tests are skipped
// with that reason (the build is stale, not the host wrong).
let engine22 = false;

before(async () => {
  host = await startTestHost({}, ["--kv-pool-bytes", String(64 << 20), "--ctx-size", String(N_CTX)]);
  c = await HostClient.connect(host.url);
  engine22 = (host.sessions.hello.protocol_minor ?? 0) >= 2;
});
after(async () => {
  c.close();
  await host.stop();
});

const skip = () => (engine22 ? false : "the shared engine build predates engine protocol 2.2");

async function chatSession(session: string, extra: Record<string, unknown> = {}) {
  expectType(await c.call({ type: "open_session", tenant: "t", session, budget: 64, ...extra }), "opened");
  return expectType(
    await c.call({
      type: "append",
      tenant: "t",
      session,
      messages: [
        { role: "system", content: "You are a helpful assistant." },
        { role: "user", content: "Name three colours of the rainbow." },
      ],
      max_tokens: 16,
    }),
    "appended",
  );
}

test("hello and /health name the engine's chat template and the context", async (t) => {
  if (skip()) return t.skip(skip() as string);
  const hello = expectType(c.hello!, "hello");
  assert.ok(hello.chat_template === "gguf" || hello.chat_template === "chatml", String(hello.chat_template));
  assert.equal(hello.n_ctx, N_CTX);
  const health = (await (await fetch(`http://127.0.0.1:${host.address.port}/health`)).json()) as Record<
    string,
    unknown
  >;
  assert.deepEqual([health.chat_template, health.n_ctx], [hello.chat_template, N_CTX]);
});

test("messages, then greedy logprobs: one map per token, the chosen token the most likely", {
  timeout: 180_000,
}, async (t) => {
  if (skip()) return t.skip(skip() as string);
  await chatSession("lp");
  const frames = await c.request({
    type: "generate",
    tenant: "t",
    session: "lp",
    max_tokens: 6,
    temperature: 0,
    top_logprobs: 3,
  });
  const done = expectType(frames[frames.length - 1]!, "done");
  const tokens = frames.filter((f) => f.type === "token").map((f) => expectType(f, "token"));
  const lps = tokens.flatMap((f) => {
    assert.equal(f.logprobs?.length, f.tokens.length);
    return f.logprobs!;
  });
  const ids = tokens.flatMap((f) => f.tokens);
  assert.equal(ids.length, done.new_tokens);
  const bytes: number[] = [];
  lps.forEach((l, i) => {
    const top = l.top_logprobs as { token: number; bytes: Uint8Array; logprob: number }[];
    assert.equal(top.length, 3);
    assert.ok((l.logprob as number) <= 0);
    for (let k = 1; k < top.length; k++) assert.ok(top[k - 1]!.logprob >= top[k]!.logprob, "best first");
    // Greedy: the chosen token is the argmax, so its logprob is the best one.
    assert.equal(l.logprob, top[0]!.logprob, `token ${i}`);
    bytes.push(...(l.bytes as Uint8Array));
  });
  if (done.reason === "length") assert.equal(Buffer.from(bytes).toString("utf8"), done.text);
});

test("a seed is honoured (same seed, same text) and reported; without one the engine's is reported", {
  timeout: 180_000,
}, async (t) => {
  if (skip()) return t.skip(skip() as string);
  const texts: string[] = [];
  for (const s of ["seed-a", "seed-b"]) {
    await chatSession(s);
    const done = expectType(
      await c.call({ type: "generate", tenant: "t", session: s, max_tokens: 8, temperature: 1, seed: 42 }),
      "done",
    );
    assert.equal(done.seed, 42);
    texts.push(done.text);
  }
  assert.equal(texts[1], texts[0]);
  await chatSession("seed-none");
  const free = expectType(
    await c.call({ type: "generate", tenant: "t", session: "seed-none", max_tokens: 2, temperature: 1 }),
    "done",
  );
  assert.equal(typeof free.seed, "number");
});

test("the context: refused before any prefill by the host (known tokens) and by the engine (the text's)", {
  timeout: 180_000,
}, async (t) => {
  if (skip()) return t.skip(skip() as string);
  const before = await chatSession("ctx");
  const own = expectType(
    await c.call({ type: "append", tenant: "t", session: "ctx", text: "more", max_tokens: N_CTX }),
    "error",
  );
  assert.equal(own.code, "context_full");
  const long = "The quick brown fox jumps over the lazy dog. ".repeat(40); // ~400 tokens
  const engine = expectType(
    await c.call({ type: "append", tenant: "t", session: "ctx", text: long, max_tokens: 200 }),
    "error",
  );
  assert.equal(engine.code, "context_full");
  const stats = expectType(await c.call({ type: "stats", tenant: "t", session: "ctx" }), "stats_result");
  assert.equal(stats.tokens_seen, before.tokens_seen, "nothing was prefilled");
});

test("a q8_0 session is stored and accounted at q8_0's entry size", { timeout: 180_000 }, async (t) => {
  if (skip()) return t.skip(skip() as string);
  const f16Entry = expectType(c.hello!, "hello").bytes_per_entry;
  await chatSession("q8", { kv_type: "q8_0" });
  const st = expectType(await c.call({ type: "stats", tenant: "t", session: "q8" }), "stats_result");
  const entries = st.layer_kv_lengths!.reduce((a, b) => a + b, 0);
  // ggml: q8_0 is 34 bytes per 32 values, f16 64.
  assert.equal(st.kv_bytes, (entries * f16Entry * 34) / 64);
  const next = expectType(
    await c.call({ type: "open_session", tenant: "t", session: "q8-next", budget: 64, kv_type: "q8_0" }),
    "opened",
  );
  assert.equal(next.reserved_bytes, host.sessions.hello.n_layer * 64 * ((f16Entry * 34) / 64));
});

test("sampling fields reach the engine: a grammar binds the output, penalties are accepted", {
  timeout: 180_000,
}, async (t) => {
  if (skip()) return t.skip(skip() as string);
  await chatSession("gbnf");
  const done = expectType(
    await c.call({
      type: "generate",
      tenant: "t",
      session: "gbnf",
      max_tokens: 8,
      grammar: 'root ::= "yes" | "no"',
      min_p: 0.05,
      presence_penalty: 0.5,
      frequency_penalty: 0.5,
      repetition_penalty: 1.1,
      penalty_last_n: 32,
    }),
    "done",
  );
  assert.ok(done.text === "yes" || done.text === "no", JSON.stringify(done.text));
});
