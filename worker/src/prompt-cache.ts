// The compressed prompt cache, request side (docs/WORKER.md, "Prompt cache"): a chat completion is
// the sessions API on the same turns. The messages before the last user message are the
// conversation's document, appended without the generation prompt and compressed on their own
// (when they hold at least PKV_CACHE_MIN_BYTES of content), then the rest with the generation
// prompt, then the answer. Each such state is snapshotted (host protocol 3.1) under a key of its
// exact messages: the document's as a doc entry, the prompt + answer as a reply entry, in the
// tenant's Durable Object (tenant.ts). A later request starts from a copy of the longest cached
// prefix of its messages (open_session.from_cache) and prefills only what follows it; a miss (or
// a host answering cache_miss, whose entry is then forgotten) runs the same steps from an empty
// session. Lookup comes before routing (withCache): a request goes to the host that stored its
// hit, whose snapshot memory holds the state, while that host is live and has room.
//
// Keys: a hash chain over the messages, seeded by the model and the compression, so that a key
// names exactly one state (the same messages, model, method and budget):
//   chain_0 = SHA-256("pkv-cache-v1\n" + JSON([model, method, budget]))
//   chain_k = SHA-256(chain_{k-1} || JSON([role_k, content_k]))
//   key(kind, k) = hex(SHA-256(chain_k || kind))
import type { Context } from "hono";

import { tenantStub } from "./auth.js";
import type { Turn } from "./chat.js";
import { MAX_CACHE_CANDIDATES } from "./cache-store.js";
import { type CompletionJob, streamCompletion, wholeCompletion } from "./completion.js";
import type { AppEnv, Env } from "./env.js";
import { ApiError } from "./errors.js";
import { type HostLease, type HostPlan, withHost } from "./host-lease.js";
import type { HostLink } from "./host-link.js";
import { ANY_MODEL, registry } from "./routing.js";
import { appendTurns, modelId, type OpenOptions, openSession, snapshot, turnsBytes } from "./serve.js";
import { CACHE_DEFAULTS, type CacheEntry } from "./tenant.js";
import type { KvSettings, Sampling } from "./validate.js";

export type EntryKind = "doc" | "reply";

/** Below this many content bytes, the messages before the last user message are not a document step of their own. */
export const DEFAULT_CACHE_MIN_BYTES = 1024;

/** PKV_CACHE_MIN_BYTES (0: every conversation with earlier messages has a document step). */
export function cacheMinBytes(env: Env): number {
  const v = env.PKV_CACHE_MIN_BYTES;
  const n = Number(v);
  return v !== undefined && v !== "" && Number.isSafeInteger(n) && n >= 0 ? n : DEFAULT_CACHE_MIN_BYTES;
}

/** The host can copy and snapshot states (protocol 3.1) and the request (or its tenant) has the cache on. */
export const cacheUsable = (on: boolean, link: HostLink): boolean => on && (link.hello.protocol_minor ?? 0) >= 1;

const utf8 = new TextEncoder();
const hex = (b: Uint8Array) => [...b].map((x) => x.toString(16).padStart(2, "0")).join("");

async function sha256(...parts: Uint8Array[]): Promise<Uint8Array> {
  const all = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    all.set(p, at);
    at += p.length;
  }
  return new Uint8Array(await crypto.subtle.digest("SHA-256", all));
}

/** chain_0 of a model (hello.model) and the compression sent in open_session. */
export const chainSeed = (model: string, kv: KvSettings): Promise<Uint8Array> =>
  sha256(utf8.encode(`pkv-cache-v1\n${JSON.stringify([model, kv.method, kv.budget])}`));

/** chain_k from chain_{k-1} and message k. */
export const chainNext = (prev: Uint8Array, t: Turn): Promise<Uint8Array> =>
  sha256(prev, utf8.encode(JSON.stringify([t.role, t.content])));

/** chain_0 … chain_n of messages m_1 … m_n. */
export async function chains(model: string, kv: KvSettings, turns: Turn[]): Promise<Uint8Array[]> {
  const out = [await chainSeed(model, kv)];
  for (const t of turns) out.push(await chainNext(out[out.length - 1]!, t));
  return out;
}

