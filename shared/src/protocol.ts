// The engine's stdio protocol (pkv-engine serve --stdio), as seen from TypeScript, and the
// machinery (spec parser, validator, msgpack codec) that the host<->edge protocol reuses
// (host-protocol.ts: the same spec format in shared/protocol/host.json, other directions).
//
// shared/protocol/engine.json is its only definition. The C++ engine embeds the file at build
// time; here it is imported as a JSON module (`with { type: "json" }`): Node 20 loads it without
// a flag or warning, bundlers (esbuild in wrangler, vitest) inline it, and tsc copies it to
// dist/protocol/ beside dist/src/, so the same relative import resolves in both trees. No build
// step of our own, and no copy that could go stale.
//
// validateFrame() applies the C++ validator's rules in the C++ validator's order and returns the
// same one-line messages (gpu-host/engine/src/protocol.cpp; both test suites hold the same table).
// One difference is inherent: JavaScript numbers cannot tell 1.0 from 1, so a float64 that holds
// an integer counts as an integer here while C++ sees a float — frames from our own encoders never
// carry one (msgpackr writes integral numbers as integers, and encodeFrame() writes large ones as
// uint64/int64).
import { C1, Packr, Unpackr } from "msgpackr";

import engineJson from "../protocol/engine.json" with { type: "json" };

export type Direction = "to_engine" | "from_engine";
/** Directions of the host<->edge protocol (host.json). */
export type HostDirection = "to_host" | "from_host";
export type AnyDirection = Direction | HostDirection;
export type FieldType = "uint" | "int" | "float" | "str" | "bin" | "bool" | "map" | "str[]" | "uint[]" | "map[]";

export interface FieldSpec {
  readonly name: string;
  readonly type: FieldType;
  readonly required: boolean;
}
export interface MessageSpec {
  readonly name: string;
  readonly direction: AnyDirection;
  readonly fields: readonly FieldSpec[]; // engine.json order; 'type' is implicit
}
export interface ProtocolSpec {
  readonly version: number;
  /** optional fields added since `version` (absent in the file: 0) */
  readonly minor: number;
  readonly maxFrameBytes: number;
  readonly messages: ReadonlyMap<string, MessageSpec>; // engine.json order
}

const FIELD_TYPES: readonly string[] = [
  "uint",
  "int",
  "float",
  "str",
  "bin",
  "bool",
  "map",
  "str[]",
  "uint[]",
  "map[]",
];

function isPlainObject(v: unknown): v is Record<string, unknown> {
  if (typeof v !== "object" || v === null) return false;
  const proto: unknown = Object.getPrototypeOf(v);
  return proto === Object.prototype || proto === null;
}

export interface SpecFormat {
  /** the file's name, in error messages */
  readonly file: string;
  /** the two directions a message of this spec may take: [requests, answers] */
  readonly directions: readonly [AnyDirection, AnyDirection];
}
export const ENGINE_SPEC_FORMAT: SpecFormat = { file: "engine.json", directions: ["to_engine", "from_engine"] };

/** Checks a spec file (engine.json by default) as strictly as the C++ loader does (unknown keys and
 * types are mistakes). */
