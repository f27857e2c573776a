// What an official OpenAI client meets at the edge, against scripted hosts: the frames a request
// becomes (messages, every sampling field, request_id), the headers of every response
// (x-request-id, x-ratelimit-*, x-pkv-kv-*, Retry-After, x-should-retry), logprobs in OpenAI's
// shapes, context limits, models and routing by model, /v1/completions, tenant KV defaults.
import type { ToHostMessage } from "@pyramidkv/shared";
import { afterAll, beforeAll, beforeEach, describe, expect, it } from "vitest";

import { ADMIN, as, call, error, makeTenant, readSse } from "./client.js";
import { FakeHost } from "./fake-host.js";

const llama = new FakeHost("llama-host", "Llama-3.2-1B-Instruct.Q4_K_M.gguf", { n_ctx: 2048 });
const plain = new FakeHost("plain-host", "base-model.gguf", { n_ctx: 1024, chat_template: "chatml" });
const hosts = [llama, plain];
const LLAMA = "Llama-3.2-1B-Instruct.Q4_K_M";
let key: string;

const enc = new TextEncoder();
/** A host that answers every generate with two tokens, their logprobs and top alternatives. */
function withLogprobs(host: FakeHost) {
  host.on.generate = (m, reply) => {
    const g = m as Extract<ToHostMessage, { type: "generate" }>;
    const tok = (text: string, lp: number) => ({
      logprob: lp,
      bytes: enc.encode(text),
      ...(g.top_logprobs
        ? {
            top_logprobs: [
              { token: 7, bytes: enc.encode(text), logprob: lp },
              { token: 8, bytes: enc.encode("x"), logprob: -3 },
            ],
          }
        : {}),
    });
    reply({ type: "token", id: g.id, session: g.session, tokens: [1], text: "Hel", logprobs: [tok("Hel", -0.5)] });
    reply({ type: "token", id: g.id, session: g.session, tokens: [2], text: "lo", logprobs: [tok("lo", -0.25)] });
    reply({ type: "done", id: g.id, session: g.session, reason: "length", new_tokens: 2, text: "Hello", seed: 5 });
  };
}

