// Residency: moving sessions' states between the engine and the store (store.ts: host memory or
// the offload directory). Offload saves an idle session and closes it in the engine; a request
// for an offloaded session is admitted like any other and restores it first; at start-up the
// sessions an earlier run left in the offload directory are adopted as offloaded. States larger
// than one engine frame travel in pieces (docs/HOST.md, "States over the engine's frame limit").
//
// Tiers (issue 13): with the edge's store (RemoteStore, edge-link.ts), every save of a session that
// is not ephemeral goes to the local store (the cache) and then to the edge, awaited; when the
// edge refuses it (quota, another host's newer copy, no connection) the local copy goes too, so the
// local tier is never ahead of the edge's: the checkpoint to go back to is the edge's. A state the
// local store lacks is read from the edge (and cached), checked against this host's model and
// shape.
//
// Cached states (issue 14, the prompt cache): `snapshot` stores a copy of a session's state as the
// tenant's cached state (a key): in this host's snapshot memory (store.ts SnapshotMemory, LRU by
// bytes) and the edge's store (cache/<tenant>/<key>); open_session.from_cache makes a new session
// from one (memory first, else the edge's), checked like an adopted session: a missing, damaged or
// other model's state is cache_miss.
import { MAX_FRAME_BYTES } from "@pyramidkv/shared";

import type { Admission } from "./admission.js";
import { TENANT_NAME } from "./config.js";
import { type EngineProcess, EngineRequestError } from "./engine.js";
import { type CacheMissReason, HostError } from "./errors.js";
import { hostLog } from "./log.js";
import type { HostMetrics } from "./metrics.js";
import { HostSession, type OpenParams } from "./session.js";
import { type RemoteState, type RemoteStore, RemoteStateError } from "./edge-link.js";
import {
  DamagedStateError,
  decodeStateFile,
  encodeStateFile,
  SnapshotMemory,
  type StateIdentity,
  type StateStore,
  type StoredSessionMeta,
} from "./store.js";

/** The engine calls residency makes (save, restore, open, close). */
export type StateEngine = Pick<EngineProcess, "call">;

/** A session's state out of the engine. The engine answers `save` with at most one frame's worth
 * and the total; we ask again from the next offset until we have it all. */
export async function saveFromEngine(engine: StateEngine, engineName: string): Promise<Uint8Array> {
  const pieces: Uint8Array[] = [];
  let received = 0;
  let total = 1;
  while (received < total) {
    const saved = await engine.call<"saved">({ type: "save", session: engineName, offset: received });
    if (saved.offset !== received)
      throw new HostError("internal", `engine answered offset ${saved.offset}, expected ${received}`);
    pieces.push(saved.state);
    received += saved.state.length;
    total = saved.total;
    if (saved.state.length === 0 && received < total)
      throw new HostError("internal", "engine sent an empty state piece");
  }
  return pieces.length === 1 ? pieces[0]! : Buffer.concat(pieces);
}

/** A saved state back into the engine, in pieces of at most half a frame each, in order (one
 * piece, possibly empty, at least). */
export async function restoreToEngine(engine: StateEngine, engineName: string, state: Uint8Array): Promise<void> {
  const piece = Math.floor(MAX_FRAME_BYTES / 2);
  for (let at = 0; at === 0 || at < state.length; at += piece) {
    await engine.call({
      type: "restore",
      session: engineName,
      state: state.subarray(at, at + piece),
      offset: at,
      total: state.length,
    });
  }
}

export interface ResidencyOptions {
  /** the tenant's bound on stored state bytes (absent: unbounded) */
  maxStoredBytes?: (tenant: string) => number;
  /** the edge's store: the tier behind the local one (absent: local only) */
  remote?: RemoteStore;
  /** this host's model and shape, which a state from the edge must match */
  identity?: () => StateIdentity;
  /** bytes of cached states kept in host memory (--cache-memory-bytes; absent or 0: none) */
  cacheMemoryBytes?: number;
}

/** A cached state, read and checked (Residency.getCached). */
export interface CachedState {
  meta: StoredSessionMeta;
  state: Uint8Array;
  /** the state file's bytes */
  bytes: number;
  source: "memory" | "edge";
}

