// Which GPU host serves a request. Hosts dial in (host-conn.ts) and report their load every few
// seconds to the routing table (registry.ts): a new session goes to the live host with the most
// free KV among those serving its model, read from that table (no probe, no storage read per
// request); a session sticks to the host that holds it while that host is live, and moves to
// another live host of its model otherwise (the host restores it from R2). A new session that
// starts from a cached state prefers the host that stored it (its snapshot memory holds the
// state: no copy from R2), while that host is live and has room (prompt-cache.ts).
import { type Env, intVar } from "./env.js";
import { ApiError, noHost } from "./errors.js";
import { DEFAULT_DEADLINES, type Deadlines, HostGone, HostLink } from "./host-link.js";
import { ANY_MODEL, modelId } from "./registry.js";

export { ANY_MODEL, modelId };

/** how many hosts a new session tries when the one picked went away between its heartbeat and the dial */
const PICK_TRIES = 3;

export const registry = (env: Env) => env.ROUTER.get(env.ROUTER.idFromName("hosts"));

/** The edge → host deadlines: PKV_HOST_CONNECT_TIMEOUT_MS, PKV_HOST_IDLE_TIMEOUT_MS (wrangler.jsonc). */
export function deadlines(env: Env): Deadlines {
  return {
    connectMs: intVar(env.PKV_HOST_CONNECT_TIMEOUT_MS, DEFAULT_DEADLINES.connectMs),
    idleMs: intVar(env.PKV_HOST_IDLE_TIMEOUT_MS, DEFAULT_DEADLINES.idleMs),
  };
}

/**
 * The live host for a new session of `model` (`prefer` when it is live, serves it and has room;
 * registry.ts): 503 when none is live, 404 model_not_found when none of the live ones serves it —
 * unless `moving` (a session whose model is known: its hosts are away for now, 503).
 */
export async function pickHost(
  env: Env,
  model = ANY_MODEL,
  exclude: string[] = [],
  moving = false,
  prefer?: string,
): Promise<string> {
  const r = await registry(env).route(model, exclude, prefer);
  if (r.name !== null) return r.name;
  if (r.live === 0 || exclude.length > 0) throw noHost("no GPU host is available (none connected and live)");
  if (moving)
    throw noHost(`no live GPU host serves this session's model '${model.slice(0, 100)}' now (its host went away)`);
  throw new ApiError(
    404,
    "not_found_error",
    `the model '${model.slice(0, 100)}' does not exist: the GPU hosts serve ${r.models.join(", ")} ('${ANY_MODEL}': any of them)`,
    "model",
    "model_not_found",
  );
}

/**
 * A link to the best live host serving `model` (`prefer` first, when it can take it), trying the
 * next one when a host went away just then.
 */
export async function connectBest(env: Env, tenant: string, model = ANY_MODEL, prefer?: string): Promise<HostLink> {
  const tried: string[] = [];
  for (;;) {
    const name = await pickHost(env, model, tried, false, prefer);
    try {
      return await HostLink.connect(env, name, tenant, deadlines(env));
    } catch (e) {
      if (!(e instanceof HostGone) || tried.length + 1 >= PICK_TRIES) throw e;
      tried.push(name);
    }
  }
}

/** A link to the host `name` (a session's): 503 host_unavailable when it is not connected. */
export async function connectTo(env: Env, name: string, tenant: string): Promise<HostLink> {
  try {
    return await HostLink.connect(env, name, tenant, deadlines(env));
  } catch (e) {
    if (e instanceof HostGone) throw noHost(`the GPU host holding this session is unavailable: ${e.message}`);
    throw e;
  }
}
