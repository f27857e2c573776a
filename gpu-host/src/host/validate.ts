// The fields of the edge's open_session, append and generate frames that the frame's types alone
// do not check: ranges, NaN, combinations. Checked here before anything is admitted, restored or
// sent to the engine, with the engine's ranges (shared/protocol/engine.json), so a bad value is
// answered `invalid` naming the field, the value and what is accepted — never mid-stream.
import type { HostMessage } from "@pyramidkv/shared";

import { KV_TYPES } from "./config.js";
import { HostError } from "./errors.js";

/** Most alternatives a token frame carries (engine.json `generate.top_logprobs`, OpenAI's cap). */
export const MAX_TOP_LOGPROBS = 20;

/** The keys of one chat message (engine.json `append.messages`). */
const MESSAGE_KEYS = ["role", "content"];

const invalid = (message: string) => new HostError("invalid", message);

// Untrusted text in a one-line message: control characters become '?', at most 64 code points.
function shown(v: unknown): string {
  if (typeof v !== "string") return typeof v === "number" ? String(v) : (JSON.stringify(v) ?? String(v));
  const points = Array.from(v);
  const text = points
    .slice(0, 64)
    .map((c) => (c < " " || c === "\x7f" ? "?" : c))
    .join("");
  return `'${text}${points.length > 64 ? "..." : ""}'`;
}

type Range = { min: number; max: number; minOpen?: boolean; maxOpen?: boolean };

function inRange(v: number, r: Range): boolean {
  return (r.minOpen ? v > r.min : v >= r.min) && (r.maxOpen ? v < r.max : v <= r.max);
}

function rangeText(r: Range): string {
  if (r.max === Number.POSITIVE_INFINITY) return `a finite number ${r.minOpen ? ">" : ">="} ${r.min}`;
  return `${r.minOpen ? "(" : "["}${r.min}, ${r.max}${r.maxOpen ? ")" : "]"}`;
}

// The engine's ranges of generate's float fields (engine.json docs).
const FLOAT_RANGES: Record<string, Range> = {
  temperature: { min: 0, max: Number.POSITIVE_INFINITY },
  top_p: { min: 0, max: 1, minOpen: true },
  min_p: { min: 0, max: 1 },
  presence_penalty: { min: -2, max: 2 },
  frequency_penalty: { min: -2, max: 2 },
  repetition_penalty: { min: 0, max: 10, minOpen: true },
};

/** A cached state's key (open_session.from_cache, snapshot.key): 64 lowercase hex digits. */
export const CACHE_KEY = /^[0-9a-f]{64}$/;

/** `field` of a `type` frame is a cache key. */
export function checkCacheKey(type: string, field: string, v: unknown): void {
  if (typeof v !== "string" || !CACHE_KEY.test(v))
    throw invalid(`${type}: ${field} ${shown(v)} is not a cache key (accepted: 64 lowercase hex digits)`);
}

/** open_session: kv_type is one the engine stores. */
export function checkOpen(msg: HostMessage<"open_session">): void {
  if (msg.kv_type !== undefined && !(KV_TYPES as readonly string[]).includes(msg.kv_type))
    throw invalid(`open_session: kv_type ${shown(msg.kv_type)} is not one of ${KV_TYPES.join(", ")}`);
}

/** generate: every sampling field within the engine's range (NaN and infinities refused);
 * penalty_last_n looks back at most the context (`nCtx` tokens). */
export function checkGenerate(msg: HostMessage<"generate">, nCtx: number): void {
  for (const [field, r] of Object.entries(FLOAT_RANGES)) {
    const v = (msg as Record<string, unknown>)[field];
    if (v === undefined) continue;
    if (typeof v !== "number" || !Number.isFinite(v) || !inRange(v, r))
      throw invalid(`generate: ${field} ${shown(v)} is out of range (accepted: ${rangeText(r)})`);
  }
  if (msg.penalty_last_n !== undefined && msg.penalty_last_n > nCtx)
    throw invalid(`generate: penalty_last_n ${msg.penalty_last_n} is out of range (accepted: 0..${nCtx}, the context)`);
  if (msg.top_logprobs !== undefined && msg.top_logprobs > MAX_TOP_LOGPROBS)
    throw invalid(`generate: top_logprobs ${msg.top_logprobs} is out of range (accepted: 0..${MAX_TOP_LOGPROBS})`);
  if (msg.grammar !== undefined && msg.json_schema !== undefined)
    throw invalid("generate: grammar and json_schema exclude each other (accepted: one of them)");
  if (msg.grammar !== undefined && msg.grammar.trim() === "")
    throw invalid("generate: grammar '' is empty (accepted: a GBNF grammar with a root rule)");
  if (msg.json_schema !== undefined) {
    let schema: unknown;
    try {
      schema = JSON.parse(msg.json_schema);
    } catch (e) {
      throw invalid(
        `generate: json_schema ${shown(msg.json_schema)} is not JSON (${e instanceof Error ? e.message : String(e)}; accepted: the JSON text of a JSON Schema object)`,
      );
    }
    if (typeof schema !== "object" || schema === null || Array.isArray(schema))
      throw invalid(
        `generate: json_schema ${shown(msg.json_schema)} is not an object (accepted: the JSON text of a JSON Schema object, "{}" for any object)`,
      );
  }
}

/** append: messages well formed and not mixed with text, tokens or chat; the fields that go with
 * messages only with messages; a piece (more: true) carries text only. */
export function checkAppend(msg: HostMessage<"append">): void {
  if (msg.more === true) {
    for (const field of ["tokens", "messages", "add_generation_prompt", "max_tokens"] as const) {
      if (msg[field] !== undefined)
        throw invalid(`append: a piece (more: true) carries text only, not ${field} (send it with the final append)`);
    }
  }
  if (msg.messages === undefined) {
    if (msg.add_generation_prompt !== undefined)
      throw invalid("append: add_generation_prompt applies to messages only, and there are none");
    return;
  }
  for (const field of ["text", "tokens", "chat"] as const) {
    if (msg[field] !== undefined)
      throw invalid(`append: messages and ${field} exclude each other (accepted: messages alone, or text/tokens)`);
  }
  if (msg.messages.length === 0) throw invalid("append: messages is empty (accepted: 1 or more {role, content})");
  msg.messages.forEach((m, i) => {
    for (const k of Object.keys(m)) {
      if (m[k] !== undefined && !MESSAGE_KEYS.includes(k))
        throw invalid(`append: messages[${i}] has unknown key ${shown(k)} (accepted: ${MESSAGE_KEYS.join(", ")})`);
    }
    if (typeof m.role !== "string" || m.role === "")
      throw invalid(`append: messages[${i}].role ${shown(m.role)} must be a non-empty string`);
    if (typeof m.content !== "string")
      throw invalid(`append: messages[${i}].content ${shown(m.content)} must be a string`);
  });
}

/** append.max_tokens against the context, before the engine tokenises anything: what is already
 * known (the session's tokens, token ids sent) plus max_tokens must fit. The engine checks the
 * exact count (it alone knows the text's tokens); this refuses what cannot fit whatever they are. */
export function checkContext(msg: HostMessage<"append">, tokensSeen: number, nCtx: number): void {
  if (msg.max_tokens === undefined) return;
  const known = tokensSeen + (msg.tokens?.length ?? 0);
  if (known + msg.max_tokens > nCtx)
    throw new HostError(
      "context_full",
      `append: ${known} tokens in the session and sent + max_tokens ${msg.max_tokens} exceed the context of ${nCtx} tokens`,
    );
}
