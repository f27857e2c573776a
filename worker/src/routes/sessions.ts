// The sessions API for long contexts: a document prefilled once (compressed with kv_method /
// kv_budget, or the tenant's defaults) on the host with the most free KV among those serving the
// model, then questions answered against it, streamed. The document is a system and a user message;
// each question is one more user message, rendered by the engine after the session's earlier ones.
// Session ids are bound to their tenant (the tenant's Durable Object maps id → host; another
// tenant's id is 404) and the host namespaces sessions by tenant as well. A session idle longer
// than its tenant's session_ttl_s expires (tenant.ts: the object's alarm closes it on its host);
// the session object names its host by an opaque id (host-id.ts), never by name. A session whose
// host is not live any more moves to another live host of its model at its next request (the new
// host restores it from its checkpoint in R2). A document opened before (same system, document,
// compression and model, with the prompt cache on) is not prefilled again: the session starts from
// a copy of its state (prompt-cache.ts), on the host that stored it when that host can take it,
// `cached_tokens` in the session object.
import { type Context, Hono } from "hono";
import { validator } from "hono/validator";

import { tenantStub } from "../auth.js";
import type { Turn } from "../chat.js";
import { streamCompletion, wholeCompletion } from "../completion.js";
import type { AppEnv, Env } from "../env.js";
import { ApiError, notFound, sessionExpired, sessionLimit } from "../errors.js";
import { hostId } from "../host-id.js";
import type { HostLink } from "../host-link.js";
import { withHost } from "../host-lease.js";
import { chains, entryKey, type Served, withCache } from "../prompt-cache.js";
import { appendTurns, checkMaxTokens, modelId, openSession, type Progress, randomId, turnsBytes } from "../serve.js";
import { REQUEST_MAX_MS, type SessionRecord } from "../tenant.js";
import { jsonBody, messageRequest, resolveKv, resolveKvCache, sessionRequest } from "../validate.js";

export const DEFAULT_SYSTEM =
  "You are a helpful assistant. Answer questions about the document the user gives you, briefly and accurately.";

export const sessions = new Hono<AppEnv>();

async function sessionObject(env: Env, link: HostLink, rec: SessionRecord) {
  const st = await link.call({ type: "stats", session: rec.id }, "stats_result");
  return {
    id: rec.id,
    object: "session",
    created: rec.created,
    model: modelId(link.hello.model),
    host: await hostId(env, rec.host),
    kv_method: rec.kv_method,
    kv_budget: rec.kv_budget,
    tokens: st.tokens_seen ?? 0,
    kv_bytes: st.kv_bytes ?? 0,
    full_kv_bytes: st.full_kv_bytes ?? null,
    resident: st.resident ?? null,
  };
}

const unknownSession = (id: string) => notFound(`no session '${id.slice(0, 80)}'`, "session_not_found");

/**
 * `:id` is valid when it names an open session of the calling tenant (404 session_not_found, or
 * session_expired, before any body is read); the request counts as a use of it.
 */
const sessionParam = validator("param", async (p, c) => {
  const use = await tenantStub(c.env, c.get("tenant")).useSession(p.id!);
  if (!use.ok) throw use.code === "session_expired" ? sessionExpired(p.id!) : unknownSession(p.id!);
  c.set("kv", { method: use.rec.kv_method, budget: use.rec.kv_budget });
  return use.rec;
});

/**
 * The plan of a request on an existing session: its host, or the next live host of its model when
 * that one is not live (recorded first, by compare-and-set: two requests racing move it to one
 * host); its last use is when the request ends.
 */
const onSession = (c: Context<AppEnv>, rec: SessionRecord) => ({
  host: rec.host,
  move: {
    model: rec.model,
    to: async (from: string, next: string) => {
      const host = await tenantStub(c.env, c.get("tenant")).moveSession(rec.id, from, next);
      if (host === null) throw unknownSession(rec.id);
      rec.host = host;
      return host;
    },
  },
  onEnd: () => tenantStub(c.env, c.get("tenant")).touchSession(rec.id),
});

/** The host closed the session after its own idle TTL: the edge forgets it too. */
async function expiredOnHost<T>(c: Context<AppEnv>, id: string, p: Promise<T>): Promise<T> {
  try {
    return await p;
  } catch (e) {
    if (e instanceof ApiError && e.code === "session_expired") {
      await tenantStub(c.env, c.get("tenant")).expireSession(id);
      throw sessionExpired(id);
    }
    throw e;
  }
}

