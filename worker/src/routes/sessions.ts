// The sessions API for long contexts: a document prefilled once (compressed with kv_method /
// kv_budget, or the tenant's defaults) on the host with the most free KV among those serving the
// model, then questions answered against it, streamed. The document is a system and a user message;
// each question is one more user message, rendered by the engine after the session's earlier ones.
// Session ids are bound to their tenant (the tenant's Durable Object maps id → host; another
// tenant's id is 404) and the host namespaces sessions by tenant as well.
import { Hono } from "hono";
import { validator } from "hono/validator";

import { tenantStub } from "../auth.js";
import type { Turn } from "../chat.js";
import { streamCompletion, wholeCompletion } from "../completion.js";
import type { AppEnv, Env } from "../env.js";
import { notFound, sessionLimit } from "../errors.js";
import type { HostLink } from "../host-link.js";
import { withHost } from "../host-lease.js";
import { appendTurns, checkMaxTokens, modelId, openSession, randomId } from "../serve.js";
import type { SessionRecord } from "../tenant.js";
import { jsonBody, messageRequest, resolveKv, sessionRequest } from "../validate.js";

export const DEFAULT_SYSTEM =
  "You are a helpful assistant. Answer questions about the document the user gives you, briefly and accurately.";

export const sessions = new Hono<AppEnv>();

async function sessionObject(link: HostLink, rec: SessionRecord) {
  const st = await link.call({ type: "stats", session: rec.id }, "stats_result");
  return {
    id: rec.id,
    object: "session",
    created: rec.created,
    model: modelId(link.hello.model),
    host: rec.host,
    kv_method: rec.kv_method,
    kv_budget: rec.kv_budget,
    tokens: st.tokens_seen ?? 0,
    kv_bytes: st.kv_bytes ?? 0,
    full_kv_bytes: st.full_kv_bytes ?? null,
    resident: st.resident ?? null,
  };
}

async function lookup(env: Env, tenant: string, id: string): Promise<SessionRecord> {
  const rec = await tenantStub(env, tenant).session(id);
  if (!rec || rec.host === "") throw notFound(`no session '${id.slice(0, 80)}'`, "session_not_found");
  return rec;
}

/** `:id` is valid when it names a session of the calling tenant (404 otherwise, before any body is read). */
const sessionParam = validator("param", async (p, c) => {
  const rec = await lookup(c.env, c.get("tenant"), p.id!);
  c.set("kv", { method: rec.kv_method, budget: rec.kv_budget });
  return rec;
});

sessions.post("/", jsonBody(sessionRequest), async (c) => {
  const req = c.req.valid("json");
  const tenant = c.get("tenant");
  const stub = tenantStub(c.env, tenant);
  const kv = resolveKv(req.kv, c.get("tenantConfig"));
  c.set("kv", kv);
  const id = randomId("sess-");
  const slot = await stub.reserveSession(id, kv);
  if (!slot) {
    const cfg = await stub.config();
    throw sessionLimit(
      `tenant '${tenant}' has reached its limit of ${cfg?.max_sessions} open sessions; delete one first`,
    );
  }
  const turns: Turn[] = [
    { role: "system", content: req.system ?? DEFAULT_SYSTEM },
    { role: "user", content: req.document },
  ];
  // A failed upload, or a client that leaves during it, closes the session on the host and gives the slot back.
  return withHost(c, { opens: id, model: req.model, onFailure: () => stub.dropSession(id) }, async (lease) => {
    const opened = await openSession(c, lease.link, id, kv);
    const rec = (await stub.updateSession(id, {
      host: lease.link.url,
      kv_method: opened.method,
      kv_budget: opened.budget,
      model: modelId(lease.link.hello.model),
    }))!;
    // The document's turn stays closed: each question opens the assistant's turn after itself.
    const append = { param: "document", maxTokens: 1 };
    if (!req.stream) {
      await appendTurns(c.env, lease.link, id, turns, false, append);
      return c.json(await sessionObject(lease.link, rec), 201);
    }
    return lease.sse(async (sse) => {
      await appendTurns(c.env, lease.link, id, turns, false, {
        ...append,
        onProgress: (p) => sse.event("progress", p),
      });
      sse.event("session", await sessionObject(lease.link, rec));
      sse.done();
    });
  });
});

sessions.get("/:id", sessionParam, async (c) => {
  const rec = c.req.valid("param");
  return c.json(
    await withHost(c, { host: rec.host, tenantSettings: false }, (lease) => sessionObject(lease.link, rec)),
  );
});

sessions.delete("/:id", sessionParam, async (c) => {
  const rec = c.req.valid("param");
  const hostClosed = await withHost(c, { host: rec.host, tenantSettings: false }, async ({ link }) => {
    const f = await link.send({ type: "close", session: rec.id });
    return f.type === "closed" || (f.type === "error" && f.code === "unknown_session");
  }).catch(() => false); // the host is gone: its sessions went with it; forget the record anyway
  await tenantStub(c.env, c.get("tenant")).dropSession(rec.id);
  return c.json({ id: rec.id, object: "session.deleted", deleted: true, host_closed: hostClosed });
});

sessions.post("/:id/messages", sessionParam, jsonBody(messageRequest), async (c) => {
  const rec = c.req.valid("param");
  const req = c.req.valid("json");
  return withHost(c, { host: rec.host }, async (lease) => {
    checkMaxTokens(lease.link, req.sampling);
    const before = await lease.link.call({ type: "stats", session: rec.id }, "stats_result");
    const appended = await appendTurns(c.env, lease.link, rec.id, [{ role: "user", content: req.content }], true, {
      maxTokens: req.sampling.max_tokens_asked ?? 1,
      param: "content",
    });
    const job = {
      lease,
      session: rec.id,
      model: modelId(lease.link.hello.model),
      promptTokens: appended.tokens_seen - (before.tokens_seen ?? 0),
      sampling: req.sampling,
      includeUsage: req.includeUsage,
      extra: { session: rec.id },
    };
    return req.stream ? streamCompletion(job) : c.json(await wholeCompletion(job));
  });
});
