// The host conversations every route is made of: open a link for a tenant (its KV quota passed to
// the host), send a long text or a conversation in acknowledged pieces with progress, stream a
// generation.
import type { FromHostMessage, HostMessage } from "@pyramidkv/shared";
import type { Context } from "hono";

import type { Turn } from "./chat.js";
import { hostMessages } from "./chat.js";
import { splitText, utf8Bytes } from "./chunking.js";
import type { AppEnv, Env } from "./env.js";
import { intVar } from "./env.js";
import { ApiError, contextExceeded } from "./errors.js";
import type { HostLink } from "./host-link.js";
import { DEFAULT_LIMITS, type TenantConfig } from "./tenant.js";
import type { KvSettings, Sampling } from "./validate.js";

export { modelId } from "./routing.js";

export interface OpenOptions {
  /** UTF-8 bytes of the first append's content: an upper bound of its tokens, for the host's admission */
  promptBytes: number;
  /** the host closes the session when this link closes (a chat completion's: nothing outlives a dead edge) */
  ephemeral?: boolean;
  /** start from a copy of this cached state (prompt-cache.ts): the host answers cache_miss when it has none */
  fromCache?: string;
}

/** Open a session on the host with these KV settings; the response headers echo what the host granted. */
export async function openSession(c: Context<AppEnv>, link: HostLink, session: string, kv: KvSettings, o: OpenOptions) {
  const opened = await link.call(
    {
      type: "open_session",
      session,
      method: kv.method,
      budget: kv.budget,
      prompt_bytes: o.promptBytes,
      ...(o.ephemeral ? { ephemeral: true } : {}),
      ...(o.fromCache !== undefined ? { from_cache: o.fromCache } : {}),
    },
    "opened",
  );
  c.set("kv", { method: opened.method, budget: opened.budget });
  return opened;
}

export const DEFAULT_PIECE_BYTES = 65536;
/** host-side sessions per tenant: the edge counts sessions itself; this only bounds a runaway */
const HOST_MAX_SESSIONS = 100_000;

export type Progress =
  | { phase: "upload"; done: number; total: number; unit: "bytes" }
  | { phase: "prefill"; done: number; total: number; unit: "tokens" };

/** Passes the tenant's KV quota, policy, session TTL and stored-state bound to the host the link reaches. */
export async function applyTenant(link: HostLink, cfg: TenantConfig | null): Promise<void> {
  await link.call(
    {
      type: "set_tenant",
      kv_quota_bytes: cfg?.kv_quota_bytes ?? DEFAULT_LIMITS.kv_quota_bytes,
      max_sessions: HOST_MAX_SESSIONS,
      policy: cfg?.policy ?? DEFAULT_LIMITS.policy,
      // the host's idle sweep uses the same TTL as the edge's alarm (tenant.ts)
      session_ttl_s: cfg?.session_ttl_s ?? DEFAULT_LIMITS.session_ttl_s,
      ...(cfg?.max_stored_bytes !== undefined ? { max_stored_bytes: cfg.max_stored_bytes } : {}),
    },
    "tenant_set",
  );
}

/** open_session.prompt_bytes of a conversation: the UTF-8 bytes of its messages' content. */
export const turnsBytes = (turns: Turn[]): number => turns.reduce((n, t) => n + utf8Bytes(t.content), 0);

/**
 * max_tokens alone beyond the host's context: refused at once, before anything is sent (the prompt
 * plus max_tokens is the host's check, before its prefill).
 */
export function checkMaxTokens(link: HostLink, s: Sampling, param = "max_tokens"): void {
  const asked = s.max_tokens_asked;
  if (asked !== undefined && asked >= link.hello.n_ctx)
    throw contextExceeded(
      `This model's maximum context length is ${link.hello.n_ctx} tokens. However, you requested ${asked} tokens for the completion alone (the prompt needs some too). Please reduce max_tokens.`,
      param,
    );
}

export interface AppendOptions {
  /** the tokens the next generate may add: the host refuses the append (context) before prefilling when they do not fit */
  maxTokens?: number;
  /** the request field a context error is about */
  param: string;
  onProgress?: (p: Progress) => void;
}

/** A host context_full names the request's own field. */
async function naming<T>(param: string, p: Promise<T>): Promise<T> {
  try {
    return await p;
  } catch (e) {
    if (e instanceof ApiError && e.code === "context_length_exceeded" && e.param === null)
      throw contextExceeded(e.message, param);
    throw e;
  }
}

/**
 * Sends `text` (its last piece with `final`'s other fields): pieces of at most PKV_PIECE_BYTES sent
 * one at a time, each after the host acknowledged the previous one ('buffered'), then the last,
 * whose prefill reports 'progress' frames. Upload and prefill progress go to onProgress.
 */
