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
//   chain_0 = SHA-256("pkv-cache-v1\n" + JSON([model, method, budget])), with the host's
//             cache_fingerprint when it has one: JSON([model, method, budget, cache_fingerprint])
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
import { appendTurns, modelId, type OpenOptions, openSession, type Progress, snapshot, turnsBytes } from "./serve.js";
import { CACHE_DEFAULTS, type CacheEntry, type ReleaseOutcome } from "./tenant.js";
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

/** The largest cached state stored by default (PKV_CACHE_MAX_ENTRY_BYTES): its upload stays short. */
export const DEFAULT_CACHE_MAX_ENTRY_BYTES = 64 * 1024 * 1024;

/** PKV_CACHE_MAX_ENTRY_BYTES (0: no state is stored). */
export function cacheMaxEntryBytes(env: Env): number {
  const v = env.PKV_CACHE_MAX_ENTRY_BYTES;
  const n = Number(v);
  return v !== undefined && v !== "" && Number.isSafeInteger(n) && n >= 0 ? n : DEFAULT_CACHE_MAX_ENTRY_BYTES;
}

/**
 * How the holder of a claim keeps it alive (a claim not renewed for CLAIM_LEASE_MS, 30 s, is void
 * and a waiter builds the document too): cacheRenew every `timerMs` while it holds the claim (a
 * request queued on its host sends no frames), and on the document append's progress frames at
 * most once per `progressMs`. Tests shorten them.
 */
export const claimRenewal = { timerMs: 10_000, progressMs: 10_000 };

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

/**
 * chain_0 of what the host serves (hello.model, and its cache_fingerprint when it says one: its
 * state-making defaults, docs/HOST.md) and the compression sent in open_session.
 */
export const chainSeed = (served: Served, kv: KvSettings): Promise<Uint8Array> => {
  const seed: (string | number)[] = [served.model, kv.method, kv.budget];
  if (served.cache_fingerprint !== undefined) seed.push(served.cache_fingerprint);
  return sha256(utf8.encode(`pkv-cache-v1\n${JSON.stringify(seed)}`));
};

/** chain_k from chain_{k-1} and message k. */
export const chainNext = (prev: Uint8Array, t: Turn): Promise<Uint8Array> =>
  sha256(prev, utf8.encode(JSON.stringify([t.role, t.content])));

