// Sessions of all tenants: frames in, frames out (the socket side is edge-link.ts). This file
// dispatches the requests, keeps each session's queue (appends and generates one at a time, in
// arrival order) and turn (one request's pieces, appends and generate; anyone else session_busy),
// runs the operations (open, append, generate, cancel, close, stats, snapshot), fails a request whose
// result cannot be checkpointed (rolling the session back), and the housekeeping (idle offload,
// the idle TTL, ephemeral sessions of closed connections, pool stats, the graceful stop). The rest
// has a module each:
//   account.ts     what a session accounts (the rule below), one object per session
//   admission.ts   quotas and the pool: LRU offload of idle sessions, policy auto, per-tenant lock
//   residency.ts   save/restore in pieces, offload, restore on demand, adopt from the store
//   pieces.ts      append pieces (more: true) until their final append
//   supervisor.ts  the engine process, restarted with backoff; sessions back to their checkpoint
//   tenants.ts     tenant limits and the sizes of requests (everything method-specific)
//
// Accounting (what a resident session counts against its tenant's quota, in KV bytes):
//   max(steady, reservation) + in-flight
// steady = the engine's kv_bytes after the last append/generate (exact, from the engine);
// reservation = at open, the first append's peak: (budget + min(prompt_tokens, chunk)) entries per
// layer (FullKV: prompt_tokens), dropped after that append; in-flight = during an append, one
// chunk of uncompressed entries per layer (min(new tokens, chunk), new tokens bounded by the
// text's UTF-8 bytes before tokenising), during a generate max_tokens entries per layer. One f16
// entry of one layer = 2 x n_head_kv x head_dim x 2 bytes (768 for SmolLM2-135M): page_bytes /
// page_slots until the first stats of an f16 session; a q8_0 or q4_0 entry is f16's scaled by
// ggml's block sizes until a session of that type's stats (kv_bytes / entries) give it exactly.
// Offloaded sessions count nothing (their state is in host memory or on disk).
import { createHash } from "node:crypto";

import {
  ENGINE_DEFAULTS,
  type HostMessage,
  isKvMethod,
  KV_METHODS,
  type Message,
  type ToHostMessage,
} from "@pyramidkv/shared";

import { Admission, type Fit } from "./admission.js";
import { type HostConfig, KV_TYPES, type KvType, TENANT_NAME, type TenantPolicy } from "./config.js";
import { ENGINE_DIED, ENGINE_TIMEOUT, EngineProcess, EngineRequestError } from "./engine.js";
import type { LinkedHost, RemoteStore } from "./edge-link.js";
import { type CacheMissReason, errorCode, HostError } from "./errors.js";
import { hostLog } from "./log.js";
import type { HostGauges, HostMetrics } from "./metrics.js";
import { Residency, StateConflictError, saveFromEngine, storedMetaOf } from "./residency.js";
import { FairScheduler } from "./scheduler.js";
import { HostSession, keyOf, type OpenParams, type Op, type Sink, type TokenLogprobs } from "./session.js";
import { encodeStateFile, FORMAT_VERSION, StateStore, type StoredSessionMeta } from "./store.js";
import { EngineSupervisor } from "./supervisor.js";
import {
  appendTokenBound,
  autoBudget,
  bytesPerEntryOf,
  generatePeakBytes,
  geometryFromHello,
  type KvGeometry,
  measuredBytesPerEntry,
  openReservationBytes,
  prefillPeakBytes,
  promptTokenBound,
  Tenants,
} from "./tenants.js";
import { checkAppend, checkCacheKey, checkContext, checkGenerate, checkOpen } from "./validate.js";

/** Ids of sessions closed by their idle TTL that the host remembers (oldest forgotten first), so a
 * request for one is answered session_expired rather than unknown_session. */
export const EXPIRED_MEMORY = 10_000;

/** The longest session_ttl_s set_tenant accepts (a year; as --session-ttl-seconds). */
const MAX_SESSION_TTL_S = 86400 * 365;

/** Why a copy here was dropped: the edge's copy is another host's (sessions' `lost`). */
const MOVED = "continued on another host";

export class SessionHost implements LinkedHost {
  private readonly sessions = new Map<string, HostSession>();
  /** keyOf(tenant, id) of sessions the TTL closed -> the TTL in seconds, oldest first */
  private readonly expired = new Map<string, number>();
  /** sessions sweepStale is checking against the edge now (a request waits for the answer) */
  private readonly sweeping = new Map<string, Promise<void>>();
  /** sessions being closed (close, TTL, their ephemeral connection), and that close */
  private readonly closings = new WeakMap<HostSession, Promise<void>>();
  /** sessions being checked against the edge's store or adopted from it, by keyOf */
  private readonly finding = new Map<string, Promise<HostSession>>();
  private readonly scheduler: FairScheduler;
  private readonly engines: EngineSupervisor;
  private readonly admission: Admission<HostSession>;
  private readonly residency: Residency;
  private tenants!: Tenants;
  /** the geometry of f16 entries (hello's bytes_per_entry); other types: entryBytes() */
  geometry!: KvGeometry;
  /** bytes of one entry of one layer per KV type, measured from a session of that type's stats */
  private readonly measuredEntryBytes = new Map<KvType, number>();
  private poolUsedBytes = 0;
  private closing = false;
  private timer?: NodeJS.Timeout;
  connections = 0;

  /** bytes_per_entry as the engine's hello gave it (host_hello's, what a restored state must match) */
  private helloBytesPerEntry = 0;

  private constructor(
    private readonly config: HostConfig,
    readonly metrics: HostMetrics,
    /** the edge's store (absent: local tiers only) */
    private readonly remote?: RemoteStore,
  ) {
    this.scheduler = FairScheduler.forHost(config); // --max-prefills, --decode-lanes, --tenant-decode-lanes
    this.engines = new EngineSupervisor({
      spawn: () =>
        EngineProcess.start({
          bin: config.engineBin,
          model: config.model,
          kvPoolBytes: config.kvPoolBytes,
          chunkSize: config.chunkSize,
          threads: config.threads,
          ctxSize: config.ctxSize,
          kvType: config.kvType,
          requestTimeoutMs: config.engineTimeoutMs,
        }),
      sessions: () => this.sessions.values(),
      died: () => metrics.engineRestarts.inc(),
    });
    this.admission = new Admission({
      sessions: () => this.sessions.values(),
      offload: (s) => this.residency.offload(s),
      quota: (tenant) => this.tenants.get(tenant).kvQuotaBytes,
      poolBytes: () => this.engines.engine.hello.pool_bytes,
      refused: (tenant) => metrics.quotaRefusals.inc({ tenant, reason: "kv_quota" }),
    });
    this.residency = new Residency(new StateStore(config.offloadDir), this.engines, this.admission, metrics, {
      maxStoredBytes: (t) => this.tenants.get(t).maxStoredBytes,
      remote,
      identity: () => ({
        model: this.hello.model,
        n_layer: this.hello.n_layer,
        bytes_per_entry: this.helloBytesPerEntry,
      }),
      cacheMemoryBytes: config.cacheMemoryBytes,
    });
  }

