// An answer in OpenAI's chat completion format, streamed (chat.completion.chunk frames, then
// `data: [DONE]`) or whole (chat.completion with usage). Shared by /v1/chat/completions and
// /v1/sessions/{id}/messages. The prompt is already prefilled; this runs the generation.
import type { HostMessage } from "@pyramidkv/shared";

import type { HostLink } from "./host-link.js";
import { finishReason, generate, randomId } from "./serve.js";
import { sseResponse } from "./sse.js";
import type { Sampling } from "./validate.js";

export interface CompletionJob {
  link: HostLink;
  session: string;
  model: string;
  promptTokens: number;
  sampling: Sampling;
  includeUsage: boolean;
  /** runs after the generation (success or not), e.g. closing an ephemeral session */
  after: (done: HostMessage<"done"> | undefined, error: unknown) => Promise<void>;
  /** the client went away mid-stream (default: close the link, which cancels on the host) */
  onCancel?: () => void;
  /** the client's request: its signal aborts when the client disconnects */
  signal?: AbortSignal;
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
  return sseResponse(
    async (sse) => {
      let done: HostMessage<"done"> | undefined;
      try {
        sse.data(chunk({ role: "assistant", content: "" }, null));
        done = await generate(job.link, job.session, job.sampling, (text) => sse.data(chunk({ content: text }, null)));
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
      } catch (e) {
        await job.after(done, e);
        throw e;
      }
      await job.after(done, undefined);
    },
    () => {
      // The client went away: closing the link cancels the generation on the host.
      if (job.onCancel) job.onCancel();
      else job.link.close();
    },
    job.signal,
  );
}

export async function wholeCompletion(job: CompletionJob): Promise<Record<string, unknown>> {
  let text = "";
  let done: HostMessage<"done">;
  try {
    done = await generate(job.link, job.session, job.sampling, (t) => (text += t));
  } catch (e) {
    await job.after(undefined, e);
    throw e;
  }
  await job.after(done, undefined);
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
