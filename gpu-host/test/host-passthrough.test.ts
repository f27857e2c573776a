// Host protocol 2.1 through the host to an engine of protocol 2.2 (the fake engine, which checks
// every frame against engine.json and logs it): each new field reaches the engine as sent, each
// new answer field reaches the edge, and what the host can check itself (ranges, combinations,
// the context) is refused before anything reaches the engine, naming the field, the value and
// what is accepted.
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";

import { HOST_PROTOCOL_SPEC } from "@pyramidkv/shared";

import { setLogWriter } from "../src/host/log.js";
import { FAKE_ENTRY_BYTES, FAKE_N_LAYER, FAKE_RANDOM_SEED, fakeEngineBin, type Logged } from "./fake-engine.js";
import { expectType, HostClient, startTestHost } from "./host-client.js";

const N_CTX = 200;
let dir: string;
let log: string;
let host: Awaited<ReturnType<typeof startTestHost>>;
let c: HostClient;
const logLines: string[] = [];

before(async () => {
  dir = mkdtempSync(join(tmpdir(), "pkv-passthrough-"));
  log = join(dir, "engine.log");
  setLogWriter((line) => logLines.push(line));
  host = await startTestHost({ engineBin: fakeEngineBin(log) }, [
    "--kv-type",
    "q8_0",
    "--ctx-size",
    String(N_CTX),
    "--checkpoint",
    "off",
  ]);
  c = await HostClient.connect(host.url);
});
after(async () => {
  c.close();
  await host.stop();
  rmSync(dir, { recursive: true, force: true });
});

/** Frames the engine received so far, of one type (and session). */
function received(type: string, session?: string): Logged[] {
  return readFileSync(log, "utf8")
    .trim()
    .split("\n")
    .map((l) => JSON.parse(l) as Logged)
    .filter((m) => m.type === type && (session === undefined || m.session === `t/${session}`));
}

async function open(session: string, extra: Record<string, unknown> = {}) {
  return expectType(await c.call({ type: "open_session", tenant: "t", session, budget: 16, ...extra }), "opened");
}

test("hello and /health: protocol_minor, chat_template from the engine's hello, n_ctx", async () => {
  const hello = expectType(c.hello!, "hello");
  assert.equal(hello.protocol_minor, HOST_PROTOCOL_SPEC.minor);
  assert.equal(hello.chat_template, "gguf");
  assert.equal(hello.n_ctx, N_CTX);
  const health = (await (await fetch(`http://127.0.0.1:${host.address.port}/health`)).json()) as Record<
    string,
    unknown
  >;
  assert.deepEqual(
    [health.model, health.n_ctx, health.chat_template, health.protocol_minor],
    ["fake-model", N_CTX, "gguf", HOST_PROTOCOL_SPEC.minor],
  );
  // The host's --kv-type and --ctx-size reach the engine's command line.
  const argv = received("argv")[0]!.argv as string[];
  assert.deepEqual(argv.slice(argv.indexOf("--kv-type"), argv.indexOf("--kv-type") + 2), ["--kv-type", "q8_0"]);
  assert.deepEqual(argv.slice(argv.indexOf("--ctx-size"), argv.indexOf("--ctx-size") + 2), ["--ctx-size", "200"]);
});

test("open_session: kv_type to the engine (the host's --kv-type when absent), sized by its type; request_id stays", async () => {
  const a = await open("kv-a", { kv_type: "f16", request_id: "req-open-1" });
  const b = await open("kv-b");
  assert.equal(received("open", "kv-a")[0]!.kv_type, "f16");
  assert.equal(received("open", "kv-b")[0]!.kv_type, "q8_0", "the host's --kv-type");
  assert.equal(received("open", "kv-a")[0]!.request_id, undefined, "request_id is the host's, not the engine's");
  // Reservation: budget entries per layer of the session's type (f16 from the hello's pages,
  // q8_0 by ggml's block ratio 34/64 until measured).
  assert.equal(a.reserved_bytes, FAKE_N_LAYER * 16 * FAKE_ENTRY_BYTES.f16!);
  assert.equal(b.reserved_bytes, FAKE_N_LAYER * 16 * 68);
  const bad = expectType(
    await c.call({ type: "open_session", tenant: "t", session: "kv-bad", kv_type: "q2_k" }),
    "error",
  );
  assert.equal(bad.code, "invalid");
  assert.match(bad.message, /kv_type 'q2_k' is not one of f16, q8_0, q4_0/);
  assert.equal(received("open", "kv-bad").length, 0);
});

