// Body validation as route middleware and the body limit (PKV_MAX_BODY_BYTES, 4096 in these
// tests), through the routes: a bad field is a 400 naming it, an oversized body a 413 while it is
// being read — both before any GPU host is contacted.
import { env, exports } from "cloudflare:workers";
import { afterAll, beforeAll, describe, expect, it } from "vitest";

import { readBody } from "../src/body.js";
import { ApiError } from "../src/errors.js";
import { ADMIN, as, call, error, makeTenant } from "./client.js";
import { FakeHost } from "./fake-host.js";

const LIMIT = 4096;
const host = new FakeHost("validation-host");
let key: string;
let sessionId: string;

/** A body of `chunks` pieces of `chunk` bytes, pulled one at a time; `pulled` counts the bytes handed out. */
function countingStream(chunks: number, chunk: number) {
  const counter = { pulled: 0 };
  let left = chunks;
  const stream = new ReadableStream<Uint8Array>(
    {
      pull(controller) {
        if (left-- === 0) return controller.close();
        counter.pulled += chunk;
        controller.enqueue(new Uint8Array(chunk).fill(0x20));
      },
    },
    { highWaterMark: 0 }, // pulled only when read
  );
  return { stream, counter };
}

/** Channels the edge opened to the host. */
const hostContacts = () => host.control.filter((m) => m.type === "channel_open").length;

beforeAll(async () => {
  key = await makeTenant("validation", { max_sessions: 4, requests_per_minute: 10_000 });
  await host.connect();
  // A session on the fake host, recorded as the route would, so that its messages route has one to check against.
  const stub = env.TENANTS.get(env.TENANTS.idFromName("validation"));
  sessionId = "sess-validation";
  await stub.reserveSession(sessionId, { method: "pyramidkv", budget: 128 });
  await stub.updateSession(sessionId, { host: host.name, state: "open" });
});
afterAll(async () => {
  await host.disconnect();
});

describe("validators as route middleware", () => {
  const chat = { model: "m", messages: [{ role: "user", content: "hi" }] };
  const cases: [string, string, RequestInit, string, RegExp][] = [
    [
      "chat completions",
      "/v1/chat/completions",
      {},
      "kv_budget",
      /'kv_budget': 8 is not an integer in \[16, 1048576\]/,
    ],
    ["sessions", "/v1/sessions", {}, "kv_method", /'kv_method': "zip" is not one of full, streamingllm/],
    [
      "messages",
      "/v1/sessions/sess-validation/messages",
      {},
      "max_tokens",
      /'max_tokens': 0 is not an integer in \[1, 1048576\]/,
    ],
    [
      "admin tenants",
      "/admin/tenants/acme-2",
      { method: "PUT" },
      "max_sessions",
      /'max_sessions': -1 is not an integer >= 0/,
    ],
    ["admin hosts", "/admin/hosts", {}, "name", /'name': "GPU 1!" is not a host name: it must match \^\[a-z0-9\]/],
  ];
  const bodies: Record<string, unknown> = {
    "chat completions": { ...chat, kv_budget: 8 },
    sessions: { document: "doc", kv_method: "zip" },
    messages: { content: "Why?", max_tokens: 0 },
    "admin tenants": { max_sessions: -1 },
    "admin hosts": { name: "GPU 1!" },
  };
  for (const [name, path, init, param, message] of cases) {
    it(`${name}: a bad field is a 400 naming it, the value and the range, before any host is contacted`, async () => {
      const before = hostContacts();
      const headers = path.startsWith("/admin") ? ADMIN : as(key).headers;
      const r = await call(path, { method: "POST", ...init, headers, body: JSON.stringify(bodies[name]) });
      expect(await error(r)).toMatchObject({
        status: 400,
        type: "invalid_request_error",
        param,
        code: "invalid_value",
      });
      expect(
        (await error(await call(path, { method: "POST", ...init, headers, body: JSON.stringify(bodies[name]) })))
          .message,
      ).toMatch(message);
      expect(hostContacts()).toBe(before);
      expect(host.connections).toHaveLength(0);
    });
  }

  it("parses the body whatever its content type (curl -d sends a form type)", async () => {
    const r = await call("/v1/sessions", {
      method: "POST",
      headers: { authorization: `Bearer ${key}`, "content-type": "application/x-www-form-urlencoded" },
      body: JSON.stringify({ document: "doc", kv_budget: 3 }),
    });
    expect(await error(r)).toMatchObject({ status: 400, param: "kv_budget" });
  });

  it("malformed JSON and a non-object body are invalid_json on 'body', with the parser's reason", async () => {
    const bad = await error(await call("/v1/chat/completions", as(key, '{"model": ')));
    expect(bad).toMatchObject({ status: 400, param: "body", code: "invalid_json" });
    expect(bad.message).toMatch(/^the body is not valid JSON: \S/);
    expect(await error(await call("/v1/chat/completions", as(key, "[1, 2]")))).toMatchObject({
      status: 400,
      param: "body",
      code: "invalid_json",
      message: "the body must be a JSON object",
    });
  });

  it("an unknown session is 404 before its body is checked", async () => {
    expect(await error(await call("/v1/sessions/sess-nope/messages", as(key, { max_tokens: 0 })))).toMatchObject({
      status: 404,
      code: "session_not_found",
    });
  });
});