export function parseProtocolSpec(json: unknown, format: SpecFormat = ENGINE_SPEC_FORMAT): ProtocolSpec {
  const file = format.file;
  const [dirA, dirB] = format.directions;
  const fail = (where: string, msg: string): never => {
    throw new Error(`${where}: ${msg}`);
  };
  const onlyKeys = (o: Record<string, unknown>, where: string, keys: string[]) => {
    for (const k of Object.keys(o)) if (!keys.includes(k)) fail(where, `unknown key '${k}'`);
  };
  if (!isPlainObject(json)) return fail(file, "must be an object");
  onlyKeys(json, file, ["$comment", "version", "minor", "max_frame_bytes", "messages"]);
  const { version, minor = 0, max_frame_bytes: maxFrameBytes, messages } = json;
  if (typeof version !== "number" || !Number.isInteger(version) || version < 1)
    fail(file, "version must be a positive integer");
  if (typeof minor !== "number" || !Number.isInteger(minor) || minor < 0) fail(file, "minor must be an integer >= 0");
  if (typeof maxFrameBytes !== "number" || !Number.isInteger(maxFrameBytes) || maxFrameBytes < 16)
    fail(file, "max_frame_bytes must be an integer >= 16");
  if (!isPlainObject(messages)) return fail(file, "messages must be an object");
  const specs = new Map<string, MessageSpec>();
  for (const [name, m] of Object.entries(messages)) {
    const where = `${file} messages.${name}`;
    if (!isPlainObject(m)) return fail(where, "must be an object");
    onlyKeys(m, where, ["direction", "doc", "fields"]);
    if (m.direction !== dirA && m.direction !== dirB) fail(where, `direction must be ${dirA} or ${dirB}`);
    if (!isPlainObject(m.fields)) return fail(where, "fields must be an object");
    const fields: FieldSpec[] = [];
    for (const [fname, f] of Object.entries(m.fields)) {
      const fwhere = `${where}.fields.${fname}`;
      if (fname === "type") fail(fwhere, "'type' is implicit in every message");
      if (!isPlainObject(f)) return fail(fwhere, "must be an object");
      onlyKeys(f, fwhere, ["type", "required", "doc"]);
      if (typeof f.type !== "string" || !FIELD_TYPES.includes(f.type))
        fail(fwhere, `unknown field type '${String(f.type)}'`);
      if (f.required !== undefined && typeof f.required !== "boolean") fail(fwhere, "required must be a bool");
      fields.push({ name: fname, type: f.type as FieldType, required: f.required === true });
    }
    specs.set(name, { name, direction: m.direction as AnyDirection, fields });
  }
  return {
    version: version as number,
    minor: minor as number,
    maxFrameBytes: maxFrameBytes as number,
    messages: specs,
  };
}

export const PROTOCOL_SPEC: ProtocolSpec = parseProtocolSpec(engineJson);
export const PROTOCOL_VERSION: number = PROTOCOL_SPEC.version;
export const PROTOCOL_MINOR: number = PROTOCOL_SPEC.minor;
export const MAX_FRAME_BYTES: number = PROTOCOL_SPEC.maxFrameBytes;

// ---- message types ---------------------------------------------------------------------------
// The TypeScript types are derived from this table; test/protocol.test.ts checks that it equals
// engine.json field for field, so the two cannot drift. "?" marks an optional field.

export type FieldDecl = FieldType | `${FieldType}?`;
/** A message table like MESSAGES (host-protocol.ts has the host's). */
export type MessageTable = Record<string, { direction: AnyDirection; fields: Record<string, FieldDecl> }>;

