// Fair scheduling between tenants: requests wait in one queue per tenant and are started at most
// `limit` at a time per kind, and at most `tenantLimit` of one tenant at a time; a free lane goes
// to the tenant with work (and a lane of its own left) that was served least recently, so a
// tenant that has just arrived goes before one that has just been served. The engine batches
// decode steps and round-robins prefills over sessions, so without this one tenant with many
// sessions would get as many prefill turns as it has sessions, and its 500 generations would make
// every decode step (everyone's inter-token gap) 500 sequences long; with it, each tenant with
// work gets a turn and a bounded share of a step (docs/HOST.md, "Fairness").
import type { HostConfig } from "./config.js";

export type JobKind = "prefill" | "decode";

interface Job {
  tenant: string;
  start: () => void;
}

class Lane {
  private readonly queues = new Map<string, Job[]>();
  private readonly runningOf = new Map<string, number>();
  /** the tick of a tenant's last start, for tenants with jobs queued or running */
  private readonly servedAt = new Map<string, number>();
  private ticks = 0;
  private running = 0;

  constructor(
    private readonly limit: number,
    private readonly tenantLimit: number,
  ) {}

  get queued(): number {
    let n = 0;
    for (const q of this.queues.values()) n += q.length;
    return n;
  }

  push(job: Job): void {
    const q = this.queues.get(job.tenant);
    if (q) q.push(job);
    else this.queues.set(job.tenant, [job]);
    this.pump();
  }

  remove(job: Job): boolean {
    const q = this.queues.get(job.tenant);
    const i = q ? q.indexOf(job) : -1;
    if (!q || i < 0) return false;
    q.splice(i, 1);
    if (q.length === 0) this.queues.delete(job.tenant);
    this.forgetIfIdle(job.tenant);
    return true;
  }

  done(tenant: string): void {
    this.running--;
    const n = (this.runningOf.get(tenant) ?? 1) - 1;
    if (n > 0) this.runningOf.set(tenant, n);
    else this.runningOf.delete(tenant);
    this.forgetIfIdle(tenant);
    this.pump();
  }

  private forgetIfIdle(tenant: string): void {
    if (!this.queues.has(tenant) && !this.runningOf.has(tenant)) this.servedAt.delete(tenant);
  }

  /** The tenant with queued work and a lane of its own left, served least recently (one never
   * served first, in arrival order). */
  private next(): string | undefined {
    let best: string | undefined;
    let bestAt = Number.POSITIVE_INFINITY;
    for (const tenant of this.queues.keys()) {
      if ((this.runningOf.get(tenant) ?? 0) >= this.tenantLimit) continue;
      const at = this.servedAt.get(tenant) ?? -1;
      if (at < bestAt) {
        best = tenant;
        bestAt = at;
      }
    }
    return best;
  }

  private pump(): void {
    while (this.running < this.limit) {
      const tenant = this.next();
      if (tenant === undefined) return;
      const q = this.queues.get(tenant)!;
      const job = q.shift()!;
      if (q.length === 0) this.queues.delete(tenant);
      this.running++;
      this.runningOf.set(tenant, (this.runningOf.get(tenant) ?? 0) + 1);
      this.servedAt.set(tenant, ++this.ticks);
      job.start();
    }
  }
}

export interface SchedulerLimits {
  /** appends (prefills) in the engine at once */
  prefill: number;
  /** generations in the engine at once, every tenant's */
  decode: number;
  /** generations of one tenant in the engine at once (default: `decode`) */
  tenantDecode?: number;
}

export class FairScheduler {
  private readonly lanes: Record<JobKind, Lane>;

  /** The host's limits: --max-prefills, --decode-lanes, --tenant-decode-lanes. */
  static forHost(c: Pick<HostConfig, "maxConcurrentPrefills" | "decodeLanes" | "tenantDecodeLanes">): FairScheduler {
    return new FairScheduler({
      prefill: c.maxConcurrentPrefills,
      decode: c.decodeLanes,
      tenantDecode: c.tenantDecodeLanes,
    });
  }

  constructor(limits: SchedulerLimits) {
    this.lanes = {
      prefill: new Lane(limits.prefill, limits.prefill),
      decode: new Lane(limits.decode, Math.min(limits.decode, limits.tenantDecode ?? limits.decode)),
    };
  }

  /** Requests waiting for a turn, by kind. */
  queued(kind: JobKind): number {
    return this.lanes[kind].queued;
  }

  /** Runs fn when the tenant's turn comes. `abort` removes a job that has not started yet
   * (it then rejects with `reason`). */
  run<T>(
    tenant: string,
    kind: JobKind,
    fn: () => Promise<T>,
  ): { promise: Promise<T>; abort: (reason: Error) => boolean; started: () => boolean } {
    const lane = this.lanes[kind];
    let job!: Job;
    let rejectQueued!: (e: Error) => void;
    let started = false;
    const promise = new Promise<T>((resolve, reject) => {
      rejectQueued = reject;
      job = {
        tenant,
        start: () => {
          started = true;
          fn()
            .then(resolve, reject)
            .finally(() => lane.done(tenant));
        },
      };
    });
    lane.push(job);
    return {
      promise,
      abort: (reason) => {
        if (!lane.remove(job)) return false;
        rejectQueued(reason);
        return true;
      },
      started: () => started,
    };
  }
}
