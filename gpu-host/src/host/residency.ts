// Residency: moving sessions' states between the engine and the store (store.ts: host memory or
// the offload directory). Offload saves an idle session and closes it in the engine; a request
// for an offloaded session is admitted like any other and restores it first; at start-up the
// sessions an earlier run left in the offload directory are adopted as offloaded. States larger
// than one engine frame travel in pieces (docs/HOST.md, "States over the engine's frame limit").
import { MAX_FRAME_BYTES } from "@pyramidkv/shared";

import type { Admission } from "./admission.js";
import { TENANT_NAME } from "./config.js";
import { type EngineProcess, EngineRequestError } from "./engine.js";
import { HostError } from "./errors.js";
import { hostLog } from "./log.js";
import type { HostMetrics } from "./metrics.js";
import { HostSession, type OpenParams } from "./session.js";
import { DamagedStateError, type StateStore, type StoredSessionMeta } from "./store.js";

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
}

export class Residency {
  constructor(
    private readonly store: StateStore,
    /** the engine to call: supervisor.ts's, the running one or the one being restarted */
    private readonly engines: { readonly ready: Promise<StateEngine> },
    private readonly admission: Admission<HostSession>,
    private readonly metrics: HostMetrics,
    private readonly options: ResidencyOptions = {},
  ) {}

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
   * stored-bytes bound (stored_quota_exceeded past it). A save that fails, the engine's part or
   * the store's, leaves the previous checkpoint as it was. */
  async save(s: HostSession, engine: StateEngine): Promise<void> {
    const state = await saveFromEngine(engine, s.engineName);
    const meta: StoredSessionMeta = {
      tenant: s.tenant,
      session: s.id,
      params: s.params,
      tokens_seen: s.tokensSeen,
      kv_bytes: s.kv.steady,
    };
    await this.store.put(meta, state, this.options.maxStoredBytes?.(s.tenant));
    s.saved = true;
    s.dirty = false;
  }

  /** The session is closed for good: its saved state goes. */
  forget(s: HostSession): Promise<void> {
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
    try {
      const state = await this.store.get(s.tenant, s.id);
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
      await this.store.quarantine(s.tenant, s.id, damaged);
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
    const work = (async () => {
      try {
        const engine = await this.engines.ready;
        if (s.dirty || !s.saved) await this.save(s, engine);
        await engine.call({ type: "close", session: s.engineName });
        s.kv.offloaded();
        this.metrics.offloads.inc({ tenant: s.tenant });
        return true;
      } catch (e) {
        hostLog(`offload of ${s.engineName.slice(0, 129)} failed: ${e instanceof Error ? e.message : String(e)}`);
        return false;
      } finally {
        s.pendingOps--;
      }
    })();
    s.chain = s.chain.then(() => work.then(() => {}));
    return work;
  }
}
