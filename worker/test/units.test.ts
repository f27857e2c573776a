// Pure pieces of the worker, in the Workers runtime: chunking, ChatML rendering, validation, the
// edge token the hosts verify.
import { describe, expect, it } from "vitest";

import { renderPrompt, renderTurns } from "../src/chat.js";
import { splitText, utf8Bytes } from "../src/chunking.js";
import { ApiError } from "../src/errors.js";
import { edgeToken } from "../src/host-link.js";
import { normaliseHostUrl } from "../src/registry.js";
import { chatRequest, kvSettings, messageRequest } from "../src/validate.js";

const enc = new TextEncoder();

describe("splitText", () => {
  const text = "Ünïcødé text 🎉 with emoji, spaces\nand newlines. ".repeat(200);
  for (const max of [4, 7, 64, 1000, 1 << 20]) {
    it(`pieces of at most ${max} UTF-8 bytes join back to the text`, () => {
      const pieces = splitText(text, max);
      expect(pieces.join("")).toBe(text);
      for (const p of pieces) {
        expect(enc.encode(p).length).toBeLessThanOrEqual(max);
        expect(p.length).toBeGreaterThan(0);
        expect(/[\uD800-\uDBFF]$/.test(p), "no piece ends inside a surrogate pair").toBe(false);
      }
      if (max >= utf8Bytes(text)) expect(pieces).toHaveLength(1);
    });
  }
  it("cuts before whitespace when there is some near the end of a piece", () => {
    const pieces = splitText("alpha beta gamma delta epsilon zeta eta theta", 16);
    for (const p of pieces.slice(1)) expect(p.startsWith(" ")).toBe(true);
  });
  it("utf8Bytes agrees with TextEncoder", () => {
    expect(utf8Bytes(text)).toBe(enc.encode(text).length);
  });
  it("refuses a piece size below one code point", () => {
    expect(() => splitText("abc", 3)).toThrow(/maxBytes 3/);
  });
});

describe("ChatML", () => {
  it("renders turns and the assistant opening like the engine's chat template", () => {
    expect(renderPrompt([{ role: "user", content: "Hi" }])).toBe(
      "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    );
    expect(
      renderTurns([
        { role: "system", content: "S" },
        { role: "user", content: "U" },
      ]),
    ).toBe("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>");
  });
  it("continues a session, closing a turn the model left open", () => {
    expect(renderPrompt([{ role: "user", content: "Q" }], { continues: true })).toBe(
      "\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n",
    );
    expect(renderPrompt([{ role: "user", content: "Q" }], { continues: true, openTurn: true })).toBe(
      "<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n",
    );
  });
});

describe("validation", () => {
  const bad = (f: () => unknown, param: string, message: RegExp) => {
    try {
      f();
    } catch (e) {
      expect(e).toBeInstanceOf(ApiError);
      expect((e as ApiError).status).toBe(400);
      expect((e as ApiError).param).toBe(param);
      expect((e as ApiError).message).toMatch(message);
      return;
    }
    throw new Error("expected a 400");
  };
  const ok = { model: "m", messages: [{ role: "user", content: "hi" }] };
  it("accepts an OpenAI body with defaults", () => {
    const r = chatRequest({
      ...ok,
      messages: [
        { role: "developer", content: [{ type: "text", text: "be brief" }] },
        { role: "user", content: "hi" },
      ],
    });
    expect(r.turns).toEqual([
      { role: "system", content: "be brief" },
      { role: "user", content: "hi" },
    ]);
    expect(r.kv).toEqual({ method: "pyramidkv", budget: 128 });
    expect(r.sampling.max_tokens).toBe(256);
    expect(r.stream).toBe(false);
  });
  it("names the parameter and the accepted range", () => {
    bad(() => chatRequest({ ...ok, kv_budget: 8 }), "kv_budget", /\[16, 1048576\]/);
    bad(() => chatRequest({ ...ok, kv_budget: 64.5 }), "kv_budget", /not an integer/);
    bad(
      () => chatRequest({ ...ok, kv_method: "zip" }),
      "kv_method",
      /one of full, streamingllm, h2o, snapkv, pyramidkv/,
    );
    bad(() => chatRequest({ ...ok, temperature: -1 }), "temperature", /\[0, 2\]/);
    bad(() => chatRequest({ ...ok, stop: ["a", "b", "c", "d", "e"] }), "stop", /up to 4/);
    bad(
      () => chatRequest({ ...ok, messages: [{ role: "assistant", content: "x" }] }),
      "messages",
      /last message must have role user/,
    );
    bad(() => chatRequest({ ...ok, messages: [{ role: "user", content: 5 }] }), "messages[0].content", /not a string/);
    bad(() => chatRequest({ ...ok, stream: "yes" }), "stream", /true or false/);
    bad(() => messageRequest({}), "content", /required/);
  });
  it("kv settings for every engine method", () => {
    for (const m of ["full", "streamingllm", "h2o", "snapkv", "pyramidkv"])
      expect(kvSettings({ kv_method: m, kv_budget: 64 }).method).toBe(m);
  });
});

describe("edge token and host urls", () => {
  it("is the HMAC the host verifies (gpu-host/src/host/auth.ts)", async () => {
    // expiry 1800000300 = (1800000000 s + 300 s TTL); the MAC computed with node:crypto.
    expect(await edgeToken("test-secret-0123456789abcdef", 1_800_000_000_000)).toBe(
      "1800000300.04d027e7ac13fac8ccb462edd58bc9b2f9cccf9209fcbb96477ac5d27e15bf4b",
    );
  });
  it("normalises host urls", () => {
    expect(normaliseHostUrl("ws://127.0.0.1:8790/")).toBe("http://127.0.0.1:8790");
    expect(normaliseHostUrl("https://gpu1.example.com")).toBe("https://gpu1.example.com");
    expect(() => normaliseHostUrl("ftp://x")).toThrow(/scheme/);
  });
});
