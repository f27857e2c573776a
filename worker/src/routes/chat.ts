// POST /v1/chat/completions (OpenAI-compatible) and GET /v1/models. A chat completion is an
// ephemeral host session: opened on the host with the most free KV, the whole conversation
// appended as one ChatML prompt (one prefill, compressed once with kv_method/kv_budget),
// generated, closed.
import { Hono } from "hono";

import { tenantStub } from "../auth.js";
import { renderPrompt } from "../chat.js";
import { streamCompletion, wholeCompletion } from "../completion.js";
import type { AppEnv } from "../env.js";
import { noHost } from "../errors.js";
import type { HostLink } from "../host-link.js";
import { connectBest, rankHosts, reportFailure } from "../routing.js";
import { appendText, applyTenant, modelId, randomId } from "../serve.js";
import { chatRequest, jsonBody } from "../validate.js";

export const chat = new Hono<AppEnv>();

chat.post("/chat/completions", jsonBody(chatRequest), async (c) => {
  const req = c.req.valid("json");
  const tenant = c.get("tenant");
  const cfg = await tenantStub(c.env, tenant).config();
  const prompt = renderPrompt(req.turns);
  const session = randomId("chat-");
  let link: HostLink | undefined;
  try {
    link = await connectBest(c.env, tenant);
    await applyTenant(link, cfg);
    await link.call({ type: "open_session", session, method: req.kv.method, budget: req.kv.budget }, "opened");
    const appended = await appendText(c.env, link, session, prompt);
    const l = link;
    const job = {
      link: l,
      session,
      model: req.model,
      promptTokens: appended.tokens_seen,
      sampling: req.sampling,
      includeUsage: req.includeUsage,
      signal: c.req.raw.signal,
      after: async (_done: unknown, error: unknown) => {
        await reportFailure(c.env, l, error);
        if (l.alive) await l.send({ type: "close", session }).catch(() => {});
        l.close();
      },
      // Close the ephemeral session (which cancels its generation), then the connection.
      // waitUntil: the invocation outlives the client for that close.
      onCancel: () =>
        c.executionCtx.waitUntil(
          l
            .send({ type: "close", session })
            .catch(() => {})
            .finally(() => l.close()),
        ),
    };
    if (req.stream) return streamCompletion(job);
    return c.json(await wholeCompletion(job));
  } catch (e) {
    await reportFailure(c.env, link, e);
    if (link?.alive) await link.send({ type: "close", session }).catch(() => {});
    link?.close();
    throw e;
  }
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
