// Tenants and their KV quotas. A tenant's usage is the sum of what its resident sessions account
// (account.ts decides what a session accounts, admission.ts whether it fits); this module owns the
// limits and the arithmetic. Everything in host/ that depends on the compression method (whether
// it compresses, its smallest budget, the defaults) is in this file, read from the shared table.
import { ENGINE_DEFAULTS, methodInfo, minBudget } from "@pyramidkv/shared";

import type { KvType, TenantLimits } from "./config.js";

export interface TenantView extends TenantLimits {
  name: string;
}

export class Tenants {
  private readonly limits = new Map<string, TenantLimits>();

  constructor(
    configured: Record<string, TenantLimits>,
    private readonly defaults: TenantLimits,
    private readonly poolBytes: number,
  ) {
    for (const [name, l] of Object.entries(configured)) this.limits.set(name, { ...l });
  }

  /** A tenant's limits (the defaults for an unconfigured one). Quota 0 is no quota of its own: the
   * pool bounds it, and its admission may offload another tenant's idle sessions only while that
   * tenant holds more than its fair share of the pool (admission.ts), else pool_full. */
  get(name: string): TenantView {
    const l = this.limits.get(name) ?? this.defaults;
    return { name, ...l, kvQuotaBytes: l.kvQuotaBytes === 0 ? this.poolBytes : l.kvQuotaBytes };
  }

  /** set_tenant from the edge: absent fields keep their value. */
  set(name: string, patch: Partial<TenantLimits>): TenantView {
    const cur = this.limits.get(name) ?? { ...this.defaults };
    this.limits.set(name, {
      kvQuotaBytes: patch.kvQuotaBytes ?? cur.kvQuotaBytes,
      maxSessions: patch.maxSessions ?? cur.maxSessions,
      policy: patch.policy ?? cur.policy,
      sessionTtlS: patch.sessionTtlS ?? cur.sessionTtlS,
      maxStoredBytes: patch.maxStoredBytes ?? cur.maxStoredBytes,
    });
    return this.get(name);
  }
}

// The defaults of open_session's and generate's absent fields (method, budget, window, chunk size,
// max_tokens) and what each method is (compresses, min_budget) come from the engine's table in
// @pyramidkv/shared, which gpu-host/test/engine-methods.test.ts proves equal to the engine's own.

/** KV slots per pool page of an engine whose hello predates `page_slots` (protocol 2.0). */
const PAGE_SLOTS_2_0 = 16;

/** The KV geometry admission needs, from the engine's hello and stats. */
export interface KvGeometry {
  nLayer: number;
  /** bytes of one KV entry of one layer: 2 (K, V) x n_head_kv x head_dim x 2 (f16) */
  bytesPerEntry: number;
  /** the engine's chunked-prefill chunk (tokens) */
  chunkSize: number;
}

// Bytes of 32 values of one row in each KV storage type: ggml's blocks (f16: 2 bytes a value;
// q8_0: a 2-byte scale + 32 one-byte values; q4_0: a 2-byte scale + 32 four-bit values).
const BLOCK_BYTES: Record<KvType, number> = { f16: 64, q8_0: 34, q4_0: 18 };

/** Bytes of one entry of one layer stored as `type`, from the f16 entry's bytes, before the
 * engine's stats of a session of that type say the exact size (rounded up: never under). */
export function bytesPerEntryOf(f16BytesPerEntry: number, type: KvType): number {
  return Math.ceil((f16BytesPerEntry * BLOCK_BYTES[type]) / BLOCK_BYTES.f16);
}

/** Bytes of one entry of one layer measured from an engine stats_result: the session's kv_bytes
 * over its entries (every layer's length), else FullKV's bytes over tokens_seen x layers; 0 when
 * the stats hold no entry yet. */
export function measuredBytesPerEntry(
  st: { kv_bytes?: number; layer_kv_lengths?: number[]; full_kv_bytes?: number; tokens_seen?: number },
  nLayer: number,
): number {
  const entries = st.layer_kv_lengths?.reduce((a, b) => a + b, 0) ?? 0;
  if (entries > 0 && st.kv_bytes) return Math.round(st.kv_bytes / entries);
  if (st.full_kv_bytes && st.tokens_seen) return Math.round(st.full_kv_bytes / (st.tokens_seen * nLayer));
  return 0;
}

/** The geometry before the first stats: one entry of one layer estimated as page_bytes / 16. */
export function geometryFromHello(
  h: { n_layer: number; page_bytes: number; page_slots?: number },
  chunkSize?: number,
): KvGeometry {
  return {
    nLayer: h.n_layer,
    bytesPerEntry: Math.floor(h.page_bytes / (h.page_slots ?? PAGE_SLOTS_2_0)),
    chunkSize: chunkSize ?? ENGINE_DEFAULTS.chunk_size,
  };
}

