// An answer in OpenAI's formats, streamed (chunks, then `data: [DONE]`) or whole (with usage):
// chat (chat.completion / chat.completion.chunk; /v1/chat/completions and
// /v1/sessions/{id}/messages) or text (text_completion; /v1/completions). The prompt is already
// prefilled; this runs the generation on the lease's link (the lease is ended by the stream, or by
// withHost for a whole answer). Streamed and whole answers are built from the same token frames,
// so they carry the same text; the usage adds the session's KV bytes vs FullKV. `answered` runs
// between the last token and the end of the response (the prompt cache stores the turn there, so
// that the next turn, sent after this response, finds it).
import type { HostMessage } from "@pyramidkv/shared";

import type { HostLease } from "./host-lease.js";
import { finishReason, generate, randomId, type TokenLogprob } from "./serve.js";
import type { Sampling } from "./validate.js";

export interface CompletionJob {
  /** the host link, held until the generation ends (host-lease.ts) */
  lease: HostLease;
  session: string;
  model: string;
  /** chat (messages) or text (/v1/completions) */
  format?: "chat" | "text";
  promptTokens: number;
  /** the prompt tokens the session started with, copied from the prompt cache (chat usage: prompt_tokens_details) */
  cachedTokens?: number;
  sampling: Sampling;
  includeUsage: boolean;
  /** runs when the generation ends, however it ends */
  after?: (done: HostMessage<"done"> | undefined) => Promise<unknown>;
  /**
   * runs after the generation's done, before the finish chunk (stream) or the body, with the
   * answer's text exactly as the client receives it; it must not throw (its failure is its own)
   */
  answered?: (answer: string, done: HostMessage<"done">) => Promise<void>;
  /** extra top-level fields of every chunk / the completion (e.g. session) */
  extra?: Record<string, unknown>;
}

const utf8 = new TextDecoder();
const bytesOf = (b: Uint8Array) => [...b];
/** A token's text: its bytes as UTF-8 (a token holding part of a character shows U+FFFD, as OpenAI's do). */
const tokenText = (b: Uint8Array) => utf8.decode(b);

/** Chat logprobs of some tokens (OpenAI: choices[].logprobs.content). */
export function chatLogprobs(lp: TokenLogprob[]) {
  return lp.map((t) => ({
    token: tokenText(t.bytes),
    logprob: t.logprob,
    bytes: bytesOf(t.bytes),
    top_logprobs: (t.top_logprobs ?? []).map((a) => ({
      token: tokenText(a.bytes),
      logprob: a.logprob,
      bytes: bytesOf(a.bytes),
    })),
  }));
}

/** The legacy completions' logprobs of some tokens, their text offsets counted from `offset`. */
export function textLogprobs(lp: TokenLogprob[], offset: number) {
  const offsets: number[] = [];
  let at = offset;
  for (const t of lp) {
    offsets.push(at);
    at += tokenText(t.bytes).length;
  }
  return {
    tokens: lp.map((t) => tokenText(t.bytes)),
    token_logprobs: lp.map((t) => t.logprob),
    top_logprobs: lp.map((t) => Object.fromEntries((t.top_logprobs ?? []).map((a) => [tokenText(a.bytes), a.logprob]))),
    text_offset: offsets,
  };
}

async function usageOf(job: CompletionJob, done: HostMessage<"done">) {
  // The session's KV after the answer: what the compression holds vs what FullKV would.
  const st = await job.lease.link.call({ type: "stats", session: job.session }, "stats_result").catch(() => undefined);
  return {
    prompt_tokens: job.promptTokens,
    completion_tokens: done.new_tokens,
    total_tokens: job.promptTokens + done.new_tokens,
    ...(job.format !== "text" ? { prompt_tokens_details: { cached_tokens: job.cachedTokens ?? 0 } } : {}),
    ...(st?.kv_bytes !== undefined ? { kv_bytes: st.kv_bytes } : {}),
    ...(st?.full_kv_bytes !== undefined ? { full_kv_bytes: st.full_kv_bytes } : {}),
  };
}

function names(job: CompletionJob) {
  return job.format === "text"
    ? { prefix: "cmpl-", object: "text_completion", chunk: "text_completion" }
    : { prefix: "chatcmpl-", object: "chat.completion", chunk: "chat.completion.chunk" };
}

export function streamCompletion(job: CompletionJob): Response {
  const n = names(job);
  const id = randomId(n.prefix);
  const created = Math.floor(Date.now() / 1000);
  const text = job.format === "text";
  const wantLogprobs = job.sampling.logprobs === true;
  const frame = (choices: unknown[], more: Record<string, unknown> = {}) => ({
    id,
    object: n.chunk,
    created,
    model: job.model,
    ...job.extra,
    choices,
    ...more,
  });
  let offset = 0;
  /** A chunk's choice: `delta` (chat) or `text`, with the logprobs of its tokens when asked. */
  const choice = (delta: { role?: string; content?: string }, lp: TokenLogprob[] | null, finish: string | null) => {
    const piece = delta.content ?? "";
    const logprobs =
      lp === null || !wantLogprobs
        ? null
        : text
          ? textLogprobs(lp, offset)
          : { content: chatLogprobs(lp), refusal: null };
    offset += piece.length;
    return text
      ? { index: 0, text: piece, logprobs, finish_reason: finish }
      : { index: 0, delta, logprobs, finish_reason: finish };
  };
  // The client going away ends the lease, which closes the link: that cancels the generation on the host.
  return job.lease.sse(async (sse) => {
    let done: HostMessage<"done"> | undefined;
    let answer = "";
    try {
      if (!text) sse.data(frame([choice({ role: "assistant", content: "" }, null, null)]));
      done = await generate(job.lease.link, job.session, job.sampling, (t, lp) => {
        answer += t;
        sse.data(frame([choice({ content: t }, lp, null)]));
      });
      await job.answered?.(answer, done);
      sse.data(frame([choice({}, null, finishReason(done.reason))]));
      if (job.includeUsage) sse.data(frame([], { usage: await usageOf(job, done) }));
      sse.done();
    } finally {
      await job.after?.(done);
    }
  });
}

export async function wholeCompletion(job: CompletionJob): Promise<Record<string, unknown>> {
  const n = names(job);
  let text = "";
  const lps: TokenLogprob[] = [];
  let done: HostMessage<"done"> | undefined;
  let usage: Awaited<ReturnType<typeof usageOf>> | undefined;
  try {
    done = await generate(job.lease.link, job.session, job.sampling, (t, lp) => {
      text += t;
      lps.push(...lp);
    });
    await job.answered?.(text, done);
    usage = await usageOf(job, done);
  } finally {
    await job.after?.(done);
  }
  const wantLogprobs = job.sampling.logprobs === true;
  const finish = finishReason(done.reason);
  const choice =
    job.format === "text"
      ? { index: 0, text, logprobs: wantLogprobs ? textLogprobs(lps, 0) : null, finish_reason: finish }
      : {
          index: 0,
          message: { role: "assistant", content: text, refusal: null },
          logprobs: wantLogprobs ? { content: chatLogprobs(lps), refusal: null } : null,
          finish_reason: finish,
        };
  return {
    id: randomId(n.prefix),
    object: n.object,
    created: Math.floor(Date.now() / 1000),
    model: job.model,
    ...job.extra,
    choices: [choice],
    usage,
  };
}