  static async start(config: HostConfig, metrics: HostMetrics, remote?: RemoteStore): Promise<SessionHost> {
    const host = new SessionHost(config, metrics, remote);
    const h = (await host.engines.start()).hello;
    host.geometry = geometryFromHello(h, config.chunkSize);
    host.helloBytesPerEntry = host.geometry.bytesPerEntry;
    host.tenants = new Tenants(config.tenants, config.defaultTenant, h.pool_bytes);
    for (const s of await host.residency.adopt()) host.sessions.set(keyOf(s.tenant, s.id), s);
    const tick = Math.max(50, Math.min(1000, config.idleMs / 4));
    host.timer = setInterval(() => host.housekeeping(), tick);
    host.timer.unref();
    return host;
  }

  get hello(): Message<"hello"> {
    return this.engines.engine.hello;
  }

  get enginePid(): number | undefined {
    return this.engines.engine.pid;
  }

  get healthy(): boolean {
    return this.engines.engine.alive && !this.engines.stopped;
  }

  get isClosing(): boolean {
    return this.closing;
  }

  /** host_hello's fields (edge-link.ts) but the protocol and heartbeat_ms. */
  helloFields(): ReturnType<LinkedHost["helloFields"]> {
    const h = this.hello;
    return {
      model: h.model,
      n_layer: h.n_layer,
      n_ctx: h.n_ctx,
      pool_bytes: h.pool_bytes,
      bytes_per_entry: this.helloBytesPerEntry,
      ...(h.chat_template !== undefined ? { chat_template: h.chat_template } : {}),
      cache_fingerprint: cacheFingerprint(h, this.config),
    };
  }

  /** A heartbeat's load (edge-link.ts): what routing reads. */
  load(): ReturnType<LinkedHost["load"]> {
    const pool = this.hello.pool_bytes;
    const used = this.admission.usage();
    let resident = 0;
    let active = 0;
    for (const s of this.sessions.values()) {
      if (s.resident) resident++;
      active += s.ops.length;
    }
    const queued = this.scheduler.queued("prefill") + this.scheduler.queued("decode");
    return {
      pool_bytes: pool,
      kv_used_bytes: used,
      free_bytes: Math.max(0, pool - used),
      sessions: this.sessions.size,
      resident,
      active: Math.max(0, active - queued),
      queued,
    };
  }

  /** KV bytes accounted to every tenant's sessions (steady, reservations, in-flight peaks). */
  get kvUsedBytes(): number {
    return this.admission.usage();
  }

  // ---- requests -------------------------------------------------------------------------------

  handle(sink: Sink, msg: ToHostMessage): void {
    const t0 = performance.now();
    const fail = (e: unknown) => {
      const { code, message, reason } = errorCode(e);
      this.metrics.errors.inc({ code });
      if (code !== "cancelled")
        hostLog(
          `${msg.type} ${msg.tenant.slice(0, 64)}/${"session" in msg ? (msg.session ?? "").slice(0, 64) : ""}: ${code}: ${message}`,
          "request_id" in msg ? msg.request_id : undefined,
        );
      if (sink.open)
        sink.send({
          type: "error",
          id: msg.id,
          ...("session" in msg && msg.session !== undefined ? { session: msg.session } : {}),
          code,
          message,
          ...(reason !== undefined ? { reason } : {}),
        });
    };
    const finish = () => this.metrics.latency.observe({ type: msg.type }, (performance.now() - t0) / 1000);
    try {
      // edge-link.ts has already answered frames of any tenant but its channel's with 'unauthorized'.
      if (!TENANT_NAME.test(msg.tenant))
        throw new HostError(
          "invalid",
          `${msg.type}: tenant '${msg.tenant.slice(0, 64)}' must match ${TENANT_NAME.source}`,
        );
      if (this.closing && msg.type !== "stats") throw new HostError("shutting_down", "the host is shutting down");
      switch (msg.type) {
        case "open_session":
          return void this.open(sink, msg).then(finish, fail);
        case "append":
          checkAppend(msg);
          return void this.withSession(msg.tenant, msg.session, (s) => this.enqueue(s, sink, "append", msg, t0)).then(
            finish,
            fail,
          );
        case "generate":
          checkGenerate(msg, this.hello.n_ctx);
          return void this.withSession(msg.tenant, msg.session, (s) => this.enqueue(s, sink, "generate", msg, t0)).then(
            finish,
            fail,
          );
        case "snapshot": {
          checkCacheKey("snapshot", "key", msg.key);
          const counted = (result: string) => this.metrics.snapshots.inc({ result });
          return void this.withSession(msg.tenant, msg.session, (s) => this.snapshot(s, sink, msg)).then(
            () => {
              counted("ok");
              finish();
            },
            (e) => {
              counted(errorCode(e).code);
              fail(e);
            },
          );
        }
        case "cancel":
          return void this.cancel(sink, msg).then(finish, fail);
        case "close":
          return void this.close(sink, msg).then(finish, fail);
        case "stats":
          return void this.stats(sink, msg).then(finish, fail);
        case "set_tenant": {
          const policy = msg.policy as TenantPolicy | undefined;
          if (policy !== undefined && policy !== "refuse" && policy !== "auto")
            throw new HostError("invalid", `set_tenant: policy '${policy}' is not one of refuse, auto`);
          const ttl = msg.session_ttl_s;
          if (ttl !== undefined && (ttl < 1 || ttl > MAX_SESSION_TTL_S))
            throw new HostError(
              "invalid",
              `set_tenant: session_ttl_s ${ttl} is out of range (accepted: 1..${MAX_SESSION_TTL_S} seconds)`,
            );
          const t = this.tenants.set(msg.tenant, {
            kvQuotaBytes: msg.kv_quota_bytes,
            maxSessions: msg.max_sessions,
            policy,
            sessionTtlS: ttl,
            maxStoredBytes: msg.max_stored_bytes,
          });
          sink.send({
            type: "tenant_set",
            id: msg.id,
            tenant: msg.tenant,
            kv_quota_bytes: t.kvQuotaBytes,
            max_sessions: t.maxSessions,
            policy: t.policy,
            session_ttl_s: t.sessionTtlS,
            max_stored_bytes: t.maxStoredBytes,
          });
          finish();
          return;
        }
      }
    } catch (e) {
      fail(e);
    }
  }

  /** A connection went away: nobody reads its generations any more; the turns it held end, and the
   * ephemeral sessions it opened are closed (what a dead edge left behind never outlives it; the
   * rest the idle TTL closes). */
  connectionClosed(sink: Sink): void {
    for (const s of [...this.sessions.values()]) {
      const key = s.turn.releaseSink(sink);
      if (key !== undefined) s.pieces.dropFrom(key);
      for (const op of s.ops) if (op.sink === sink) void this.cancelOp(s, op);
      if (s.openedBy === sink) void this.closeSession(s, "closed with the connection that opened it (ephemeral)");
    }
  }

  /** `run` on the session: at once when it is known here and checked in this connection epoch;
   * else after its check against the edge's copy, or its adoption from the edge's store. Requests
   * of one session run in arrival order either way (they wait on the same promise). */
  private withSession(tenant: string, session: string, run: (s: HostSession) => Promise<void>): Promise<void> {
    const found = this.find(tenant, session);
    return found instanceof HostSession ? run(found) : found.then(run);
  }