export const MESSAGES = {
  open: {
    direction: "to_engine",
    fields: {
      id: "uint",
      session: "str",
      method: "str?",
      budget: "uint?",
      window: "uint?",
      beta: "uint?",
      kernel_size: "uint?",
      pooling: "str?",
      head_aggregation: "str?",
      chunk_size: "uint?",
      keep_scores: "bool?",
      kv_type: "str?",
    },
  },
  append: {
    direction: "to_engine",
    fields: {
      id: "uint",
      session: "str",
      text: "str?",
      tokens: "uint[]?",
      chat: "bool?",
      messages: "map[]?",
      add_generation_prompt: "bool?",
      max_tokens: "uint?",
    },
  },
  generate: {
    direction: "to_engine",
    fields: {
      id: "uint",
      session: "str",
      max_tokens: "uint?",
      temperature: "float?",
      top_k: "uint?",
      top_p: "float?",
      seed: "uint?",
      stop: "str[]?",
      min_p: "float?",
      presence_penalty: "float?",
      frequency_penalty: "float?",
      repetition_penalty: "float?",
      penalty_last_n: "uint?",
      logprobs: "bool?",
      top_logprobs: "uint?",
      grammar: "str?",
      json_schema: "str?",
    },
  },
  cancel: { direction: "to_engine", fields: { id: "uint", session: "str" } },
  close: { direction: "to_engine", fields: { id: "uint", session: "str" } },
  stats: { direction: "to_engine", fields: { id: "uint", session: "str?" } },
  save: { direction: "to_engine", fields: { id: "uint", session: "str", offset: "uint?", max_bytes: "uint?" } },
  restore: {
    direction: "to_engine",
    fields: { id: "uint", session: "str", state: "bin", offset: "uint?", total: "uint?" },
  },
  fork: {
    direction: "to_engine",
    fields: {
      id: "uint",
      session: "str",
      new_session: "str",
      method: "str",
      budget: "uint?",
      window: "uint?",
      beta: "uint?",
      kernel_size: "uint?",
      pooling: "str?",
      head_aggregation: "str?",
    },
  },
  shutdown: { direction: "to_engine", fields: { id: "uint" } },
  hello: {
    direction: "from_engine",
    fields: {
      protocol: "uint",
      model: "str",
      n_layer: "uint",
      n_ctx: "uint",
      pool_bytes: "uint",
      page_bytes: "uint",
      protocol_minor: "uint?",
      page_slots: "uint?",
      methods: "map[]?",
      defaults: "map?",
      chat_template: "str?",
    },
  },
  opened: { direction: "from_engine", fields: { id: "uint", session: "str" } },
  progress: { direction: "from_engine", fields: { id: "uint", session: "str", done: "uint", total: "uint" } },
  appended: { direction: "from_engine", fields: { id: "uint", session: "str", tokens_seen: "uint", kv_bytes: "uint" } },
  token: {
    direction: "from_engine",
    fields: {
      id: "uint",
      session: "str",
      token: "uint",
      text: "str",
      logprob: "float?",
      bytes: "bin?",
      top_logprobs: "map[]?",
    },
  },
  done: {
    direction: "from_engine",
    fields: { id: "uint", session: "str", reason: "str", new_tokens: "uint", text: "str", seed: "uint?" },
  },
  stats_result: {
    direction: "from_engine",
    fields: {
      id: "uint",
      session: "str?",
      tokens_seen: "uint?",
      layer_kv_lengths: "uint[]?",
      kv_bytes: "uint?",
      full_kv_bytes: "uint?",
      pool_bytes: "uint?",
      pool_used_bytes: "uint?",
      sessions: "uint?",
    },
  },
  saved: {
    direction: "from_engine",
    fields: { id: "uint", session: "str", state: "bin", offset: "uint", total: "uint" },
  },
  restored: { direction: "from_engine", fields: { id: "uint", session: "str", received: "uint" } },
  forked: { direction: "from_engine", fields: { id: "uint", session: "str" } },
  closed: { direction: "from_engine", fields: { id: "uint", session: "str" } },
  cancelled: { direction: "from_engine", fields: { id: "uint", session: "str" } },
  bye: { direction: "from_engine", fields: { id: "uint" } },
  error: { direction: "from_engine", fields: { id: "uint?", session: "str?", code: "str", message: "str" } },
} as const satisfies Record<string, { direction: Direction; fields: Record<string, FieldDecl> }>;

type Messages = typeof MESSAGES;
export type MessageType = keyof Messages;

type TsType<T> = T extends "uint" | "int" | "float"
  ? number
  : T extends "str"
    ? string
    : T extends "bin"
      ? Uint8Array
      : T extends "bool"
        ? boolean
        : T extends "map"
          ? Record<string, unknown>
          : T extends "str[]"
            ? string[]
            : T extends "uint[]"
              ? number[]
              : T extends "map[]"
                ? Record<string, unknown>[]
                : never;
type Simplify<T> = { [K in keyof T]: T[K] };
export type FieldsOf<F> = Simplify<
  { -readonly [K in keyof F as F[K] extends `${string}?` ? never : K]: TsType<F[K]> } & {
    -readonly [K in keyof F as F[K] extends `${string}?` ? K : never]?: F[K] extends `${infer T}?` ? TsType<T> : never;
  }
>;

/** The frame of message type T of a message table. */
export type MessageOf<Table extends MessageTable, T extends keyof Table & string> = Simplify<
  { type: T } & FieldsOf<Table[T]["fields"]>
>;

/** The frame of one message type, e.g. Message<"open">. */
export type Message<T extends MessageType> = Simplify<{ type: T } & FieldsOf<Messages[T]["fields"]>>;
export type EngineMessage = { [T in MessageType]: Message<T> }[MessageType];
export type ToEngineMessage = {
  [T in MessageType]: Messages[T]["direction"] extends "to_engine" ? Message<T> : never;
}[MessageType];
export type FromEngineMessage = {
  [T in MessageType]: Messages[T]["direction"] extends "from_engine" ? Message<T> : never;
}[MessageType];