/** Template tokens around one chat message, and the opening/closing of a conversation (a default
 * system turn, a generation prompt), bounded generously: the admission bound, not a count. */
const TEMPLATE_TOKENS_PER_MESSAGE = 16;
const TEMPLATE_TOKENS_PER_APPEND = 64;

/** Upper bound on the tokens of an append before tokenising: a token is at least one byte of
 * text, plus the chat template's wrapping. */
export function appendTokenBound(
  text: string | undefined,
  tokens: number[] | undefined,
  chat: boolean | undefined,
  messages?: Record<string, unknown>[],
): number {
  const rendered =
    messages === undefined
      ? 0
      : TEMPLATE_TOKENS_PER_APPEND +
        messages.reduce(
          (n, m) =>
            n +
            TEMPLATE_TOKENS_PER_MESSAGE +
            Buffer.byteLength(String(m.role ?? ""), "utf8") +
            Buffer.byteLength(String(m.content ?? ""), "utf8"),
          0,
        );
  return (
    (text === undefined ? 0 : Buffer.byteLength(text, "utf8") + (chat ? 16 : 1)) + (tokens?.length ?? 0) + rendered + 1
  );
}

/** Extra KV bytes while `newTokens` are prefilled on top of the kept entries: a compressing
 * method holds at most one chunk of uncompressed entries in every layer before it compresses it;
 * FullKV keeps every prefilled token, so all of them, up to `room` (n_ctx - tokens seen: the
 * engine never holds more). `method` absent: a compressing one. */
export function prefillPeakBytes(
  g: KvGeometry,
  newTokens: number,
  method?: string,
  room: number = Number.POSITIVE_INFINITY,
): number {
  const keepsEvery = method !== undefined && !methodInfo(method).compresses;
  const inFlight = keepsEvery || g.chunkSize <= 0 ? newTokens : Math.min(newTokens, g.chunkSize);
  return g.nLayer * Math.max(0, Math.min(inFlight, room)) * g.bytesPerEntry;
}

/** Extra KV bytes while a generate runs: up to `maxTokens` new entries in every layer. */
export function generatePeakBytes(g: KvGeometry, maxTokens: number): number {
  return g.nLayer * maxTokens * g.bytesPerEntry;
}

/** Upper bound on the tokens of a session's first append, from open_session's hints: the larger of
 * `prompt_tokens` and `prompt_bytes` (UTF-8 bytes of its content: a token is at least one byte)
 * with the chat template's wrapping, capped at the context `nCtx`; 0 without hints. */
export function promptTokenBound(
  promptTokens: number | undefined,
  promptBytes: number | undefined,
  nCtx: number,
): number {
  const fromBytes = promptBytes === undefined || promptBytes === 0 ? 0 : promptBytes + TEMPLATE_TOKENS_PER_APPEND;
  return Math.min(Math.max(promptTokens ?? 0, fromBytes), nCtx);
}

/** Bytes a session reserves at open: its first append's peak, budget + min(prompt, chunk) entries
 * per layer (FullKV: the prompt itself). With no prompt hint that is the budget alone. */
export function openReservationBytes(g: KvGeometry, method: string, budget: number, promptTokens: number): number {
  const inFlight = g.chunkSize > 0 ? Math.min(promptTokens, g.chunkSize) : promptTokens;
  const entries = methodInfo(method).compresses ? budget + inFlight : promptTokens;
  return g.nLayer * entries * g.bytesPerEntry;
}

/** Largest budget whose reservation fits `freeBytes`, or 0 when not even the method's smallest
 * budget (above the window, and its own minimum) fits. */
export function largestBudgetThatFits(
  g: KvGeometry,
  method: string,
  promptTokens: number,
  freeBytes: number,
  window: number,
): number {
  const inFlight = Math.min(promptTokens, g.chunkSize > 0 ? g.chunkSize : promptTokens);
  const perLayer = Math.floor(freeBytes / (g.nLayer * g.bytesPerEntry));
  const budget = perLayer - inFlight;
  return budget >= minBudget(method, window) ? budget : 0;
}

/** Policy auto at open_session: the largest budget whose reservation fits `freeBytes`, and that
 * reservation; null when there is nothing to shrink (FullKV keeps every entry) or not even
 * window + 1 entries fit. */
export function autoBudget(
  g: KvGeometry,
  method: string,
  promptTokens: number,
  window: number,
  freeBytes: number,
): { budget: number; reservation: number } | null {
  if (!methodInfo(method).compresses) return null;
  const budget = largestBudgetThatFits(g, method, promptTokens, freeBytes, window);
  if (budget === 0) return null;
  return { budget, reservation: openReservationBytes(g, method, budget, promptTokens) };
}