  /** The session: known here (checked once per connection epoch against the edge's copy: another
   * host's newer one replaces it), or adopted from the edge's store; unknown_session when neither
   * has it. */
  private find(tenant: string, session: string): HostSession | Promise<HostSession> {
    const key = keyOf(tenant, session);
    const pending = this.finding.get(key);
    if (pending) return pending;
    const sweeping = this.sweeping.get(key); // checked by sweepStale now: its answer, then on
    if (sweeping) {
      const again = () => this.find(tenant, session);
      return sweeping.then(again, again);
    }
    const remote = this.remote;
    const s = this.sessions.get(key);
    // Connected, this host's memory of having expired the session does not answer for it (the
    // edge owns the TTL: the session may have moved on and been used elsewhere since): the edge's
    // copy is adopted when it has one, session_expired only when it has none.
    if (!remote?.connected) return this.lookup(tenant, session);
    if (s && (s.openedBy !== undefined || s.epoch === remote.epoch || s.lost)) return this.lookup(tenant, session);
    const work = (async () => {
      if (s) {
        const head = await remote.head(tenant, session).catch((e: Error) => {
          throw new HostError(
            "timeout",
            `checking session '${session.slice(0, 64)}' against the edge's store: ${e.message}`,
          );
        });
        // Ours stands when the edge's copy is ours, or when the edge has none and this host never
        // stored one there (a new session, or one only ever in this host's offload directory).
        // The edge having none of a session this host stored there: it is recorded on another host
        // (the edge's fence) or was deleted there; ours goes.
        if (head ? head.etag === s.etag : s.etag === undefined) {
          s.epoch = remote.epoch;
          return this.lookup(tenant, session);
        }
        hostLog(
          head
            ? `session ${s.engineName.slice(0, 129)}: the edge's copy (etag ${head.etag}) is not this host's (${s.etag ?? "none"}): continued elsewhere, restored from the edge's store`
            : `session ${s.engineName.slice(0, 129)}: the edge has no copy of it for this host (this host's had etag ${s.etag}): recorded on another host or deleted, this host's copy dropped`,
        );
        await this.dropCopy(s, MOVED, true);
      }
      const limit = this.tenants.get(tenant).maxSessions;
      const count = [...this.sessions.values()].filter((x) => x.tenant === tenant).length;
      if (count >= limit && (await remote.head(tenant, session).catch(() => undefined))) {
        this.metrics.quotaRefusals.inc({ tenant, reason: "session_limit" });
        throw new HostError(
          "session_limit",
          `tenant '${tenant}' has ${count} sessions on this host, its limit is ${limit}: session '${session.slice(0, 64)}' cannot be restored here`,
        );
      }
      const adopted = await this.residency.adoptRemote(tenant, session);
      if (!adopted) return this.lookup(tenant, session);
      if (this.sessions.has(key)) return this.lookup(tenant, session); // opened meanwhile
      this.expired.delete(key);
      this.sessions.set(key, adopted);
      this.metrics.restores.inc({ tenant });
      return adopted;
    })().finally(() => this.finding.delete(key));
    this.finding.set(key, work);
    return work;
  }

  /** A new connection epoch (`epoch`, main.ts): the copies here not checked in it yet are checked
   * against the edge's in the background, a few at a time; those the edge's copy does not match,
   * or that the edge has none of for this host (recorded on another host), go: they hold pool KV
   * and count against the tenants' max_sessions here. A session a request uses meanwhile is
   * checked by that request instead (find). */
  async sweepStale(epoch: number, batch = 4): Promise<void> {
    const remote = this.remote;
    if (!remote) return;
    const due = (s: HostSession) =>
      remote.connected &&
      remote.epoch === epoch &&
      this.sessions.get(keyOf(s.tenant, s.id)) === s &&
      !this.finding.has(keyOf(s.tenant, s.id)) &&
      s.openedBy === undefined &&
      !s.lost &&
      !s.busy &&
      s.epoch !== epoch;
    const todo = [...this.sessions.values()].filter(due);
    for (let at = 0; at < todo.length && !this.closing; at += batch)
      await Promise.all(
        todo.slice(at, at + batch).map(async (s) => {
          const key = keyOf(s.tenant, s.id);
          if (!due(s)) return;
          const work = (async () => {
            const head = await remote.head(s.tenant, s.id).catch(() => null);
            if (head === null || !due(s)) return; // not answered: the session's next use checks it
            if (head ? head.etag === s.etag : s.etag === undefined) {
              s.epoch = epoch;
              return;
            }
            hostLog(
              `session ${s.engineName.slice(0, 129)}: the edge's copy (${head ? `etag ${head.etag}` : "none for this host"}) is not this host's (${s.etag ?? "none"}): this host's copy is dropped`,
            );
            await this.dropCopy(s, MOVED, true);
          })().finally(() => this.sweeping.delete(key));
          this.sweeping.set(key, work);
          await work;
        }),
      );
  }

  /** This host's copy of the session is not the one to continue (another host wrote the edge's
   * since): forgotten here, engine and local store, without touching the edge's copy. `wait`: its
   * queued work ends first (not from inside its own queue). */
  private async dropCopy(s: HostSession, why: string, wait: boolean): Promise<void> {
    const key = keyOf(s.tenant, s.id);
    if (this.sessions.get(key) === s) this.sessions.delete(key);
    if (wait) {
      await Promise.all(s.ops.map((op) => this.cancelOp(s, op)));
      await s.chain;
    }
    s.lost = why;
    s.pieces.drop();
    s.turn.release();
    if (s.resident) {
      const engine = this.engines.engine;
      if (engine.alive) await engine.call({ type: "close", session: s.engineName }).catch(() => {});
      s.kv.offloaded();
    }
    await this.residency
      .dropLocal(s)
      .catch((e) => hostLog(`${s.engineName}: dropping its local copy: ${e instanceof Error ? e.message : String(e)}`));
  }

  private lookup(tenant: string, session: string): HostSession {
    const key = keyOf(tenant, session);
    const s = this.sessions.get(key);
    if (!s) {
      const ttl = this.expired.get(key);
      if (ttl !== undefined)
        throw new HostError(
          "session_expired",
          `session '${session.slice(0, 64)}' of tenant '${tenant}' was closed after ${ttl} s idle (the tenant's session_ttl_s)`,
        );
      throw new HostError("unknown_session", `no session '${session.slice(0, 64)}' for tenant '${tenant}'`);
    }
    if (s.lost) {
      this.sessions.delete(keyOf(tenant, session));
      throw new HostError("session_lost", `session '${session.slice(0, 64)}' was lost: ${s.lost}`);
    }
    return s;
  }

  /** session_exists, or session_limit, when `msg` cannot open a session now. */
  private checkRoom(msg: HostMessage<"open_session">): void {
    const key = keyOf(msg.tenant, msg.session);
    if (this.sessions.has(key)) throw new HostError("session_exists", `session '${msg.session.slice(0, 64)}' exists`);
    const limits = this.tenants.get(msg.tenant);
    const count = [...this.sessions.values()].filter((s) => s.tenant === msg.tenant).length;
    if (count >= limits.maxSessions) {
      this.metrics.quotaRefusals.inc({ tenant: msg.tenant, reason: "session_limit" });
      throw new HostError(
        "session_limit",
        `tenant '${msg.tenant}' has ${count} sessions, its limit is ${limits.maxSessions}`,
      );
    }
  }

