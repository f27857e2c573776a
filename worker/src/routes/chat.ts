// POST /v1/chat/completions (OpenAI-compatible) and GET /v1/models. A chat completion is an
// ephemeral host session: opened on the host with the most free KV, the whole conversation
// appended as one ChatML prompt (one prefill, compressed once with kv_method/kv_budget),
// generated, closed.
import { Hono } from "hono";

import { renderPrompt } from "../chat.js";
import { streamCompletion, wholeCompletion } from "../completion.js";
import type { AppEnv } from "../env.js";
import { noHost } from "../errors.js";
import { withHost } from "../host-lease.js";
import { rankHosts } from "../routing.js";
import { appendText, modelId, randomId } from "../serve.js";
import { chatRequest, jsonBody } from "../validate.js";

export const chat = new Hono<AppEnv>();

chat.post("/chat/completions", jsonBody(chatRequest), async (c) => {
  const req = c.req.valid("json");
  const session = randomId("chat-");
  // The session is closed on the host after the answer, and when anything fails or the client leaves.
  return withHost(c, { opens: session, ephemeral: true }, async (lease) => {
    await lease.link.call({ type: "open_session", session, method: req.kv.method, budget: req.kv.budget }, "opened");
    const appended = await appendText(c.env, lease.link, session, renderPrompt(req.turns));
    const job = {
      lease,
      session,
      model: req.model,
      promptTokens: appended.tokens_seen,
      sampling: req.sampling,
      includeUsage: req.includeUsage,
    };
    return req.stream ? streamCompletion(job) : c.json(await wholeCompletion(job));
  });
});

chat.get("/models", async (c) => {
  const { ranked } = await rankHosts(c.env);
  if (ranked.length === 0) throw noHost("no GPU host is available to list its models");
  const ids = [...new Set(ranked.map((h) => modelId(h.model ?? "unknown")))];
  return c.json({
    object: "list",
    data: ids.map((id) => ({ id, object: "model", created: 0, owned_by: "pyramidkv" })),
  });
});
