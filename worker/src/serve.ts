// The host conversations every route is made of: open a link for a tenant (its KV quota passed to
// the host), send a long text in acknowledged pieces with progress, stream a generation.
import type { FromHostMessage, HostMessage } from "@pyramidkv/shared";

import { splitText, utf8Bytes } from "./chunking.js";
import type { Env } from "./env.js";
import { intVar } from "./env.js";
import type { HostLink } from "./host-link.js";
import { DEFAULT_LIMITS, type TenantConfig } from "./tenant.js";
import type { Sampling } from "./validate.js";

export const DEFAULT_PIECE_BYTES = 65536;
/** host-side sessions per tenant: the edge counts sessions itself; this only bounds a runaway */
const HOST_MAX_SESSIONS = 100_000;

export type Progress =
  | { phase: "upload"; done: number; total: number; unit: "bytes" }
  | { phase: "prefill"; done: number; total: number; unit: "tokens" };

export const modelId = (file: string) => file.replace(/\.gguf$/i, "");

/** Passes the tenant's KV quota and policy to the host the link reaches. */
export async function applyTenant(link: HostLink, cfg: TenantConfig | null): Promise<void> {
  await link.call(
    {
      type: "set_tenant",
      kv_quota_bytes: cfg?.kv_quota_bytes ?? DEFAULT_LIMITS.kv_quota_bytes,
      max_sessions: HOST_MAX_SESSIONS,
      policy: cfg?.policy ?? DEFAULT_LIMITS.policy,
    },
    "tenant_set",
  );
}

// open_session carries no prompt_tokens hint: the host accounts the first append's peak when the
// append arrives (bounded by its UTF-8 bytes); a hint would be reserved on top of that.

/**
 * Appends `text` to a session: pieces of at most PKV_PIECE_BYTES sent one at a time, each after
 * the host acknowledged the previous one ('buffered'), then the last piece, whose prefill reports
 * 'progress' frames. Upload and prefill progress go to onProgress.
 */
export async function appendText(
  env: Env,
  link: HostLink,
  session: string,
  text: string,
  onProgress?: (p: Progress) => void,
): Promise<HostMessage<"appended">> {
  const pieces = splitText(text, intVar(env.PKV_PIECE_BYTES, DEFAULT_PIECE_BYTES));
  const total = utf8Bytes(text);
  let sent = 0;
  for (let i = 0; i < pieces.length - 1; i++) {
    const ack = await link.call({ type: "append", session, text: pieces[i]!, more: true }, "buffered");
    sent = ack.buffered_bytes;
    onProgress?.({ phase: "upload", done: sent, total, unit: "bytes" });
  }
  if (pieces.length > 1) onProgress?.({ phase: "upload", done: total, total, unit: "bytes" }); // the last piece, sent with the prefill request
  return link.call({ type: "append", session, text: pieces[pieces.length - 1] ?? "" }, "appended", (f) => {
    if (f.type === "progress") onProgress?.({ phase: "prefill", done: f.done, total: f.total, unit: "tokens" });
  });
}

/** Streams a generation: onText for each piece of text, resolves with 'done'. */
export function generate(
  link: HostLink,
  session: string,
  s: Sampling,
  onText: (text: string) => void,
): Promise<HostMessage<"done">> {
  return link.call(
    {
      type: "generate",
      session,
      max_tokens: s.max_tokens,
      ...(s.temperature !== undefined ? { temperature: s.temperature } : {}),
      ...(s.top_p !== undefined ? { top_p: s.top_p } : {}),
      ...(s.seed !== undefined ? { seed: s.seed } : {}),
      ...(s.stop ? { stop: s.stop } : {}),
    },
    "done",
    (f: FromHostMessage) => {
      if (f.type === "token" && f.text !== "") onText(f.text);
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