beforeAll(async () => {
  key = await makeTenant("openai", { max_sessions: 4, requests_per_minute: 10_000 });
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

const chat = (extra: Record<string, unknown> = {}) => ({
  model: LLAMA,
  messages: [
    { role: "system", content: "Be brief." },
    { role: "user", content: "Hi" },
  ],
  ...extra,
});
const sent = (h: FakeHost, type: ToHostMessage["type"]) => h.frames.filter((f) => f.type === type);

describe("what a chat completion sends the host", () => {
  it("the messages (no template at the edge), every sampling field, and the request id of the response", async () => {
    const r = await call(
      "/v1/chat/completions",
      as(
        key,
        chat({
          max_tokens: 9,
          temperature: 0.8,
          top_p: 0.9,
          top_k: 40,
          min_p: 0.1,
          presence_penalty: 0.3,
          frequency_penalty: 0.2,
          repetition_penalty: 1.2,
          seed: 7,
          stop: ["\n\n"],
          response_format: { type: "json_object" },
          user: "someone",
        }),
      ),
    );
    expect(r.status).toBe(200);
    const rid = r.headers.get("x-request-id")!;
    expect(rid).toMatch(/^req_[0-9a-f]{32}$/);
    const [append] = sent(llama, "append") as Extract<ToHostMessage, { type: "append" }>[];
    expect(append).toMatchObject({
      messages: [
        { role: "system", content: "Be brief." },
        { role: "user", content: "Hi" },
      ],
      add_generation_prompt: true,
      max_tokens: 9,
      request_id: rid,
    });
    expect(append!.text).toBeUndefined();
    const [gen] = sent(llama, "generate");
    expect(gen).toEqual({
      type: "generate",
      id: gen!.id,
      tenant: "openai",
      session: (append as { session: string }).session,
      request_id: rid,
      max_tokens: 9,
      temperature: 0.8,
      top_p: 0.9,
      top_k: 40,
      min_p: 0.1,
      presence_penalty: 0.3,
      frequency_penalty: 0.2,
      repetition_penalty: 1.2,
      seed: 7,
      stop: ["\n\n"],
      json_schema: '{"type":"object"}',
    });
    expect(sent(llama, "open_session")[0]).toMatchObject({ request_id: rid });
    expect(plain.frames).toHaveLength(0);
  });

  it("a client's own x-request-id is kept and passed on", async () => {
    const r = await call("/v1/chat/completions", {
      ...as(key, chat()),
      headers: { ...as(key).headers, "x-request-id": "trace-42" },
    });
    expect(r.headers.get("x-request-id")).toBe("trace-42");
    expect(sent(llama, "generate")[0]).toMatchObject({ request_id: "trace-42" });
  });
});

describe("headers of every response", () => {
  it("x-request-id, x-ratelimit-* and the compression that served it, on answers and errors", async () => {
    const ok = await call("/v1/chat/completions", as(key, chat({ kv_budget: 64 })));
    expect(ok.headers.get("x-ratelimit-limit-requests")).toBe("10000");
    const remaining = Number(ok.headers.get("x-ratelimit-remaining-requests"));
    expect(remaining).toBeGreaterThan(0);
    expect(remaining).toBeLessThan(10_000);
    expect(ok.headers.get("x-pkv-kv-method")).toBe("pyramidkv");
    expect(ok.headers.get("x-pkv-kv-budget")).toBe("64");
    const body = (await ok.json()) as { usage: Record<string, number>; model: string };
    expect(body.usage).toMatchObject({ kv_bytes: 640, full_kv_bytes: 6400 });
    expect(body.model).toBe(LLAMA);
    const next = await call("/v1/usage", as(key));
    expect(Number(next.headers.get("x-ratelimit-remaining-requests"))).toBe(remaining - 1);
    const bad = await call("/v1/chat/completions", as(key, chat({ top_p: 0 })));
    expect(bad.status).toBe(400);
    expect(bad.headers.get("x-request-id")).toMatch(/^req_/);
    expect(bad.headers.get("x-ratelimit-limit-requests")).toBe("10000");
    expect((await call("/v1/models")).headers.get("x-request-id")).toMatch(/^req_/);
  });

  it("the budget a host granted (policy auto) and the full method", async () => {
    llama.on.open_session = (m, reply) => {
      const o = m as Extract<ToHostMessage, { type: "open_session" }>;
      reply({ type: "opened", id: o.id, session: o.session, method: o.method!, budget: 48, reserved_bytes: 0 });
    };
    const shrunk = await call("/v1/chat/completions", as(key, chat({ kv_budget: 512 })));
    expect(shrunk.headers.get("x-pkv-kv-budget")).toBe("48");
    delete llama.on.open_session;
    const full = await call("/v1/chat/completions", as(key, chat({ kv_method: "full" })));
    expect(full.headers.get("x-pkv-kv-method")).toBe("full");
    expect(full.headers.get("x-pkv-kv-budget")).toBe("all");
  });

  it("429s that waiting cannot clear carry x-should-retry: false; every 429 and 503 a Retry-After", async () => {
    llama.on.open_session = (m, reply) =>
      reply({ type: "error", id: (m as { id: number }).id, code: "quota_exceeded", message: "KV quota exceeded" });
    const quota = await call("/v1/chat/completions", as(key, chat()));
    expect(quota.status).toBe(429);
    expect(quota.headers.get("x-should-retry")).toBe("false");
    expect(Number(quota.headers.get("retry-after"))).toBeGreaterThanOrEqual(1);
    llama.on.open_session = (m, reply) =>
      reply({ type: "error", id: (m as { id: number }).id, code: "pool_full", message: "pool full" });
    const full = await call("/v1/chat/completions", as(key, chat()));
    expect(full.status).toBe(503);
    expect(Number(full.headers.get("retry-after"))).toBeGreaterThanOrEqual(1);
    expect(full.headers.get("x-should-retry")).toBeNull();
    const k = await makeTenant("one-session", { max_sessions: 0, requests_per_minute: 100 });
    const limit = await call("/v1/sessions", as(k, { document: "d" }));
    expect(await error(limit.clone())).toMatchObject({ status: 429, code: "session_limit" });
    expect(limit.headers.get("x-should-retry")).toBe("false");
    expect(Number(limit.headers.get("retry-after"))).toBeGreaterThanOrEqual(1);
    const slow = await makeTenant("rpm-one", { requests_per_minute: 1 });
    await call("/v1/usage", as(slow));
    const rpm = await call("/v1/usage", as(slow));
    expect(rpm.status).toBe(429);
    expect(rpm.headers.get("x-should-retry")).toBeNull(); // waiting clears it: the SDKs may retry
    expect(rpm.headers.get("x-ratelimit-remaining-requests")).toBe("0");
  });
});

describe("logprobs in OpenAI's shape", () => {
  it("whole and streamed carry the same tokens, logprobs and alternatives; finish_reason length", async () => {
    withLogprobs(llama);
    const body = chat({ logprobs: true, top_logprobs: 2, max_tokens: 2 });
    const whole = (await (await call("/v1/chat/completions", as(key, body))).json()) as {
      choices: { message: { content: string }; logprobs: { content: unknown[] }; finish_reason: string }[];
    };
    const expected = [
      {
        token: "Hel",
        logprob: -0.5,
        bytes: [72, 101, 108],
        top_logprobs: [
          { token: "Hel", logprob: -0.5, bytes: [72, 101, 108] },
          { token: "x", logprob: -3, bytes: [120] },
        ],
      },
      {
        token: "lo",
        logprob: -0.25,
        bytes: [108, 111],
        top_logprobs: [
          { token: "lo", logprob: -0.25, bytes: [108, 111] },
          { token: "x", logprob: -3, bytes: [120] },
        ],
      },
    ];
    expect(sent(llama, "generate")[0]).toMatchObject({ logprobs: true, top_logprobs: 2 });
    expect(whole.choices[0]!.logprobs.content).toEqual(expected);
    expect(whole.choices[0]!.message.content).toBe("Hello");
    expect(whole.choices[0]!.finish_reason).toBe("length");
    const r = await call("/v1/chat/completions", as(key, { ...body, stream: true }));
    let text = "";
    const streamed: unknown[] = [];
    let finish: string | null = null;
    for await (const ev of readSse(r)) {
      if (ev.data === "[DONE]") continue;
      const c = (
        JSON.parse(ev.data) as {
          choices: {
            delta: { content?: string };
            logprobs: { content: unknown[] } | null;
            finish_reason: string | null;
          }[];
        }
      ).choices[0]!;
      text += c.delta.content ?? "";
      streamed.push(...(c.logprobs?.content ?? []));
      finish = c.finish_reason ?? finish;
    }
    expect(text).toBe("Hello");
    expect(streamed).toEqual(expected);
    expect(finish).toBe("length");
    // without logprobs: null, and the host is not asked for them
    const none = (await (await call("/v1/chat/completions", as(key, chat()))).json()) as {
      choices: { logprobs: unknown }[];
    };
    expect(none.choices[0]!.logprobs).toBeNull();
  });
});

describe("context limits", () => {
  it("max_tokens alone beyond the host's context: 400 before a session is opened", async () => {
    const e = await error(await call("/v1/chat/completions", as(key, chat({ max_tokens: 2048 }))));
    expect(e).toMatchObject({
      status: 400,
      code: "context_length_exceeded",
      param: "max_tokens",
      type: "invalid_request_error",
    });
    expect(e.message).toMatch(/maximum context length is 2048 tokens/);
    expect(sent(llama, "open_session")).toHaveLength(0);
  });
  it("the host's refusal (prompt + max_tokens) becomes 400 context_length_exceeded naming the prompt's field", async () => {
    llama.on.append = (m, reply) =>
      reply({ type: "error", id: (m as { id: number }).id, code: "context_full", message: "2100 tokens over 2048" });
    expect(await error(await call("/v1/chat/completions", as(key, chat({ max_tokens: 100 }))))).toMatchObject({
      status: 400,
      code: "context_length_exceeded",
      param: "messages",
    });
    expect(sent(llama, "generate")).toHaveLength(0);
    expect(await error(await call("/v1/completions", as(key, { model: LLAMA, prompt: "x" })))).toMatchObject({
      status: 400,
      code: "context_length_exceeded",
      param: "prompt",
    });
  });
});

describe("models and routing by model", () => {
  it("lists each model with its chat template and context; retrieves one; 404 model_not_found otherwise", async () => {
    const list = (await (await call("/v1/models", as(key))).json()) as { data: Record<string, unknown>[] };
    expect(list.data.sort((a, b) => String(a.id).localeCompare(String(b.id)))).toEqual(
      [
        {
          id: LLAMA,
          object: "model",
          created: 0,
          owned_by: "pyramidkv",
          chat_template: "gguf",
          context_length: 2048,
          hosts: 1,
        },
        {
          id: "base-model",
          object: "model",
          created: 0,
          owned_by: "pyramidkv",
          chat_template: "chatml",
          context_length: 1024,
          hosts: 1,
        },
      ].sort((a, b) => a.id.localeCompare(b.id)),
    );
    expect(await (await call(`/v1/models/${LLAMA}`, as(key))).json()).toMatchObject({
      id: LLAMA,
      chat_template: "gguf",
    });
    expect(await error(await call("/v1/models/gpt-4o", as(key)))).toMatchObject({
      status: 404,
      code: "model_not_found",
    });
  });
  it("a request goes to a host serving its model; default to any; an unknown model is 404 before any host work", async () => {
    expect((await call("/v1/chat/completions", as(key, chat({ model: "base-model" })))).status).toBe(200);
    expect(sent(plain, "generate")).toHaveLength(1);
    expect(sent(llama, "generate")).toHaveLength(0);
    expect((await call("/v1/chat/completions", as(key, chat({ model: "default" })))).status).toBe(200);
    expect(sent(plain, "generate").length + sent(llama, "generate").length).toBe(2);
    const e = await error(await call("/v1/chat/completions", as(key, chat({ model: "gpt-4o" }))));
    expect(e).toMatchObject({ status: 404, code: "model_not_found", param: "model", type: "not_found_error" });
    expect(e.message).toMatch(/base-model/);
    expect((await call("/v1/sessions", as(key, { model: "gpt-4o", document: "d" }))).status).toBe(404);
    expect(sent(llama, "open_session").length + sent(plain, "open_session").length).toBe(2);
  });
});

describe("/v1/completions", () => {
  it("a raw prompt (text or tokens), no template, whole and streamed with the legacy logprobs", async () => {
    withLogprobs(llama);
    const r = await call("/v1/completions", as(key, { model: LLAMA, prompt: "Once upon", max_tokens: 2, logprobs: 1 }));
    expect(r.status).toBe(200);
    const whole = (await r.json()) as {
      object: string;
      choices: { text: string; logprobs: Record<string, unknown>; finish_reason: string }[];
      usage: Record<string, number>;
    };
    expect(whole.object).toBe("text_completion");
    expect(whole.choices[0]).toMatchObject({ text: "Hello", finish_reason: "length" });
    expect(whole.choices[0]!.logprobs).toEqual({
      tokens: ["Hel", "lo"],
      token_logprobs: [-0.5, -0.25],
      top_logprobs: [
        { Hel: -0.5, x: -3 },
        { lo: -0.25, x: -3 },
      ],
      text_offset: [0, 3],
    });
    expect(whole.usage).toMatchObject({ completion_tokens: 2, kv_bytes: 640 });
    const [append] = sent(llama, "append");
    expect(append).toMatchObject({ text: "Once upon", max_tokens: 2 });
    expect((append as { messages?: unknown }).messages).toBeUndefined();
    await call("/v1/completions", as(key, { model: LLAMA, prompt: [1, 2, 3] }));
    expect(sent(llama, "append")[1]).toMatchObject({ tokens: [1, 2, 3] });
    expect(sent(llama, "generate")[1]).toMatchObject({ max_tokens: 16 });
    const s = await call(
      "/v1/completions",
      as(key, { model: LLAMA, prompt: "Once", stream: true, stream_options: { include_usage: true } }),
    );
    let text = "";
    let usage: unknown;
    for await (const ev of readSse(s)) {
      if (ev.data === "[DONE]") continue;
      const j = JSON.parse(ev.data) as { object: string; choices: { text: string }[]; usage?: unknown };
      expect(j.object).toBe("text_completion");
      text += j.choices[0]?.text ?? "";
      usage ??= j.usage;
    }
    expect(text).toBe("Hello");
    expect(usage).toMatchObject({ completion_tokens: 2, full_kv_bytes: 6400 });
  });
});

describe("tenant KV defaults", () => {
  it("set by the admin (full allowed), used when a request names none, echoed", async () => {
    const put = await call("/admin/tenants/openai", {
      method: "PUT",
      headers: ADMIN,
      body: JSON.stringify({ kv_method: "snapkv", kv_budget: 256 }),
    });
    expect(await put.json()).toMatchObject({ kv_method: "snapkv", kv_budget: 256 });
    const r = await call("/v1/chat/completions", as(key, chat()));
    expect(r.headers.get("x-pkv-kv-method")).toBe("snapkv");
    expect(r.headers.get("x-pkv-kv-budget")).toBe("256");
    expect(sent(llama, "open_session")[0]).toMatchObject({ method: "snapkv", budget: 256 });
    const asked = await call("/v1/chat/completions", as(key, chat({ kv_method: "h2o" })));
    expect(asked.headers.get("x-pkv-kv-method")).toBe("h2o");
    await call("/admin/tenants/openai", { method: "PUT", headers: ADMIN, body: JSON.stringify({ kv_method: "full" }) });
    expect((await call("/v1/chat/completions", as(key, chat()))).headers.get("x-pkv-kv-method")).toBe("full");
    expect(
      await error(
        await call("/admin/tenants/openai", {
          method: "PUT",
          headers: ADMIN,
          body: JSON.stringify({ kv_method: "zip" }),
        }),
      ),
    ).toMatchObject({ status: 400, param: "kv_method" });
    expect(
      await error(
        await call("/admin/tenants/openai", { method: "PUT", headers: ADMIN, body: JSON.stringify({ kv_budget: 8 }) }),
      ),
    ).toMatchObject({ status: 400, param: "kv_budget" });
    await call("/admin/tenants/openai", {
      method: "PUT",
      headers: ADMIN,
      body: JSON.stringify({ kv_method: "pyramidkv", kv_budget: 128 }),
    });
  });
});

describe("sessions send messages", () => {
  it("the document as a system and a user message (closed), each question as one more user message", async () => {
    const made = (await (
      await call(
        "/v1/sessions",
        as(key, { model: LLAMA, document: "The meeting is on Tuesday.", system: "Answer from it." }),
      )
    ).json()) as { id: string; model: string };
    expect(made.model).toBe(LLAMA);
    expect(sent(llama, "append")[0]).toMatchObject({
      messages: [
        { role: "system", content: "Answer from it." },
        { role: "user", content: "The meeting is on Tuesday." },
      ],
      add_generation_prompt: false,
    });
    const q = await call(
      `/v1/sessions/${made.id}/messages`,
      as(key, { content: "When?", stream: false, max_tokens: 5 }),
    );
    expect(q.status).toBe(200);
    expect(q.headers.get("x-pkv-kv-method")).toBe("pyramidkv");
    expect(sent(llama, "append")[1]).toMatchObject({
      messages: [{ role: "user", content: "When?" }],
      add_generation_prompt: true,
      max_tokens: 5,
    });
    expect((await call(`/v1/sessions/${made.id}`, { ...as(key), method: "DELETE" })).status).toBe(200);
  });
});
