// Request bodies, checked at the edge of each route (Hono validator middleware, jsonBody): every
// error names the parameter, the value received and what is accepted (400 invalid_request_error).
// Every field of OpenAI's request bodies is honoured, refused (400 unsupported_parameter naming it,
// unless it has its neutral value) or on the short ignore list below; a field OpenAI does not
// define and we do not add is refused too (unknown_parameter), so nothing is silently dropped.
// The table of fields is in docs/WORKER.md.
import { ENGINE_DEFAULTS, isKvMethod, KV_METHODS, type KvMethod } from "@pyramidkv/shared";
import { HTTPException } from "hono/http-exception";
import { validator } from "hono/validator";

import { maxBodyBytes, readBody } from "./body.js";
import type { Role, Turn } from "./chat.js";
import type { Env } from "./env.js";
import { ApiError, invalid } from "./errors.js";

export const BUDGET_RANGE = [16, 1 << 20] as const;
/** The upper bound is only a sanity bound: the host's context is the real one (context_length_exceeded). */
export const MAX_TOKENS_RANGE = [1, 1 << 20] as const;
/** The engine's own default (the shared table, proven equal to the engine by a test). */
export const DEFAULT_MAX_TOKENS = ENGINE_DEFAULTS.max_tokens;
/** OpenAI's (and vLLM's) default for /v1/completions. */
export const DEFAULT_COMPLETION_MAX_TOKENS = 16;
export const MAX_TOP_LOGPROBS = 20;
/** `model` that means "any host" */
export const ANY_MODEL = "default";

/** Fields accepted and ignored, on purpose: they do not change what is generated. */
export const IGNORED_FIELDS = ["user", "safety_identifier", "parallel_tool_calls"] as const;

export interface KvSettings {
  method: KvMethod;
  budget: number;
}

/** The compression a request asks for; what it leaves out comes from the tenant's defaults (resolveKv). */
export interface KvRequest {
  method?: KvMethod;
  budget?: number;
}

export interface Sampling {
  /** the generate's limit (the default when the request gave none) */
  max_tokens: number;
  /** max_tokens as the request gave it: checked against the context before any prefill */
  max_tokens_asked?: number;
  temperature?: number;
  top_p?: number;
  top_k?: number;
  min_p?: number;
  presence_penalty?: number;
  frequency_penalty?: number;
  repetition_penalty?: number;
  seed?: number;
  stop?: string[];
  logprobs?: boolean;
  top_logprobs?: number;
  /** JSON text of a JSON Schema (json_object: {"type": "object"}) */
  json_schema?: string;
}

export interface ChatRequest {
  model: string;
  turns: Turn[];
  stream: boolean;
  includeUsage: boolean;
  kv: KvRequest;
  /** kv_cache as the request gave it (absent: the tenant's, else on) */
  kvCache?: KvCache;
  sampling: Sampling;
}

export interface CompletionRequest {
  model: string;
  prompt: { text: string } | { tokens: number[] };
  stream: boolean;
  includeUsage: boolean;
  kv: KvRequest;
  sampling: Sampling;
}

