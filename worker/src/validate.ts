// Request bodies, checked at the edge of each route (Hono validator middleware, jsonBody): every
// error names the parameter, the value received and what is accepted (400 invalid_request_error).
import { ENGINE_DEFAULTS, isKvMethod, KV_METHODS, type KvMethod } from "@pyramidkv/shared";
import { HTTPException } from "hono/http-exception";
import { validator } from "hono/validator";

import { maxBodyBytes, readBody } from "./body.js";
import type { Role, Turn } from "./chat.js";
import type { Env } from "./env.js";
import { type ApiError, invalid } from "./errors.js";

export const BUDGET_RANGE = [16, 1 << 20] as const;
export const MAX_TOKENS_RANGE = [1, 4096] as const;
/** The engine's own default (the shared table, proven equal to the engine by a test). */
export const DEFAULT_MAX_TOKENS = ENGINE_DEFAULTS.max_tokens;

export interface KvSettings {
  method: KvMethod;
  budget: number;
}

export interface Sampling {
  max_tokens: number;
  temperature?: number;
  top_p?: number;
  seed?: number;
  stop?: string[];
}

export interface ChatRequest {
  model: string;
  turns: Turn[];
  stream: boolean;
  includeUsage: boolean;
  kv: KvSettings;
  sampling: Sampling;
}

export interface SessionRequest {
  document: string;
  system?: string;
  stream: boolean;
  kv: KvSettings;
}

export interface MessageRequest {
  content: string;
  stream: boolean;
  includeUsage: boolean;
  sampling: Sampling;
}

const show = (v: unknown) => {
  const s = JSON.stringify(v);
  return s === undefined ? String(v) : s.length > 60 ? `${s.slice(0, 57)}...` : s;
};

/** A parsed body that is not a JSON object (an array, a number, null) is refused. */
function jsonObject(value: unknown): Record<string, unknown> {
  if (typeof value !== "object" || value === null || Array.isArray(value))
    throw invalid("body", "the body must be a JSON object", "invalid_json");
  return value as Record<string, unknown>;
}

function notJson(body: Uint8Array): ApiError | undefined {
  try {
    JSON.parse(new TextDecoder().decode(body));
    return undefined;
  } catch (e) {
    return invalid("body", `the body is not valid JSON: ${e instanceof Error ? e.message : String(e)}`, "invalid_json");
  }
}

/**
 * A route's body validator, as Hono middleware (`validator("json")`; the handler reads the result
 * with `c.req.valid("json")`): the body is read under the byte limit (body.ts), parsed as JSON
 * whatever its content type (`curl -d` sends a form type, which Hono's validator would not parse),
 * and handed to `check`, whose errors name the parameter. Malformed JSON and a body that is not an
 * object are 400 invalid_json on `body`.
 */
export function jsonBody<T>(check: (body: Record<string, unknown>) => T, limit: (env: Env) => number = maxBodyBytes) {
  const validate = validator("json", (value: unknown) => check(jsonObject(value)));
  const middleware: typeof validate = async (c, next) => {
    const body = await readBody(c.req.raw, limit(c.env));
    const headers = new Headers(c.req.raw.headers);
    headers.set("content-type", "application/json");
    c.req.raw = new Request(c.req.raw, { body, headers, signal: c.req.raw.signal });
    try {
      return await validate(c, next);
    } catch (e) {
      // Hono's parse failed (HTTPException 400): today's message, with the parser's reason.
      throw (e instanceof HTTPException && notJson(body)) || e;
    }
  };
  return middleware;
}

function int(o: Record<string, unknown>, name: string, lo: number, hi: number, fallback: number): number;
function int(o: Record<string, unknown>, name: string, lo: number, hi: number): number | undefined;
function int(o: Record<string, unknown>, name: string, lo: number, hi: number, fallback?: number): number | undefined {
  const v = o[name];
  if (v === undefined || v === null) return fallback;
  if (typeof v !== "number" || !Number.isInteger(v) || v < lo || v > hi)
    throw invalid(name, `'${name}': ${show(v)} is not an integer in [${lo}, ${hi}]`);
  return v;
}

function num(o: Record<string, unknown>, name: string, lo: number, hi: number): number | undefined {
  const v = o[name];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== "number" || !Number.isFinite(v) || v < lo || v > hi)
    throw invalid(name, `'${name}': ${show(v)} is not a number in [${lo}, ${hi}]`);
  return v;
}

function bool(o: Record<string, unknown>, name: string, fallback: boolean): boolean {
  const v = o[name];
  if (v === undefined || v === null) return fallback;
  if (typeof v !== "boolean") throw invalid(name, `'${name}': ${show(v)} is not true or false`);
  return v;
}