/** Why a state's identity is not this host's (`mine`), or undefined when it matches. */
function mismatch(theirs: StateIdentity, mine: StateIdentity): string | undefined {
  if (theirs.model === mine.model && theirs.n_layer === mine.n_layer && theirs.bytes_per_entry === mine.bytes_per_entry)
    return undefined;
  return `stored by a host of model '${theirs.model}' (n_layer ${theirs.n_layer}, bytes_per_entry ${theirs.bytes_per_entry}); this host serves '${mine.model}' (n_layer ${mine.n_layer}, bytes_per_entry ${mine.bytes_per_entry})`;
}

/** A state file's identity: its meta JSON's, else the edge's metadata of it. */
function identityOf(decoded: Partial<StateIdentity> | undefined, meta: Record<string, unknown>): StateIdentity {
  return {
    model: decoded?.model ?? stringOf(meta.model),
    n_layer: decoded?.n_layer ?? Number(meta.n_layer),
    bytes_per_entry: decoded?.bytes_per_entry ?? Number(meta.bytes_per_entry),
  };
}

const cacheMiss = (message: string, reason: CacheMissReason) => new HostError("cache_miss", message, reason);

/** The edge's copy of a session was written by another host since this host's (if_etag did not
 * match): the session was continued elsewhere. */
export class StateConflictError extends HostError {
  constructor(message: string) {
    super("checkpoint_failed", message);
  }
}

/** The edge's custom metadata of a state (strings: R2's customMetadata). */
function remoteMeta(meta: StoredSessionMeta, identity: StateIdentity | undefined): Record<string, string> {
  return {
    ...(identity
      ? { model: identity.model, n_layer: String(identity.n_layer), bytes_per_entry: String(identity.bytes_per_entry) }
      : {}),
    tokens_seen: String(meta.tokens_seen),
    kv_bytes: String(meta.kv_bytes),
    format: "pkvf1",
  };
}

/** The meta a session's stored state carries (its checkpoint, an offload, a copy's first state). */
export function storedMetaOf(s: HostSession): StoredSessionMeta {
  return { tenant: s.tenant, session: s.id, params: s.params, tokens_seen: s.tokensSeen, kv_bytes: s.kv.steady };
}

export class Residency {
  /** cached states in host memory (snapshot, open_session.from_cache) */
  readonly snapshots: SnapshotMemory;
  /** reads of cached states from the edge's store under way, by tenant and key */
  private readonly fetching = new Map<string, Promise<RemoteState>>();

  constructor(
    private readonly store: StateStore,
    /** the engine to call: supervisor.ts's, the running one or the one being restarted */
    private readonly engines: { readonly ready: Promise<StateEngine> },
    private readonly admission: Admission<HostSession>,
    private readonly metrics: HostMetrics,
    private readonly options: ResidencyOptions = {},
  ) {
    this.snapshots = new SnapshotMemory(options.cacheMemoryBytes ?? 0);
  }

  /** Bytes of the tenant's stored states (offloaded or checkpointed), memory or disk. */
  storedBytes(tenant: string): number {
    return this.store.storedBytes(tenant);
  }

  /** States survive the host (an offload directory), not only the engine. */
  get persistent(): boolean {
    return this.store.persistent;
  }

  /** Sessions an earlier run of the host left in the offload directory, as offloaded sessions. */
  async adopt(): Promise<HostSession[]> {
    const adopted: HostSession[] = [];
    for (const meta of await this.store.load()) {
      if (!TENANT_NAME.test(meta.tenant)) continue;
      adopted.push(
        new HostSession(meta.tenant, meta.session, meta.params as OpenParams, {
          tokensSeen: meta.tokens_seen,
          kvBytes: meta.kv_bytes,
        }),
      );
    }
    return adopted;
  }