/** Codes of 'error' frames, as listed in engine.json's doc of error.code (a test compares them). */
export const ERROR_CODES = [
  "bad_frame",
  "too_large",
  "unknown_type",
  "invalid",
  "unknown_session",
  "session_exists",
  "pool_full",
  "context_full",
  "busy",
  "cancelled",
  "internal",
] as const;
export type ErrorCode = (typeof ERROR_CODES)[number];

// ---- validation ------------------------------------------------------------------------------

/** The msgpack kind of a decoded value, named as in the C++ validator's messages. */
function kindOf(v: unknown): string {
  if (v === null || v === undefined) return "nil";
  switch (typeof v) {
    case "boolean":
      return "bool";
    case "number":
      return Number.isInteger(v) ? (v >= 0 ? "uint" : "int") : "float";
    case "bigint":
      return v >= 0n ? "uint" : "int";
    case "string":
      return "str";
  }
  if (v instanceof Uint8Array) return "bin";
  if (Array.isArray(v)) return "array";
  if (isPlainObject(v)) return "map";
  return "ext"; // a Date from a timestamp extension, ...: the C++ decoder refuses extensions
}

function matches(v: unknown, t: FieldType): boolean {
  const kind = kindOf(v);
  switch (t) {
    case "uint":
      return kind === "uint";
    case "int":
      return kind === "uint" || kind === "int";
    case "float":
      return kind === "uint" || kind === "int" || kind === "float";
    case "str[]":
      return Array.isArray(v) && v.every((x) => kindOf(x) === "str");
    case "uint[]":
      return Array.isArray(v) && v.every((x) => kindOf(x) === "uint");
    case "map[]":
      return Array.isArray(v) && v.every((x) => kindOf(x) === "map");
    default:
      return kind === t;
  }
}

// "str", or for an array with a wrong element "array (element 2 is uint)".
function describe(v: unknown, t: FieldType): string {
  if (!Array.isArray(v) || (t !== "str[]" && t !== "uint[]" && t !== "map[]")) return kindOf(v);
  const want = t === "str[]" ? "str" : t === "uint[]" ? "uint" : "map";
  const bad = v.findIndex((x) => kindOf(x) !== want);
  return bad < 0 ? "array" : `array (element ${bad} is ${kindOf(v[bad])})`;
}

// Untrusted text in one-line messages: control characters become '?', and the text is cut after
// 64 code points (not UTF-16 units: C++ counts UTF-8 code points, and both must agree).
function quoted(s: string): string {
  const points = Array.from(s);
  const shown = points
    .slice(0, 64)
    .map((c) => (c < " " || c === "\x7f" ? "?" : c))
    .join("");
  return `'${shown}${points.length > 64 ? "..." : ""}'`;
}

// Code point order = UTF-8 byte order, the order C++ compares keys in (JS `<` compares UTF-16
// units, which differs above U+FFFF).
function codePointLess(a: string, b: string): boolean {
  const x = Array.from(a, (c) => c.codePointAt(0) ?? 0);
  const y = Array.from(b, (c) => c.codePointAt(0) ?? 0);
  for (let i = 0; i < Math.min(x.length, y.length); i++) if (x[i] !== y[i]) return (x[i] ?? 0) < (y[i] ?? 0);
  return x.length < y.length;
}

/**
 * null when `value` is a valid frame (of `direction`, if given), else one line naming the message
 * type and the field, identical to the C++ engine's validate_frame(). Fields set to undefined
 * count as absent (encodeFrame drops them). `spec` defaults to the engine's.
 */
