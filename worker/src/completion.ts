// An answer in OpenAI's chat completion format, streamed (chat.completion.chunk frames, then
// `data: [DONE]`) or whole (chat.completion with usage). Shared by /v1/chat/completions and
// /v1/sessions/{id}/messages. The prompt is already prefilled; this runs the generation on the
// lease's link (the lease is ended by the stream, or by withHost for a whole answer).
import type { HostMessage } from "@pyramidkv/shared";

import type { HostLease } from "./host-lease.js";
import { finishReason, generate, randomId } from "./serve.js";
import type { Sampling } from "./validate.js";

export interface CompletionJob {
  /** the host link, held until the generation ends (host-lease.ts) */
  lease: HostLease;
  session: string;
  model: string;
  promptTokens: number;
  sampling: Sampling;
  includeUsage: boolean;
  /** runs when the generation ends, however it ends (e.g. recording whether the turn was left open) */
  after?: (done: HostMessage<"done"> | undefined) => Promise<unknown>;
  /** extra top-level fields of every chunk / the completion (e.g. session) */
  extra?: Record<string, unknown>;
}

const usageOf = (job: CompletionJob, done: HostMessage<"done">) => ({
  prompt_tokens: job.promptTokens,
  completion_tokens: done.new_tokens,
  total_tokens: job.promptTokens + done.new_tokens,
});

export function streamCompletion(job: CompletionJob): Response {
  const id = randomId("chatcmpl-");
  const created = Math.floor(Date.now() / 1000);
  const chunk = (delta: Record<string, unknown>, finish: string | null) => ({
    id,
    object: "chat.completion.chunk",
    created,
    model: job.model,
    ...job.extra,
    choices: [{ index: 0, delta, logprobs: null, finish_reason: finish }],
  });
  // The client going away ends the lease, which closes the link: that cancels the generation on the host.
  return job.lease.sse(async (sse) => {
    let done: HostMessage<"done"> | undefined;
    try {
      sse.data(chunk({ role: "assistant", content: "" }, null));
      done = await generate(job.lease.link, job.session, job.sampling, (text) =>
        sse.data(chunk({ content: text }, null)),
      );
      sse.data(chunk({}, finishReason(done.reason)));
      if (job.includeUsage)
        sse.data({
          id,
          object: "chat.completion.chunk",
          created,
          model: job.model,
          ...job.extra,
          choices: [],
          usage: usageOf(job, done),
        });
      sse.done();
    } finally {
      await job.after?.(done);
    }
  });
}

export async function wholeCompletion(job: CompletionJob): Promise<Record<string, unknown>> {
  let text = "";
  let done: HostMessage<"done"> | undefined;
  try {
    done = await generate(job.lease.link, job.session, job.sampling, (t) => (text += t));
  } finally {
    await job.after?.(done);
  }
  return {
    id: randomId("chatcmpl-"),
    object: "chat.completion",
    created: Math.floor(Date.now() / 1000),
    model: job.model,
    ...job.extra,
    choices: [
      {
        index: 0,
        message: { role: "assistant", content: text, refusal: null },
        logprobs: null,
        finish_reason: finishReason(done.reason),
      },
    ],
    usage: usageOf(job, done),
  };
}