  private async open(sink: Sink, msg: HostMessage<"open_session">): Promise<void> {
    if (msg.from_cache !== undefined) return this.openFromCache(sink, msg, msg.from_cache);
    const key = keyOf(msg.tenant, msg.session);
    this.checkRoom(msg);
    const limits = this.tenants.get(msg.tenant);
    const {
      id: _id,
      type: _type,
      tenant: _tenant,
      session: _session,
      request_id: _requestId,
      prompt_tokens: _promptTokens,
      prompt_bytes: _promptBytes,
      ephemeral: _ephemeral,
      from_cache: _fromCache,
      ...rest
    } = msg;
    const promptTokens = promptTokenBound(msg.prompt_tokens, msg.prompt_bytes, this.hello.n_ctx);
    // Known before admission sizes it by the method's traits (the engine would refuse it anyway).
    if (msg.method !== undefined && !isKvMethod(msg.method)) {
      throw new HostError(
        "invalid",
        `open_session: method '${msg.method.slice(0, 64)}' is not one of ${KV_METHODS.join(", ")}`,
      );
    }
    checkOpen(msg);
    const params: OpenParams = {
      ...rest,
      method: msg.method ?? ENGINE_DEFAULTS.method,
      budget: msg.budget ?? ENGINE_DEFAULTS.budget,
      // Saved with the session's state: a host restarted with another --kv-type reopens it as it was.
      kv_type: msg.kv_type ?? this.config.kvType,
    };
    const g = this.geometryFor(params);
    const s = new HostSession(msg.tenant, msg.session, params);
    s.epoch = this.remote?.epoch ?? 0; // new: nothing of it at the edge to check against
    if (msg.ephemeral === true) s.openedBy = sink;
    this.sessions.set(key, s);
    this.expired.delete(key);
    s.pendingOps++;
    try {
      let reservation = openReservationBytes(g, params.method, params.budget, promptTokens);
      const fit: Fit | undefined =
        limits.policy === "auto"
          ? (free) => {
              const shrunk = autoBudget(g, params.method, promptTokens, params.window ?? ENGINE_DEFAULTS.window, free);
              if (!shrunk) return null;
              params.budget = shrunk.budget;
              reservation = shrunk.reservation;
              return reservation;
            }
          : undefined;
      await this.admission.admit(s, reservation, fit); // reserves `reservation`
      const engine = await this.engines.ready;
      await engine.call({ type: "open", session: s.engineName, ...params });
      s.kv.opened();
      sink.send({
        type: "opened",
        id: msg.id,
        session: msg.session,
        method: params.method,
        budget: params.budget,
        reserved_bytes: reservation,
      });
    } catch (e) {
      this.sessions.delete(key);
      // Timed out: the engine may open it yet; closed there so that the id can be opened again.
      if (e instanceof EngineRequestError && e.code === ENGINE_TIMEOUT && this.engines.engine.alive)
        void this.engines.engine.call({ type: "close", session: s.engineName }).catch(() => {});
      throw e;
    } finally {
      s.pendingOps--;
    }
  }

  /** open_session.from_cache: a new session (its own id, its ephemeral flag) as a copy of the
   * tenant's cached state `cacheKey` (snapshot memory, else the edge's store; cache_miss when it is
   * gone, damaged or another model's): the state's params (the open's method and budget are
   * ignored) and tokens, admitted and restored like an offloaded session, and — not ephemeral —
   * checkpointed to the edge's store, all before `opened`. Copies share nothing: each is restored
   * into the engine from the state file. */
  private async openFromCache(sink: Sink, msg: HostMessage<"open_session">, cacheKey: string): Promise<void> {
    checkCacheKey("open_session", "from_cache", cacheKey);
    this.checkRoom(msg);
    let cached: Awaited<ReturnType<Residency["getCached"]>>;
    try {
      cached = await this.residency.getCached(msg.tenant, cacheKey);
    } catch (e) {
      if (e instanceof HostError && e.code === "cache_miss") this.metrics.cacheOpens.inc({ source: "miss" });
      throw e;
    }
    this.checkRoom(msg); // opened meanwhile (another open of the id), or the tenant's last room taken
    const key = keyOf(msg.tenant, msg.session);
    const params = cached.meta.params as OpenParams;
    const s = new HostSession(msg.tenant, msg.session, params, {
      tokensSeen: cached.meta.tokens_seen,
      kvBytes: cached.meta.kv_bytes,
    });
    s.epoch = this.remote?.epoch ?? 0; // new: nothing of it at the edge to check against
    if (msg.ephemeral === true) s.openedBy = sink;
    this.sessions.set(key, s);
    this.expired.delete(key);
    s.pendingOps++;
    try {
      await this.residency.openCopy(s, cached.state);
      this.metrics.cacheOpens.inc({ source: cached.source });
      sink.send({
        type: "opened",
        id: msg.id,
        session: msg.session,
        method: params.method,
        budget: params.budget,
        reserved_bytes: s.kv.steady,
        tokens_seen: s.tokensSeen,
        cached_bytes: cached.bytes,
      });
    } catch (e) {
      if (this.sessions.get(key) === s) this.sessions.delete(key);
      // The engine refused the state (damaged, or an engine whose state format differs): a miss.
      if (s.lost) {
        this.metrics.cacheOpens.inc({ source: "miss" });
        this.residency.snapshots.delete(msg.tenant, cacheKey);
        throw new HostError(
          "cache_miss",
          `cached state '${cacheKey}' of tenant '${msg.tenant}' cannot be restored here: ${s.lost}`,
          "damaged" satisfies CacheMissReason,
        );
      }
      throw e;
    } finally {
      s.pendingOps--;
    }
  }

  /** snapshot: the session's state as the requests queued before this one leave it (taken in its
   * queue: from the engine, or the local store when offloaded), as a state file naming `key`,
   * within max_bytes (too_large: nothing stored), stored as the tenant's cached state (the edge's
   * store, awaited, and this host's memory). The session itself is untouched: a snapshot that
   * fails (checkpoint_failed when the edge refuses it) changes nothing of it. The edge's put runs
   * outside the session's queue: the next request need not wait for it. */
  private async snapshot(s: HostSession, sink: Sink, msg: HostMessage<"snapshot">): Promise<void> {
    s.pendingOps++;
    const taken = s.chain.then(async () => {
      try {
        if (s.lost) throw new HostError("session_lost", `session '${s.id.slice(0, 64)}' was lost: ${s.lost}`);
        return await this.stateNow(s);
      } finally {
        s.pendingOps--;
      }
    });
    s.chain = taken.then(
      () => {},
      () => {},
    );
    const { meta, state } = await taken;
    const cachedMeta: StoredSessionMeta = { ...meta, session: msg.key };
    const file = encodeStateFile(cachedMeta, state, {
      model: this.hello.model,
      n_layer: this.hello.n_layer,
      bytes_per_entry: this.helloBytesPerEntry,
    });
    if (msg.max_bytes !== undefined && file.length > msg.max_bytes)
      throw new HostError(
        "too_large",
        `snapshot: the state of session '${s.id.slice(0, 64)}' is ${file.length} bytes, over max_bytes ${msg.max_bytes}: not stored`,
      );
    await this.residency.putCached(s.tenant, msg.key, file, cachedMeta);
    if (sink.open)
      sink.send({
        type: "snapshotted",
        id: msg.id,
        session: s.id,
        key: msg.key,
        bytes: file.length,
        tokens_seen: meta.tokens_seen,
        kv_bytes: meta.kv_bytes,
      });
  }

