// Sessions of all tenants: admission against quotas, the engine calls that serve them, offload
// and transparent restore, checkpoints, and recovery when the engine dies. Frames in, frames out;
// the WebSocket side is server.ts.
//
// Accounting (what a resident session counts against its tenant's quota, in KV bytes):
//   max(steady, reservation) + in-flight
// steady = the engine's kv_bytes after the last append/generate (exact, from the engine);
// reservation = at open, the first append's peak: (budget + min(prompt_tokens, chunk)) entries per
// layer (FullKV: prompt_tokens), dropped after that append; in-flight = during an append, one
// chunk of uncompressed entries per layer (min(new tokens, chunk), new tokens bounded by the
// text's UTF-8 bytes before tokenising), during a generate max_tokens entries per layer. One entry
// of one layer = 2 x n_head_kv x head_dim x 2 bytes (768 for SmolLM2-135M), from the engine's stats
// (full_kv_bytes / tokens_seen / n_layer), page_bytes / 16 until the first stats.
// Offloaded sessions count nothing (their state is in host memory or on disk).
import {
  type FromHostMessage,
  type HostErrorCode,
  type HostMessage,
  MAX_FRAME_BYTES,
  type Message,
  type ToHostMessage,
} from "@pyramidkv/shared";

import { type HostConfig, TENANT_NAME, type TenantPolicy } from "./config.js";
import { ENGINE_DIED, EngineProcess, EngineRequestError } from "./engine.js";
import type { HostGauges, HostMetrics } from "./metrics.js";
import { FairScheduler } from "./scheduler.js";
import { StateStore, type StoredSessionMeta } from "./store.js";
import {
  appendTokenBound,
  type KvGeometry,
  largestBudgetThatFits,
  openReservationBytes,
  prefillPeakBytes,
  Tenants,
} from "./tenants.js";

/** A connection as the sessions see it. */
export interface Sink {
  send(msg: FromHostMessage): void;
  /** a generated token; the connection may coalesce tokens when the client reads slowly */
  sendToken(id: number, session: string, token: number, text: string): void;
  readonly open: boolean;
}

export class HostError extends Error {
  constructor(
    readonly code: HostErrorCode,
    message: string,
  ) {
    super(message);
  }
}

const DEFAULT_CHUNK = 8192; // the engine's --chunk-size default
const DEFAULT_MAX_TOKENS = 256; // the engine's max_tokens default
const SLOTS_PER_PAGE = 16;
/** Text buffered from `append` pieces (`more: true`) per session before its final piece; beyond
 * this the pieces are dropped and the piece is refused with too_large. */
export const MAX_PIECE_BUFFER_BYTES = 16 << 20;

type OpenParams = Omit<HostMessage<"open_session">, "type" | "id" | "tenant" | "session" | "prompt_tokens"> & {
  method: string;
  budget: number;
};

interface Op {
  kind: "append" | "generate";
  id: number;
  sink: Sink;
  cancelled: boolean;
  engine?: EngineProcess;
  engineId?: number;
  abortQueued?: (e: Error) => boolean;
}

interface HostSession {
  tenant: string;
  id: string;
  engineName: string;
  params: OpenParams;
  resident: boolean;
  saved: boolean; // a state is in the store
  dirty: boolean; // the engine holds changes the store lacks
  steadyBytes: number;
  reservedBytes: number;
  inflightBytes: number;
  tokensSeen: number;
  lastUsed: number;
  chain: Promise<void>;
  pendingOps: number; // queued or running on chain
  ops: Op[]; // append/generate queued or running, oldest first
  lost?: string;
  reopen?: boolean; // empty and never saved when the engine died: restored by opening it again
  // append pieces (more: true) awaiting their final piece, bound to the connection that sent them
  pieces: string[];
  pieceBytes: number;
  pieceSink?: Sink;
}

const keyOf = (tenant: string, session: string) => `${tenant}\0${session}`;

function dropPieces(s: HostSession): void {
  s.pieces = [];
  s.pieceBytes = 0;
  s.pieceSink = undefined;
}