test("a KV type's entry size is measured from its first session's stats, then used for the next", async () => {
  await open("q4-a", { kv_type: "q4_0" });
  const first = await open("q4-est", { kv_type: "q4_0" });
  assert.equal(first.reserved_bytes, FAKE_N_LAYER * 16 * 36, "estimated: 128 x 18/64");
  expectType(await c.call({ type: "append", tenant: "t", session: "q4-a", tokens: [1, 2, 3] }), "appended");
  const next = await open("q4-b", { kv_type: "q4_0" });
  assert.equal(next.reserved_bytes, FAKE_N_LAYER * 16 * FAKE_ENTRY_BYTES.q4_0!, "measured: the engine's 40");
  const stats = expectType(await c.call({ type: "stats", tenant: "t", session: "q4-a" }), "stats_result");
  assert.equal(stats.kv_bytes, FAKE_N_LAYER * 3 * FAKE_ENTRY_BYTES.q4_0!);
});

test("append: messages, add_generation_prompt and max_tokens reach the engine as sent", async () => {
  await open("msg");
  const messages = [
    { role: "system", content: "Be brief." },
    { role: "user", content: "Hi <|im_start|>system" },
  ];
  const ok = expectType(
    await c.call({
      type: "append",
      tenant: "t",
      session: "msg",
      messages,
      add_generation_prompt: false,
      max_tokens: 10,
      request_id: "req-a",
    }),
    "appended",
  );
  assert.ok(ok.tokens_seen > 0);
  const sent = received("append", "msg")[0]!;
  assert.deepEqual(
    [sent.messages, sent.add_generation_prompt, sent.max_tokens, sent.request_id, sent.text],
    [messages, false, 10, undefined, undefined],
  );
});

test("append: context_full from the engine passes on; the host refuses what cannot fit before the engine sees it", async () => {
  await open("ctx");
  const engine = expectType(
    await c.call({ type: "append", tenant: "t", session: "ctx", text: "x".repeat(150), max_tokens: 60 }),
    "error",
  );
  assert.equal(engine.code, "context_full");
  assert.equal(received("append", "ctx").length, 1, "the engine counted the text and refused it");
  const tokens = Array.from({ length: 150 }, (_, i) => i);
  const own = expectType(
    await c.call({ type: "append", tenant: "t", session: "ctx", tokens, max_tokens: 51 }),
    "error",
  );
  assert.equal(own.code, "context_full");
  assert.match(own.message, /150 tokens .* max_tokens 51 exceed the context of 200 tokens/);
  assert.equal(received("append", "ctx").length, 1, "refused by the host: no engine append");
  // Exactly at the context fits.
  expectType(await c.call({ type: "append", tenant: "t", session: "ctx", tokens, max_tokens: 50 }), "appended");
});

test("append: malformed messages and mixed fields are refused by the host, naming the field", async () => {
  await open("bad-append");
  const cases: [Record<string, unknown>, RegExp][] = [
    [{ messages: [] }, /messages is empty/],
    [{ messages: [{ role: "user", content: "a" }], text: "b" }, /messages and text exclude each other/],
    [{ messages: [{ role: "user", content: "a" }], chat: true }, /messages and chat exclude each other/],
    [{ messages: [{ role: "user", content: "a" }], tokens: [1] }, /messages and tokens exclude each other/],
    [{ messages: [{ role: "user", content: "a", name: "x" }] }, /messages\[0\] has unknown key 'name'/],
    [{ messages: [{ role: "", content: "a" }] }, /messages\[0\]\.role '' must be a non-empty string/],
    [{ messages: [{ role: "user", content: "a" }, { role: "user" }] }, /messages\[1\]\.content undefined must be/],
    [{ messages: [{ role: "user", content: 5 }] }, /messages\[0\]\.content 5 must be a string/],
    [{ text: "a", add_generation_prompt: true }, /add_generation_prompt applies to messages only/],
    [{ text: "a", more: true, max_tokens: 4 }, /a piece \(more: true\) carries text only, not max_tokens/],
    [{ more: true, messages: [{ role: "user", content: "a" }] }, /carries text only, not messages/],
  ];
  for (const [fields, re] of cases) {
    const e = expectType(await c.call({ type: "append", tenant: "t", session: "bad-append", ...fields }), "error");
    assert.equal(e.code, "invalid", JSON.stringify(fields));
    assert.match(e.message, re, JSON.stringify(fields));
  }
  assert.equal(received("append", "bad-append").length, 0);
});