export interface SessionRequest {
  model: string;
  document: string;
  system?: string;
  stream: boolean;
  kv: KvRequest;
  kvCache?: KvCache;
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

export const unsupported = (param: string, message: string) =>
  new ApiError(400, "invalid_request_error", message, param, "unsupported_parameter");

const absent = (v: unknown) => v === undefined || v === null;

function int(o: Record<string, unknown>, name: string, lo: number, hi: number, fallback: number): number;
function int(o: Record<string, unknown>, name: string, lo: number, hi: number): number | undefined;
function int(o: Record<string, unknown>, name: string, lo: number, hi: number, fallback?: number): number | undefined {
  const v = o[name];
  if (absent(v)) return fallback;
  if (typeof v !== "number" || !Number.isInteger(v) || v < lo || v > hi)
    throw invalid(name, `'${name}': ${show(v)} is not an integer in [${lo}, ${hi}]`);
  return v;
}

/** A number in [lo, hi] (or (lo, hi] with openLow). */
function num(o: Record<string, unknown>, name: string, lo: number, hi: number, openLow = false): number | undefined {
  const v = o[name];
  if (absent(v)) return undefined;
  if (typeof v !== "number" || !Number.isFinite(v) || v < lo || v > hi || (openLow && v === lo))
    throw invalid(name, `'${name}': ${show(v)} is not a number in ${openLow ? "(" : "["}${lo}, ${hi}]`);
  return v;
}

function bool(o: Record<string, unknown>, name: string, fallback: boolean): boolean {
  const v = o[name];
  if (absent(v)) return fallback;
  if (typeof v !== "boolean") throw invalid(name, `'${name}': ${show(v)} is not true or false`);
  return v;
}

function str(o: Record<string, unknown>, name: string, required: true): string;
function str(o: Record<string, unknown>, name: string, required?: false): string | undefined;
function str(o: Record<string, unknown>, name: string, required = false): string | undefined {
  const v = o[name];
  if (absent(v)) {
    if (required) throw invalid(name, `'${name}' is required (a string)`, "missing_required_parameter");
    return undefined;
  }
  if (typeof v !== "string") throw invalid(name, `'${name}': ${show(v)} is not a string`);
  return v;
}

const isEmptyObject = (v: unknown) =>
  typeof v === "object" && v !== null && !Array.isArray(v) && Object.keys(v).length === 0;

/**
 * Fields we do not implement, each with its neutral value (accepted: it asks for nothing) and why
 * it is refused otherwise. null is always neutral.
 */
const REFUSED: Record<string, { neutral: (v: unknown) => boolean; why: string }> = {
  tools: { neutral: (v) => Array.isArray(v) && v.length === 0, why: "tool calls are not supported" },
  tool_choice: { neutral: (v) => v === "none", why: "tool calls are not supported" },
  functions: { neutral: (v) => Array.isArray(v) && v.length === 0, why: "function calls are not supported" },
  function_call: { neutral: (v) => v === "none", why: "function calls are not supported" },
  logit_bias: { neutral: isEmptyObject, why: "logit_bias is not supported" },
  audio: { neutral: () => false, why: "audio output is not supported" },
  modalities: {
    neutral: (v) => Array.isArray(v) && v.every((m) => m === "text"),
    why: "only the text modality is supported",
  },
  prediction: { neutral: () => false, why: "predicted outputs are not supported" },
  web_search_options: { neutral: () => false, why: "web search is not supported" },
  reasoning_effort: { neutral: () => false, why: "reasoning effort is not supported" },
  verbosity: { neutral: () => false, why: "verbosity is not supported" },
  service_tier: { neutral: (v) => v === "auto" || v === "default", why: "only the default service tier exists" },
  store: { neutral: (v) => v === false, why: "completions are not stored" },
  metadata: { neutral: isEmptyObject, why: "metadata is only kept with store, which is not supported" },
  prompt_cache_key: { neutral: () => false, why: "prompt caching is not supported" },
  prompt_cache_retention: { neutral: () => false, why: "prompt caching is not supported" },
  n: { neutral: (v) => v === 1, why: "one choice per request: send n requests (n > 1 is not supported)" },
  echo: { neutral: (v) => v === false, why: "echo is not supported" },
  suffix: { neutral: (v) => v === "", why: "suffix (insertion) is not supported" },
  best_of: { neutral: (v) => v === 1, why: "best_of > 1 is not supported" },
};

/** Every field of a body is one `accepted` reads, a refused one at its neutral value, or an ignored one. */
function checkFields(o: Record<string, unknown>, accepted: readonly string[], refused: readonly string[]): void {
  for (const [k, v] of Object.entries(o)) {
    if (accepted.includes(k) || (IGNORED_FIELDS as readonly string[]).includes(k)) continue;
    if (refused.includes(k)) {
      const r = REFUSED[k]!;
      if (absent(v) || r.neutral(v)) continue;
      throw unsupported(k, `'${k}': ${show(v)} is not supported: ${r.why}`);
    }
    throw new ApiError(
      400,
      "invalid_request_error",
      `unknown field '${k}': accepted are ${[...accepted, ...refused.map((r) => `${r} (neutral value only)`), ...IGNORED_FIELDS.map((i) => `${i} (ignored)`)].join(", ")}`,
      k,
      "unknown_parameter",
    );
  }
}

function kvRequest(o: Record<string, unknown>): KvRequest {
  const method = str(o, "kv_method");
  if (method !== undefined && !isKvMethod(method))
    throw invalid("kv_method", `'kv_method': ${show(method)} is not one of ${KV_METHODS.join(", ")}`);
  const budget = int(o, "kv_budget", BUDGET_RANGE[0], BUDGET_RANGE[1]);
  return { ...(method !== undefined ? { method } : {}), ...(budget !== undefined ? { budget } : {}) };
}

/** A request's kv_method / kv_budget, else the tenant's defaults, else the engine's. */
export function resolveKv(asked: KvRequest, tenant?: { kv_method?: string; kv_budget?: number } | null): KvSettings {
  const fallback = tenant?.kv_method;
  const method = asked.method ?? (fallback !== undefined && isKvMethod(fallback) ? fallback : ENGINE_DEFAULTS.method);
  return { method, budget: asked.budget ?? tenant?.kv_budget ?? ENGINE_DEFAULTS.budget };
}

/** The compressed prompt cache (prompt-cache.ts): on (the default) or off (every prompt prefilled whole). */
export const KV_CACHE_VALUES = ["on", "off"] as const;
export type KvCache = (typeof KV_CACHE_VALUES)[number];
const isKvCache = (v: unknown): v is KvCache => (KV_CACHE_VALUES as readonly unknown[]).includes(v);

function kvCache(o: Record<string, unknown>): { kvCache?: KvCache } {
  const v = o.kv_cache;
  if (absent(v)) return {};
  if (!isKvCache(v))
    throw invalid(
      "kv_cache",
      `'kv_cache': ${show(v)} is not one of ${KV_CACHE_VALUES.map((x) => `"${x}"`).join(", ")}`,
    );
  return { kvCache: v };
}

/** Whether a request uses the prompt cache: its kv_cache, else its tenant's, else on. */
export function resolveKvCache(asked: KvCache | undefined, tenant?: { kv_cache?: string } | null): boolean {
  const fallback = tenant?.kv_cache;
  return (asked ?? (isKvCache(fallback) ? fallback : "on")) === "on";
}

/** kv_method / kv_budget with the engine's defaults (no tenant defaults). */
export const kvSettings = (o: Record<string, unknown>): KvSettings => resolveKv(kvRequest(o));

function stopStrings(o: Record<string, unknown>): string[] | undefined {
  const s = o.stop;
  if (absent(s)) return undefined;
  if (typeof s === "string") {
    if (s.length === 0) throw invalid("stop", "'stop': \"\" is not a non-empty string");
    return [s];
  }
  if (!Array.isArray(s)) throw invalid("stop", `'stop': ${show(s)} is not a string or an array of strings`);
  if (s.length > 4 || !s.every((x) => typeof x === "string" && x.length > 0))
    throw invalid("stop", `'stop': ${show(s)} is not up to 4 non-empty strings`);
  return s.length === 0 ? undefined : (s as string[]);
}

/** Any JSON object, spelt out: an empty schema ("{}") means any JSON value to a JSON Schema converter. */
const ANY_OBJECT_SCHEMA = '{"type":"object"}';

/** response_format → the host's json_schema (JSON text), or undefined for plain text. */
function responseFormat(o: Record<string, unknown>): string | undefined {
  const rf = o.response_format;
  if (absent(rf)) return undefined;
  const accepted = `accepted are {"type": "text"}, {"type": "json_object"}, {"type": "json_schema", "json_schema": {"name", "schema"}}`;
  if (typeof rf !== "object" || Array.isArray(rf))
    throw invalid("response_format", `'response_format': ${show(rf)} is not an object: ${accepted}`);
  const { type, json_schema: js } = rf as { type?: unknown; json_schema?: unknown };
  if (type === "text") return undefined;
  if (type === "json_object") return ANY_OBJECT_SCHEMA;
  if (type !== "json_schema")
    throw invalid(
      "response_format.type",
      `'response_format.type': ${show(type)} is not one of text, json_object, json_schema`,
    );
  if (typeof js !== "object" || js === null || Array.isArray(js))
    throw invalid(
      "response_format.json_schema",
      `'response_format.json_schema': ${show(js)} is not an object {name, schema}`,
    );
  const { name, schema } = js as { name?: unknown; schema?: unknown };
  if (typeof name !== "string" || !/^[A-Za-z0-9_-]{1,64}$/.test(name))
    throw invalid(
      "response_format.json_schema.name",
      `'response_format.json_schema.name': ${show(name)} is not a name of 1-64 letters, digits, _ or -`,
    );
  if (absent(schema)) return ANY_OBJECT_SCHEMA;
  if (typeof schema !== "object" || Array.isArray(schema))
    throw invalid(
      "response_format.json_schema.schema",
      `'response_format.json_schema.schema': ${show(schema)} is not a JSON Schema object`,
    );
  return JSON.stringify(schema);
}

/** The sampling fields shared by chat completions, completions and session messages. */
const SAMPLING_FIELDS = [
  "max_tokens",
  "temperature",
  "top_p",
  "top_k",
  "min_p",
  "presence_penalty",
  "frequency_penalty",
  "repetition_penalty",
  "seed",
  "stop",
] as const;

function sampling(o: Record<string, unknown>, defaultMaxTokens: number): Sampling {
  const asked =
    int(o, "max_completion_tokens", MAX_TOKENS_RANGE[0], MAX_TOKENS_RANGE[1]) ??
    int(o, "max_tokens", MAX_TOKENS_RANGE[0], MAX_TOKENS_RANGE[1]);
  int(o, "n", 1, 128);
  const topK = int(o, "top_k", -1, 1 << 20);
  const stop = stopStrings(o);
  const s: Sampling = {
    max_tokens: asked ?? defaultMaxTokens,
    ...(asked !== undefined ? { max_tokens_asked: asked } : {}),
    temperature: num(o, "temperature", 0, 2),
    top_p: num(o, "top_p", 0, 1, true),
    // -1 (vLLM) and 0 (llama.cpp) both mean off
    top_k: topK === undefined || topK <= 0 ? undefined : topK,
    min_p: num(o, "min_p", 0, 1),
    presence_penalty: num(o, "presence_penalty", -2, 2),
    frequency_penalty: num(o, "frequency_penalty", -2, 2),
    repetition_penalty: num(o, "repetition_penalty", 0, 10, true),
    seed: int(o, "seed", 0, 2 ** 32 - 1),
    ...(stop ? { stop } : {}),
  };
  for (const k of Object.keys(s) as (keyof Sampling)[]) if (s[k] === undefined) delete s[k];
  return s;
}

/** Chat logprobs: `logprobs` (bool) and `top_logprobs` (0-20, needs logprobs). */
function chatLogprobs(o: Record<string, unknown>): Pick<Sampling, "logprobs" | "top_logprobs"> {
  const logprobs = bool(o, "logprobs", false);
  const top = int(o, "top_logprobs", 0, MAX_TOP_LOGPROBS);
  if (top !== undefined && !logprobs) throw invalid("top_logprobs", `'top_logprobs': ${top} needs 'logprobs': true`);
  return logprobs ? { logprobs: true, ...(top ? { top_logprobs: top } : {}) } : {};
}

function streamOptions(o: Record<string, unknown>): boolean {
  const so = o.stream_options;
  if (absent(so)) return false;
  if (typeof so !== "object" || Array.isArray(so))
    throw invalid("stream_options", `'stream_options': ${show(so)} is not an object`);
  const opts = so as Record<string, unknown>;
  for (const [k, v] of Object.entries(opts)) {
    if (k === "include_usage" || (k === "include_obfuscation" && (absent(v) || v === false))) continue;
    if (k === "include_obfuscation")
      throw unsupported(
        "stream_options.include_obfuscation",
        "'stream_options.include_obfuscation': true is not supported",
      );
    throw invalid(
      `stream_options.${k}`,
      `unknown field 'stream_options.${k}': accepted is include_usage`,
      "unknown_parameter",
    );
  }
  if (!absent(opts.include_usage) && o.stream !== true)
    throw invalid("stream_options", "'stream_options' is only allowed with 'stream': true");
  return bool(opts, "include_usage", false);
}

const ROLES: readonly Role[] = ["system", "user", "assistant"];
const MESSAGE_FIELDS = ["role", "content", "name", "tool_calls", "tool_call_id", "function_call", "refusal", "audio"];

function content(v: unknown, where: string): string {
  if (typeof v === "string") return v;
  // OpenAI's content parts: text only here.
  if (Array.isArray(v)) {
    return v
      .map((p, i) => {
        const type = typeof p === "object" && p !== null ? (p as { type?: unknown }).type : undefined;
        if (type === "text" && typeof (p as { text?: unknown }).text === "string") return (p as { text: string }).text;
        if (typeof type === "string" && type !== "text")
          throw unsupported(
            `${where}[${i}]`,
            `'${where}[${i}]': content parts of type ${show(type)} are not supported (text only)`,
          );
        throw invalid(`${where}[${i}]`, `'${where}[${i}]': ${show(p)} is not a text part {type: "text", text}`);
      })
      .join("");
  }
  throw invalid(where, `'${where}': ${show(v)} is not a string or an array of text parts`);
}

function turns(messages: unknown): Turn[] {
  if (!Array.isArray(messages) || messages.length === 0)
    throw invalid("messages", `'messages': ${show(messages)} is not a non-empty array of {role, content}`);
  const list = messages.map((m: unknown, i): Turn => {
    if (typeof m !== "object" || m === null || Array.isArray(m))
      throw invalid(`messages[${i}]`, `'messages[${i}]': ${show(m)} is not an object`);
    const msg = m as Record<string, unknown>;
    const { role } = msg;
    if (role === "tool" || role === "function")
      throw unsupported(`messages[${i}].role`, `'messages[${i}].role': ${show(role)}: tool calls are not supported`);
    const r = role === "developer" ? "system" : role;
    if (typeof r !== "string" || !(ROLES as readonly string[]).includes(r)) {
      throw invalid(
        `messages[${i}].role`,
        `'messages[${i}].role': ${show(role)} is not one of system, developer, user, assistant`,
      );
    }
    for (const [k, v] of Object.entries(msg)) {
      if (k === "role" || k === "content" || absent(v)) continue;
      const where = `messages[${i}].${k}`;
      if (k === "tool_calls" && Array.isArray(v) && v.length === 0) continue;
      if (!MESSAGE_FIELDS.includes(k))
        throw invalid(where, `unknown field '${where}': accepted are role, content`, "unknown_parameter");
      throw unsupported(where, `'${where}': ${show(v)} is not supported (the chat template gets role and content)`);
    }
    return { role: r as Role, content: content(msg.content, `messages[${i}].content`) };
  });
  if (list[list.length - 1]!.role !== "user")
    throw invalid("messages", "'messages': the last message must have role user");
  return list;
}

const CHAT_FIELDS = [
  "model",
  "messages",
  "stream",
  "stream_options",
  "max_completion_tokens",
  ...SAMPLING_FIELDS,
  "logprobs",
  "top_logprobs",
  "response_format",
  "kv_method",
  "kv_budget",
  "kv_cache",
];
const CHAT_REFUSED = [
  "n",
  "tools",
  "tool_choice",
  "functions",
  "function_call",
  "logit_bias",
  "audio",
  "modalities",
  "prediction",
  "web_search_options",
  "reasoning_effort",
  "verbosity",
  "service_tier",
  "store",
  "metadata",
  "prompt_cache_key",
  "prompt_cache_retention",
];

export function chatRequest(o: Record<string, unknown>): ChatRequest {
  const model = str(o, "model", true);
  const t = turns(o.messages);
  const s = sampling(o, DEFAULT_MAX_TOKENS);
  checkFields(o, CHAT_FIELDS, CHAT_REFUSED);
  const json = responseFormat(o);
  return {
    model,
    turns: t,
    stream: bool(o, "stream", false),
    includeUsage: streamOptions(o),
    kv: kvRequest(o),
    ...kvCache(o),
    sampling: { ...s, ...chatLogprobs(o), ...(json !== undefined ? { json_schema: json } : {}) },
  };
}

const COMPLETION_FIELDS = [
  "model",
  "prompt",
  "stream",
  "stream_options",
  ...SAMPLING_FIELDS,
  "logprobs",
  "kv_method",
  "kv_budget",
];
const COMPLETION_REFUSED = ["n", "echo", "suffix", "best_of", "logit_bias"];

function prompt(v: unknown): CompletionRequest["prompt"] {
  const isTokens = (x: unknown): x is number[] =>
    Array.isArray(x) && x.length > 0 && x.every((t) => typeof t === "number" && Number.isInteger(t) && t >= 0);
  const one = Array.isArray(v) && v.length === 1 && (typeof v[0] === "string" || isTokens(v[0])) ? v[0] : v;
  if (typeof one === "string") {
    if (one.length === 0) throw invalid("prompt", "'prompt' must not be empty");
    return { text: one };
  }
  if (isTokens(one)) return { tokens: one };
  if (Array.isArray(v) && v.length > 1 && v.every((x) => typeof x === "string" || isTokens(x)))
    throw unsupported("prompt", `'prompt': ${v.length} prompts: one prompt per request (send ${v.length} requests)`);
  if (absent(v))
    throw invalid("prompt", "'prompt' is required (a string or an array of token ids)", "missing_required_parameter");
  throw invalid("prompt", `'prompt': ${show(v)} is not a string or an array of token ids`);
}

export function completionRequest(o: Record<string, unknown>): CompletionRequest {
  const model = str(o, "model", true);
  const p = prompt(o.prompt);
  const s = sampling(o, DEFAULT_COMPLETION_MAX_TOKENS);
  checkFields(o, COMPLETION_FIELDS, COMPLETION_REFUSED);
  // The legacy API's logprobs: how many alternatives per token (0: the chosen token's only).
  const lp = int(o, "logprobs", 0, MAX_TOP_LOGPROBS);
  return {
    model,
    prompt: p,
    stream: bool(o, "stream", false),
    includeUsage: streamOptions(o),
    kv: kvRequest(o),
    sampling: { ...s, ...(lp !== undefined ? { logprobs: true, ...(lp > 0 ? { top_logprobs: lp } : {}) } : {}) },
  };
}

export function sessionRequest(o: Record<string, unknown>): SessionRequest {
  checkFields(o, ["model", "document", "system", "stream", "kv_method", "kv_budget", "kv_cache"], []);
  const document = str(o, "document", true);
  if (document.length === 0) throw invalid("document", "'document' must not be empty");
  return {
    model: str(o, "model") ?? ANY_MODEL,
    document,
    system: str(o, "system"),
    stream: bool(o, "stream", false),
    kv: kvRequest(o),
    ...kvCache(o),
  };
}

const MESSAGE_REQUEST_FIELDS = [
  "content",
  "stream",
  "stream_options",
  "max_completion_tokens",
  ...SAMPLING_FIELDS,
  "logprobs",
  "top_logprobs",
  "response_format",
];

export function messageRequest(o: Record<string, unknown>): MessageRequest {
  const c = content(
    o.content ??
      (() => {
        throw invalid("content", "'content' is required (the question, a string)", "missing_required_parameter");
      })(),
    "content",
  );
  if (c.length === 0) throw invalid("content", "'content' must not be empty");
  const s = sampling(o, DEFAULT_MAX_TOKENS);
  checkFields(o, MESSAGE_REQUEST_FIELDS, ["n"]);
  const json = responseFormat(o);
  return {
    content: c,
    stream: bool(o, "stream", true),
    includeUsage: streamOptions({ ...o, stream: bool(o, "stream", true) }),
    sampling: { ...s, ...chatLogprobs(o), ...(json !== undefined ? { json_schema: json } : {}) },
  };
}