  /** The session's state and meta as it is now (in its queue): from the engine when resident (its
   * exact tokens_seen and kv_bytes after the save, which decodes a generation's last token), else
   * from the local store; one whose state is neither there (its checkpoint is the edge's only, or
   * it is reopened empty) is restored first. */
  private async stateNow(s: HostSession): Promise<{ meta: StoredSessionMeta; state: Uint8Array }> {
    if (!s.resident) {
      const stored = s.reopen ? undefined : await this.residency.storedState(s);
      if (stored) return { meta: storedMetaOf(s), state: stored };
      await this.residency.ensureResident(s, 0);
      s.kv.end();
    }
    const engine = await this.engines.ready;
    const state = await saveFromEngine(engine, s.engineName);
    const st = await engine.call<"stats_result">({ type: "stats", session: s.engineName });
    this.learnGeometry(s, st);
    const tokens = st.tokens_seen ?? s.tokensSeen;
    if (tokens !== s.tokensSeen) s.dirty = true; // the generation's last token, decoded by the save
    s.tokensSeen = tokens;
    s.kv.measure(st.kv_bytes ?? s.kv.steady);
    return { meta: storedMetaOf(s), state };
  }

  /** The geometry a session of these parameters is sized with: its chunk, its KV type's entry. */
  private geometryFor(params: OpenParams): KvGeometry {
    return {
      ...this.geometry,
      bytesPerEntry: this.entryBytes(kvTypeOf(params, this.hello.defaults?.kv_type)),
      chunkSize: params.chunk_size ?? this.geometry.chunkSize,
    };
  }

  /** Bytes of one entry of one layer of `type`: measured, else from f16's by ggml's block sizes. */
  entryBytes(type: KvType): number {
    if (type === "f16") return this.geometry.bytesPerEntry;
    return this.measuredEntryBytes.get(type) ?? bytesPerEntryOf(this.geometry.bytesPerEntry, type);
  }

  // append and generate run one at a time per session, in arrival order.
  private enqueue(
    s: HostSession,
    sink: Sink,
    kind: "append" | "generate",
    msg: HostMessage<"append"> | HostMessage<"generate">,
    t0: number,
  ): Promise<void> {
    // Refused at once (session_busy) when another request holds the turn, before anything is queued.
    const before = s.turn.current;
    const turn = s.turn.claim(msg.request_id, sink, s.ops.length === 0, s.id);
    if (turn !== before) s.pieces.drop(); // a holder silent past the grace left them
    const op: Op = { kind, id: msg.id, sink, requestId: msg.request_id, turn, cancelled: false };
    s.ops.push(op);
    s.pendingOps++;
    const run = async () => {
      let ok = false;
      try {
        if (op.cancelled) throw new HostError("cancelled", `${kind} cancelled before it started`);
        if (s.lost) throw new HostError("session_lost", `session '${s.id}' was lost: ${s.lost}`);
        if (kind === "generate" && s.turnLost) throw new HostError(s.turnLost.code, s.turnLost.message);
        if (kind === "append") s.turnLost = undefined; // the edge sends the turn again
        try {
          if (kind === "append") await this.append(s, op, msg as HostMessage<"append">);
          else await this.generate(s, op, msg as HostMessage<"generate">, t0);
        } catch (e) {
          // Timed out: the engine may still be at it; its copy is discarded (back to the checkpoint).
          if (e instanceof EngineRequestError && e.code === ENGINE_TIMEOUT) await this.rollback(s, op, e.message);
          // Its restore found another host's copy at the edge (residency.ts): this one goes; the
          // next request adopts the edge's.
          if (e instanceof StateConflictError) {
            hostLog(`${kind} ${s.engineName}: ${e.message}: this host's copy is dropped`, op.requestId);
            await this.dropCopy(s, MOVED, false);
            throw new HostError(
              "checkpoint_failed",
              `${kind}: ${e.message}; this host's copy is dropped and the request can be retried (it continues from the edge's copy)`,
            );
          }
          throw e;
        }
        ok = true;
      } finally {
        s.ops.splice(s.ops.indexOf(op), 1);
        s.pendingOps--;
        s.lastUsed = Date.now();
        if (kind === "generate") s.turnLost = undefined; // reported by this generate, or moot
        // A turn ends with its generate, or with a failed append (the edge ends the request there).
        if (kind === "generate" || !ok) {
          s.turn.release(turn);
          s.pieces.dropFrom(turn);
        } else s.turn.touch(turn);
      }
    };
    const result = s.chain.then(run);
    s.chain = result.catch(() => {});
    return result;
  }

  private async append(s: HostSession, op: Op, msg: HostMessage<"append">): Promise<void> {
    if (msg.more) {
      const buffered = s.pieces.add(op.turn, msg.text ?? "");
      if (op.sink.open) op.sink.send({ type: "buffered", id: op.id, session: s.id, buffered_bytes: buffered });
      return;
    }
    checkContext(msg, s.tokensSeen, this.hello.n_ctx);
    const { text, messages } = withPieces(s, msg);
    const newTokens = appendTokenBound(text, msg.tokens, msg.chat, messages);
    // FullKV keeps every token it prefills: its peak is all of them, up to the context's room.
    const extra = prefillPeakBytes(
      this.geometryFor(s.params),
      newTokens,
      s.params.method,
      this.hello.n_ctx - s.tokensSeen,
    );
    await this.residency.ensureResident(s, extra);
    try {
      const engine = await this.engines.ready;
      const job = this.scheduler.run(
        s.tenant,
        "prefill",
        () =>
          new Promise<Message<"appended">>((resolve, reject) => {
            if (op.cancelled) return reject(new HostError("cancelled", "append cancelled before it started"));
            op.engine = engine;
            op.engineId = engine.request(
              {
                type: "append",
                session: s.engineName,
                text,
                tokens: msg.tokens,
                chat: msg.chat,
                messages,
                add_generation_prompt: msg.add_generation_prompt,
                max_tokens: msg.max_tokens,
              },
              (m) => {
                if (m.type === "progress")
                  op.sink.open &&
                    op.sink.send({ type: "progress", id: op.id, session: s.id, done: m.done, total: m.total });
                if (m.type !== "appended") return false;
                resolve(m);
                return true;
              },
              reject,
            );
          }),
      );
      op.abortQueued = job.abort;
      const done = await whileQueued(op, s.id, "prefill", job);
      this.metrics.promptTokens.inc({ tenant: s.tenant }, done.tokens_seen - s.tokensSeen);
      s.tokensSeen = done.tokens_seen;
      s.kv.settle(done.kv_bytes);
      s.dirty = true;
      // Answered once checkpointed: when the edge sees 'appended', an engine crash loses nothing.
      // An append that opens the assistant's turn is checkpointed with its generate (only that
      // may follow it): the turn is saved, or rolled back, whole, so the edge can send it again.
      const opensTurn = messages !== undefined && msg.add_generation_prompt !== false;
      await this.afterOp(s, op, !opensTurn);
      s.openTurn = opensTurn;
      if (!opensTurn) s.ackedTokens = s.tokensSeen;
      if (op.sink.open)
        op.sink.send({
          type: "appended",
          id: op.id,
          session: s.id,
          tokens_seen: done.tokens_seen,
          kv_bytes: done.kv_bytes,
        });
    } finally {
      s.kv.end();
    }
  }