sessions.post("/", jsonBody(sessionRequest), async (c) => {
  const req = c.req.valid("json");
  const tenant = c.get("tenant");
  const stub = tenantStub(c.env, tenant);
  const kv = resolveKv(req.kv, c.get("tenantConfig"));
  c.set("kv", kv);
  const useCache = resolveKvCache(req.kvCache, c.get("tenantConfig"));
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
  const plan = {
    opens: id,
    model: req.model,
    onFailure: () => stub.dropSession(id),
    onEnd: () => stub.touchSession(id),
  };
  // The prompt cache: the document's state, the same entry as a chat completion whose messages
  // begin with these two (prompt-cache.ts); one request builds it, the others start from copies
  // (on the host that stored it when it can take them).
  const keysOf = async (served: Served) => {
    const docKey = await entryKey((await chains(served, kv, turns))[2]!, "doc");
    return { keys: [docKey], claim: docKey };
  };
  return withCache(c, useCache, plan, keysOf, async (lease, cache) => {
    // The host is recorded before the open, so that a DELETE or the alarm can close a session
    // whose request died while opening it. A record gone meanwhile was deleted: this open fails
    // (and its failure closes what it opened).
    if (!(await stub.updateSession(id, { host: lease.link.host }))) throw unknownSession(id);
    // a copy is checkpointed by the host before it answers opened: it is as durable as a prefilled one
    const opened = cache
      ? await cache.open(id, kv, {}, (k) => turnsBytes(turns.slice(k)))
      : await openSession(c, lease.link, id, kv, { promptBytes: turnsBytes(turns) });
    const cachedTokens = cache?.hit ? (opened.tokens_seen ?? cache.hit.tokens) : 0;
    const rec = await stub.updateSession(id, {
      state: "open",
      used_ms: Date.now(),
      // the document's prefill still runs: the alarm must not expire the session under it
      busy_until_ms: Date.now() + REQUEST_MAX_MS,
      kv_method: opened.method,
      kv_budget: opened.budget,
      model: modelId(lease.link.hello.model),
    });
    if (!rec) throw unknownSession(id);
    const session = async () => ({ ...(await sessionObject(c.env, lease.link, rec)), cached_tokens: cachedTokens });
    // The document's turn stays closed: each question opens the assistant's turn after itself.
    const append = { param: "document", maxTokens: 1 };
    // the document's snapshot is sent after its prefill and awaited before the response ends
    const prefill = async (onProgress?: (p: Progress) => void) => {
      if (cache?.hit) return;
      await appendTurns(c.env, lease.link, id, turns, false, {
        ...append,
        onProgress: (p) => {
          cache?.progress(p); // the claim renewed while the document is prefilled
          onProgress?.(p);
        },
      });
      cache?.send(id, cache.keys.claim, "doc", turns.length);
    };
    if (!req.stream) {
      try {
        await prefill();
        return c.json(await session(), 201);
      } finally {
        await cache?.settle();
      }
    }
    return lease.sse(async (sse) => {
      // a stream's claim is the stream's own (withCache leaves a held lease's claim to it)
      try {
        await prefill((p) => sse.event("progress", p));
        sse.event("session", await session());
        await cache?.settle();
        sse.done();
      } finally {
        await cache?.settle();
        await cache?.release();
      }
    });
  });
});

sessions.get("/:id", sessionParam, async (c) => {
  const rec = c.req.valid("param");
  return c.json(
    await expiredOnHost(
      c,
      rec.id,
      withHost(c, { ...onSession(c, rec), tenantSettings: false }, (lease) => sessionObject(c.env, lease.link, rec)),
    ),
  );
});

// DELETE frees the tenant's slot at once. A session still being opened can be deleted too (its
// opening request then fails and closes it). When the host's close is not confirmed (the host is
// unreachable), the record stays as a tombstone that the tenant's alarm retries (host_closed: false).
sessions.delete("/:id", async (c) => {
  const id = c.req.param("id");
  const stub = tenantStub(c.env, c.get("tenant"));
  const rec = await stub.session(id);
  if (!rec || rec.state === "closing") {
    const use = rec ? null : await stub.useSession(id);
    throw use?.ok === false && use.code === "session_expired" ? sessionExpired(id) : unknownSession(id);
  }
  const hostClosed =
    rec.host === "" ||
    (await withHost(c, { host: rec.host, tenantSettings: false }, async ({ link }) => {
      const f = await link.send({ type: "close", session: rec.id });
      return (
        f.type === "closed" ||
        (f.type === "error" && ["unknown_session", "session_expired", "session_lost"].includes(f.code))
      );
    }).catch(() => false));
  if (hostClosed) await stub.dropSession(rec.id);
  else await stub.closeLater(rec.id);
  return c.json({ id: rec.id, object: "session.deleted", deleted: true, host_closed: hostClosed });
});

sessions.post("/:id/messages", sessionParam, jsonBody(messageRequest), async (c) => {
  const rec = c.req.valid("param");
  const req = c.req.valid("json");
  return expiredOnHost(
    c,
    rec.id,
    withHost(c, onSession(c, rec), async (lease) => {
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
    }),
  );
});
