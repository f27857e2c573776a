// Host configuration: flags override environment variables override defaults. Parsing only; the
// values are checked here so that every other module can trust them.
import { readFileSync } from "node:fs";

import { bool, type FlagValues, int, oneOf, parseFlags, string } from "../flags.js";

export type TenantPolicy = "refuse" | "auto";

/** Storage types of pooled KV entries (engine protocol 2.2 `open.kv_type`, the engine's --kv-type). */
export const KV_TYPES = ["f16", "q8_0", "q4_0"] as const;
export type KvType = (typeof KV_TYPES)[number];
export const TENANT_POLICIES: readonly TenantPolicy[] = ["refuse", "auto"];

export interface TenantLimits {
  kvQuotaBytes: number;
  maxSessions: number;
  policy: TenantPolicy;
  /** a session idle this long is closed and its stored state deleted */
  sessionTtlS: number;
  /** bytes of offloaded state (memory or disk) the tenant may keep */
  maxStoredBytes: number;
}

/** Default idle TTL of a session (1 h) and bytes of offloaded state per tenant (1 GiB). */
export const DEFAULT_SESSION_TTL_S = 3600;
export const DEFAULT_MAX_STORED_BYTES = 1 << 30;
/** Bytes of cached states (snapshots) the host keeps in memory, every tenant together (256 MiB). */
export const DEFAULT_CACHE_MEMORY_BYTES = 256 << 20;

export interface HostConfig {
  listen: string;
  port: number;
  engineBin?: string;
  model?: string;
  kvPoolBytes?: number;
  chunkSize?: number;
  threads?: number;
  /** the engine's context (--ctx-size); unset = the model's */
  ctxSize?: number;
  /** KV storage type of sessions whose open_session names none; unset = the engine's (f16) */
  kvType?: KvType;
  /** the edge this host dials (http(s) or ws(s) URL; `<edge>/hosts/connect`) */
  connect: string;
  /** the host token (`pkvh.<name>.<64 hex>`, from `pkv admin host create NAME`) */
  hostToken: string;
  /** heartbeats to the edge every this many ms */
  heartbeatMs: number;
  /** the host writes its pid here (for `pkv host --drain --pid-file P`) */
  pidFile?: string;
  /** a control request to the edge (a state part, a head) unanswered this long fails */
  edgeTimeoutMs: number;
  /** offloaded states go to files here (and survive a restart); unset = host memory */
  offloadDir?: string;
  /** a session idle this long is offloaded */
  idleMs: number;
  /** save every session after each completed append/generate, so an engine crash loses nothing */
  checkpoint: boolean;
  tenants: Record<string, TenantLimits>;
  /** limits of a tenant absent from `tenants` (kvQuotaBytes 0 = no quota of its own: admission.ts, fair share) */
  defaultTenant: TenantLimits;
  /** appends (prefills) in the engine at once; the rest wait in per-tenant queues */
  maxConcurrentPrefills: number;
  /** a connection with more unsent bytes than this gets its tokens coalesced */
  highWaterBytes: number;
  /** a connection with more unsent bytes than this is dropped (slow consumer) */
  maxBufferedBytes: number;
  /** SIGTERM: how long in-flight work may run before it is cancelled */
  drainMs: number;
  /** GET /metrics needs `Authorization: Bearer <metricsToken>`; unset = /metrics is refused */
  metricsToken?: string;
  /** generations in the engine at once (every tenant), and at most per tenant */
  decodeLanes: number;
  tenantDecodeLanes: number;
  /** an engine request that gets no frame for this long fails with 'timeout' */
  engineTimeoutMs: number;
  /** cached states (snapshot, open_session.from_cache) kept in host memory, LRU; 0 = none (the
   * edge's store only) */
  cacheMemoryBytes: number;
}