/** key(kind, k) from chain_k: 64 lowercase hex. */
export const entryKey = async (chain: Uint8Array, kind: EntryKind): Promise<string> =>
  hex(await sha256(chain, utf8.encode(kind)));

/**
 * The lookup candidates of a request m_1 … m_n (chain_0 … chain_n): for k = n−1 down to 1, the
 * reply key (only where m_k is the assistant's: a reply entry ends with its answer) and the doc
 * key, longest first, at most MAX_CACHE_CANDIDATES.
 */
export async function candidates(turns: Turn[], chain: Uint8Array[]): Promise<string[]> {
  const keys: string[] = [];
  for (let k = turns.length - 1; k >= 1 && keys.length < MAX_CACHE_CANDIDATES; k--) {
    if (turns[k - 1]!.role === "assistant") keys.push(await entryKey(chain[k]!, "reply"));
    if (keys.length < MAX_CACHE_CANDIDATES) keys.push(await entryKey(chain[k]!, "doc"));
  }
  return keys;
}

const failure = (e: unknown) => (e instanceof Error ? e.message : String(e));

/**
 * What a host's cached states are made by, besides the compression (its hello's model and
 * cache_fingerprint): the keys are computed for it, and only a host that serves the same shares them.
 */
export interface Served {
  model: string;
  cache_fingerprint?: string;
}

const sameServed = (a: Served | undefined, b: Served) =>
  a !== undefined && a.model === b.model && a.cache_fingerprint === b.cache_fingerprint;

/** A host's cache_miss reasons (host.json error.reason) that mean the entry's state is gone or broken: the entry is forgotten. */
const FORGET_REASONS = new Set(["missing", "damaged"]);

/** What a request looks up, for what it is served by: the candidates, and the doc key it would build. */
export interface CacheKeys {
  keys: string[];
  claim?: string;
}

/**
 * One request's use of the tenant's cache: the lookup (with the claim of the document it would
 * build), the open from a copy (or from nothing on a miss), the snapshots and their entries.
 * Nothing here fails a request for the cache's sake: a lookup that fails is a miss, a snapshot or
 * put that fails leaves the entry absent. A claim not resolved by a put is released (release(),
 * which withCache runs when the request ends without it).
 */
export class CacheUse<K extends CacheKeys = CacheKeys> {
  /** the entry the request starts from (null: none, or the host had no copy) */
  hit: CacheEntry | null = null;
  /** the doc key this request claimed and has not stored or released yet */
  private claimed?: string;
  /** what the lookup was for (the peeked host's, or the link's), and its keys */
  private looked?: { served: Served; keys: K };
  private host?: HostLink;

  constructor(
    private readonly c: Context<AppEnv>,
    private readonly keysOf: (served: Served) => Promise<K>,
  ) {}

  private get stub() {
    return tenantStub(this.c.env, this.c.get("tenant"));
  }

  /** The link of the lease (bind()). */
  private get link(): HostLink {
    if (!this.host) throw new Error("prompt cache: used before its host link was bound");
    return this.host;
  }

  /** The keys of the model looked up (bind()'s, the link's). */
  get keys(): K {
    if (!this.looked) throw new Error("prompt cache: keys used before a lookup");
    return this.looked.keys;
  }

  /**
   * The first of the keys for `served` with a live entry; with their claim, nobody else building
   * that document meanwhile. A claim of an earlier lookup (other keys) is released first.
   */
  async lookup(served: Served): Promise<void> {
    await this.release();
    this.hit = null;
    const keys = await this.keysOf(served);
    this.looked = { served: { model: served.model, cache_fingerprint: served.cache_fingerprint }, keys };
    if (keys.keys.length === 0) return;
    try {
      const r = await this.stub.cacheLookup(keys.keys, keys.claim);
      this.hit = r.hit;
      if (r.claimed) this.claimed = keys.claim;
    } catch (e) {
      console.warn(`prompt cache: lookup failed (a miss): ${failure(e)}`);
    }
  }