  private async generate(s: HostSession, op: Op, msg: HostMessage<"generate">, t0: number): Promise<void> {
    const maxTokens = msg.max_tokens ?? ENGINE_DEFAULTS.max_tokens;
    await this.residency.ensureResident(s, generatePeakBytes(this.geometryFor(s.params), maxTokens));
    try {
      const engine = await this.engines.ready;
      // Every sampling field was range-checked (checkGenerate) before the request was queued.
      const { type: _t, tenant: _tenant, session: _s, id: _id, request_id: _rid, ...sampling } = msg;
      let first = true;
      const job = this.scheduler.run(
        s.tenant,
        "decode",
        () =>
          new Promise<Message<"done">>((resolve, reject) => {
            if (op.cancelled) return reject(new HostError("cancelled", "generate cancelled before it started"));
            op.engine = engine;
            op.engineId = engine.request(
              { type: "generate", session: s.engineName, ...sampling },
              (m) => {
                if (m.type === "token") {
                  if (first) this.metrics.firstToken.observe({}, (performance.now() - t0) / 1000);
                  first = false;
                  this.metrics.generatedTokens.inc({ tenant: s.tenant });
                  if (op.sink.open) op.sink.sendToken(op.id, s.id, m.token, m.text, tokenLogprobs(m));
                  return false;
                }
                if (m.type !== "done") return false;
                resolve(m);
                return true;
              },
              reject,
            );
          }),
      );
      op.abortQueued = job.abort;
      const done = await whileQueued(op, s.id, "decode", job);
      s.dirty = true;
      s.kv.end();
      await this.afterOp(s, op);
      s.openTurn = false;
      s.ackedTokens = s.tokensSeen;
      if (op.sink.open)
        op.sink.send({
          type: "done",
          id: op.id,
          session: s.id,
          reason: done.reason,
          new_tokens: done.new_tokens,
          text: done.text,
          seed: done.seed,
        });
    } finally {
      s.kv.end();
    }
  }

  // Exact size from the engine, then the checkpoint, before the result is answered. A checkpoint
  // that fails (a save error, the tenant's stored bytes, a deadline) fails the request, and the
  // session goes back to its last checkpoint, so host, engine and edge agree and a retry is clean;
  // an engine death meanwhile is engine_restarted (the supervisor put the session back), or
  // session_lost for one with nothing to go back to. Without checkpoints only the engine's death
  // fails the request (the result stands in the engine, but is not the edge's to lose silently).
  private async afterOp(s: HostSession, op: Op, save = true): Promise<void> {
    const checkpoint = this.config.checkpoint && save;
    try {
      const engine = await this.engines.ready;
      // The engine decodes a generation's last token when the session is next used or saved: a
      // one-byte save decodes it now, so that the stats and the checkpoint's meta count it.
      if (checkpoint && op.kind === "generate")
        await engine.call({ type: "save", session: s.engineName, offset: 0, max_bytes: 1 });
      const st = await engine.call<"stats_result">({ type: "stats", session: s.engineName });
      this.learnGeometry(s, st);
      s.kv.measure(st.kv_bytes ?? s.kv.steady);
      s.tokensSeen = st.tokens_seen ?? s.tokensSeen;
      if (checkpoint) await this.residency.save(s, engine);
    } catch (e) {
      const why = e instanceof Error ? e.message : String(e);
      const died = e instanceof EngineRequestError && e.code === ENGINE_DIED;
      if (!died && !checkpoint) {
        hostLog(`${op.kind} ${s.engineName}: stats after it failed: ${why}`, op.requestId);
        return;
      }
      if (e instanceof StateConflictError) {
        hostLog(`${op.kind} ${s.engineName}: ${why}: this host's copy is dropped`, op.requestId);
        await this.dropCopy(s, MOVED, false);
        throw new HostError(
          "checkpoint_failed",
          `${op.kind}: ${why}; this host's copy is dropped and the request can be retried (it continues from the edge's copy)`,
        );
      }
      if (!died) {
        hostLog(`${op.kind} ${s.engineName}: checkpoint failed: ${why}`, op.requestId);
        await this.rollback(s, op, why);
      }
      if (s.lost === MOVED)
        throw new HostError(
          "checkpoint_failed",
          `${op.kind}: its result could not be checkpointed (${why}), and the edge's checkpoint is another host's: this host's copy is dropped, the request can be retried (it continues from the edge's copy)`,
        );
      if (s.lost) throw new HostError("session_lost", `session '${s.id.slice(0, 64)}' was lost: ${s.lost}`);
      if (died || !this.engines.engine.alive)
        throw new EngineRequestError(ENGINE_DIED, died ? why : `the engine was restarted (${why})`);
      throw new HostError(
        e instanceof HostError && e.code === "stored_quota_exceeded" ? "stored_quota_exceeded" : "checkpoint_failed",
        `${op.kind}: its result could not be checkpointed (${why}); the session is back at its last checkpoint (${s.tokensSeen} tokens seen), the request can be retried`,
      );
    }
  }

  /** The engine's copy of the session is not what the store holds (a checkpoint failed, a request
   * timed out): discard it, back to the checkpoint, restored at once when the engine can. */
  private async rollback(s: HostSession, op: Op, why: string): Promise<void> {
    const engine = this.engines.engine;
    if (s.resident) {
      if (engine.alive) {
        await engine.call({ type: "cancel", session: s.engineName }).catch(() => {});
        await engine.call({ type: "close", session: s.engineName }).catch(() => {});
      }
      s.kv.end();
      s.backToCheckpoint(
        `${op.kind} could not be checkpointed and nothing was saved before (${why})`,
        "checkpoint_failed",
      );
    }
    if (s.lost || !this.engines.engine.alive) return;
    try {
      await this.residency.ensureResident(s, 0); // else restored by its next request
      s.kv.end();
    } catch (e) {
      hostLog(
        `${s.engineName}: restore after a rollback failed: ${e instanceof Error ? e.message : String(e)}`,
        op.requestId,
      );
      // The edge's checkpoint is another host's: this copy goes (the next request adopts the edge's).
      if (e instanceof StateConflictError) await this.dropCopy(s, MOVED, false);
    }
  }

  // The entry size of the session's KV type, exact from its first stats that hold entries.
  private learnGeometry(s: HostSession, st: Message<"stats_result">): void {
    const type = kvTypeOf(s.params, this.hello.defaults?.kv_type);
    if (this.measuredEntryBytes.has(type)) return;
    const bytes = measuredBytesPerEntry(st, this.geometry.nLayer);
    if (bytes === 0) return;
    this.measuredEntryBytes.set(type, bytes);
    if (type === "f16") this.geometry.bytesPerEntry = bytes;
  }

  // ---- cancel, close, stats -------------------------------------------------------------------------

  private async cancelOp(s: HostSession, op: Op): Promise<void> {
    op.cancelled = true;
    if (op.abortQueued?.(new HostError("cancelled", `${op.kind} cancelled while queued`))) return;
    if (op.engine && op.engineId !== undefined && op.engine.alive) {
      await op.engine.call({ type: "cancel", session: s.engineName }).catch(() => {});
      // A cancelled prefill gets no frame of its own from the engine: fail it here.
      if (op.kind === "append") op.engine.fail(op.engineId, new EngineRequestError("cancelled", "append cancelled"));
    }
  }

