// Admission: whether a request's KV bytes fit its tenant's quota and the engine's pool, making
// room by offloading idle sessions (least recently used first). A tenant's quota may offload only
// that tenant's sessions; the pool may offload anyone's. Admissions of one tenant run one at a
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
   * offloads idle sessions of any tenant while the pool cannot hold it.
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
    const quota = deps.quota(s.tenant);
    for (;;) {
      const others = this.usage(s.tenant) - accounted(s);
      if (others + need <= quota) break;
      const victim = leastRecentlyUsedIdle(deps.sessions(), (x) => x.tenant === s.tenant && x !== s);
      if (victim) {
        // issue 12: a failed offload ends the loop and admits past the quota; try the next victim, never admit.
        if (!(await deps.offload(victim))) break;
        continue;
      }
      const smaller = fit?.(quota - others);
      if (smaller !== null && smaller !== undefined && others + smaller <= quota) {
        need = smaller;
        break;
      }
      deps.refused(s.tenant);
      throw new HostError(
        "quota_exceeded",
        `tenant '${s.tenant}' needs ${need} KV bytes for session '${s.id.slice(0, 64)}'; its quota is ${quota}, ${others} in use by busy sessions`,
      );
    }
    const pool = deps.poolBytes();
    for (;;) {
      if (this.usage() - accounted(s) + need <= pool) break;
      const victim = leastRecentlyUsedIdle(deps.sessions(), (x) => x !== s);
      if (!victim || !(await deps.offload(victim))) break; // the engine's pool_full decides
    }
    s.kv.grant(need);
  }
}
