// A request's use of one GPU host, start to end, in one place: connect (the session's own host —
// or, when that host is not live any more, another live host of the session's model, recorded as
// the session's new host, which restores it from R2 — or the live host with the most free KV for
// a new session), pass the tenant's settings, do the work, and when the work ends — done, failed,
// or the client went away — close on the host a session the work opened, close the link, and roll
// back what the edge recorded. Routes say only what the work is (withHost).
//
// dial() is the one place that obtains a link to a host (routing.ts, host-link.ts).
import type { Context } from "hono";

import { tenantStub } from "./auth.js";
import type { AppEnv, Env } from "./env.js";
import { forTenant } from "./host-id.js";
import type { HostLink } from "./host-link.js";
import { ANY_MODEL, connectBest, connectTo, pickHost, registry } from "./routing.js";
import { applyTenant } from "./serve.js";
import { type SseSink, sseResponse } from "./sse.js";

export interface HostPlan {
  /** the host holding the session; absent: the live host with the most free KV (a new session) */
  host?: string;
  /**
   * the session may move: when `host` is not live, the live host with the most free KV serving
   * `model` takes it (recorded by `to` before the link is dialled; it restores the session from R2).
   * `to(from, next)` is a compare-and-set: it answers the session's host after it — `next`, or the
   * host another request moved it to first (which this request then dials)
   */
  move?: { model?: string; to: (from: string, next: string) => Promise<string> };
  /** the model a new session needs (ANY_MODEL: any host) */
  model?: string;
  /**
   * a new session's preferred host (the one holding its cached prefix, prompt-cache.ts): picked
   * when it is live, serves `model` and has room; otherwise, or when it went away by the dial, the
   * usual pick
   */
  prefer?: string;
  /** the tenant whose work this is; default the request's (set by requireKey) */
  tenant?: string;
  /** pass the tenant's KV quota and policy to the host first (set_tenant); false for reads and closes */
  tenantSettings?: boolean;
  /** a host session the work opens: closed on the host when the work fails or the client leaves */
  opens?: string;
  /** close `opens` when the work succeeds too (a chat completion's ephemeral session) */
  ephemeral?: boolean;
  /** rolls back the edge's own records when the work fails or the client leaves, even before a host was reached */
  onFailure?: () => Promise<unknown>;
  /** runs when the work has ended, however it ended (after the link closed): e.g. a session's last use */
  onEnd?: () => Promise<unknown>;
}

/** how many times a request moves a session whose host is not live (each loss of a race: the winner's host may be gone too) */
const MOVE_TRIES = 3;

/** The link to a host for a plan: the session's host (or its next one), or the best one for a new session. */
async function dial(env: Env, tenant: string, plan: HostPlan): Promise<HostLink> {
  if (plan.host === undefined) return connectBest(env, tenant, plan.model, plan.prefer);
  let host = plan.host;
  for (let tries = 0; plan.move && tries < MOVE_TRIES && !(await registry(env).live(host)); tries++) {
    const next = await pickHost(env, plan.move.model ?? ANY_MODEL, [], true);
    host = await plan.move.to(host, next);
  }
  return connectTo(env, host, tenant);
}

/** The link held for one piece of work, and how that work ends. Ending is idempotent: the first end counts. */
export class HostLease {
  private ending?: Promise<void>;
  private held = false;

  constructor(
    readonly link: HostLink,
    private readonly env: Env,
    private readonly plan: HostPlan,
    private readonly background: (p: Promise<unknown>) => void,
    private readonly signal?: AbortSignal,
  ) {}

  /** The work succeeded. */
  end(): Promise<void> {
    this.ending ??= this.finish(false);
    return this.ending;
  }

  /** The work failed (with `_error`). */
  fail(_error: unknown): Promise<void> {
    this.ending ??= this.finish(true);
    return this.ending;
  }

  /** The client went away: the work ends now, in the background (closing the link cancels it on the host). */
  cancel(): void {
    this.background(this.fail(new Error("client disconnected")));
  }

  /** Kept open after withHost's work returned: whoever holds it ends it (a stream). */
  get isHeld(): boolean {
    return this.held;
  }

  /**
   * An SSE response that holds the lease until `run` ends (an error in it fails the lease) or the
   * client leaves (cancel). Connect, settings and anything awaited before this call happen before
   * the response starts, so their errors are HTTP statuses; errors in `run` are error frames.
   */
  sse(run: (sink: SseSink) => Promise<void>): Response {
    this.held = true;
    return sseResponse(
      async (sink) => {
        try {
          await run(sink);
        } catch (e) {
          await this.fail(e);
          throw await forTenant(this.env, e); // an error frame names no host URL
        }
        await this.end();
      },
      () => this.cancel(),
      this.signal,
    );
  }

  private async finish(failed: boolean): Promise<void> {
    const { link, plan } = this;
    try {
      if (plan.opens !== undefined && (failed || plan.ephemeral) && link.alive)
        await link.send({ type: "close", session: plan.opens }).catch(() => {});
    } finally {
      link.close();
    }
    if (failed) await plan.onFailure?.();
    await plan.onEnd?.();
  }
}

/**
 * Runs `work` on a host chosen by `plan`. A failure anywhere (connect, settings, work) ends the
 * lease as failed and is rethrown; success ends it, unless the work handed the lease to a stream
 * (lease.sse), which ends it when the stream does.
 */
export async function withHost<T>(
  c: Context<AppEnv>,
  plan: HostPlan,
  work: (lease: HostLease) => Promise<T>,
): Promise<T> {
  const tenant = plan.tenant ?? c.get("tenant");
  let link: HostLink;
  try {
    link = await dial(c.env, tenant, plan);
  } catch (e) {
    await plan.onFailure?.();
    throw e;
  }
  link.requestId = c.get("requestId");
  const signal = c.req.raw.signal;
  const lease = new HostLease(link, c.env, plan, (p) => c.executionCtx.waitUntil(p), signal);
  // A client that leaves before the answer ends the lease (closing the link cancels the work on the
  // host and rejects what waits on it); a stream learns of it through the same signal (sse.ts).
  const onAbort = () => {
    if (!lease.isHeld) lease.cancel();
  };
  if (signal.aborted) onAbort();
  else signal.addEventListener("abort", onAbort, { once: true });
  try {
    if (plan.tenantSettings !== false)
      await applyTenant(
        link,
        tenant === c.get("tenant") ? c.get("tenantConfig") : await tenantStub(c.env, tenant).config(),
      );
    const result = await work(lease);
    if (!lease.isHeld) await lease.end();
    return result;
  } catch (e) {
    await lease.fail(e);
    throw e;
  } finally {
    signal.removeEventListener("abort", onAbort);
  }
}