describe("body limit", () => {
  it("a chunked body over the limit is refused while it is read, not read whole", async () => {
    const { stream, counter } = countingStream(1024, 64 << 10); // 64 MiB if read whole
    const req = new Request("http://edge/v1/sessions", { method: "POST", headers: as(key).headers, body: stream });
    expect(req.headers.get("content-length"), "nothing declared: read chunk by chunk").toBeNull();
    const r = await exports.default.fetch(req);
    expect(await error(r)).toMatchObject({
      status: 413,
      type: "invalid_request_error",
      code: "too_large",
      message: `request body exceeds the limit of ${LIMIT} bytes`,
    });
    expect(counter.pulled).toBeLessThan(1 << 20);
    expect(host.connections).toHaveLength(0);
  });

  it("a declared content-length over the limit is refused before reading", async () => {
    const r = await call("/v1/sessions", as(key, { document: "x".repeat(LIMIT) }));
    expect(await error(r)).toMatchObject({
      status: 413,
      code: "too_large",
      message: `request body of ${LIMIT + 15} bytes exceeds the limit of ${LIMIT} bytes`,
    });
    const { stream, counter } = countingStream(4, 1 << 20);
    const req = new Request("http://edge/", { method: "POST", headers: { "content-length": "4194304" }, body: stream });
    await expect(readBody(req, LIMIT)).rejects.toThrow(
      `request body of 4194304 bytes exceeds the limit of ${LIMIT} bytes`,
    );
    expect(counter.pulled).toBe(0);
  });

  it("counts bytes, not characters: multi-byte text under the limit in characters but over it in bytes", async () => {
    const body = (n: number) => new TextEncoder().encode(JSON.stringify({ document: "é".repeat(n), kv_budget: 3 }));
    const chunked = (bytes: Uint8Array) =>
      new ReadableStream<Uint8Array>({
        start(controller) {
          controller.enqueue(bytes);
          controller.close();
        },
      });
    const over = body(3000); // 3028 characters, 6028 bytes
    expect(over.byteLength).toBeGreaterThan(LIMIT);
    const r = await call("/v1/sessions", { method: "POST", headers: as(key).headers, body: chunked(over) });
    expect(await error(r)).toMatchObject({ status: 413, code: "too_large" });
    const under = body(2000); // 4028 bytes: read, then validated
    expect(under.byteLength).toBeLessThanOrEqual(LIMIT);
    const ok = await call("/v1/sessions", { method: "POST", headers: as(key).headers, body: chunked(under) });
    expect(await error(ok)).toMatchObject({ status: 400, param: "kv_budget" });
  });

  it("readBody stops pulling at the limit", async () => {
    const { stream, counter } = countingStream(1000, 1024);
    const err = await readBody(new Request("http://edge/", { method: "POST", body: stream }), LIMIT).catch((e) => e);
    expect(err).toBeInstanceOf(ApiError);
    expect((err as ApiError).status).toBe(413);
    expect(counter.pulled).toBe(LIMIT + 1024); // the chunk that crossed the limit, and nothing after it
    const small = countingStream(3, 1024);
    const bytes = await readBody(new Request("http://edge/", { method: "POST", body: small.stream }), LIMIT);
    expect(bytes.byteLength).toBe(3 * 1024);
  });
});