async function sendInPieces(
  env: Env,
  link: HostLink,
  session: string,
  text: string,
  final: (lastPiece: string) => Record<string, unknown>,
  o: AppendOptions,
): Promise<HostMessage<"appended">> {
  const pieces = splitText(text, intVar(env.PKV_PIECE_BYTES, DEFAULT_PIECE_BYTES));
  const total = utf8Bytes(text);
  for (let i = 0; i < pieces.length - 1; i++) {
    const ack = await link.call({ type: "append", session, text: pieces[i]!, more: true }, "buffered");
    o.onProgress?.({ phase: "upload", done: ack.buffered_bytes, total, unit: "bytes" });
  }
  if (pieces.length > 1) o.onProgress?.({ phase: "upload", done: total, total, unit: "bytes" }); // the last piece, sent with the prefill request
  return naming(
    o.param,
    link.call(
      {
        type: "append",
        session,
        ...final(pieces[pieces.length - 1] ?? ""),
        ...(o.maxTokens !== undefined ? { max_tokens: o.maxTokens } : {}),
      } as Parameters<HostLink["call"]>[0],
      "appended",
      (f) => {
        if (f.type === "progress") o.onProgress?.({ phase: "prefill", done: f.done, total: f.total, unit: "tokens" });
      },
    ),
  );
}

/** Appends raw text (no template): a completion's prompt. */
export function appendText(
  env: Env,
  link: HostLink,
  session: string,
  text: string,
  o: AppendOptions,
): Promise<HostMessage<"appended">> {
  return sendInPieces(env, link, session, text, (last) => ({ text: last }), o);
}

/** Appends token ids (no template): a completion's prompt given as tokens. */
export function appendTokens(
  link: HostLink,
  session: string,
  tokens: number[],
  o: AppendOptions,
): Promise<HostMessage<"appended">> {
  const maxTokens = o.maxTokens !== undefined ? { max_tokens: o.maxTokens } : {};
  return naming(o.param, link.call({ type: "append", session, tokens, ...maxTokens }, "appended"));
}

/**
 * Appends turns, rendered by the engine with the model's template (after the session's earlier
 * turns). The last turn's content goes up in pieces when it is long (the host's buffered pieces
 * begin the last message's content, host protocol 2.1); `generationPrompt` opens the assistant's
 * turn after them.
 */
export function appendTurns(
  env: Env,
  link: HostLink,
  session: string,
  turns: Turn[],
  generationPrompt: boolean,
  o: AppendOptions,
): Promise<HostMessage<"appended">> {
  const messages = hostMessages(turns);
  const last = turns[turns.length - 1]!;
  return sendInPieces(
    env,
    link,
    session,
    last.content,
    (piece) => ({
      messages: [...messages.slice(0, -1), { role: last.role, content: piece }],
      add_generation_prompt: generationPrompt,
    }),
    o,
  );
}

/**
 * Stores an immutable copy of the session's state, as it is after its pending work, under `key`
 * (host protocol 3.1): in the host's snapshot memory and the edge's store (cache/<tenant>/<key>).
 * Over `maxBytes` the host answers too_large and stores nothing.
 */
export function snapshot(
  link: HostLink,
  session: string,
  key: string,
  maxBytes?: number,
): Promise<HostMessage<"snapshotted">> {
  return link.call(
    { type: "snapshot", session, key, ...(maxBytes !== undefined ? { max_bytes: maxBytes } : {}) },
    "snapshotted",
  );
}

/** One generated token's log-probabilities as the host sends them (host protocol 2.1, token.logprobs). */
export interface TokenLogprob {
  logprob: number;
  bytes: Uint8Array;
  top_logprobs?: { token: number; bytes: Uint8Array; logprob: number }[];
}

/** The generate frame's sampling fields. */
export function generateFields(s: Sampling): Record<string, unknown> {
  const { max_tokens_asked: _, ...fields } = s;
  return fields;
}

/** Streams a generation: onText for each piece of text (with its tokens' logprobs when asked), resolves with 'done'. */
export function generate(
  link: HostLink,
  session: string,
  s: Sampling,
  onText: (text: string, logprobs: TokenLogprob[]) => void,
): Promise<HostMessage<"done">> {
  return link.call(
    { type: "generate", session, ...generateFields(s) } as Parameters<HostLink["call"]>[0],
    "done",
    (f: FromHostMessage) => {
      if (f.type !== "token") return;
      const lp = (f.logprobs ?? []) as unknown as TokenLogprob[];
      if (f.text !== "" || lp.length > 0) onText(f.text, lp);
    },
  );
}

/** The engine's reason → OpenAI's finish_reason. */
export function finishReason(reason: string): "stop" | "length" {
  return reason === "length" ? "length" : "stop";
}

export function randomId(prefix: string): string {
  const b = crypto.getRandomValues(new Uint8Array(12));
  return `${prefix}${[...b].map((x) => x.toString(16).padStart(2, "0")).join("")}`;
}