  /** Checkpoints the session: its state from the engine into the store, within the tenant's
   * stored-bytes bound (stored_quota_exceeded past it), then, for a session that is not ephemeral,
   * into the edge's store. A save that fails, the engine's part or the store's, leaves the previous
   * checkpoint as it was (the edge's, when the edge refused: the local copy is dropped). `strict`
   * false (an offload, the drain: nothing is acknowledged on it): the edge refusing is only logged
   * and the local copy stays, newer than the edge's (the drain sends it later). */
  async save(s: HostSession, engine: StateEngine, strict = true): Promise<void> {
    const state = await saveFromEngine(engine, s.engineName);
    const meta = storedMetaOf(s);
    await this.store.put(meta, state, this.options.maxStoredBytes?.(s.tenant));
    s.origin = undefined; // the store has its checkpoint now
    if (this.toRemote(s)) {
      if (strict) await this.putRemote(s, meta, state);
      else
        await this.putRemote(s, meta, state, false).catch((e) => {
          if (e instanceof StateConflictError) throw e; // the copy here is not the one to continue
          hostLog(
            `${s.engineName.slice(0, 129)}: kept in the local store only: ${e instanceof Error ? e.message : String(e)}`,
          );
        });
    }
    s.saved = true;
    s.dirty = false;
  }

  /** The session's states go to the edge's store too. */
  private toRemote(s: HostSession): boolean {
    return this.options.remote !== undefined && s.openedBy === undefined;
  }

  private async putRemote(s: HostSession, meta: StoredSessionMeta, state: Uint8Array, strict = true): Promise<void> {
    const remote = this.options.remote!;
    const identity = this.options.identity?.();
    try {
      // A copy not checked against the edge's in this connection epoch (adopted from the offload
      // directory, or checked before a reconnect) is put only when the edge's copy is this host's
      // last one, or the edge has none and neither does this host know one: never over a copy
      // another host wrote since.
      if (s.epoch !== remote.epoch) {
        const head = await remote.head(s.tenant, s.id);
        if (head ? head.etag !== s.etag : s.etag !== undefined)
          throw new RemoteStateError(
            "state_conflict",
            head
              ? `the edge's copy has etag ${head.etag}, this host's ${s.etag ?? "none"}`
              : `the edge has no copy of it for this host, this host's had etag ${s.etag}`,
          );
        s.epoch = remote.epoch;
      }
      const file = encodeStateFile(meta, state, identity);
      s.etag = await remote.put(s.tenant, s.id, file, remoteMeta(meta, identity), s.etag);
      s.epoch = remote.epoch;
      s.remoteSynced = true;
      this.metrics.statePuts.inc({ result: "ok" });
    } catch (e) {
      s.remoteSynced = false;
      this.metrics.statePuts.inc({ result: e instanceof RemoteStateError ? e.code : "internal" });
      // The local tier must not be ahead of the edge's (of what a request was answered on), nor
      // hold a copy another host continued.
      if (strict || (e instanceof RemoteStateError && e.code === "state_conflict"))
        await this.store
          .delete(s.tenant, s.id)
          .catch((d) =>
            hostLog(`${s.engineName}: dropping the local copy: ${d instanceof Error ? d.message : String(d)}`),
          );
      if (!(e instanceof RemoteStateError)) throw e;
      if (e.code === "state_conflict")
        throw new StateConflictError(
          `session '${s.id.slice(0, 64)}' was continued on another host since this host's last checkpoint (${e.message})`,
        );
      if (e.code === "stored_quota_exceeded") throw new HostError("stored_quota_exceeded", e.message);
      throw new HostError(
        "checkpoint_failed",
        `the checkpoint did not reach the edge's store (${e.code}: ${e.message})`,
      );
    }
  }

  /** An offloaded session's local state goes to the edge's store when the edge lacks it (the
   * drain); false when there is none to send. StateConflictError when the edge's copy is not this
   * host's (checked first when not checked in this connection epoch). */
  async pushStored(s: HostSession): Promise<boolean> {
    if (!this.toRemote(s) || s.resident || s.remoteSynced) return false;
    const state = await this.store.get(s.tenant, s.id);
    if (!state) return false;
    const meta = storedMetaOf(s);
    await this.putRemote(s, meta, state, false);
    return true;
  }

