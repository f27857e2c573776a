// The sessions API for long contexts: a document prefilled once (compressed with kv_method /
// kv_budget) on the host with the most free KV, then questions answered against it, streamed.
// Session ids are bound to their tenant (the tenant's Durable Object maps id → host; another
// tenant's id is 404) and the host namespaces sessions by tenant as well.
import { Hono } from "hono";
import { validator } from "hono/validator";

import { tenantStub } from "../auth.js";
import { renderPrompt, renderTurns } from "../chat.js";
import { streamCompletion, wholeCompletion } from "../completion.js";
import type { AppEnv, Env } from "../env.js";
import { ApiError, notFound } from "../errors.js";
import type { HostLink } from "../host-link.js";
import { withHost } from "../host-lease.js";
import { appendText, modelId, randomId } from "../serve.js";
import type { SessionRecord } from "../tenant.js";
import { jsonBody, messageRequest, sessionRequest } from "../validate.js";

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
const sessionParam = validator("param", (p, c) => lookup(c.env, c.get("tenant"), p.id!));

sessions.post("/", jsonBody(sessionRequest), async (c) => {
  const req = c.req.valid("json");
  const tenant = c.get("tenant");
  const stub = tenantStub(c.env, tenant);
  const id = randomId("sess-");
  const slot = await stub.reserveSession(id, req.kv);
  if (!slot) {
    const cfg = await stub.config();
    throw new ApiError(
      429,
      "rate_limit_error",
      `tenant '${tenant}' has reached its limit of ${cfg?.max_sessions} open sessions; delete one first`,
      null,
      "session_limit",
    );
  }
  const text = renderTurns([
    { role: "system", content: req.system ?? DEFAULT_SYSTEM },
    { role: "user", content: req.document },
  ]);
  // A failed upload, or a client that leaves during it, closes the session on the host and gives the slot back.
  return withHost(c, { opens: id, onFailure: () => stub.dropSession(id) }, async (lease) => {
    const opened = await lease.link.call(
      { type: "open_session", session: id, method: req.kv.method, budget: req.kv.budget },
      "opened",
    );
    const rec = (await stub.updateSession(id, { host: lease.link.url, kv_budget: opened.budget }))!;
    if (!req.stream) {
      await appendText(c.env, lease.link, id, text);
      return c.json(await sessionObject(lease.link, rec), 201);
    }
    return lease.sse(async (sse) => {
      await appendText(c.env, lease.link, id, text, (p) => sse.event("progress", p));
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
  const stub = tenantStub(c.env, c.get("tenant"));
  return withHost(c, { host: rec.host }, async (lease) => {
    const before = await lease.link.call({ type: "stats", session: rec.id }, "stats_result");
    const prompt = renderPrompt([{ role: "user", content: req.content }], { continues: true, openTurn: rec.open_turn });
    const appended = await appendText(c.env, lease.link, rec.id, prompt);
    const job = {
      lease,
      session: rec.id,
      model: modelId(lease.link.hello.model),
      promptTokens: appended.tokens_seen - (before.tokens_seen ?? 0),
      sampling: req.sampling,
      includeUsage: req.includeUsage,
      extra: { session: rec.id },
      // An answer cut short (max_tokens, a stop string, a disconnect) leaves the turn open.
      after: (done: { reason: string } | undefined) =>
        stub.updateSession(rec.id, { open_turn: done?.reason !== "end" }),
    };
    return req.stream ? streamCompletion(job) : c.json(await wholeCompletion(job));
  });
});
