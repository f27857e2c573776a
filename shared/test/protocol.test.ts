/// <reference types="node" />
// The shared protocol: engine.json loads, the TypeScript types agree with it, every message
// type survives a round trip, the bytes equal the C++ encoder's, the stream decoder copes with any
// chunking, and validation errors read exactly as the engine's (gpu-host/engine/tests/protocol_test.cpp).
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { test } from "node:test";

import {
  type DecodedFrame,
  decodeMsgpack,
  type EngineMessage,
  encodeFrame,
  encodeMsgpack,
  ERROR_CODES,
  FrameDecoder,
  type FieldType,
  MAX_FRAME_BYTES,
  MESSAGES,
  parseProtocolSpec,
  PROTOCOL_MINOR,
  PROTOCOL_SPEC,
  PROTOCOL_VERSION,
  validateFrame,
} from "../src/index.js";

const engineJsonPath = fileURLToPath(new URL("../../protocol/engine.json", import.meta.url)); // from dist/test/
const hex = (b: Uint8Array) => Buffer.from(b).toString("hex");
const unhex = (h: string) => new Uint8Array(Buffer.from(h.replace(/ /g, ""), "hex"));

function exampleOf(t: FieldType): unknown {
  switch (t) {
    case "uint":
      return 1;
    case "int":
      return -1;
    case "float":
      return 0.5;
    case "str":
      return "s";
    case "bin":
      return new Uint8Array([0, 1]);
    case "bool":
      return true;
    case "map":
      return {};
    case "str[]":
      return ["a"];
    case "uint[]":
      return [1, 2];
    case "map[]":
      return [{ k: 1 }];
  }
}

function examples(withOptional: boolean): EngineMessage[] {
  return [...PROTOCOL_SPEC.messages.values()].map((m) => {
    const frame: Record<string, unknown> = { type: m.name };
    for (const f of m.fields) if (f.required || withOptional) frame[f.name] = exampleOf(f.type);
    return frame as EngineMessage;
  });
}

// Buffers (Node's Uint8Array subclass) compare equal to plain Uint8Arrays of the same bytes.
function plain(v: unknown): unknown {
  if (v instanceof Uint8Array) return Array.from(v);
  if (Array.isArray(v)) return v.map(plain);
  if (v && typeof v === "object") return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, plain(x)]));
  return v;
}

function decodeAll(chunks: Uint8Array[], decoder = new FrameDecoder()): DecodedFrame[] {
  return chunks.flatMap((c) => decoder.push(c));
}