/** chain_0 … chain_n of messages m_1 … m_n. */
export async function chains(served: Served, kv: KvSettings, turns: Turn[]): Promise<Uint8Array[]> {
  const out = [await chainSeed(served, kv)];
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

/**
 * A copy the host cannot take now (admitted without shrinking its budget, or not checkpointed)
 * where a fresh open may succeed (under policy auto the host shrinks a fresh session's budget to
 * fit): the request opens from nothing, the entry kept.
 */
const COPY_REFUSED = new Set(["quota_exceeded", "pool_full", "stored_quota_exceeded", "checkpoint_failed"]);

/** What a request looks up, for what it is served by: the candidates, and the doc key it would build. */
export interface CacheKeys {
  keys: string[];
  claim?: string;
}

/**
 * One request's use of the tenant's cache: the lookup (with the claim of the document it would
 * build), the open from a copy (or from nothing on a miss), the snapshots and their entries.
 * Nothing here fails a request for the cache's sake: a lookup that fails is a miss, a snapshot or
 * put that fails leaves the entry absent. A claim is renewed while it is held (claimRenewal) and
 * ends with its put, or is released: "not_stored" when the state was built but is not kept (the
 * waiters go on at once, each without the claim), "failed" when the request ended without
 * building it (release(), which withCache runs when the request ends: one waiter claims it).
 */
export class CacheUse<K extends CacheKeys = CacheKeys> {
  /** the entry the request starts from (null: none, or the host had no copy) */
  hit: CacheEntry | null = null;
  /** the doc key this request claimed and has not stored or released yet */
  private claimed?: string;
  private renewTimer?: ReturnType<typeof setInterval>;
  private renewedMs = 0;
  /** what the lookup was for (the peeked host's, or the link's), and its keys */
  private looked?: { served: Served; keys: K };
  private host?: HostLink;
  /**
   * false when the host opened the session with other settings than the keys were made with
   * (policy auto shrank its budget): its states are not what the keys name, nothing is stored
   */
  private storable = true;
  /** stores sent and not awaited yet (settle()) */
  private readonly pending: Promise<void>[] = [];

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

  /** An entry's bound: PKV_CACHE_MAX_ENTRY_BYTES and the tenant's cache_max_bytes, the smaller (0: nothing is stored). */
  private get maxBytes(): number {
    const tenant = this.c.get("tenantConfig")?.cache_max_bytes ?? CACHE_DEFAULTS.cache_max_bytes;
    return Math.min(cacheMaxEntryBytes(this.c.env), tenant);
  }

  /**
   * The first of the keys for `served` with a live entry; with their claim, nobody else building
   * that document meanwhile (no claim when nothing can be stored: nobody would wait for nothing).
   * A claim of an earlier lookup (other keys) is released first.
   */
  async lookup(served: Served): Promise<void> {
    await this.release();
    this.hit = null;
    const keys = await this.keysOf(served);
    this.looked = { served: { model: served.model, cache_fingerprint: served.cache_fingerprint }, keys };
    await this.find(keys.keys, keys.claim);
  }

  /** cacheLookup of `keys` (claiming `claim` when it is one of them and anything can be stored). */
  private async find(keys: string[], claim: string | undefined): Promise<void> {
    this.hit = null;
    if (keys.length === 0) return;
    const asked = claim !== undefined && this.claimed === undefined && keys.includes(claim) && this.maxBytes > 0;
    try {
      const r = await this.stub.cacheLookup(keys, asked ? claim : undefined);
      this.hit = r.hit;
      if (asked && r.claimed) this.hold(claim);
    } catch (e) {
      console.warn(`prompt cache: lookup failed (a miss): ${failure(e)}`);
    }
  }

  /** The claim of `key` is this request's: renewed every claimRenewal.timerMs until it ends. */
  private hold(key: string): void {
    this.claimed = key;
    this.renewedMs = Date.now();
    this.renewTimer = setInterval(() => this.renew(), claimRenewal.timerMs);
  }

  /** The claim ended (put, released, or gone): its renewals stop. */
  private unhold(): string | undefined {
    const key = this.claimed;
    this.claimed = undefined;
    if (this.renewTimer !== undefined) clearInterval(this.renewTimer);
    this.renewTimer = undefined;
    return key;
  }

  /** Renews the claim (not awaited; a claim gone meanwhile stops the renewals: the put or release still comes). */
  private renew(): void {
    const key = this.claimed;
    if (key === undefined) return;
    this.renewedMs = Date.now();
    this.stub.cacheRenew(key).then(
      (alive) => {
        if (!alive && this.claimed === key && this.renewTimer !== undefined) {
          clearInterval(this.renewTimer);
          this.renewTimer = undefined;
        }
      },
      (e: unknown) => console.warn(`prompt cache: renewal of ${key} failed: ${failure(e)}`),
    );
  }

  /** An append's progress (the document being built): renews the claim, at most once per claimRenewal.progressMs. */
  readonly progress = (_p: Progress): void => {
    if (this.claimed !== undefined && Date.now() - this.renewedMs >= claimRenewal.progressMs) this.renew();
  };

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
   * Opens `session` from a copy of the hit, else from nothing. The host answers cache_miss when
   * no copy can be had (when it says the state is missing or damaged the entry is forgotten): the
   * keys after the missed one are looked up and the next hit opened, until none is left. A copy
   * the host cannot take now (COPY_REFUSED) opens from nothing, the entry kept. `promptBytes(k)`:
   * the bytes after a copy of k messages (0: all of them).
   */
  async open(
    session: string,
    kv: KvSettings,
    o: Omit<OpenOptions, "promptBytes" | "fromCache">,
    promptBytes: (messages: number) => number,
  ) {
    for (let hit = this.hit; hit !== null; hit = this.hit) {
      try {
        const opened = await openSession(this.c, this.link, session, kv, {
          ...o,
          promptBytes: promptBytes(hit.messages),
          fromCache: hit.key,
        });
        this.granted(opened, kv);
        return opened;
      } catch (e) {
        if (!(e instanceof ApiError) || (e.code !== "cache_miss" && !COPY_REFUSED.has(e.code ?? ""))) throw e;
        if (e.code !== "cache_miss") {
          console.warn(
            `prompt cache: host ${this.link.host} could not take a copy of ${hit.key} now (${e.code}): ${e.message}`,
          );
          this.hit = null;
          break;
        }
        console.warn(`prompt cache: host ${this.link.host} had no copy of ${hit.key} (${e.reason}): ${e.message}`);
        // its object is gone or broken: later requests would pay the same miss (not so when the store was unreachable)
        if (e.reason !== undefined && FORGET_REASONS.has(e.reason))
          await this.stub.cacheForget(hit.key, hit.created_ms).catch((f: unknown) => {
            console.warn(`prompt cache: forgetting ${hit.key} failed: ${failure(f)}`);
          });
        // the next shorter prefix cached (its document claimed when none is)
        const { keys, claim } = this.keys;
        const at = keys.indexOf(hit.key);
        if (at < 0) this.hit = null;
        else await this.find(keys.slice(at + 1), claim);
      }
    }
    const opened = await openSession(this.c, this.link, session, kv, { ...o, promptBytes: promptBytes(0) });
    this.granted(opened, kv);
    return opened;
  }

  /** What the host granted: states of other settings than the keys' are not stored. */
  private granted(opened: { method: string; budget: number }, kv: KvSettings): void {
    this.storable = opened.method === kv.method && opened.budget === kv.budget;
    if (!this.storable)
      console.warn(
        `prompt cache: the host opened ${opened.method}/${opened.budget} for ${kv.method}/${kv.budget} (policy auto): nothing stored`,
      );
  }

  /**
   * Snapshots the session's state (after its pending work) as entry `key` (`messages` long) and
   * records it; a failure leaves the entry absent (and releases the claim on it, not_stored).
   * Resolves when the entry is recorded (or not); never rejects.
   */
  async store(session: string, key: string, kind: EntryKind, messages: number): Promise<void> {
    try {
      const maxBytes = this.maxBytes;
      if (maxBytes === 0 || !this.storable) return; // nothing kept (finally: its claim released)
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
      if (this.claimed === key) this.unhold(); // the put resolved it
    } catch (e) {
      console.warn(`prompt cache: ${kind} entry not stored: ${failure(e)}`);
    } finally {
      if (this.claimed === key) await this.release("not_stored");
    }
  }

  /**
   * store() sent without awaiting it: the host takes the snapshot in the session's order (after
   * the work sent before it, before the work sent after it) and uploads it outside that order, so
   * the request goes on meanwhile. settle() awaits it (before the response ends: the link must stay
   * open until the host's upload is done).
   */
  send(session: string, key: string, kind: EntryKind, messages: number): void {
    this.pending.push(this.store(session, key, kind, messages));
  }

  /** Awaits the stores sent (send()). */
  async settle(): Promise<void> {
    while (this.pending.length > 0) await this.pending.shift();
  }

  /**
   * Gives up an unresolved claim: "failed" (the request ended before it built the state: one of
   * those waiting claims it) or "not_stored" (built but not kept: they all go on without it).
   */
  async release(outcome: ReleaseOutcome = "failed"): Promise<void> {
    const key = this.unhold();
    if (key === undefined) return;
    await this.stub.cacheRelease(key, outcome).catch((e: unknown) => {
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
  const chain = await chains(served, kv, turns);
  let split = turns.length - 1;
  while (split > 0 && turns[split]!.role !== "user") split--;
  const docStep = split > 0 && turnsBytes(turns.slice(0, split)) >= cacheMinBytes(env);
  const claim = docStep ? await entryKey(chain[split]!, "doc") : undefined;
  return { keys: await candidates(turns, chain), chain, split, ...(claim !== undefined ? { claim } : {}) };
}

/** done.reason of a generation ended by a stop string (docs/PROTOCOL.md: end, stop, length, cancelled). */
const STOP_STRING = "stop";

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
 * copy does not hold it already (its snapshot sent, not awaited: the host takes it before the
 * question's append and uploads it meanwhile) → the rest with the generation prompt → the answer,
 * whose state is snapshotted as a reply entry (unless a stop string cut the answer: the state
 * holds the stop string's tokens, which the client never saw) — both entries recorded before the
 * response ends. Resolves with the response (a stream holds the lease).
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
  try {
    const opened = await cache.open(session, kv, { ephemeral: true }, (k) => turnsBytes(turns.slice(k)));
    const hit = cache.hit;
    let from = hit?.messages ?? 0;
    const cachedTokens = hit ? (opened.tokens_seen ?? hit.tokens) : 0;
    if (docKey !== undefined && from < split) {
      await appendTurns(c.env, link, session, turns.slice(from, split), false, {
        param: "messages",
        maxTokens: 1,
        onProgress: cache.progress,
      });
      cache.send(session, docKey, "doc", split);
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
      answered: async (answer, done) => {
        if (done.reason !== STOP_STRING) {
          const reply = await chainNext(chain[turns.length]!, { role: "assistant", content: answer });
          cache.send(session, await entryKey(reply, "reply"), "reply", turns.length + 1);
        }
        await cache.settle();
      },
      // a generation that failed: the document's entry still recorded before the link closes
      after: () => cache.settle(),
    };
    return chat.stream ? streamCompletion(job) : c.json(await wholeCompletion(job));
  } catch (e) {
    await cache.settle(); // the document built before the failure is kept
    throw e;
  }
}