  // Anyone may cancel: the turn ends with it.
  private async cancel(sink: Sink, msg: HostMessage<"cancel">): Promise<void> {
    const s = this.lookup(msg.tenant, msg.session);
    s.pieces.drop();
    s.turn.release();
    await Promise.all(s.ops.map((op) => this.cancelOp(s, op)));
    sink.send({ type: "cancelled", id: msg.id, session: msg.session });
  }

  private async close(sink: Sink, msg: HostMessage<"close">): Promise<void> {
    await this.closeSession(this.lookup(msg.tenant, msg.session), "closed");
    sink.send({ type: "closed", id: msg.id, session: msg.session });
  }

  /** Closes the session for good (close, the TTL, its ephemeral connection): unknown at once, its
   * work cancelled, closed in the engine, its stored state deleted. Once, however many ask. */
  private closeSession(s: HostSession, why: string): Promise<void> {
    const running = this.closings.get(s);
    if (running) return running;
    const key = keyOf(s.tenant, s.id);
    if (this.sessions.get(key) === s) this.sessions.delete(key);
    const work = (async () => {
      await Promise.all(s.ops.map((op) => this.cancelOp(s, op)));
      await s.chain;
      s.lost = why;
      s.pieces.drop();
      s.turn.release();
      if (s.resident) {
        const engine = this.engines.engine;
        if (engine.alive) await engine.call({ type: "close", session: s.engineName }).catch(() => {});
        s.kv.offloaded();
      }
      await this.residency.forget(s);
    })();
    this.closings.set(s, work);
    work.catch((e) => hostLog(`close of ${s.engineName}: ${e instanceof Error ? e.message : String(e)}`));
    return work;
  }

  /** The session was idle past its tenant's TTL: closed, remembered as expired, counted. */
  private expire(s: HostSession, ttlS: number): void {
    const key = keyOf(s.tenant, s.id);
    this.expired.delete(key);
    this.expired.set(key, ttlS);
    if (this.expired.size > EXPIRED_MEMORY) this.expired.delete(this.expired.keys().next().value!);
    this.metrics.sessionsExpired.inc({ tenant: s.tenant });
    void this.closeSession(s, `expired after ${ttlS} s idle`).catch(() => {});
  }

  private async stats(sink: Sink, msg: HostMessage<"stats">): Promise<void> {
    if (msg.session === undefined) {
      const t = this.tenants.get(msg.tenant);
      const mine = [...this.sessions.values()].filter((s) => s.tenant === msg.tenant);
      sink.send({
        type: "stats_result",
        id: msg.id,
        tenant: msg.tenant,
        kv_quota_bytes: t.kvQuotaBytes,
        kv_used_bytes: this.admission.usage(msg.tenant),
        max_sessions: t.maxSessions,
        sessions: mine.length,
        offloaded: mine.filter((s) => !s.resident).length,
        policy: t.policy,
        stored_bytes: this.residency.storedBytes(msg.tenant),
        max_stored_bytes: t.maxStoredBytes,
        session_ttl_s: t.sessionTtlS,
      });
      return;
    }
    const s = await this.find(msg.tenant, msg.session);
    // Stats do not queue behind the session's requests, but an offload's close in the engine is
    // awaited: asked in between, the engine no longer knows the session while this host still
    // counts it resident. A close sent while the engine is asked is awaited when the engine's
    // answer is an error, and the answer is then the offloaded session's (so is it when the engine
    // died meanwhile: the session is back at its checkpoint, outside the engine).
    await s.offloading;
    let st: Message<"stats_result"> | undefined;
    if (s.resident) {
      const engine = await this.engines.ready;
      st = await engine.call<"stats_result">({ type: "stats", session: s.engineName }).catch(async (e: unknown) => {
        await s.offloading;
        if (s.resident) throw e;
        return undefined;
      });
    }
    const base = {
      type: "stats_result" as const,
      id: msg.id,
      tenant: msg.tenant,
      session: msg.session,
      resident: st !== undefined,
      idle_s: s.busy ? 0 : Math.floor(Math.max(0, Date.now() - s.lastUsed) / 1000),
    };
    if (!st) {
      sink.send({ ...base, tokens_seen: s.tokensSeen, kv_bytes: s.kv.steady });
      return;
    }
    this.learnGeometry(s, st);
    sink.send({
      ...base,
      tokens_seen: st.tokens_seen,
      kv_bytes: st.kv_bytes,
      full_kv_bytes: st.full_kv_bytes,
      layer_kv_lengths: st.layer_kv_lengths,
    });
  }

  // ---- housekeeping, shutdown ---------------------------------------------------------------------

  private housekeeping(): void {
    if (this.closing) return;
    const engine = this.engines.engine;
    const now = Date.now();
    for (const s of [...this.sessions.values()]) {
      if (s.busy) continue;
      const ttlS = this.tenants.get(s.tenant).sessionTtlS;
      if (now - s.lastUsed >= ttlS * 1000) this.expire(s, ttlS);
      else if (engine.alive && s.resident && now - s.lastUsed >= this.config.idleMs) void this.residency.offload(s);
    }
    if (!engine.alive) return;
    void engine.call<"stats_result">({ type: "stats" }).then(
      (st) => (this.poolUsedBytes = st.pool_used_bytes ?? 0),
      () => {},
    );
  }

  gauges(): Omit<HostGauges, "connections"> {
    const byTenant = new Map<string, { active: number; offloaded: number }>();
    for (const s of this.sessions.values()) {
      const t = byTenant.get(s.tenant) ?? { active: 0, offloaded: 0 };
      if (s.resident) t.active++;
      else t.offloaded++;
      byTenant.set(s.tenant, t);
    }
    return {
      sessions: [...byTenant.entries()].flatMap(([tenant, c]) => [
        { tenant, state: "active" as const, count: c.active },
        { tenant, state: "offloaded" as const, count: c.offloaded },
      ]),
      tenantKvBytes: [...byTenant.keys()].map((tenant) => ({
        tenant,
        used: this.admission.usage(tenant),
        quota: this.tenants.get(tenant).kvQuotaBytes,
      })),
      poolBytes: this.engines.engine.hello.pool_bytes,
      poolUsedBytes: this.poolUsedBytes,
      cacheMemoryBytes: this.residency.snapshots.bytes,
      queued: [
        { kind: "prefill", count: this.scheduler.queued("prefill") },
        { kind: "decode", count: this.scheduler.queued("decode") },
      ],
    };
  }