  /** The edge's state of a session this host does not know, as an offloaded session (its state
   * cached in the local store); undefined when the edge has none. session_lost when it was written
   * by a host of another model or shape, or is damaged. */
  async adoptRemote(tenant: string, session: string): Promise<HostSession | undefined> {
    const remote = this.options.remote;
    if (!remote?.connected) return undefined;
    const got = await this.getRemote(tenant, session);
    if (!got) return undefined;
    const s = new HostSession(tenant, session, got.meta.params as OpenParams, {
      tokensSeen: got.meta.tokens_seen,
      kvBytes: got.meta.kv_bytes,
    });
    s.etag = got.etag;
    s.epoch = remote.epoch;
    s.remoteSynced = true;
    await this.cache(got.meta, got.state);
    return s;
  }

  /** The edge's copy of `s`, checked, if it has one. */
  private async getRemote(
    tenant: string,
    session: string,
  ): Promise<{ meta: StoredSessionMeta; state: Uint8Array; etag: string } | undefined> {
    const remote = this.options.remote!;
    let got: Awaited<ReturnType<RemoteStore["get"]>>;
    try {
      got = await remote.get(tenant, session);
    } catch (e) {
      if (e instanceof RemoteStateError)
        throw new HostError(e.code === "timeout" ? "timeout" : "internal", `the edge's store: ${e.message}`);
      throw e;
    }
    if (!got) return undefined;
    let decoded: ReturnType<typeof decodeStateFile>;
    try {
      decoded = decodeStateFile(got.file, tenant, session);
    } catch (e) {
      throw new HostError(
        "session_lost",
        `session '${session.slice(0, 64)}': the edge's stored state is unusable (${e instanceof Error ? e.message : String(e)})`,
      );
    }
    const mine = this.options.identity?.();
    const why = mine && mismatch(identityOf(decoded.identity, got.meta), mine);
    if (why)
      throw new HostError("session_lost", `session '${session.slice(0, 64)}' was ${why}: it cannot be restored here`);
    return { meta: decoded.meta, state: decoded.state, etag: got.etag };
  }

  /** The tenant's cached state `key`: from this host's snapshot memory, else from the edge's store
   * (then kept in memory too), checked (its file, its CRC, the key it names, this host's model and
   * shape). cache_miss, saying why, when neither has it, or it is damaged, or another model's. */
  async getCached(tenant: string, key: string): Promise<CachedState> {
    const name = `cached state '${key.slice(0, 64)}' of tenant '${tenant}'`;
    let file = this.snapshots.get(tenant, key);
    let edgeMeta: Record<string, unknown> = {};
    const source = file ? "memory" : "edge";
    if (!file) {
      // Opens of one key at once (sessions on one shared document) read the edge's store once.
      const k = `${tenant}\0${key}`;
      let fetch = this.fetching.get(k);
      if (!fetch) {
        fetch = this.fetchCached(tenant, key, name).finally(() => this.fetching.delete(k));
        this.fetching.set(k, fetch);
      }
      ({ file, meta: edgeMeta } = await fetch);
    }
    let decoded: ReturnType<typeof decodeStateFile>;
    try {
      decoded = decodeStateFile(file, tenant, key);
    } catch (e) {
      if (source === "memory") this.snapshots.delete(tenant, key);
      throw cacheMiss(`${name} is damaged (${e instanceof Error ? e.message : String(e)})`, "damaged");
    }
    const mine = this.options.identity?.();
    const why = mine && mismatch(identityOf(decoded.identity, edgeMeta), mine);
    if (why) throw cacheMiss(`${name} is another model's: ${why}`, "incompatible");
    if (source === "edge") this.snapshots.put(tenant, key, file);
    return { meta: decoded.meta, state: decoded.state, bytes: file.length, source };
  }

  private async fetchCached(tenant: string, key: string, name: string): Promise<RemoteState> {
    const remote = this.options.remote;
    if (!remote?.connected)
      throw cacheMiss(
        `${name} is not in this host's memory, and this host is not connected to the edge's store`,
        "unavailable",
      );
    let got: RemoteState | undefined;
    try {
      got = await remote.get(tenant, key, { cache: true });
    } catch (e) {
      throw cacheMiss(
        `${name}: the edge's store could not be read (${e instanceof Error ? e.message : String(e)})`,
        "unavailable",
      );
    }
    if (!got)
      throw cacheMiss(`${name} is missing: not in the edge's store (expired, evicted or never stored)`, "missing");
    return got;
  }