  /**
   * The lease's link: when its host makes states otherwise than the one looked up for (another
   * model or cache_fingerprint), or nothing was looked up (the peeked host had no cache), the
   * lookup again with its keys.
   */
  async bind(link: HostLink): Promise<void> {
    this.host = link;
    if (!sameServed(this.looked?.served, link.hello)) await this.lookup(link.hello);
  }

  /**
   * Opens `session` from a copy of the hit (the host answers cache_miss when no copy can be had:
   * the session is opened again from nothing, as a miss, and when the host says the state is
   * missing or damaged the entry is forgotten). `promptBytes` of `fromHit` are those after the
   * copy's messages, of `whole` all of them.
   */
  async open(
    session: string,
    kv: KvSettings,
    o: Omit<OpenOptions, "promptBytes" | "fromCache">,
    bytes: { fromHit: number; whole: number },
  ) {
    const hit = this.hit;
    if (hit) {
      try {
        return await openSession(this.c, this.link, session, kv, {
          ...o,
          promptBytes: bytes.fromHit,
          fromCache: hit.key,
        });
      } catch (e) {
        if (!(e instanceof ApiError && e.code === "cache_miss")) throw e;
        console.warn(`prompt cache: host ${this.link.host} had no copy of ${hit.key} (${e.reason}): ${e.message}`);
        this.hit = null;
        // its object is gone or broken: later requests would pay the same miss (not so when the store was unreachable)
        if (e.reason !== undefined && FORGET_REASONS.has(e.reason))
          await this.stub.cacheForget(hit.key, hit.created_ms).catch((f: unknown) => {
            console.warn(`prompt cache: forgetting ${hit.key} failed: ${failure(f)}`);
          });
      }
    }
    return openSession(this.c, this.link, session, kv, { ...o, promptBytes: bytes.whole });
  }

  /**
   * Snapshots the session's state (after its pending work) as entry `key` (`messages` long) and
   * records it; a failure leaves the entry absent (and releases the claim on it).
   */
  async store(session: string, key: string, kind: EntryKind, messages: number): Promise<void> {
    try {
      const maxBytes = this.c.get("tenantConfig")?.cache_max_bytes ?? CACHE_DEFAULTS.cache_max_bytes;
      if (maxBytes === 0) return; // the tenant keeps no cached state (finally: its claim released)
      const snap = await snapshot(this.link, session, key, maxBytes);
      await this.stub.cachePut(this.c.get("tenant"), {
        key,
        kind,
        messages,
        host: this.link.host,
        model: this.link.hello.model,
        bytes: snap.bytes,
        tokens: snap.tokens_seen,
      });
      if (this.claimed === key) this.claimed = undefined; // the put resolved it
    } catch (e) {
      console.warn(`prompt cache: ${kind} entry not stored: ${failure(e)}`);
    } finally {
      if (this.claimed === key) await this.release();
    }
  }

  /** Gives up an unresolved claim (the request failed): those waiting for it look again. */
  async release(): Promise<void> {
    const key = this.claimed;
    if (key === undefined) return;
    this.claimed = undefined;
    await this.stub.cacheRelease(key).catch((e: unknown) => {
      console.warn(`prompt cache: release of ${key} failed: ${failure(e)}`);
    });
  }
}

/**
 * withHost (host-lease.ts) for a new session that may start from a cached state: the one place
 * where the cache and routing meet. With the cache on, the request learns the model it would be
 * served by before it is routed (the registry's peek: no pick counted), looks its keys up (with
 * the claim of its document), and is routed to the hit's host when that host is live, serves the
 * model and has room (its snapshot memory holds the state: no copy from R2), else as usual. The
 * host dialled may serve another model than the peeked one (model "default" on a mixed fleet), or
 * make its states otherwise (cache_fingerprint): then the lookup runs again with its keys. `work`
 * gets the CacheUse bound to the lease's link, or undefined — the cache off, or a host of protocol
 * 3.0 — for the path without the cache (nothing peeked or looked up when off). A claim still held
 * when the work ends (unless a stream holds the lease: the stream releases it) is released.
 */