function str(o: Record<string, unknown>, name: string, required: true): string;
function str(o: Record<string, unknown>, name: string, required?: false): string | undefined;
function str(o: Record<string, unknown>, name: string, required = false): string | undefined {
  const v = o[name];
  if (v === undefined || v === null) {
    if (required) throw invalid(name, `'${name}' is required (a string)`, "missing_required_parameter");
    return undefined;
  }
  if (typeof v !== "string") throw invalid(name, `'${name}': ${show(v)} is not a string`);
  return v;
}

export function kvSettings(o: Record<string, unknown>): KvSettings {
  const method = str(o, "kv_method") ?? ENGINE_DEFAULTS.method;
  if (!isKvMethod(method))
    throw invalid("kv_method", `'kv_method': ${show(method)} is not one of ${KV_METHODS.join(", ")}`);
  const budget = int(o, "kv_budget", BUDGET_RANGE[0], BUDGET_RANGE[1], ENGINE_DEFAULTS.budget);
  return { method, budget };
}

function sampling(o: Record<string, unknown>): Sampling {
  const maxTokens =
    int(o, "max_completion_tokens", MAX_TOKENS_RANGE[0], MAX_TOKENS_RANGE[1]) ??
    int(o, "max_tokens", MAX_TOKENS_RANGE[0], MAX_TOKENS_RANGE[1], DEFAULT_MAX_TOKENS);
  int(o, "n", 1, 1); // one choice per request
  let stop: string[] | undefined;
  const s = o.stop;
  if (typeof s === "string") stop = [s];
  else if (Array.isArray(s)) {
    if (s.length > 4 || !s.every((x) => typeof x === "string" && x.length > 0))
      throw invalid("stop", `'stop': ${show(s)} is not up to 4 non-empty strings`);
    stop = s as string[];
  } else if (s !== undefined && s !== null)
    throw invalid("stop", `'stop': ${show(s)} is not a string or an array of strings`);
  return {
    max_tokens: maxTokens,
    temperature: num(o, "temperature", 0, 2),
    top_p: num(o, "top_p", 0, 1),
    seed: int(o, "seed", 0, 2 ** 32 - 1),
    ...(stop ? { stop } : {}),
  };
}

function streamOptions(o: Record<string, unknown>): boolean {
  const so = o.stream_options;
  if (so === undefined || so === null) return false;
  if (typeof so !== "object" || Array.isArray(so))
    throw invalid("stream_options", `'stream_options': ${show(so)} is not an object`);
  return bool(so as Record<string, unknown>, "include_usage", false);
}

const ROLES: readonly Role[] = ["system", "user", "assistant"];

function content(v: unknown, where: string): string {
  if (typeof v === "string") return v;
  // OpenAI's content parts: text only here.
  if (
    Array.isArray(v) &&
    v.every(
      (p) =>
        typeof p === "object" &&
        p !== null &&
        (p as { type?: unknown }).type === "text" &&
        typeof (p as { text?: unknown }).text === "string",
    )
  ) {
    return v.map((p) => (p as { text: string }).text).join("");
  }
  throw invalid(where, `'${where}': ${show(v)} is not a string or an array of text parts`);
}

export function chatRequest(o: Record<string, unknown>): ChatRequest {
  const model = str(o, "model", true);
  const messages = o.messages;
  if (!Array.isArray(messages) || messages.length === 0)
    throw invalid("messages", `'messages': ${show(messages)} is not a non-empty array of {role, content}`);
  const turns = messages.map((m: unknown, i): Turn => {
    if (typeof m !== "object" || m === null)
      throw invalid(`messages[${i}]`, `'messages[${i}]': ${show(m)} is not an object`);
    const { role, content: c } = m as { role?: unknown; content?: unknown };
    const r = role === "developer" ? "system" : role;
    if (typeof r !== "string" || !(ROLES as readonly string[]).includes(r)) {
      throw invalid(
        `messages[${i}].role`,
        `'messages[${i}].role': ${show(role)} is not one of system, developer, user, assistant`,
      );
    }
    return { role: r as Role, content: content(c, `messages[${i}].content`) };
  });
  if (turns[turns.length - 1]!.role !== "user")
    throw invalid("messages", "'messages': the last message must have role user");
  return {
    model,
    turns,
    stream: bool(o, "stream", false),
    includeUsage: streamOptions(o),
    kv: kvSettings(o),
    sampling: sampling(o),
  };
}

export function sessionRequest(o: Record<string, unknown>): SessionRequest {
  const document = str(o, "document", true);
  if (document.length === 0) throw invalid("document", "'document' must not be empty");
  return { document, system: str(o, "system"), stream: bool(o, "stream", false), kv: kvSettings(o) };
}

export function messageRequest(o: Record<string, unknown>): MessageRequest {
  const c = content(
    o.content ??
      (() => {
        throw invalid("content", "'content' is required (the question, a string)", "missing_required_parameter");
      })(),
    "content",
  );
  if (c.length === 0) throw invalid("content", "'content' must not be empty");
  return { content: c, stream: bool(o, "stream", true), includeUsage: streamOptions(o), sampling: sampling(o) };
}
