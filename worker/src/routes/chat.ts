// POST /v1/chat/completions (OpenAI-compatible). A chat completion is an ephemeral host session:
// opened on the host with the most free KV among those serving the model, the conversation
// appended as one list of messages (rendered by the engine with the model's own chat template; one
// prefill, compressed once with kv_method/kv_budget or the tenant's defaults), generated, closed.
// Opened ephemeral: should the edge die before closing it, the host closes it with the link.
// With the prompt cache (kv_cache on, a host of protocol 3.1) the session starts from a copy of the
// longest cached prefix of the conversation instead, and only the rest is prefilled; it is routed
// to the host that stored that prefix when it can take it (prompt-cache.ts).
import { Hono } from "hono";

import { streamCompletion, wholeCompletion } from "../completion.js";
import type { AppEnv } from "../env.js";
import { cachedChat, chatKeys, type Served, withCache } from "../prompt-cache.js";
import { appendTurns, checkMaxTokens, modelId, openSession, randomId, turnsBytes } from "../serve.js";
import { chatRequest, jsonBody, resolveKv, resolveKvCache } from "../validate.js";

export const chat = new Hono<AppEnv>();

chat.post("/chat/completions", jsonBody(chatRequest), async (c) => {
  const req = c.req.valid("json");
  const kv = resolveKv(req.kv, c.get("tenantConfig"));
  c.set("kv", kv);
  const useCache = resolveKvCache(req.kvCache, c.get("tenantConfig"));
  const session = randomId("chat-");
  // The session is closed on the host after the answer, and when anything fails or the client leaves (also before the answer: host-lease.ts).
  // With the cache on, the host is the one holding the longest cached prefix when it can take the request.
  const plan = { opens: session, ephemeral: true, model: req.model };
  const keysOf = (served: Served) => chatKeys(c.env, served, kv, req.turns);
  return withCache(c, useCache, plan, keysOf, async (lease, cache) => {
    checkMaxTokens(lease.link, req.sampling);
    if (cache)
      return cachedChat(c, lease, cache, {
        session,
        kv,
        turns: req.turns,
        sampling: req.sampling,
        stream: req.stream,
        includeUsage: req.includeUsage,
      });
    await openSession(c, lease.link, session, kv, { promptBytes: turnsBytes(req.turns), ephemeral: true });
    const appended = await appendTurns(c.env, lease.link, session, req.turns, true, {
      maxTokens: req.sampling.max_tokens_asked ?? 1,
      param: "messages",
    });
    const job = {
      lease,
      session,
      model: modelId(lease.link.hello.model),
      promptTokens: appended.tokens_seen,
      sampling: req.sampling,
      includeUsage: req.includeUsage,
    };
    return req.stream ? streamCompletion(job) : c.json(await wholeCompletion(job));
  });
});