function errorCode(e: unknown): { code: HostErrorCode; message: string } {
  if (e instanceof HostError) return { code: e.code, message: e.message };
  if (e instanceof EngineRequestError) {
    if (e.code === ENGINE_DIED)
      return { code: "engine_restarted", message: `${e.message}; the session is restored from its last saved state` };
    const known: readonly string[] = [
      "invalid",
      "unknown_session",
      "session_exists",
      "pool_full",
      "context_full",
      "busy",
      "cancelled",
      "too_large",
    ];
    return { code: (known.includes(e.code) ? e.code : "internal") as HostErrorCode, message: e.message };
  }
  return { code: "internal", message: e instanceof Error ? e.message : String(e) };
}

export class SessionHost {
  private engine!: EngineProcess;
  private ready!: Promise<EngineProcess>;
  private readonly sessions = new Map<string, HostSession>();
  private readonly tenantLocks = new Map<string, Promise<unknown>>();
  private readonly scheduler: FairScheduler;
  private readonly store: StateStore;
  private tenants!: Tenants;
  geometry!: KvGeometry;
  private bytesPerEntryMeasured = false;
  private poolUsedBytes = 0;
  private closing = false;
  private stopped = false;
  private timer?: NodeJS.Timeout;
  connections = 0;

  private constructor(
    private readonly config: HostConfig,
    readonly metrics: HostMetrics,
  ) {
    this.scheduler = new FairScheduler({ prefill: config.maxConcurrentPrefills, decode: 1 << 20 });
    this.store = new StateStore(config.offloadDir);
  }

  static async start(config: HostConfig, metrics: HostMetrics): Promise<SessionHost> {
    const host = new SessionHost(config, metrics);
    host.engine = await host.spawnEngine();
    host.ready = Promise.resolve(host.engine);
    const h = host.engine.hello;
    host.geometry = {
      nLayer: h.n_layer,
      bytesPerEntry: Math.floor(h.page_bytes / SLOTS_PER_PAGE),
      chunkSize: config.chunkSize ?? DEFAULT_CHUNK,
    };
    host.tenants = new Tenants(config.tenants, config.defaultTenant, h.pool_bytes);
    for (const meta of await host.store.load()) host.adoptStored(meta);
    const tick = Math.max(50, Math.min(1000, config.idleMs / 4));
    host.timer = setInterval(() => host.housekeeping(), tick);
    host.timer.unref();
    return host;
  }

  get hello(): Message<"hello"> {
    return this.engine.hello;
  }

  get enginePid(): number | undefined {
    return this.engine.pid;
  }

  get healthy(): boolean {
    return this.engine.alive && !this.stopped;
  }

  get isClosing(): boolean {
    return this.closing;
  }

  /** KV bytes accounted to every tenant's sessions (steady, reservations, in-flight peaks). */
  get kvUsedBytes(): number {
    return this.usage();
  }

  // ---- requests -------------------------------------------------------------------------------