export const HOST_USAGE = `usage: pkv host [options]            (each option also reads an environment variable)
  --listen ADDR              PKV_HOST_LISTEN        listen address (127.0.0.1)
  --port N                   PKV_HOST_PORT          port of GET /health and /metrics; 0 = any free port, printed (8790)
  --connect URL              PKV_EDGE_URL           the edge to dial: <URL>/hosts/connect (required)
  --host-token T             PKV_HOST_TOKEN         this host's token, pkvh.<name>.<64 hex> (pkv admin host create NAME)
  --heartbeat-seconds N      PKV_HEARTBEAT_SECONDS  load reports to the edge every N seconds (5)
  --pid-file P               PKV_PID_FILE           write the host's pid to P
  --drain                                           with --pid-file P: drain the host whose pid P holds, wait for its exit
  --drain-seconds N          PKV_DRAIN_SECONDS      SIGTERM: in-flight work may run this long before it is cancelled (10)
  --model M                  PKV_MODEL              GGUF model (the engine's default: the embedded model)
  --kv-pool-bytes N          PKV_KV_POOL_BYTES      engine KV pool capacity
  --chunk-size N             PKV_CHUNK_SIZE         engine chunked-prefill size
  --threads N                PKV_THREADS            engine threads
  --ctx-size N               PKV_CTX_SIZE           engine context in tokens (0 = the model's)
  --kv-type T                PKV_KV_TYPE            KV storage of sessions that name none: f16, q8_0, q4_0 (f16)
  --offload-dir DIR          PKV_OFFLOAD_DIR        offloaded sessions on disk (survive restarts); default host memory
  --idle-seconds N           PKV_IDLE_SECONDS       offload sessions idle this long (300)
  --tenants FILE|JSON        PKV_TENANTS            {"name": {"kv_quota_bytes": N, "max_sessions": N, "policy": "refuse"|"auto"}, "*": {...}}
  --checkpoint on|off        PKV_CHECKPOINT         save sessions after every append/generate (on)
  --max-prefills N           PKV_MAX_PREFILLS       appends in the engine at once (2)
  --session-ttl-seconds N    PKV_SESSION_TTL_SECONDS  close sessions idle this long, per tenant by default (3600)
  --max-stored-bytes N       PKV_MAX_STORED_BYTES   offloaded state a tenant may keep, by default (1073741824)
  --cache-memory-bytes N     PKV_CACHE_MEMORY_BYTES  cached prompt states kept in memory, LRU; 0 = none (268435456)
  --decode-lanes N           PKV_DECODE_LANES       generations in the engine at once (64)
  --tenant-decode-lanes N    PKV_TENANT_DECODE_LANES  of which one tenant may hold (16)
  --engine-timeout-seconds N PKV_ENGINE_TIMEOUT_SECONDS  an engine request silent this long fails (120)
  --metrics-token T          PKV_METRICS_TOKEN      bearer token GET /metrics requires (unset: /metrics refused)`;

/** One tenant's limits from JSON ({kv_quota_bytes, max_sessions, policy}); `base` fills gaps. */
export function parseTenantLimits(where: string, v: unknown, base: TenantLimits): TenantLimits {
  if (typeof v !== "object" || v === null || Array.isArray(v)) throw new Error(`${where}: must be an object`);
  const o = v as Record<string, unknown>;
  for (const k of Object.keys(o)) {
    if (!["kv_quota_bytes", "max_sessions", "policy", "session_ttl_s", "max_stored_bytes"].includes(k))
      throw new Error(`${where}: unknown key '${k}'`);
  }
  const num = (k: string, fallback: number) => {
    const x = o[k];
    if (x === undefined) return fallback;
    if (typeof x !== "number" || !Number.isSafeInteger(x) || x < 0)
      throw new Error(`${where}.${k}: '${String(x)}' is not an integer >= 0`);
    return x;
  };
  const policy = o.policy ?? base.policy;
  if (policy !== "refuse" && policy !== "auto")
    throw new Error(`${where}.policy: '${String(policy)}' is not one of refuse, auto`);
  return {
    kvQuotaBytes: num("kv_quota_bytes", base.kvQuotaBytes),
    maxSessions: num("max_sessions", base.maxSessions),
    policy,
    sessionTtlS: num("session_ttl_s", base.sessionTtlS),
    maxStoredBytes: num("max_stored_bytes", base.maxStoredBytes),
  };
}

export const TENANT_NAME = /^[A-Za-z0-9_.-]{1,64}$/;

/** A host token (FLEET: `pkvh.<name>.<64 hex>`, name as the edge's host names). */
export const HOST_TOKEN = /^pkvh\.[a-z0-9][a-z0-9-]{0,62}\.[0-9a-f]{64}$/;

