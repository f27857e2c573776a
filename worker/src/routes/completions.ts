// POST /v1/completions (OpenAI's legacy completions): a raw prompt — text or token ids, no chat
// template — on an ephemeral host session (closed by the host should the edge die first), with the
// same sampling as chat completions.
import { Hono } from "hono";

import { streamCompletion, wholeCompletion } from "../completion.js";
import type { AppEnv } from "../env.js";
import { withHost } from "../host-lease.js";
import { appendText, appendTokens, checkMaxTokens, modelId, openSession, randomId } from "../serve.js";
import { utf8Bytes } from "../chunking.js";
import { completionRequest, jsonBody, resolveKv } from "../validate.js";

export const completions = new Hono<AppEnv>();

completions.post("/completions", jsonBody(completionRequest), async (c) => {
  const req = c.req.valid("json");
  const kv = resolveKv(req.kv, c.get("tenantConfig"));
  c.set("kv", kv);
  const session = randomId("cmpl-");
  return withHost(c, { opens: session, ephemeral: true, model: req.model }, async (lease) => {
    checkMaxTokens(lease.link, req.sampling);
    // a token prompt's length bounds its tokens as the bytes of a text do
    const promptBytes = "text" in req.prompt ? utf8Bytes(req.prompt.text) : req.prompt.tokens.length;
    await openSession(c, lease.link, session, kv, { promptBytes, ephemeral: true });
    const append = { maxTokens: req.sampling.max_tokens_asked ?? 1, param: "prompt" };
    const appended =
      "text" in req.prompt
        ? await appendText(c.env, lease.link, session, req.prompt.text, append)
        : await appendTokens(lease.link, session, req.prompt.tokens, append);
    const job = {
      lease,
      session,
      model: modelId(lease.link.hello.model),
      format: "text" as const,
      promptTokens: appended.tokens_seen,
      sampling: req.sampling,
      includeUsage: req.includeUsage,
    };
    return req.stream ? streamCompletion(job) : c.json(await wholeCompletion(job));
  });
});