  handle(sink: Sink, msg: ToHostMessage): void {
    const t0 = performance.now();
    const fail = (e: unknown) => {
      const { code, message } = errorCode(e);
      this.metrics.errors.inc({ code });
      if (sink.open)
        sink.send({
          type: "error",
          id: msg.id,
          ...("session" in msg && msg.session !== undefined ? { session: msg.session } : {}),
          code,
          message,
        });
    };
    const finish = () => this.metrics.latency.observe({ type: msg.type }, (performance.now() - t0) / 1000);
    try {
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
          return void this.enqueue(this.lookup(msg.tenant, msg.session), sink, "append", msg, t0).then(finish, fail);
        case "generate":
          return void this.enqueue(this.lookup(msg.tenant, msg.session), sink, "generate", msg, t0).then(finish, fail);
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
          const t = this.tenants.set(msg.tenant, {
            kvQuotaBytes: msg.kv_quota_bytes,
            maxSessions: msg.max_sessions,
            policy,
          });
          sink.send({
            type: "tenant_set",
            id: msg.id,
            tenant: msg.tenant,
            kv_quota_bytes: t.kvQuotaBytes,
            max_sessions: t.maxSessions,
            policy: t.policy,
          });
          finish();
          return;
        }
      }
    } catch (e) {
      fail(e);
    }
  }

  /** A connection went away: nobody reads its generations any more. */
  connectionClosed(sink: Sink): void {
    for (const s of this.sessions.values()) {
      if (s.pieceSink === sink) dropPieces(s);
      for (const op of s.ops) if (op.sink === sink) void this.cancelOp(s, op);
    }
  }

  private lookup(tenant: string, session: string): HostSession {
    const s = this.sessions.get(keyOf(tenant, session));
    if (!s) throw new HostError("unknown_session", `no session '${session.slice(0, 64)}' for tenant '${tenant}'`);
    if (s.lost) {
      this.sessions.delete(keyOf(tenant, session));
      throw new HostError("session_lost", `session '${session.slice(0, 64)}' was lost: ${s.lost}`);
    }
    return s;
  }

  private async open(sink: Sink, msg: HostMessage<"open_session">): Promise<void> {
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
    const { id: _id, type: _type, tenant: _tenant, session: _session, prompt_tokens: promptTokens = 0, ...rest } = msg;
    const params: OpenParams = { ...rest, method: msg.method ?? "pyramidkv", budget: msg.budget ?? 128 };
    const g = this.geometryFor(params);
    const s: HostSession = {
      tenant: msg.tenant,
      id: msg.session,
      engineName: `${msg.tenant}/${msg.session}`,
      params,
      resident: false,
      saved: false,
      dirty: false,
      steadyBytes: 0,
      reservedBytes: 0,
      inflightBytes: 0,
      tokensSeen: 0,
      lastUsed: Date.now(),
      chain: Promise.resolve(),
      pendingOps: 0,
      ops: [],
      pieces: [],
      pieceBytes: 0,
    };
    this.sessions.set(key, s);
    s.pendingOps++;
    try {
      let reservation = openReservationBytes(g, params.method, params.budget, promptTokens);
      await this.admit(s, reservation, (free) => {
        if (limits.policy !== "auto" || params.method === "full") return null;
        const budget = largestBudgetThatFits(g, promptTokens, free, params.window ?? 8);
        if (budget === 0) return null;
        params.budget = budget;
        reservation = openReservationBytes(g, params.method, budget, promptTokens);
        return reservation;
      });
      s.reservedBytes = reservation;
      const engine = await this.ready;
      await engine.call({ type: "open", session: s.engineName, ...params });
      s.resident = true;
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
      throw e;
    } finally {
      s.pendingOps--;
    }
  }

  private geometryFor(params: OpenParams): KvGeometry {
    return { ...this.geometry, chunkSize: params.chunk_size ?? this.geometry.chunkSize };
  }

  // append and generate run one at a time per session, in arrival order.
  private enqueue(
    s: HostSession,
    sink: Sink,
    kind: "append" | "generate",
    msg: HostMessage<"append"> | HostMessage<"generate">,
    t0: number,
  ): Promise<void> {
    const op: Op = { kind, id: msg.id, sink, cancelled: false };
    s.ops.push(op);
    s.pendingOps++;
    const run = async () => {
      try {
        if (op.cancelled) throw new HostError("cancelled", `${kind} cancelled before it started`);
        if (s.lost) throw new HostError("session_lost", `session '${s.id}' was lost: ${s.lost}`);
        if (kind === "append") await this.append(s, op, msg as HostMessage<"append">);
        else await this.generate(s, op, msg as HostMessage<"generate">, t0);
      } finally {
        s.ops.splice(s.ops.indexOf(op), 1);
        s.pendingOps--;
        s.lastUsed = Date.now();
      }
    };
    const result = s.chain.then(run);
    s.chain = result.catch(() => {});
    return result;
  }

  private async append(s: HostSession, op: Op, msg: HostMessage<"append">): Promise<void> {
    // Pieces come from one connection; a piece or final append from another one starts afresh.
    if (s.pieceSink !== undefined && s.pieceSink !== op.sink) dropPieces(s);
    if (msg.more) {
      if (msg.tokens !== undefined)
        throw new HostError("invalid", "append: a piece (more: true) carries text only, not tokens");
      const bytes = Buffer.byteLength(msg.text ?? "", "utf8");
      if (s.pieceBytes + bytes > MAX_PIECE_BUFFER_BYTES) {
        const had = s.pieceBytes;
        dropPieces(s);
        throw new HostError(
          "too_large",
          `append: ${had + bytes} bytes of pieces exceed the host's buffer of ${MAX_PIECE_BUFFER_BYTES} bytes; the pieces were dropped`,
        );
      }
      s.pieces.push(msg.text ?? "");
      s.pieceBytes += bytes;
      s.pieceSink = op.sink;
      if (op.sink.open) op.sink.send({ type: "buffered", id: op.id, session: s.id, buffered_bytes: s.pieceBytes });
      return;
    }
    const text = s.pieces.length > 0 ? s.pieces.join("") + (msg.text ?? "") : msg.text;
    dropPieces(s);
    const newTokens = appendTokenBound(text, msg.tokens, msg.chat);
    const extra = prefillPeakBytes(this.geometryFor(s.params), newTokens);
    await this.ensureResident(s, extra);
    try {
      const engine = await this.ready;
      const job = this.scheduler.run(
        s.tenant,
        "prefill",
        () =>
          new Promise<Message<"appended">>((resolve, reject) => {
            if (op.cancelled) return reject(new HostError("cancelled", "append cancelled before it started"));
            op.engine = engine;
            op.engineId = engine.request(
              { type: "append", session: s.engineName, text, tokens: msg.tokens, chat: msg.chat },
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
      const done = await job.promise;
      s.steadyBytes = done.kv_bytes;
      this.metrics.promptTokens.inc({ tenant: s.tenant }, done.tokens_seen - s.tokensSeen);
      s.tokensSeen = done.tokens_seen;
      s.reservedBytes = 0;
      s.dirty = true;
      s.inflightBytes = 0;
      // Answered once checkpointed: when the edge sees 'appended', an engine crash loses nothing.
      await this.afterOp(s);
      if (op.sink.open)
        op.sink.send({
          type: "appended",
          id: op.id,
          session: s.id,
          tokens_seen: done.tokens_seen,
          kv_bytes: done.kv_bytes,
        });
    } finally {
      s.inflightBytes = 0;
    }
  }

  private async generate(s: HostSession, op: Op, msg: HostMessage<"generate">, t0: number): Promise<void> {
    const maxTokens = msg.max_tokens ?? DEFAULT_MAX_TOKENS;
    await this.ensureResident(s, this.geometry.nLayer * maxTokens * this.geometry.bytesPerEntry);
    try {
      const engine = await this.ready;
      const { type: _t, tenant: _tenant, session: _s, id: _id, ...sampling } = msg;
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
                  if (op.sink.open) op.sink.sendToken(op.id, s.id, m.token, m.text);
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
      const done = await job.promise;
      s.dirty = true;
      s.inflightBytes = 0;
      await this.afterOp(s);
      if (op.sink.open)
        op.sink.send({
          type: "done",
          id: op.id,
          session: s.id,
          reason: done.reason,
          new_tokens: done.new_tokens,
          text: done.text,
        });
    } finally {
      s.inflightBytes = 0;
    }
  }

  // Exact size from the engine, then the checkpoint. Failures here do not fail the request that
  // already completed; a session that cannot be checkpointed is only lost if the engine dies.
  private async afterOp(s: HostSession): Promise<void> {
    try {
      const engine = await this.ready;
      const st = await engine.call<"stats_result">({ type: "stats", session: s.engineName });
      this.learnGeometry(st);
      s.steadyBytes = st.kv_bytes ?? s.steadyBytes;
      s.tokensSeen = st.tokens_seen ?? s.tokensSeen;
      if (this.config.checkpoint) await this.save(s, engine);
    } catch (e) {
      if (!(e instanceof EngineRequestError && e.code === ENGINE_DIED)) {
        process.stderr.write(
          `pkv host: checkpoint of ${s.engineName} failed: ${e instanceof Error ? e.message : String(e)}\n`,
        );
      }
    }
  }

  private learnGeometry(st: Message<"stats_result">): void {
    if (this.bytesPerEntryMeasured || !st.full_kv_bytes || !st.tokens_seen) return;
    this.geometry.bytesPerEntry = Math.round(st.full_kv_bytes / (st.tokens_seen * this.geometry.nLayer));
    this.bytesPerEntryMeasured = true;
  }

  // A state larger than one engine frame (64 MiB; FullKV sessions beyond ~2.8k tokens) travels in
  // pieces: 'saved' says the total and we ask again from the next offset.
  private async save(s: HostSession, engine: EngineProcess): Promise<void> {
    const pieces: Uint8Array[] = [];
    let received = 0;
    let total = 1;
    while (received < total) {
      const saved = await engine.call<"saved">({ type: "save", session: s.engineName, offset: received });
      if (saved.offset !== received)
        throw new HostError("internal", `engine answered offset ${saved.offset}, expected ${received}`);
      pieces.push(saved.state);
      received += saved.state.length;
      total = saved.total;
      if (saved.state.length === 0 && received < total)
        throw new HostError("internal", "engine sent an empty state piece");
    }
    const state = pieces.length === 1 ? pieces[0]! : Buffer.concat(pieces);
    const meta: StoredSessionMeta = {
      tenant: s.tenant,
      session: s.id,
      params: s.params,
      tokens_seen: s.tokensSeen,
      kv_bytes: s.steadyBytes,
    };
    await this.store.put(meta, state);
    s.saved = true;
    s.dirty = false;
  }

  /** Restore pieces of at most half a frame each, in order. */
  private async restoreInEngine(s: HostSession, engine: EngineProcess, state: Uint8Array): Promise<void> {
    const piece = Math.floor(MAX_FRAME_BYTES / 2);
    for (let at = 0; at === 0 || at < state.length; at += piece) {
      await engine.call({
        type: "restore",
        session: s.engineName,
        state: state.subarray(at, at + piece),
        offset: at,
        total: state.length,
      });
    }
  }

  // ---- admission, offload, restore ---------------------------------------------------------------

  private accounted(s: HostSession): number {
    return s.resident || (s.pendingOps > 0 && s.reservedBytes > 0)
      ? Math.max(s.steadyBytes, s.reservedBytes) + s.inflightBytes
      : 0;
  }

  private usage(tenant?: string): number {
    let n = 0;
    for (const s of this.sessions.values()) if (tenant === undefined || s.tenant === tenant) n += this.accounted(s);
    return n;
  }

  private lru(filter: (s: HostSession) => boolean): HostSession | undefined {
    let best: HostSession | undefined;
    for (const s of this.sessions.values()) {
      if (s.resident && s.pendingOps === 0 && !s.lost && filter(s) && (!best || s.lastUsed < best.lastUsed)) best = s;
    }
    return best;
  }

  /**
   * Makes room for `s` to account `need` bytes (in total): offloads the tenant's idle sessions
   * (least recently used first) until its quota holds it, then other tenants' idle sessions while
   * the pool cannot. `fit(free)` may shrink the need (policy auto); null refuses.
   */
  private admit(s: HostSession, need: number, fit?: (freeBytes: number) => number | null): Promise<void> {
    const prev = this.tenantLocks.get(s.tenant) ?? Promise.resolve();
    const run = prev
      .catch(() => {})
      .then(async () => {
        const quota = this.tenants.get(s.tenant).kvQuotaBytes;
        for (;;) {
          const others = this.usage(s.tenant) - this.accounted(s);
          if (others + need <= quota) break;
          const victim = this.lru((x) => x.tenant === s.tenant && x !== s);
          if (victim) {
            if (!(await this.offload(victim))) break;
            continue;
          }
          const smaller = fit?.(quota - others);
          if (smaller !== null && smaller !== undefined && others + smaller <= quota) {
            need = smaller;
            break;
          }
          this.metrics.quotaRefusals.inc({ tenant: s.tenant, reason: "kv_quota" });
          throw new HostError(
            "quota_exceeded",
            `tenant '${s.tenant}' needs ${need} KV bytes for session '${s.id.slice(0, 64)}'; its quota is ${quota}, ${others} in use by busy sessions`,
          );
        }
        const pool = this.engine.hello.pool_bytes;
        for (;;) {
          if (this.usage() - this.accounted(s) + need <= pool) break;
          const victim = this.lru((x) => x !== s);
          if (!victim || !(await this.offload(victim))) break; // the engine's pool_full decides
        }
        if (s.resident) s.inflightBytes = Math.max(0, need - Math.max(s.steadyBytes, s.reservedBytes));
        else s.reservedBytes = Math.max(s.reservedBytes, need);
      });
    this.tenantLocks.set(
      s.tenant,
      run.catch(() => {}),
    );
    return run;
  }

  /** Admits `extra` bytes on top of the session's steady size, restoring it first if offloaded. */
  private async ensureResident(s: HostSession, extra: number): Promise<void> {
    if (s.resident) return this.admit(s, Math.max(s.steadyBytes, s.reservedBytes) + extra);
    await this.admit(s, s.steadyBytes + extra);
    if (s.reopen) {
      try {
        const engine = await this.ready;
        await engine.call({ type: "open", session: s.engineName, ...s.params });
      } finally {
        s.reservedBytes = 0;
      }
      s.reopen = false;
      s.resident = true;
      s.inflightBytes = extra;
      return;
    }
    const state = await this.store.get(s.tenant, s.id);
    if (!state) {
      s.lost = "its saved state is missing";
      throw new HostError("session_lost", `session '${s.id}' has no saved state to restore`);
    }
    try {
      const engine = await this.ready;
      await this.restoreInEngine(s, engine, state);
    } finally {
      s.reservedBytes = 0; // held only while restoring; resident sessions account steady + in-flight
    }
    s.resident = true;
    s.dirty = false;
    s.inflightBytes = extra;
    this.metrics.restores.inc({ tenant: s.tenant });
  }

  /** Saves an idle session out of the engine; false when it cannot be (busy, unsaveable). */
  private async offload(s: HostSession): Promise<boolean> {
    if (!s.resident || s.pendingOps > 0) return false;
    s.pendingOps++;
    const work = (async () => {
      try {
        const engine = await this.ready;
        if (s.dirty || !s.saved) await this.save(s, engine);
        await engine.call({ type: "close", session: s.engineName });
        s.resident = false;
        this.metrics.offloads.inc({ tenant: s.tenant });
        return true;
      } catch (e) {
        process.stderr.write(
          `pkv host: offload of ${s.engineName} failed: ${e instanceof Error ? e.message : String(e)}\n`,
        );
        return false;
      } finally {
        s.pendingOps--;
      }
    })();
    s.chain = s.chain.then(() => work.then(() => {}));
    return work;
  }

  private adoptStored(meta: StoredSessionMeta): void {
    if (!TENANT_NAME.test(meta.tenant)) return;
    this.sessions.set(keyOf(meta.tenant, meta.session), {
      tenant: meta.tenant,
      id: meta.session,
      engineName: `${meta.tenant}/${meta.session}`,
      params: meta.params as OpenParams,
      resident: false,
      saved: true,
      dirty: false,
      steadyBytes: meta.kv_bytes,
      reservedBytes: 0,
      inflightBytes: 0,
      tokensSeen: meta.tokens_seen,
      lastUsed: Date.now(),
      chain: Promise.resolve(),
      pendingOps: 0,
      ops: [],
      pieces: [],
      pieceBytes: 0,
    });
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

  private async cancel(sink: Sink, msg: HostMessage<"cancel">): Promise<void> {
    const s = this.lookup(msg.tenant, msg.session);
    dropPieces(s);
    await Promise.all(s.ops.map((op) => this.cancelOp(s, op)));
    sink.send({ type: "cancelled", id: msg.id, session: msg.session });
  }

  private async close(sink: Sink, msg: HostMessage<"close">): Promise<void> {
    const s = this.lookup(msg.tenant, msg.session);
    await Promise.all(s.ops.map((op) => this.cancelOp(s, op)));
    await s.chain;
    this.sessions.delete(keyOf(s.tenant, s.id));
    s.lost = "closed";
    if (s.resident) {
      const engine = await this.ready;
      await engine.call({ type: "close", session: s.engineName }).catch(() => {});
      s.resident = false;
    }
    await this.store.delete(s.tenant, s.id);
    sink.send({ type: "closed", id: msg.id, session: msg.session });
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
        kv_used_bytes: this.usage(msg.tenant),
        max_sessions: t.maxSessions,
        sessions: mine.length,
        offloaded: mine.filter((s) => !s.resident).length,
        policy: t.policy,
      });
      return;
    }
    const s = this.lookup(msg.tenant, msg.session);
    const base = {
      type: "stats_result" as const,
      id: msg.id,
      tenant: msg.tenant,
      session: msg.session,
      resident: s.resident,
    };
    if (!s.resident) {
      sink.send({ ...base, tokens_seen: s.tokensSeen, kv_bytes: s.steadyBytes });
      return;
    }
    const engine = await this.ready;
    const st = await engine.call<"stats_result">({ type: "stats", session: s.engineName });
    this.learnGeometry(st);
    sink.send({
      ...base,
      tokens_seen: st.tokens_seen,
      kv_bytes: st.kv_bytes,
      full_kv_bytes: st.full_kv_bytes,
      layer_kv_lengths: st.layer_kv_lengths,
    });
  }

  // ---- engine supervision, housekeeping, shutdown -------------------------------------------------

  private async spawnEngine(): Promise<EngineProcess> {
    const engine = await EngineProcess.start({
      bin: this.config.engineBin,
      model: this.config.model,
      kvPoolBytes: this.config.kvPoolBytes,
      chunkSize: this.config.chunkSize,
      threads: this.config.threads,
    });
    engine.on("exit", (code, signal) => this.onEngineExit(engine, code, signal));
    return engine;
  }

  // Requests in flight have already failed (engine_restarted, through EngineProcess). Sessions
  // fall back to their last checkpoint and are restored on their next request.
  private onEngineExit(engine: EngineProcess, code: number | null, signal: NodeJS.Signals | null): void {
    if (this.stopped || engine !== this.engine) return;
    this.metrics.engineRestarts.inc();
    process.stderr.write(`pkv host: the engine exited (${signal ?? `code ${code}`}); restarting it\n`);
    for (const s of this.sessions.values()) {
      if (!s.resident) continue;
      s.resident = false;
      s.inflightBytes = 0;
      if (!s.saved && s.tokensSeen === 0)
        s.reopen = true; // nothing to lose: open it again
      else if (!s.saved) s.lost = "the engine died before it was ever saved";
      else if (s.dirty) s.dirty = false; // back to the checkpoint
    }
    this.ready = (async () => {
      for (let attempt = 0; ; attempt++) {
        try {
          this.engine = await this.spawnEngine();
          return this.engine;
        } catch (e) {
          process.stderr.write(`pkv host: engine restart failed: ${e instanceof Error ? e.message : String(e)}\n`);
          await new Promise((r) => setTimeout(r, Math.min(5000, 200 * 2 ** attempt)));
        }
      }
    })();
  }

  private housekeeping(): void {
    if (this.closing || !this.engine.alive) return;
    const now = Date.now();
    for (const s of this.sessions.values()) {
      if (s.resident && s.pendingOps === 0 && now - s.lastUsed >= this.config.idleMs) void this.offload(s);
    }
    void this.engine.call<"stats_result">({ type: "stats" }).then(
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
        used: this.usage(tenant),
        quota: this.tenants.get(tenant).kvQuotaBytes,
      })),
      poolBytes: this.engine.hello.pool_bytes,
      poolUsedBytes: this.poolUsedBytes,
      queued: [
        { kind: "prefill", count: this.scheduler.queued("prefill") },
        { kind: "decode", count: this.scheduler.queued("decode") },
      ],
    };
  }

  /** Graceful stop: refuse new work, let running work finish (cancel it after drainMs), save
   * every session to the offload directory when there is one, stop the engine. */
  async shutdown(): Promise<void> {
    if (this.closing) return;
    this.closing = true;
    clearInterval(this.timer);
    const idle = () => [...this.sessions.values()].every((s) => s.pendingOps === 0);
    const deadline = Date.now() + this.config.drainMs;
    while (!idle() && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    if (!idle()) {
      for (const s of this.sessions.values()) for (const op of s.ops) await this.cancelOp(s, op);
      await Promise.all([...this.sessions.values()].map((s) => s.chain));
    }
    if (this.store.persistent && this.engine.alive) {
      for (const s of this.sessions.values()) if (s.resident) await this.offload(s);
    }
    this.stopped = true;
    await this.engine.shutdown();
  }
}