/** --connect: the edge's URL, http(s) or ws(s), without a query; its /hosts/connect is dialled. */
export function edgeUrl(raw: string | undefined): string {
  if (raw === undefined || raw === "")
    throw new Error("--connect (or PKV_EDGE_URL): required: the edge's URL, e.g. https://pkv.example.workers.dev");
  let u: URL;
  try {
    u = new URL(raw);
  } catch {
    throw new Error(`--connect: '${raw.slice(0, 200)}' is not a URL (accepted: http://, https://, ws://, wss://)`);
  }
  if (!["http:", "https:", "ws:", "wss:"].includes(u.protocol))
    throw new Error(`--connect: scheme '${u.protocol}' of '${raw.slice(0, 200)}' is not one of http, https, ws, wss`);
  if (u.search !== "" || u.hash !== "")
    throw new Error(`--connect: '${raw.slice(0, 200)}' has a query or fragment; give the edge's base URL`);
  return u.toString().replace(/\/+$/, "");
}

/** --tenants: a file name or inline JSON. The key "*" sets the defaults of unlisted tenants. */
export function parseTenants(
  text: string | undefined,
  base: Pick<TenantLimits, "sessionTtlS" | "maxStoredBytes"> = {
    sessionTtlS: DEFAULT_SESSION_TTL_S,
    maxStoredBytes: DEFAULT_MAX_STORED_BYTES,
  },
): {
  tenants: Record<string, TenantLimits>;
  defaults: TenantLimits;
} {
  let defaults: TenantLimits = { kvQuotaBytes: 0, maxSessions: 1000, policy: "refuse", ...base };
  const tenants: Record<string, TenantLimits> = {};
  if (text === undefined || text.trim() === "") return { tenants, defaults };
  const source = text.trim().startsWith("{") ? text : readFileSync(text, "utf8");
  let json: unknown;
  try {
    json = JSON.parse(source);
  } catch (e) {
    throw new Error(`--tenants: not valid JSON: ${e instanceof Error ? e.message : String(e)}`);
  }
  if (typeof json !== "object" || json === null || Array.isArray(json))
    throw new Error("--tenants: must be a JSON object");
  const entries = Object.entries(json as Record<string, unknown>);
  const star = entries.find(([k]) => k === "*");
  if (star) defaults = parseTenantLimits("--tenants.*", star[1], defaults);
  for (const [name, v] of entries) {
    if (name === "*") continue;
    if (!TENANT_NAME.test(name)) throw new Error(`--tenants: tenant name '${name}' must match ${TENANT_NAME.source}`);
    tenants[name] = parseTenantLimits(`--tenants.${name}`, v, defaults);
  }
  return { tenants, defaults };
}

/** The flags of `pkv host`; each absent flag reads its environment variable (HOST_USAGE). */
export const HOST_FLAGS = {
  listen: string({ env: "PKV_HOST_LISTEN", default: "127.0.0.1" }),
  port: int({ min: 0, max: 65535, default: 8790, env: "PKV_HOST_PORT" }),
  connect: string({ env: "PKV_EDGE_URL" }),
  "host-token": string({ env: "PKV_HOST_TOKEN" }),
  "heartbeat-seconds": int({ min: 1, max: 3600, default: 5, env: "PKV_HEARTBEAT_SECONDS" }),
  "pid-file": string({ env: "PKV_PID_FILE" }),
  drain: bool(),
  "drain-seconds": int({ min: 0, max: 86400, default: 10, env: "PKV_DRAIN_SECONDS" }),
  model: string({ env: "PKV_MODEL" }),
  "kv-pool-bytes": int({ min: 1, max: Number.MAX_SAFE_INTEGER, env: "PKV_KV_POOL_BYTES" }),
  "chunk-size": int({ min: 0, max: 1 << 24, env: "PKV_CHUNK_SIZE" }),
  threads: int({ min: 0, max: 1024, env: "PKV_THREADS" }),
  "ctx-size": int({ min: 0, max: 1 << 24, env: "PKV_CTX_SIZE" }),
  "kv-type": oneOf(KV_TYPES, { env: "PKV_KV_TYPE" }),
  "offload-dir": string({ env: "PKV_OFFLOAD_DIR" }),
  "idle-seconds": int({ min: 0, max: 86400 * 365, default: 300, env: "PKV_IDLE_SECONDS" }),
  tenants: string({ env: "PKV_TENANTS" }),
  checkpoint: oneOf(["on", "off"], { env: "PKV_CHECKPOINT", default: "on" }),
  "max-prefills": int({ min: 1, max: 1024, default: 2, env: "PKV_MAX_PREFILLS" }),
  "session-ttl-seconds": int({
    min: 1,
    max: 86400 * 365,
    default: DEFAULT_SESSION_TTL_S,
    env: "PKV_SESSION_TTL_SECONDS",
  }),
  "max-stored-bytes": int({
    min: 0,
    max: Number.MAX_SAFE_INTEGER,
    default: DEFAULT_MAX_STORED_BYTES,
    env: "PKV_MAX_STORED_BYTES",
  }),
  "cache-memory-bytes": int({
    min: 0,
    max: Number.MAX_SAFE_INTEGER,
    default: DEFAULT_CACHE_MEMORY_BYTES,
    env: "PKV_CACHE_MEMORY_BYTES",
  }),
  "decode-lanes": int({ min: 1, max: 65536, default: 64, env: "PKV_DECODE_LANES" }),
  "tenant-decode-lanes": int({ min: 1, max: 65536, default: 16, env: "PKV_TENANT_DECODE_LANES" }),
  "engine-timeout-seconds": int({ min: 1, max: 86400, default: 120, env: "PKV_ENGINE_TIMEOUT_SECONDS" }),
  "metrics-token": string({ env: "PKV_METRICS_TOKEN" }),
  /** the engine binary (tests); not in the usage */
  engine: string({ env: "PKV_ENGINE_BIN" }),
};