export function validateFrame(
  value: unknown,
  direction?: AnyDirection,
  spec: ProtocolSpec = PROTOCOL_SPEC,
): string | null {
  if (!isPlainObject(value)) return `frame must be a map, got ${kindOf(value)}`;
  const present = (k: string) => Object.hasOwn(value, k) && value[k] !== undefined;
  if (!present("type")) return "frame has no 'type' field";
  const type = value.type;
  if (typeof type !== "string") return `field 'type' must be str, got ${kindOf(type)}`;
  const msgSpec = spec.messages.get(type);
  if (!msgSpec) return `unknown message type ${quoted(type)}`;
  if (direction && msgSpec.direction !== direction)
    return `${type}: message goes ${msgSpec.direction}, expected ${direction}`;
  for (const f of msgSpec.fields) {
    if (!present(f.name)) {
      if (f.required) return `${type}: missing required field '${f.name}'`;
      continue;
    }
    const v = value[f.name];
    if (!matches(v, f.type)) return `${type}: field '${f.name}' must be ${f.type}, got ${describe(v, f.type)}`;
  }
  let unknown: string | undefined;
  for (const k of Object.keys(value)) {
    if (
      k !== "type" &&
      present(k) &&
      !msgSpec.fields.some((f) => f.name === k) &&
      (unknown === undefined || codePointLess(k, unknown))
    )
      unknown = k;
  }
  return unknown === undefined ? null : `${type}: unknown field ${quoted(unknown)}`;
}

// ---- frames ----------------------------------------------------------------------------------

// useRecords: false — msgpackr's record extension is not msgpack the engine understands, and its
// reader is compiled with `new Function`, which Cloudflare Workers refuse (docs/DESIGN.md §5, trap 5).
// variableMapSize: fixmap/map16 by size, as the C++ encoder writes (msgpackr's default is map16).
const packr = new Packr({ useRecords: false, variableMapSize: true });
// mapsAsObjects: plain objects, as validateFrame expects. int64AsType "number": uint64 values
// (the engine writes byte counts over 4 GiB that way) arrive as numbers, as the types say.
const unpackr = new Unpackr({ useRecords: false, mapsAsObjects: true, int64AsType: "number" });

/** msgpack bytes of one value (no length prefix). */
export function encodeMsgpack(value: unknown): Uint8Array {
  return packr.pack(value);
}

/** Decodes one msgpack value; throws on malformed input or trailing bytes. */
export function decodeMsgpack(bytes: Uint8Array): unknown {
  return unpackr.unpack(bytes);
}

// msgpackr writes an integral number outside 32 bits as float64, which the engine's "uint" check
// refuses: hand such numbers over as BigInt, which it writes as int64 (uint64 above 2^63) — the
// engine reads any non-negative integer format as uint.
function wireValue(v: unknown): unknown {
  if (typeof v === "number" && Number.isInteger(v) && (v > 0xffffffff || v < -0x80000000)) return BigInt(v);
  if (Array.isArray(v)) return v.map(wireValue);
  return v;
}

/** A frame for the engine's stdio: 4-byte big-endian length, then the msgpack map. Throws if the
 * message is not valid (a bug on our side) or exceeds MAX_FRAME_BYTES. */
export function encodeFrame(msg: EngineMessage): Uint8Array {
  const payload = encodeMessage(msg, PROTOCOL_SPEC, "encodeFrame");
  if (payload.length > MAX_FRAME_BYTES)
    throw new Error(`encodeFrame: frame of ${payload.length} bytes exceeds max_frame_bytes ${MAX_FRAME_BYTES}`);
  const frame = new Uint8Array(4 + payload.length);
  new DataView(frame.buffer).setUint32(0, payload.length);
  frame.set(payload, 4);
  return frame;
}

/** The msgpack map of a message of `spec`, validated, without framing (the caller checks the size
 * against its transport's limit). Throws if the message is not valid (a bug on our side). */
export function encodeMessage(msg: Record<string, unknown>, spec: ProtocolSpec, who = "encodeMessage"): Uint8Array {
  const problem = validateFrame(msg, undefined, spec);
  if (problem) throw new Error(`${who}: ${problem}`);
  const wire: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(msg)) if (v !== undefined) wire[k] = wireValue(v);
  return packr.pack(wire);
}

/** Decodes one msgpack map (a whole frame's payload) and validates it against `spec`: the
 * decoding half of FrameDecoder, for transports that frame messages themselves (WebSocket). */