test("append: buffered pieces begin the last message's content; pieces carry text only", async () => {
  await open("pieces");
  expectType(await c.call({ type: "append", tenant: "t", session: "pieces", text: "a long ", more: true }), "buffered");
  expectType(
    await c.call({ type: "append", tenant: "t", session: "pieces", text: "document ", more: true }),
    "buffered",
  );
  const messages = [
    { role: "system", content: "Be brief." },
    { role: "user", content: "ends here" },
  ];
  expectType(await c.call({ type: "append", tenant: "t", session: "pieces", messages }), "appended");
  const sent = received("append", "pieces");
  assert.equal(sent.length, 1, "pieces are the host's: one engine append");
  assert.deepEqual(
    [sent[0]!.text, sent[0]!.messages],
    [undefined, [messages[0], { role: "user", content: "a long document ends here" }]],
  );
  // The buffer is empty afterwards: the next messages go as they are.
  expectType(await c.call({ type: "append", tenant: "t", session: "pieces", messages: [messages[1]!] }), "appended");
  assert.deepEqual(received("append", "pieces")[1]!.messages, [messages[1]]);
});

test("generate: the sampling fields reach the engine as sent; request_id does not", async () => {
  await open("gen");
  expectType(await c.call({ type: "append", tenant: "t", session: "gen", text: "hello" }), "appended");
  const sampling = {
    max_tokens: 2,
    temperature: 0.7,
    top_k: 40,
    top_p: 0.9,
    seed: 7,
    stop: ["\n"],
    min_p: 0.05,
    presence_penalty: -2,
    frequency_penalty: 2,
    repetition_penalty: 1.1,
    penalty_last_n: 32,
    grammar: 'root ::= "a"',
  };
  const done = expectType(
    await c.call({ type: "generate", tenant: "t", session: "gen", ...sampling, request_id: "req-g" }),
    "done",
  );
  assert.equal(done.seed, 7);
  const { id: _id, type: _type, session: _session, ...got } = received("generate", "gen")[0]!;
  assert.deepEqual(got, sampling);
  const schema = expectType(
    await c.call({ type: "generate", tenant: "t", session: "gen", max_tokens: 1, json_schema: '{"type":"object"}' }),
    "done",
  );
  assert.equal(schema.seed, FAKE_RANDOM_SEED, "no seed: the engine's own, reported in done");
  assert.equal(received("generate", "gen")[1]!.json_schema, '{"type":"object"}');
});

test("generate: logprobs, one map per token in order, with bytes and top_logprobs", async () => {
  await open("lp");
  expectType(await c.call({ type: "append", tenant: "t", session: "lp", text: "hello" }), "appended");
  const frames = await c.request({ type: "generate", tenant: "t", session: "lp", max_tokens: 3, top_logprobs: 2 });
  const tokens = frames.filter((f) => f.type === "token").map((f) => expectType(f, "token"));
  const ids = tokens.flatMap((t) => t.tokens);
  const lps = tokens.flatMap((t) => {
    assert.equal(t.logprobs?.length, t.tokens.length, "one logprobs map per token");
    return t.logprobs!;
  });
  assert.deepEqual(ids, [100, 101, 102]);
  assert.deepEqual(
    lps.map((l) => [l.logprob, new TextDecoder().decode(l.bytes as Uint8Array)]),
    [
      [-0.5, "w0 "],
      [-1, "w1 "],
      [-1.5, "w2 "],
    ],
  );
  const top = lps[1]!.top_logprobs as { token: number; bytes: Uint8Array; logprob: number }[];
  assert.deepEqual(
    top.map((t) => [t.token, new TextDecoder().decode(t.bytes), t.logprob]),
    [
      [101, "a0", -1],
      [102, "a1", -2],
    ],
  );
  // Without logprobs, no logprobs field.
  const plain = await c.request({ type: "generate", tenant: "t", session: "lp", max_tokens: 1 });
  assert.equal(expectType(plain[0]!, "token").logprobs, undefined);
});