  /** `file` (a state file naming `key`, encodeStateFile) as the tenant's cached state `key`: to
   * the edge's store (awaited; checkpoint_failed when it is refused or this host is not connected),
   * then into this host's snapshot memory. */
  async putCached(tenant: string, key: string, file: Uint8Array, meta: StoredSessionMeta): Promise<void> {
    const remote = this.options.remote;
    if (remote) {
      const name = `cached state '${key.slice(0, 64)}'`;
      if (!remote.connected)
        throw new HostError(
          "checkpoint_failed",
          `snapshot: ${name} cannot reach the edge's store: this host is not connected to the edge`,
        );
      try {
        await remote.put(tenant, key, file, remoteMeta(meta, this.options.identity?.()), undefined, { cache: true });
      } catch (e) {
        throw new HostError(
          "checkpoint_failed",
          `snapshot: ${name} did not reach the edge's store (${e instanceof Error ? e.message : String(e)})`,
        );
      }
    }
    this.snapshots.put(tenant, key, file);
  }

  /** The session's state in the local store (an offloaded session's), if it is there. */
  storedState(s: HostSession): Promise<Uint8Array | undefined> {
    return this.store.get(s.tenant, s.id);
  }

  /** A new session `s` made from a cached state (its params, tokens and kv_bytes the state's),
   * restored into the engine (admitted like any restore: quota, pool). Not ephemeral: the state
   * goes into the local store under the session's own id first, and after the restore is
   * checkpointed to the edge's store (sessions/<tenant>/<id>), awaited. Ephemeral: restored from
   * the cached state's bytes themselves, nothing written to the local store (nor counted in the
   * tenant's max_stored_bytes, nor adopted after a restart): those bytes are its checkpoint
   * (`origin`) until its first save. A failure leaves nothing of it in the engine or the store. */
  async openCopy(s: HostSession, state: Uint8Array): Promise<void> {
    const ephemeral = s.openedBy !== undefined;
    const meta = storedMetaOf(s);
    if (ephemeral) {
      await this.store.delete(s.tenant, s.id); // a former session's of this id, if any (none: no write)
      s.origin = state;
    } else await this.store.put(meta, state, this.options.maxStoredBytes?.(s.tenant));
    try {
      await this.ensureResident(s, 0);
      s.kv.end();
      if (!ephemeral && this.toRemote(s)) await this.putRemote(s, meta, state);
    } catch (e) {
      if (s.resident) {
        const engine = await this.engines.ready;
        await engine.call({ type: "close", session: s.engineName }).catch(() => {});
        s.kv.offloaded();
      }
      if (ephemeral) s.origin = undefined;
      else await this.store.delete(s.tenant, s.id).catch(() => {});
      throw e;
    }
  }

  // The edge's state in the local store (the cache); a cache that cannot take it is only logged.
  private async cache(meta: StoredSessionMeta, state: Uint8Array): Promise<void> {
    await this.store
      .put(meta, state)
      .catch((e) =>
        hostLog(
          `session '${meta.session.slice(0, 64)}': caching the edge's state locally failed: ${e instanceof Error ? e.message : String(e)}`,
        ),
      );
  }

  /** The local copy of the session goes (its state is not the edge's any more); the session itself
   * is the caller's to forget. */
  dropLocal(s: HostSession): Promise<void> {
    s.origin = undefined;
    return this.store.delete(s.tenant, s.id);
  }

  /** The session is closed for good: its saved state goes. */
  forget(s: HostSession): Promise<void> {
    s.origin = undefined;
    return this.store.delete(s.tenant, s.id);
  }