  /** The drain's middle (main.ts): in-flight work finishes (`quiet`: no channel is open any
   * more), cancelled after drainMs; then every resident non-ephemeral session is checkpointed to
   * the edge's store. The sessions stay (an edge request on a still-open channel is served). */
  async drain(quiet: () => boolean): Promise<void> {
    const idle = () => [...this.sessions.values()].every((s) => !s.busy);
    const deadline = Date.now() + this.config.drainMs;
    while (!(idle() && quiet()) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    if (!idle()) {
      for (const s of this.sessions.values()) for (const op of s.ops) await this.cancelOp(s, op);
      await Promise.all([...this.sessions.values()].map((s) => s.chain));
    }
    await this.checkpointAll();
  }

  /** Every session whose newest state the edge's store lacks goes there (the drain); one the edge
   * does not take stays in the local store. */
  private async checkpointAll(): Promise<void> {
    const remote = this.remote;
    if (!remote) return;
    const engine = this.engines.engine;
    const todo = [...this.sessions.values()].filter(
      (s) => s.openedBy === undefined && !s.lost && (s.dirty || !s.saved || !s.remoteSynced),
    );
    // A socket that dropped meanwhile may come back (the backoff's first ceilings are short).
    const wait = Date.now() + this.config.drainMs;
    while (todo.length > 0 && !remote.connected && remote.epoch > 0 && Date.now() < wait)
      await new Promise((r) => setTimeout(r, 100));
    if (todo.length > 0 && !remote.connected) {
      hostLog(`drain: not connected to the edge: ${todo.length} session(s) stay in the local store only`);
      return;
    }
    let failed = 0;
    for (const s of todo) {
      if (s.resident && !engine.alive) continue;
      s.pendingOps++;
      try {
        if (s.resident) {
          await this.residency.save(s, engine, false); // logs a refusal itself, but a conflict
          if (!s.remoteSynced) failed++;
        } else await this.residency.pushStored(s); // throws when the edge refuses it
      } catch (e) {
        // The edge's copy is another host's (the session moved on): this host's is dropped, never sent.
        if (e instanceof StateConflictError) {
          hostLog(`drain: session ${s.engineName.slice(0, 129)}: ${e.message}: this host's copy is dropped`);
          await this.dropCopy(s, MOVED, false);
          continue;
        }
        failed++;
        hostLog(
          `drain: session ${s.engineName.slice(0, 129)}: checkpoint to the edge failed: ${e instanceof Error ? e.message : String(e)}`,
        );
      } finally {
        s.pendingOps--;
      }
    }
    if (failed > 0) hostLog(`drain: ${failed} session(s) could not be checkpointed to the edge`);
  }

  /** Graceful stop: refuse new work, let running work finish (cancel it after drainMs), save
   * every session to the offload directory when there is one, stop the engine. */
  async shutdown(): Promise<void> {
    if (this.closing) return;
    this.closing = true;
    clearInterval(this.timer);
    const idle = () => [...this.sessions.values()].every((s) => !s.busy);
    const deadline = Date.now() + this.config.drainMs;
    while (!idle() && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    if (!idle()) {
      for (const s of this.sessions.values()) for (const op of s.ops) await this.cancelOp(s, op);
      await Promise.all([...this.sessions.values()].map((s) => s.chain));
    }
    if (this.residency.persistent && this.engines.engine.alive) {
      for (const s of this.sessions.values()) if (s.resident) await this.residency.offload(s);
    }
    this.engines.stop();
    await this.engines.engine.shutdown();
  }
}

/**
 * host_hello's cache_fingerprint (host protocol 3.1): what makes a cached state besides the model,
 * the method and the budget (which the edge's keys hold already), so that the edge seeds its
 * prompt-cache keys with it and hosts that would make another state from the same turns never
 * share an entry. The first 16 hex digits of the SHA-256 of a JSON array of:
 *   - the state's format: the engine's protocol version and minor (its hello: the engine exposes no
 *     state version of its own; a new one comes with a new protocol minor) and this host's state
 *     file version (store.ts FORMAT_VERSION);
 *   - this host's default kv_type (--kv-type, else the engine's default) and chunk size (the
 *     engine's hello.defaults.chunk_size, which it was started with; else --chunk-size);
 *   - the engine's compression defaults of the fields an open leaves out: window, beta,
 *     kernel_size, pooling, head_aggregation (hello.defaults; ENGINE_DEFAULTS' where absent).
 * The model's name, n_layer and bytes_per_entry are not in it: a restored state is checked
 * against them anyway (residency.ts), and hello.model is in the key.
 */
export function cacheFingerprint(
  hello: Pick<Message<"hello">, "protocol" | "protocol_minor" | "defaults">,
  config: Pick<HostConfig, "kvType" | "chunkSize">,
): string {
  const d = (hello.defaults ?? {}) as Record<string, unknown>;
  const of = (k: keyof typeof ENGINE_DEFAULTS) => d[k] ?? ENGINE_DEFAULTS[k];
  const parts = [
    "pkv-host-cache-v1",
    hello.protocol,
    hello.protocol_minor ?? 0,
    FORMAT_VERSION,
    config.kvType ?? of("kv_type"),
    d.chunk_size ?? config.chunkSize ?? ENGINE_DEFAULTS.chunk_size,
    of("window"),
    of("beta"),
    of("kernel_size"),
    of("pooling"),
    of("head_aggregation"),
  ];
  return createHash("sha256").update(JSON.stringify(parts)).digest("hex").slice(0, 16);
}

/** How often a request waiting for its lane says so (host.json `queued`): well inside the edge's
 * idle deadline (PKV_HOST_IDLE_TIMEOUT_MS, 60 s by default). */
export const QUEUED_EVERY_MS = 10_000;

/** The job's result; while it waits for a lane, `queued` frames (at once, then every
 * QUEUED_EVERY_MS) tell the edge that the host is alive and the request is in a queue: a tenant's
 * own backlog of generations must not look like a dead host. */
async function whileQueued<T>(
  op: Op,
  session: string,
  lane: "prefill" | "decode",
  job: { promise: Promise<T>; started: () => boolean },
): Promise<T> {
  if (job.started()) return job.promise;
  const tell = () => {
    if (!job.started() && op.sink.open) op.sink.send({ type: "queued", id: op.id, session, lane });
  };
  tell();
  const timer = setInterval(tell, QUEUED_EVERY_MS);
  timer.unref();
  try {
    return await job.promise;
  } finally {
    clearInterval(timer);
  }
}

/** A session's KV storage type: as opened (or the host's --kv-type), else the engine's default
 * (hello.defaults.kv_type; f16 for an engine before protocol 2.2). */
function kvTypeOf(params: OpenParams, engineDefault: unknown): KvType {
  const t = params.kv_type ?? engineDefault;
  return (KV_TYPES as readonly unknown[]).includes(t) ? (t as KvType) : "f16";
}

/** The edge's logprobs of one engine token frame (host.json token.logprobs), or none. */
function tokenLogprobs(m: Message<"token">): TokenLogprobs | undefined {
  if (m.logprob === undefined) return undefined;
  return {
    logprob: m.logprob,
    bytes: m.bytes ?? new TextEncoder().encode(m.text),
    ...(m.top_logprobs !== undefined ? { top_logprobs: m.top_logprobs } : {}),
  };
}

/** The final append's text, or its messages, with the session's buffered pieces in front: pieces
 * begin the text, or the content of the last message (a message too long for one frame arrives
 * as pieces and a final append holding its end). The buffer is emptied. */
function withPieces(
  s: HostSession,
  msg: HostMessage<"append">,
): { text: string | undefined; messages: Record<string, unknown>[] | undefined } {
  if (msg.messages === undefined) return { text: s.pieces.take(msg.text), messages: undefined };
  const buffered = s.pieces.take(undefined);
  if (buffered === undefined) return { text: undefined, messages: msg.messages };
  const last = msg.messages[msg.messages.length - 1]!;
  return {
    text: undefined,
    messages: [...msg.messages.slice(0, -1), { ...last, content: buffered + String(last.content) }],
  };
}