test("generate: out-of-range sampling is refused before the engine, naming the field, value and range", async () => {
  await open("bad-gen");
  const before = received("generate", "bad-gen").length;
  const cases: [Record<string, unknown>, RegExp][] = [
    [{ temperature: Number.NaN }, /temperature NaN is out of range \(accepted: a finite number >= 0\)/],
    [{ temperature: Number.POSITIVE_INFINITY }, /temperature Infinity is out of range/],
    [{ temperature: -0.1 }, /temperature -0.1 is out of range/],
    [{ top_p: 0 }, /top_p 0 is out of range \(accepted: \(0, 1\]\)/],
    [{ top_p: 1.5 }, /top_p 1.5 is out of range/],
    [{ min_p: 1.01 }, /min_p 1.01 is out of range \(accepted: \[0, 1\]\)/],
    [{ presence_penalty: 2.5 }, /presence_penalty 2.5 is out of range \(accepted: \[-2, 2\]\)/],
    [{ frequency_penalty: -3 }, /frequency_penalty -3 is out of range \(accepted: \[-2, 2\]\)/],
    [{ repetition_penalty: 0 }, /repetition_penalty 0 is out of range \(accepted: \(0, 10\]\)/],
    [{ repetition_penalty: 11 }, /repetition_penalty 11 is out of range/],
    [{ top_logprobs: 21 }, /top_logprobs 21 is out of range \(accepted: 0..20\)/],
    [{ penalty_last_n: N_CTX + 1 }, /penalty_last_n 201 is out of range \(accepted: 0..200, the context\)/],
    [{ grammar: "root ::= x", json_schema: "{}" }, /grammar and json_schema exclude each other/],
    [{ grammar: " " }, /grammar '' is empty|grammar ' ' is empty/],
    [{ json_schema: "{not json" }, /json_schema '\{not json' is not JSON/],
    [{ json_schema: "[1]" }, /json_schema '\[1\]' is not an object/],
  ];
  for (const [fields, re] of cases) {
    const e = expectType(await c.call({ type: "generate", tenant: "t", session: "bad-gen", ...fields }), "error");
    assert.equal(e.code, "invalid", JSON.stringify(fields));
    assert.match(e.message, re, JSON.stringify(fields));
  }
  assert.equal(received("generate", "bad-gen").length, before, "none reached the engine");
  // The edges of each range are accepted.
  for (const fields of [
    { temperature: 0, top_p: 1, min_p: 0, presence_penalty: 2, frequency_penalty: -2, repetition_penalty: 10 },
    { min_p: 1, top_logprobs: 20, json_schema: "{}", penalty_last_n: N_CTX },
  ]) {
    expectType(await c.call({ type: "generate", tenant: "t", session: "bad-gen", max_tokens: 1, ...fields }), "done");
  }
});

test("request_id is in the host's log lines for that request", async () => {
  logLines.length = 0;
  await c.call({ type: "generate", tenant: "t", session: "nope", request_id: "req-xyz" });
  await c.call({ type: "generate", tenant: "t", session: "nope", request_id: "evil\nforged line" });
  await c.call({ type: "generate", tenant: "t", session: "nope" });
  await c.call({ type: "generate", tenant: "t", session: "bad\x1b[2Jid\n" });
  assert.equal(logLines.length, 4, logLines.join(""));
  assert.match(logLines[3]!, /^pkv host: generate t\/bad\?\[2Jid\?: unknown_session: no session 'bad\?\[2Jid\?'/);
  assert.equal(logLines[3]!.split("\n").length, 2, "one line");
  assert.match(logLines[0]!, /^pkv host: \[req-xyz\] generate t\/nope: unknown_session: /);
  assert.match(logLines[1]!, /^pkv host: \[evil\?forged line\] generate/);
  assert.equal(logLines[1]!.split("\n").length, 2, "one line");
  assert.match(logLines[2]!, /^pkv host: generate t\/nope: unknown_session/);
});

test("an engine before 2.2: no chat_template in hello; sessions without kv_type sized by the engine's default type", async () => {
  const log2 = join(dir, "engine2.log");
  const other = await startTestHost({ engineBin: fakeEngineBin(log2, { PKV_FAKE_KV_TYPE: "q4_0" }) }, [
    "--checkpoint",
    "off",
  ]);
  const c2 = await HostClient.connect(other.url);
  try {
    const hello = expectType(c2.hello!, "hello");
    assert.equal(hello.chat_template, undefined);
    const health = (await (await fetch(`http://127.0.0.1:${other.address.port}/health`)).json()) as {
      chat_template: unknown;
    };
    assert.equal(health.chat_template, null);
    const opened = expectType(await c2.call({ type: "open_session", tenant: "t", session: "d", budget: 16 }), "opened");
    assert.equal(opened.reserved_bytes, FAKE_N_LAYER * 16 * 36, "q4_0, the engine's default (hello.defaults)");
    const sent = readFileSync(log2, "utf8")
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l) as Logged);
    assert.equal(sent.find((m) => m.type === "open")!.kv_type, undefined, "no --kv-type: the engine decides");
    assert.equal((sent[0]!.argv as string[]).includes("--kv-type"), false);
  } finally {
    c2.close();
    await other.stop();
  }
});
