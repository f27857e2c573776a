// Which GPU host serves a request. A new session goes to the live host with the most free KV
// (pool_bytes − kv_used_bytes from each host's /health, probed in parallel); a session sticks to
// the host that holds it. A host that fails a probe, a connect, or a request mid-way, or misses a
// deadline (host-link.ts), is marked down in the registry and skipped until it answers again.
import type { HostMessage } from "@pyramidkv/shared";

import { type Env, intVar } from "./env.js";
import { ApiError, noHost } from "./errors.js";
import { DEFAULT_DEADLINES, type Deadlines, HostGone, HostLink } from "./host-link.js";
import type { HostEntry } from "./registry.js";

const PROBE_TIMEOUT_MS = 2000;
/** `model` meaning any host's */
export const ANY_MODEL = "default";

/** A model's id: its GGUF file name without the extension (what hosts report in /health and hello). */
export const modelId = (file: string) => file.replace(/\.gguf$/i, "");

export interface HostHealth {
  url: string;
  ok: boolean;
  model?: string;
  /** the host's context, when its /health reports it */
  n_ctx?: number;
  /** gguf (the model's own template) or chatml, when its /health reports it */
  chat_template?: string;
  pool_bytes?: number;
  kv_used_bytes?: number;
  free_bytes: number;
  error?: string;
}

export const registry = (env: Env) => env.ROUTER.get(env.ROUTER.idFromName("hosts"));

export async function probe(url: string): Promise<HostHealth> {
  try {
    const r = await fetch(`${url}/health`, { signal: AbortSignal.timeout(PROBE_TIMEOUT_MS) });
    const h = (await r.json()) as {
      status?: string;
      model?: string;
      n_ctx?: number;
      chat_template?: string;
      pool_bytes?: number;
      kv_used_bytes?: number;
    };
    const ok = r.ok && h.status === "ok";
    const free = Math.max(0, (h.pool_bytes ?? 0) - (h.kv_used_bytes ?? 0));
    return {
      url,
      ok,
      model: h.model,
      ...(typeof h.n_ctx === "number" ? { n_ctx: h.n_ctx } : {}),
      ...(typeof h.chat_template === "string" ? { chat_template: h.chat_template } : {}),
      pool_bytes: h.pool_bytes,
      kv_used_bytes: h.kv_used_bytes,
      free_bytes: free,
      ...(ok ? {} : { error: `status ${h.status ?? r.status}` }),
    };
  } catch (e) {
    return { url, ok: false, free_bytes: 0, error: e instanceof Error ? e.message : String(e) };
  }
}

/** Routable hosts, most free KV first (probes every host not marked down). */
export async function rankHosts(
  env: Env,
  nowMs = Date.now(),
): Promise<{ ranked: HostHealth[]; registered: HostEntry[] }> {
  const reg = registry(env);
  const registered = await reg.list();
  const probes = await Promise.all(registered.filter((h) => h.down_until <= nowMs).map((h) => probe(h.url)));
  await Promise.all(
    probes.map((p) => {
      const entry = registered.find((h) => h.url === p.url);
      if (!p.ok) return reg.markDown(p.url, p.error ?? "unhealthy");
      return entry && entry.down_until !== 0 ? reg.markUp(p.url) : Promise.resolve();
    }),
  );
  return { ranked: probes.filter((p) => p.ok).sort((a, b) => b.free_bytes - a.free_bytes), registered };
}

/** The edge → host deadlines: PKV_HOST_CONNECT_TIMEOUT_MS, PKV_HOST_IDLE_TIMEOUT_MS (wrangler.jsonc). */
export function deadlines(env: Env): Deadlines {
  return {
    connectMs: intVar(env.PKV_HOST_CONNECT_TIMEOUT_MS, DEFAULT_DEADLINES.connectMs),
    idleMs: intVar(env.PKV_HOST_IDLE_TIMEOUT_MS, DEFAULT_DEADLINES.idleMs),
  };
}

function secret(env: Env): string {
  if (!env.EDGE_SECRET || env.EDGE_SECRET.length < 16)
    throw noHost("the worker has no EDGE_SECRET (at least 16 characters) to reach GPU hosts");
  return env.EDGE_SECRET;
}

/** The healthy hosts serving `model` (any with ANY_MODEL); 404 model_not_found when none serves it. */
export function servingModel(ranked: HostHealth[], model: string): HostHealth[] {
  if (model === ANY_MODEL) return ranked;
  const serving = ranked.filter((h) => h.model !== undefined && (modelId(h.model) === model || h.model === model));
  if (serving.length === 0) {
    const ids = [...new Set(ranked.map((h) => modelId(h.model ?? "unknown")))];
    throw new ApiError(
      404,
      "not_found_error",
      `the model '${model.slice(0, 100)}' does not exist: the GPU hosts serve ${ids.join(", ")} ('${ANY_MODEL}': any of them)`,
      "model",
      "model_not_found",
    );
  }
  return serving;
}

/** A connection to the best host serving `model` for a new session, trying the next one if a connect fails. */
export async function connectBest(env: Env, tenant: string, model = ANY_MODEL): Promise<HostLink> {
  const { ranked, registered } = await rankHosts(env);
  if (ranked.length === 0) throw noHost(`no GPU host is available (${registered.length} registered, none healthy)`);
  let last: unknown;
  for (const h of servingModel(ranked, model)) {
    try {
      return await HostLink.connect(h.url, secret(env), tenant, deadlines(env));
    } catch (e) {
      last = e;
      if (e instanceof HostGone) await registry(env).markDown(h.url, e.message);
      else throw e;
    }
  }
  throw last instanceof Error ? last : noHost("no GPU host accepted the connection");
}

/** A connection to the host holding a session. */
export async function connectTo(env: Env, url: string, tenant: string): Promise<HostLink> {
  try {
    return await HostLink.connect(url, secret(env), tenant, deadlines(env));
  } catch (e) {
    if (e instanceof HostGone) {
      await registry(env).markDown(url, e.message);
      throw noHost(`the GPU host holding this session (${url}) is unavailable: ${e.message}`);
    }
    throw e;
  }
}

/** Marks the host of a failed link down when the failure was the host going away. */
export async function reportFailure(env: Env, link: HostLink | undefined, e: unknown): Promise<void> {
  if (link && e instanceof HostGone && !e.byEdge)
    await registry(env)
      .markDown(link.url, e.message)
      .catch(() => {});
}

/** A host's hello (its model, context, chat template), on a link of its own closed at once. */
export async function helloOf(env: Env, url: string): Promise<HostMessage<"hello">> {
  const link = await HostLink.connect(url, secret(env), "_models", deadlines(env));
  link.close();
  return link.hello;
}