export async function withCache<T, K extends CacheKeys>(
  c: Context<AppEnv>,
  on: boolean,
  plan: HostPlan,
  keysOf: (served: Served) => Promise<K>,
  work: (lease: HostLease, cache: CacheUse<K> | undefined) => Promise<T>,
): Promise<T> {
  if (!on) return withHost(c, plan, (lease) => work(lease, undefined));
  const cache = new CacheUse(c, keysOf);
  const peeked = await registry(c.env)
    .peek(plan.model ?? ANY_MODEL)
    .catch(() => null);
  if (peeked !== null && peeked.protocol_minor >= 1) await cache.lookup(peeked);
  let held: HostLease | undefined;
  try {
    const prefer = cache.hit?.host;
    return await withHost(c, prefer === undefined ? plan : { ...plan, prefer }, async (lease) => {
      held = lease;
      if (!cacheUsable(on, lease.link)) {
        await cache.release();
        return work(lease, undefined);
      }
      await cache.bind(lease.link);
      return work(lease, cache);
    });
  } finally {
    if (!held?.isHeld) await cache.release();
  }
}

/** A chat completion's keys for a model: the candidates, and the document (its doc key claimed when its step applies). */
export interface ChatKeys extends CacheKeys {
  /** chain_0 … chain_n of the messages */
  chain: Uint8Array[];
  /** the messages before the last user message: the document */
  split: number;
}

/** The keys of a chat completion's messages `turns` on a host that serves `served`. */
export async function chatKeys(env: Env, served: Served, kv: KvSettings, turns: Turn[]): Promise<ChatKeys> {
  const chain = await chains(served.model, kv, turns);
  let split = turns.length - 1;
  while (split > 0 && turns[split]!.role !== "user") split--;
  const docStep = split > 0 && turnsBytes(turns.slice(0, split)) >= cacheMinBytes(env);
  const claim = docStep ? await entryKey(chain[split]!, "doc") : undefined;
  return { keys: await candidates(turns, chain), chain, split, ...(claim !== undefined ? { claim } : {}) };
}

export interface CachedChat {
  /** the ephemeral session the lease opens and closes */
  session: string;
  kv: KvSettings;
  turns: Turn[];
  sampling: Sampling;
  stream: boolean;
  includeUsage: boolean;
}

/**
 * A chat completion through the cache on a lease (withCache, with chatKeys looked up): open (a
 * copy of the longest cached prefix, or nothing) → the document step when it applies and the
 * copy does not hold it already (snapshotted as a doc entry) → the rest with the generation
 * prompt → the answer, whose state is snapshotted as a reply entry before the response ends.
 * Resolves with the response (a stream holds the lease).
 */
export async function cachedChat(
  c: Context<AppEnv>,
  lease: HostLease,
  cache: CacheUse<ChatKeys>,
  chat: CachedChat,
): Promise<Response> {
  const { link } = lease;
  const { session, kv, turns } = chat;
  const { chain, split, claim: docKey } = cache.keys;
  const opened = await cache.open(
    session,
    kv,
    { ephemeral: true },
    { fromHit: turnsBytes(turns.slice(cache.hit?.messages ?? 0)), whole: turnsBytes(turns) },
  );
  const hit = cache.hit;
  let from = hit?.messages ?? 0;
  const cachedTokens = hit ? (opened.tokens_seen ?? hit.tokens) : 0;
  if (docKey !== undefined && from < split) {
    await appendTurns(c.env, link, session, turns.slice(from, split), false, { param: "messages", maxTokens: 1 });
    await cache.store(session, docKey, "doc", split);
    from = split;
  }
  const appended = await appendTurns(c.env, link, session, turns.slice(from), true, {
    maxTokens: chat.sampling.max_tokens_asked ?? 1,
    param: "messages",
  });
  const job: CompletionJob = {
    lease,
    session,
    model: modelId(link.hello.model),
    promptTokens: appended.tokens_seen,
    cachedTokens,
    sampling: chat.sampling,
    includeUsage: chat.includeUsage,
    // the turn's state, prompt and answer, under the key of its messages and the answer as the client got it
    answered: async (answer) => {
      const reply = await chainNext(chain[turns.length]!, { role: "assistant", content: answer });
      await cache.store(session, await entryKey(reply, "reply"), "reply", turns.length + 1);
    },
  };
  return chat.stream ? streamCompletion(job) : c.json(await wholeCompletion(job));
}
