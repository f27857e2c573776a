// Fair scheduling between tenants: requests wait in one queue per tenant and are started
// round-robin over tenants, at most `limit` at a time per kind. The engine batches decode steps
// and round-robins prefills over sessions, so without this one tenant with many sessions would
// get as many prefill turns as it has sessions; with it, each tenant with work gets a turn.
export type JobKind = "prefill" | "decode";

interface Job {
  tenant: string;
  start: () => void;
}

class Lane {
  private readonly queues = new Map<string, Job[]>(); // insertion order = round-robin order
  private running = 0;

  constructor(private readonly limit: number) {}

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
    return true;
  }

  done(): void {
    this.running--;
    this.pump();
  }

  private pump(): void {
    while (this.running < this.limit && this.queues.size > 0) {
      const [tenant, q] = this.queues.entries().next().value as [string, Job[]];
      const job = q.shift()!;
      this.queues.delete(tenant); // the tenant goes to the back of the ring
      if (q.length > 0) this.queues.set(tenant, q);
      this.running++;
      job.start();
    }
  }
}

export class FairScheduler {
  private readonly lanes: Record<JobKind, Lane>;

  constructor(limits: Record<JobKind, number>) {
    this.lanes = { prefill: new Lane(limits.prefill), decode: new Lane(limits.decode) };
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
  ): { promise: Promise<T>; abort: (reason: Error) => boolean } {
    const lane = this.lanes[kind];
    let job!: Job;
    let rejectQueued!: (e: Error) => void;
    const promise = new Promise<T>((resolve, reject) => {
      rejectQueued = reject;
      job = {
        tenant,
        start: () => {
          fn()
            .then(resolve, reject)
            .finally(() => lane.done());
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
    };
  }
}