export function parseHostConfig(argv: string[], env: NodeJS.ProcessEnv = process.env): HostConfig {
  return hostConfig(parseFlags(HOST_FLAGS, argv, { env }).values);
}

/** The checked flag values as a HostConfig: what one flag alone cannot check is checked here. */
export function hostConfig(f: FlagValues<typeof HOST_FLAGS>): HostConfig {
  const connect = edgeUrl(f.connect);
  const hostToken = f["host-token"] ?? "";
  if (!HOST_TOKEN.test(hostToken))
    throw new Error(
      hostToken === ""
        ? "--host-token (or PKV_HOST_TOKEN): required: this host's token, from `pkv admin host create NAME`"
        : `--host-token (or PKV_HOST_TOKEN): '${hostToken.slice(0, 12)}…' is not a host token: expected pkvh.<name>.<64 hex digits>`,
    );
  const offloadDir = f["offload-dir"]; // created on start
  const { tenants, defaults } = parseTenants(f.tenants, {
    sessionTtlS: f["session-ttl-seconds"],
    maxStoredBytes: f["max-stored-bytes"],
  });
  if (f["tenant-decode-lanes"] > f["decode-lanes"])
    throw new Error(
      `--tenant-decode-lanes: ${f["tenant-decode-lanes"]} is more than --decode-lanes ${f["decode-lanes"]}; it must be 1..${f["decode-lanes"]}`,
    );
  const metricsToken = f["metrics-token"];
  if (metricsToken !== undefined && metricsToken !== "" && metricsToken.length < 16)
    throw new Error("--metrics-token (or PKV_METRICS_TOKEN): at least 16 characters when set");
  return {
    listen: f.listen,
    port: f.port,
    engineBin: f.engine,
    model: f.model,
    kvPoolBytes: f["kv-pool-bytes"],
    chunkSize: f["chunk-size"],
    threads: f.threads,
    ctxSize: f["ctx-size"],
    kvType: f["kv-type"],
    connect,
    hostToken,
    heartbeatMs: f["heartbeat-seconds"] * 1000,
    pidFile: f["pid-file"] === "" ? undefined : f["pid-file"],
    edgeTimeoutMs: 60_000,
    offloadDir: offloadDir === "" ? undefined : offloadDir,
    idleMs: f["idle-seconds"] * 1000,
    checkpoint: f.checkpoint === "on",
    tenants,
    defaultTenant: defaults,
    maxConcurrentPrefills: f["max-prefills"],
    highWaterBytes: 1 << 20,
    maxBufferedBytes: 64 << 20,
    drainMs: f["drain-seconds"] * 1000,
    metricsToken: metricsToken === undefined || metricsToken === "" ? undefined : metricsToken,
    decodeLanes: f["decode-lanes"],
    tenantDecodeLanes: f["tenant-decode-lanes"],
    engineTimeoutMs: f["engine-timeout-seconds"] * 1000,
    cacheMemoryBytes: f["cache-memory-bytes"],
  };
}