function concat(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

function header(n: number): Uint8Array {
  const h = new Uint8Array(4);
  new DataView(h.buffer).setUint32(0, n);
  return h;
}

test("engine.json loads: version 2, minor 2, 64 MiB frames", () => {
  assert.equal(PROTOCOL_VERSION, 2);
  assert.equal(PROTOCOL_MINOR, 2);
  assert.equal(MAX_FRAME_BYTES, 64 * 1024 * 1024);
  assert.equal(PROTOCOL_SPEC.messages.get("open")?.direction, "to_engine");
  assert.equal(PROTOCOL_SPEC.messages.get("hello")?.direction, "from_engine");
});

test("the TypeScript message table equals engine.json field for field", () => {
  const json = JSON.parse(readFileSync(engineJsonPath, "utf8")) as {
    messages: Record<
      string,
      { direction: string; fields: Record<string, { type: string; required?: boolean; doc?: string }> }
    >;
  };
  assert.deepEqual(json.messages.error?.fields.code?.doc?.split(", "), [...ERROR_CODES]);
  const fromJson = Object.fromEntries(
    Object.entries(json.messages).map(([name, m]) => [
      name,
      {
        direction: m.direction,
        fields: Object.fromEntries(Object.entries(m.fields).map(([f, s]) => [f, s.type + (s.required ? "" : "?")])),
      },
    ]),
  );
  assert.deepEqual(plain(MESSAGES), fromJson);
});

test("the spec parser refuses mistakes in engine.json", () => {
  const withField = (field: unknown) => ({
    version: 1,
    max_frame_bytes: 1024,
    messages: { m: { direction: "to_engine", fields: { a: field } } },
  });
  assert.doesNotThrow(() => parseProtocolSpec(withField({ type: "uint[]", required: true, doc: "x" })));
  assert.equal(parseProtocolSpec(withField({ type: "map[]" })).messages.get("m")?.fields[0]?.type, "map[]");
  assert.equal(parseProtocolSpec(withField({ type: "uint" })).minor, 0, "no 'minor': 0");
  assert.equal(parseProtocolSpec({ version: 2, minor: 3, max_frame_bytes: 1024, messages: {} }).minor, 3);
  assert.throws(
    () => parseProtocolSpec({ version: 2, minor: -1, max_frame_bytes: 1024, messages: {} }),
    /minor must be an integer >= 0/,
  );
  assert.throws(
    () => parseProtocolSpec({ version: 2, minr: 1, max_frame_bytes: 1024, messages: {} }),
    /unknown key 'minr'/,
  );
  assert.throws(() => parseProtocolSpec(withField({ type: "uint64" })), /unknown field type 'uint64'/);
  assert.throws(() => parseProtocolSpec(withField({ type: "uint", requried: true })), /unknown key 'requried'/);
  assert.throws(() =>
    parseProtocolSpec({ version: 1, max_frame_bytes: 1024, messages: { m: { direction: "up", fields: {} } } }),
  );
  assert.throws(() =>
    parseProtocolSpec({
      version: 1,
      max_frame_bytes: 1024,
      messages: { m: { direction: "to_engine", fields: { type: { type: "str" } } } },
    }),
  );
  assert.throws(() => parseProtocolSpec({ version: 1, messages: {} }));
});

test("every message type round-trips through encodeFrame and FrameDecoder", () => {
  for (const withOptional of [false, true]) {
    for (const msg of examples(withOptional)) {
      const spec = PROTOCOL_SPEC.messages.get(msg.type)!;
      assert.equal(validateFrame(msg, spec.direction), null, msg.type);
      const [got, ...rest] = new FrameDecoder(spec.direction).push(encodeFrame(msg));
      assert.equal(rest.length, 0);
      assert.ok(got?.ok, `${msg.type}: ${JSON.stringify(got)}`);
      assert.deepEqual(plain(got.message), plain(msg));
    }
  }
});

test("bin fields decode as Uint8Array, maps as plain objects", () => {
  const state = new Uint8Array([0, 255, 7]);
  const [got] = new FrameDecoder().push(
    encodeFrame({ type: "saved", id: 3, session: "s", state, offset: 0, total: 3 }),
  );
  assert.ok(got?.ok);
  assert.ok(got.message.type === "saved" && got.message.state instanceof Uint8Array);
  assert.equal(Object.getPrototypeOf(got.message), Object.prototype);
  assert.deepEqual(Array.from(got.message.state), [0, 255, 7]);
});

test("bytes equal the C++ encoder's (msgpack_test.cpp, protocol_test.cpp)", () => {
  assert.equal(hex(encodeMsgpack({ a: 1 })), "81a16101");
  const open = { type: "open", id: 7, session: "s1", method: "pyramidkv", budget: 128 } as const;
  const cppFrame =
    "00 00 00 34 85 a4 74 79 70 65 a4 6f 70 65 6e a2 69 64 07 a7 73 65 73 73 69 6f 6e a2 73 31 a6 6d 65 74 " +
    "68 6f 64 a9 70 79 72 61 6d 69 64 6b 76 a6 62 75 64 67 65 74 cc 80";
  assert.equal(hex(encodeFrame(open)), cppFrame.replace(/ /g, ""));
  assert.deepEqual(decodeMsgpack(unhex(cppFrame).subarray(4)), open);
  // A few of msgpack_test.cpp's known encodings, decoded here.
  assert.equal(decodeMsgpack(unhex("cf ff ff ff ff ff ff ff ff")), 2 ** 64); // uint64 max, as a (rounded) number
  assert.equal(decodeMsgpack(unhex("d3 80 00 00 00 00 00 00 00")), -(2 ** 63));
  assert.equal(decodeMsgpack(unhex("ca 3f c0 00 00")), 1.5);
  assert.equal(decodeMsgpack(unhex("d1 80 00")), -32768);
});

test("integers beyond 32 bits are written as 64-bit integers, never float64", () => {
  const frame = encodeFrame({ type: "appended", id: 1, session: "s", tokens_seen: 2 ** 40, kv_bytes: 5 });
  assert.ok(hex(frame).includes("d30000010000000000")); // int64; the engine reads it as uint
  const [got] = new FrameDecoder().push(frame);
  assert.ok(got?.ok && got.message.type === "appended");
  assert.equal(got.message.tokens_seen, 2 ** 40);
});

test("undefined optional fields are left out of the frame", () => {
  const frame = encodeFrame({ type: "open", id: 1, session: "s", budget: undefined });
  assert.deepEqual(decodeMsgpack(frame.subarray(4)), { type: "open", id: 1, session: "s" });
  assert.throws(
    () => encodeFrame({ type: "open", id: 1 } as unknown as EngineMessage),
    /open: missing required field 'session'/,
  );
});

test("the decoder reassembles frames split at every byte boundary", () => {
  const msgs = examples(true).slice(0, 3);
  const stream = concat(msgs.map(encodeFrame));
  for (let i = 0; i <= stream.length; i++) {
    const decoder = new FrameDecoder();
    const got = decodeAll([stream.subarray(0, i), stream.subarray(i)], decoder);
    assert.deepEqual(plain(got.map((g) => (g.ok ? g.message : g))), plain(msgs), `split at ${i}`);
    assert.equal(decoder.pendingBytes, 0);
  }
  const byteByByte = decodeAll(Array.from(stream, (b) => new Uint8Array([b])));
  assert.deepEqual(plain(byteByByte.map((g) => (g.ok ? g.message : g))), plain(msgs));
});

test("several frames in one chunk come out in order", () => {
  const msgs = examples(false);
  const got = new FrameDecoder().push(concat(msgs.map(encodeFrame)));
  assert.deepEqual(
    got.map((g) => (g.ok ? g.message.type : g.error)),
    msgs.map((m) => m.type),
  );
});

test("an oversized declared length is refused without buffering, and ends the stream", () => {
  const decoder = new FrameDecoder();
  const got = decoder.push(concat([header(MAX_FRAME_BYTES + 1), new Uint8Array(1000)]));
  assert.deepEqual(got, [
    { ok: false, code: "too_large", error: "frame of 67108865 bytes exceeds max_frame_bytes 67108864", fatal: true },
  ]);
  assert.equal(decoder.pendingBytes, 0);
  assert.deepEqual(decoder.push(encodeFrame({ type: "shutdown", id: 1 })), []); // cannot resynchronise
  // The refusal comes as soon as the header is complete, not when the payload would be.
  const small = new FrameDecoder(undefined, 10);
  assert.equal(small.push(header(11))[0]?.ok, false);
});

test("malformed msgpack is a bad_frame error, and the next frame still decodes", () => {
  const good = encodeFrame({ type: "close", id: 4, session: "s" });
  const payload = good.subarray(4);
  for (let n = 0; n < payload.length; n++) {
    const truncated = payload.subarray(0, n);
    const [bad, next] = new FrameDecoder().push(concat([header(n), truncated, good]));
    assert.ok(bad && !bad.ok && bad.code === "bad_frame" && !bad.fatal, `truncated to ${n}: ${JSON.stringify(bad)}`);
    assert.equal(next?.ok, true);
  }
  for (const junk of ["c1", "81 a1 61 01 ff", "db ff ff ff ff 68 65 6c 6c 6f", "dd ff ff ff ff 01 02 03 04 05"]) {
    const bytes = unhex(junk);
    const [bad] = new FrameDecoder().push(concat([header(bytes.length), bytes]));
    assert.ok(bad && !bad.ok && bad.code === "bad_frame" && !bad.fatal, junk);
  }
});

test("invalid frames report their id and session so the error can be answered", () => {
  const payload = encodeMsgpack({ type: "open", id: 9, session: "s", budgte: 1 });
  const [got] = new FrameDecoder("to_engine").push(concat([header(payload.length), payload]));
  assert.deepEqual(got, {
    ok: false,
    code: "invalid",
    error: "open: unknown field 'budgte'",
    fatal: false,
    id: 9,
    session: "s",
  });
  const unknown = encodeMsgpack({ type: "foo", id: 2 });
  const [u] = new FrameDecoder().push(concat([header(unknown.length), unknown]));
  assert.ok(u && !u.ok && u.code === "unknown_type" && u.id === 2);
});

test("validation errors match the C++ validator line for line", () => {
  const open = { type: "open", id: 1, session: "s" };
  const gen = { type: "generate", id: 1, session: "s" };
  const append = { type: "append", id: 1, session: "s" };
  // The same table as ErrorsNameTheMessageAndTheField in gpu-host/engine/tests/protocol_test.cpp.
  const cases: [unknown, string][] = [
    [[1], "frame must be a map, got array"],
    [{}, "frame has no 'type' field"],
    [{ type: 5 }, "field 'type' must be str, got uint"],
    [{ type: "foo", id: 1 }, "unknown message type 'foo'"],
    [
      { type: "hello", protocol: 1, model: "m", n_layer: 1, n_ctx: 1, pool_bytes: 1, page_bytes: 1 },
      "hello: message goes from_engine, expected to_engine",
    ],
    [{ type: "open", session: "s" }, "open: missing required field 'id'"],
    [{ type: "open", id: 1 }, "open: missing required field 'session'"],
    [{ ...open, budget: "128" }, "open: field 'budget' must be uint, got str"],
    [{ ...open, budget: -1 }, "open: field 'budget' must be uint, got int"],
    [{ ...open, budget: 1.5 }, "open: field 'budget' must be uint, got float"],
    [{ ...open, keep_scores: 1 }, "open: field 'keep_scores' must be bool, got uint"],
    [{ ...open, session: null }, "open: field 'session' must be str, got nil"],
    [{ ...open, budgte: 128 }, "open: unknown field 'budgte'"],
    [{ ...open, zz: 1, aa: 2 }, "open: unknown field 'aa'"],
    [{ ...open, budgte: "x", budget: "y" }, "open: field 'budget' must be uint, got str"],
    [{ ...gen, stop: ["a", 2] }, "generate: field 'stop' must be str[], got array (element 1 is uint)"],
    [{ ...gen, temperature: "hot" }, "generate: field 'temperature' must be float, got str"],
    [{ ...append, tokens: [1, -2] }, "append: field 'tokens' must be uint[], got array (element 1 is int)"],
    [{ ...append, tokens: "1 2" }, "append: field 'tokens' must be uint[], got str"],
    [{ type: "restore", id: 1, session: "s", state: "abc" }, "restore: field 'state' must be bin, got str"],
    [{ type: `x\ny${"z".repeat(100)}` }, `unknown message type 'x?y${"z".repeat(61)}...'`],
  ];
  for (const [frame, expected] of cases)
    assert.equal(validateFrame(frame, "to_engine"), expected, JSON.stringify(frame));
  assert.equal(validateFrame({ ...gen, temperature: 1, top_p: 0 }, "to_engine"), null); // float accepts integers
  // Decoded from msgpack, the answers are the same.
  for (const [frame, expected] of cases)
    assert.equal(validateFrame(decodeMsgpack(encodeMsgpack(frame)), "to_engine"), expected);
});

test("errors in frames from the engine match the C++ validator", () => {
  // The same table as ErrorsInFramesFromTheEngine in gpu-host/engine/tests/protocol_test.cpp.
  const hello = { type: "hello", protocol: 2, model: "m", n_layer: 1, n_ctx: 1, pool_bytes: 1, page_bytes: 1 };
  assert.equal(validateFrame(hello, "from_engine"), null, "an older engine's hello (minor 0) is valid");
  const cases: [unknown, string][] = [
    [{ ...hello, methods: [{}, 1] }, "hello: field 'methods' must be map[], got array (element 1 is uint)"],
    [{ ...hello, methods: {} }, "hello: field 'methods' must be map[], got map"],
    [{ ...hello, defaults: [] }, "hello: field 'defaults' must be map, got array"],
    [{ ...hello, protocol_minor: "1" }, "hello: field 'protocol_minor' must be uint, got str"],
  ];
  for (const [frame, expected] of cases) {
    assert.equal(validateFrame(frame, "from_engine"), expected, JSON.stringify(frame));
    assert.equal(validateFrame(decodeMsgpack(encodeMsgpack(frame)), "from_engine"), expected);
  }
});

test("msgpack works where code generation from strings is refused (Cloudflare Workers)", () => {
  const protocolJs = new URL("../src/protocol.js", import.meta.url).href;
  const script = `
    const p = await import(${JSON.stringify(protocolJs)});
    const d = new p.FrameDecoder();
    for (let i = 0; i < 200; i++) {   // msgpackr compiles readers for repeated shapes: repeat one
      const [got] = d.push(p.encodeFrame({ type: "token", id: i, session: "s", token: i, text: "t" }));
      if (!got.ok || got.message.id !== i) throw new Error("round trip failed: " + JSON.stringify(got));
    }
    try { new Function("return 1"); console.log("eval allowed"); } catch { console.log("eval refused"); }
  `;
  const r = spawnSync(
    process.execPath,
    ["--disallow-code-generation-from-strings", "--input-type=module", "-e", script],
    { encoding: "utf8" },
  );
  assert.equal(r.status, 0, r.stderr);
  assert.equal(r.stdout.trim(), "eval refused");
});