  /** Admits `extra` bytes on top of the session's steady size, restoring it first if offloaded. */
  async ensureResident(s: HostSession, extra: number): Promise<void> {
    if (s.resident) return this.admission.admit(s, s.kv.held + extra);
    await this.admission.admit(s, s.kv.steady + extra);
    if (s.reopen) {
      try {
        const engine = await this.engines.ready;
        await engine.call({ type: "open", session: s.engineName, ...s.params });
      } catch (e) {
        s.kv.unreserve();
        throw e;
      }
      s.reopen = false;
      s.kv.restored(extra);
      return;
    }
    // An ephemeral copy never saved since it was opened: its cached state (openCopy).
    let origin: Uint8Array | undefined;
    try {
      let state = await this.store.get(s.tenant, s.id);
      if (!state && s.origin) state = origin = s.origin;
      else if (!state && this.toRemote(s) && this.options.remote?.connected) {
        // Not here (a failed put dropped it, a cache that could not keep it): the edge's checkpoint.
        const got = await this.getRemote(s.tenant, s.id);
        // Another host's copy: this session's numbers (tokens, size, parameters) are not its; the
        // caller drops this one and adopts the edge's afresh.
        if (got && got.etag !== s.etag)
          throw new StateConflictError(
            `session '${s.id.slice(0, 64)}' was continued on another host (the edge's copy has etag ${got.etag}, this host's ${s.etag ?? "none"})`,
          );
        if (got) {
          state = got.state;
          s.tokensSeen = got.meta.tokens_seen;
          s.epoch = this.options.remote.epoch;
          s.remoteSynced = true;
          await this.cache(got.meta, got.state);
        }
      } else if (!state && this.toRemote(s))
        throw new HostError(
          "timeout",
          `session '${s.id.slice(0, 64)}': its checkpoint is in the edge's store, and this host is not connected to the edge`,
        );
      if (!state) {
        s.lost = "its saved state is missing";
        throw new HostError("session_lost", `session '${s.id}' has no saved state to restore`);
      }
      const engine = await this.engines.ready;
      await restoreToEngine(engine, s.engineName, state);
    } catch (e) {
      s.kv.unreserve(); // held only while restoring; resident sessions account steady + in-flight
      // The store found the state damaged, or the engine refused what the store gave back: it will
      // not get better, so the session is lost (not an 'invalid' on each request for ever).
      const damaged =
        e instanceof DamagedStateError
          ? e.message
          : e instanceof EngineRequestError && e.code === "invalid"
            ? e.message
            : undefined;
      if (damaged === undefined) throw e;
      if (origin) s.origin = undefined;
      else await this.store.quarantine(s.tenant, s.id, damaged);
      s.lost = `its saved state is damaged (${damaged})`;
      throw new HostError("session_lost", `session '${s.id.slice(0, 64)}' was lost: ${s.lost}`);
    }
    s.kv.restored(extra);
    s.dirty = false;
    this.metrics.restores.inc({ tenant: s.tenant });
  }

  /** Saves an idle session out of the engine; false when it cannot be (busy, unsaveable). Later
   * requests on the session wait for it. */
  async offload(s: HostSession): Promise<boolean> {
    if (!s.resident || s.busy) return false;
    s.pendingOps++;
    let closed: (() => void) | undefined;
    const work = (async () => {
      try {
        const engine = await this.engines.ready;
        // An ephemeral copy's first save too: an offloaded session's state is the store's.
        if (s.dirty || !s.saved || s.origin) await this.save(s, engine, false);
        // From the close on, the engine no longer knows the session while this host still counts it
        // resident: stats wait for this (sessions.ts).
        s.offloading = new Promise<void>((r) => {
          closed = r;
        });
        await engine.call({ type: "close", session: s.engineName });
        s.kv.offloaded();
        this.metrics.offloads.inc({ tenant: s.tenant });
        return true;
      } catch (e) {
        hostLog(`offload of ${s.engineName.slice(0, 129)} failed: ${e instanceof Error ? e.message : String(e)}`);
        return false;
      } finally {
        s.pendingOps--;
        s.offloading = undefined;
        closed?.();
      }
    })();
    s.chain = s.chain.then(() => work.then(() => {}));
    return work;
  }
}

function stringOf(v: unknown): string {
  return typeof v === "string" ? v : String(v);
}
