// Admission: whether a request's KV bytes fit its tenant's quota and the engine's pool, making
// room by offloading idle sessions (least recently used first). A tenant's quota may offload only
// that tenant's sessions; the pool may offload the tenant's own and those of a tenant holding more
// than its fair share (the pool over the tenants holding KV), never one within it. A failed
// offload makes no room: the next victim is tried, and with none left the request is refused
// (quota_exceeded, pool_full), never admitted past a limit. Admissions of one tenant run one at a
// time (a lock per tenant), so two requests cannot both take the tenant's last bytes. What a
// session accounts is account.ts's rule; the sizes of requests are tenants.ts's arithmetic.
// Nothing here talks to the engine: the session table, the offload and the limits are injected.
import type { KvAccount } from "./account.js";
import { HostError } from "./errors.js";

/** What admission sees of a session. */
export interface Admissible {
  readonly tenant: string;
  readonly id: string;
  readonly kv: KvAccount;
  /** requests queued or running: a busy session is never offloaded */
  readonly busy: boolean;
  readonly lost?: string;
  /** Date.now() of its last request: the least recently used idle session goes first */
  readonly lastUsed: number;
}

export interface AdmissionDeps<S extends Admissible> {
  /** every session of every tenant, read afresh at each step (offloads change it meanwhile) */
  sessions(): Iterable<S>;
  /** saves an idle session out of the engine; false when it could not be */
  offload(s: S): Promise<boolean>;
  /** the tenant's KV quota in bytes (a quota of 0 already resolved to the pool) */
  quota(tenant: string): number;
  /** the engine's KV pool in bytes */
  poolBytes(): number;
  /** a request of the tenant was refused for its quota (the metric) */
  refused(tenant: string): void;
}

/** Shrinks a need that does not fit: given the tenant's free bytes, the smaller need, or null to
 * refuse (open_session of a tenant with policy auto; tenants.ts's autoBudget). */
export type Fit = (freeBytes: number) => number | null;

export function accounted(s: Admissible): number {
  return s.kv.accounted(s.busy);
}

/** KV bytes accounted to the sessions (of one tenant, or of all). */
export function usage(sessions: Iterable<Admissible>, tenant?: string): number {
  let n = 0;
  for (const s of sessions) if (tenant === undefined || s.tenant === tenant) n += accounted(s);
  return n;
}

/** KV bytes accounted per tenant, of the tenants that account any. A tenant's fair share of the
 * pool is the pool over these tenants and the one asking. */
export function usageByTenant(sessions: Iterable<Admissible>): Map<string, number> {
  const m = new Map<string, number>();
  for (const s of sessions) {
    const n = accounted(s);
    if (n > 0) m.set(s.tenant, (m.get(s.tenant) ?? 0) + n);
  }
  return m;
}

/** The least recently used resident, idle, not lost session that `eligible` accepts. */
export function leastRecentlyUsedIdle<S extends Admissible>(
  sessions: Iterable<S>,
  eligible: (s: S) => boolean,
): S | undefined {
  let best: S | undefined;
  for (const s of sessions) {
    if (s.kv.resident && !s.busy && !s.lost && eligible(s) && (!best || s.lastUsed < best.lastUsed)) best = s;
  }
  return best;
}

export class Admission<S extends Admissible> {
  private readonly locks = new Map<string, Promise<unknown>>();

  constructor(private readonly deps: AdmissionDeps<S>) {}

  /** KV bytes accounted to a tenant's sessions, or to every tenant's. */
  usage(tenant?: string): number {
    return usage(this.deps.sessions(), tenant);
  }

  /**
   * Makes room for `s` to account `need` bytes in total, then grants them (account.ts: in-flight
   * for a resident session, a reservation otherwise). Offloads the tenant's idle sessions until
   * its quota holds the need, else shrinks it with `fit`, else refuses with quota_exceeded; then
   * offloads idle sessions (its own, or of tenants above their fair share) while the pool cannot
   * hold it, else refuses with pool_full. A session whose offload fails is skipped.
   */
  admit(s: S, need: number, fit?: Fit): Promise<void> {
    const prev = this.locks.get(s.tenant) ?? Promise.resolve();
    const run = prev.catch(() => {}).then(() => this.admitLocked(s, need, fit));
    this.locks.set(
      s.tenant,
      run.catch(() => {}),
    );
    return run;
  }

  private async admitLocked(s: S, need: number, fit: Fit | undefined): Promise<void> {
    const { deps } = this;
    // Sessions whose offload failed in this admission (unsaveable state, disk error, the store
    // refusing it for stored_quota_exceeded): not tried again, and no room was made by them.
    const failed = new Set<S>();
    /** Offloads the victim, if any; false when there was none to try. */
    const tried = async (victim: S | undefined): Promise<boolean> => {
      if (!victim) return false;
      if (!(await deps.offload(victim))) failed.add(victim);
      return true;
    };
    const unsaved = () =>
      failed.size === 0
        ? ""
        : `; ${failed.size} idle session${failed.size === 1 ? "" : "s"} could not be offloaded (state not saved)`;
    const quota = deps.quota(s.tenant);
    for (;;) {
      const others = this.usage(s.tenant) - accounted(s);
      if (others + need <= quota) break;
      const mine = (x: S) => x.tenant === s.tenant && x !== s && !failed.has(x);
      if (await tried(leastRecentlyUsedIdle(deps.sessions(), mine))) continue;
      const smaller = fit?.(quota - others);
      if (smaller !== null && smaller !== undefined && others + smaller <= quota) {
        need = smaller;
        break;
      }
      deps.refused(s.tenant);
      throw new HostError(
        "quota_exceeded",
        `tenant '${s.tenant}' needs ${need} KV bytes for session '${s.id.slice(0, 64)}'; its quota is ${quota}, ${others} in use by busy sessions${unsaved()}`,
      );
    }
    // The pool: the tenant's own idle sessions, and another tenant's only while that tenant holds
    // more than its fair share (a tenant without a quota cannot push out one that uses its share).
    const pool = deps.poolBytes();
    for (;;) {
      const others = this.usage() - accounted(s);
      if (others + need <= pool) break;
      const byTenant = usageByTenant(deps.sessions());
      const share = Math.floor(pool / new Set([...byTenant.keys(), s.tenant]).size);
      const movable = (x: S) =>
        x !== s && !failed.has(x) && (x.tenant === s.tenant || (byTenant.get(x.tenant) ?? 0) > share);
      if (await tried(leastRecentlyUsedIdle(deps.sessions(), movable))) continue;
      throw new HostError(
        "pool_full",
        `tenant '${s.tenant}' needs ${need} KV bytes for session '${s.id.slice(0, 64)}'; the pool holds ${pool}, ${others} in use (busy sessions, and tenants within their fair share of ${share})${unsaved()}`,
      );
    }
    s.kv.grant(need);
  }
}