export function decodeMessage(
  payload: Uint8Array,
  spec: ProtocolSpec,
  direction?: AnyDirection,
): DecodedMessage<Record<string, unknown>> {
  let value: unknown;
  try {
    if (payload.length === 0) throw new Error("empty frame"); // msgpackr would return undefined
    value = unpackr.unpack(payload);
    if (value === C1) throw new Error("invalid byte 0xc1"); // msgpackr returns a marker, C++ refuses it
  } catch (e) {
    return {
      ok: false,
      code: "bad_frame",
      error: `bad msgpack: ${e instanceof Error ? e.message : String(e)}`,
      fatal: false,
    };
  }
  const problem = validateFrame(value, direction, spec);
  if (problem === null) return { ok: true, message: value as Record<string, unknown> };
  const err: DecodedMessage<never> = {
    ok: false,
    code: problem.startsWith("unknown message type") ? "unknown_type" : "invalid",
    error: problem,
    fatal: false,
  };
  if (isPlainObject(value)) {
    if (kindOf(value.id) === "uint" && typeof value.id === "number") err.id = value.id;
    if (typeof value.session === "string") err.session = value.session;
  }
  return err;
}

export type DecodedMessage<M> =
  | { ok: true; message: M }
  | {
      ok: false;
      code: "too_large" | "bad_frame" | "unknown_type" | "invalid";
      error: string;
      /** true: the stream cannot be resynchronised and the decoder ignores all further input. */
      fatal: boolean;
      /** the request's id and session, when the frame was readable enough to tell (for the reply) */
      id?: number;
      session?: string;
    };

export type DecodedFrame = DecodedMessage<EngineMessage>;
/**
 * Reassembles frames from a byte stream (stdout of the engine, a socket), decoding and validating
 * each. A declared length over the limit is refused before any of it is buffered; as the next
 * frame's start is then unknown, that error is fatal and later input is ignored.
 */
export class FrameDecoder {
  private chunks: Uint8Array[] = [];
  private buffered = 0;
  private failed = false;

  constructor(
    private readonly direction?: AnyDirection,
    private readonly maxFrameBytes: number = MAX_FRAME_BYTES,
  ) {}

  /** Feeds bytes; returns every frame they complete, in order. */
  push(chunk: Uint8Array): DecodedFrame[] {
    const out: DecodedFrame[] = [];
    if (this.failed || chunk.length === 0) return out;
    this.chunks.push(chunk);
    this.buffered += chunk.length;
    while (this.buffered >= 4) {
      const header = this.peek(4);
      const n = new DataView(header.buffer, header.byteOffset, 4).getUint32(0);
      if (n > this.maxFrameBytes) {
        this.failed = true;
        this.chunks = [];
        this.buffered = 0;
        out.push({
          ok: false,
          code: "too_large",
          error: `frame of ${n} bytes exceeds max_frame_bytes ${this.maxFrameBytes}`,
          fatal: true,
        });
        break;
      }
      if (this.buffered < 4 + n) break;
      out.push(this.decode(this.take(4 + n).subarray(4)));
    }
    return out;
  }

  /** Bytes held for an incomplete frame (0 between frames). */
  get pendingBytes(): number {
    return this.buffered;
  }

  private decode(payload: Uint8Array): DecodedFrame {
    return decodeMessage(payload, PROTOCOL_SPEC, this.direction) as DecodedFrame;
  }

  // The first n buffered bytes, copied only when they span chunks.
  private peek(n: number): Uint8Array {
    const first = this.chunks[0]!;
    if (first.length >= n) return first.subarray(0, n);
    const out = new Uint8Array(n);
    let at = 0;
    for (const c of this.chunks) {
      const k = Math.min(c.length, n - at);
      out.set(c.subarray(0, k), at);
      at += k;
      if (at === n) break;
    }
    return out;
  }

  // Removes and returns the first n buffered bytes as a fresh copy, so decoded bin fields never
  // alias a buffer the caller may reuse.
  private take(n: number): Uint8Array {
    const out = new Uint8Array(n);
    let at = 0;
    let used = 0; // whole chunks consumed, dropped at once: shift() per chunk is quadratic
    while (at < n) {
      const c = this.chunks[used]!;
      const k = Math.min(c.length, n - at);
      out.set(c.subarray(0, k), at);
      at += k;
      if (k === c.length) used++;
      else this.chunks[used] = c.subarray(k);
    }
    this.chunks.splice(0, used);
    this.buffered -= n;
    return out;
  }
}
