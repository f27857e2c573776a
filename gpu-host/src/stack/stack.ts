// The local stack: the edge worker in Miniflare (`wrangler dev`: Durable Objects, local R2 and
// hibernation, storage persisted in the stack's directory) and GPU hosts (`pkv host` child
// processes, CPU, the embedded model) that dial in to it with host tokens made through the
// worker's admin API. Used by `npm run dev` (pkv dev), `pkv demo`, `pkv bench ttft|move`, `pkv soak`
// and the end-to-end tests, which also use its fault helpers: kill -9 a host, start it again,
// drain it, restart the worker (a "deploy").
import { type ChildProcess, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdirSync, readdirSync, readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { createServer } from "node:net";
import { dirname, resolve } from "node:path";

import { repoRoot } from "../engine/engine-path.js";

export interface Proc {
  child: ChildProcess;
  url: string;
  port: number;
  /** SIGTERM (SIGKILL of it and its children after 5 s); resolves when it exited */
  stop(): Promise<void>;
  /** SIGKILL of it and every process under it, now: a machine that disappears */
  kill(): Promise<void>;
  log(): string;
}

export function freePort(): Promise<number> {
  return new Promise((res, rej) => {
    const srv = createServer();
    srv.once("error", rej);
    srv.listen(0, "127.0.0.1", () => {
      const port = (srv.address() as { port: number }).port;
      srv.close(() => res(port));
    });
  });
}

// ---- processes ------------------------------------------------------------------------------------

/** pid → parent pid of every process (Linux /proc). */
function parents(): Map<number, number> {
  const out = new Map<number, number>();
  for (const name of readdirSync("/proc")) {
    if (!/^\d+$/.test(name)) continue;
    try {
      const stat = readFileSync(`/proc/${name}/stat`, "utf8");
      // "pid (comm) state ppid ...": comm may hold spaces and parentheses
      const rest = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
      out.set(Number(name), Number(rest[1]));
    } catch {
      // exited meanwhile
    }
  }
  return out;
}

/** Every descendant of `pid` (children first, then theirs). */
export function descendantPids(pid: number): number[] {
  const ppid = parents();
  const found: number[] = [];
  const frontier = [pid];
  while (frontier.length > 0) {
    const p = frontier.shift()!;
    for (const [c, pp] of ppid) {
      if (pp === p && !found.includes(c)) {
        found.push(c);
        frontier.push(c);
      }
    }
  }
  return found;
}

/** Sends `signal` to a pid; false when it is gone. */
export function signal(pid: number, sig: NodeJS.Signals): boolean {
  try {
    process.kill(pid, sig);
    return true;
  } catch {
    return false;
  }
}

/** SIGKILL of a process and everything under it (a host and its engine; wrangler dev and its
 * workerd): it vanishes without closing its sockets. Resolves when the process itself exited. */
export async function killTree(p: Proc): Promise<void> {
  await p.kill();
}

/** Waits for `pattern` on the child's stdout/stderr; rejects if it exits first or after timeoutMs. */
function waitFor(
  child: ChildProcess,
  logs: string[],
  pattern: RegExp,
  what: string,
  timeoutMs: number,
): Promise<RegExpExecArray> {
  return new Promise((res, rej) => {
    let done = false;
    const check = () => {
      const m = pattern.exec(logs.join(""));
      if (m && !done) {
        done = true;
        clearTimeout(timer);
        res(m);
      }
    };
    const timer = setTimeout(
      () => !done && rej(new Error(`${what} did not start within ${timeoutMs} ms:\n${logs.join("").slice(-2000)}`)),
      timeoutMs,
    );
    child.on("log", check);
    check();
    child.once("exit", (code) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      rej(new Error(`${what} exited (${code}) before it was ready:\n${logs.join("").slice(-2000)}`));
    });
  });
}

/** A child whose output is kept (and echoed to `echo` when given), with stop/kill of its whole tree. */
function spawnLogged(
  args: string[],
  opts: { cwd?: string; env?: NodeJS.ProcessEnv; echo?: (s: string) => void },
): { child: ChildProcess; logs: string[] } {
  const child = spawn(process.execPath, args, {
    cwd: opts.cwd,
    stdio: ["ignore", "pipe", "pipe"],
    env: opts.env ?? process.env,
  });
  const logs: string[] = [];
  for (const s of [child.stdout, child.stderr])
    s?.setEncoding("utf8").on("data", (d: string) => {
      logs.push(d);
      opts.echo?.(d);
      child.emit("log");
    });
  return { child, logs };
}

const running = (c: ChildProcess) => c.exitCode === null && c.signalCode === null;

function track(child: ChildProcess, url: string, port: number, logs: string[]): Proc {
  const exited = new Promise<void>((r) => (running(child) ? child.once("exit", () => r()) : r()));
  const stop = async () => {
    // the tree first: once the parent is gone its children are no longer found under it
    const tree = child.pid === undefined ? [] : descendantPids(child.pid);
    if (running(child)) child.kill("SIGTERM");
    const t = setTimeout(() => {
      child.kill("SIGKILL");
      for (const d of tree) signal(d, "SIGKILL");
    }, 5000);
    await exited;
    clearTimeout(t);
  };
  const kill = async () => {
    const tree = child.pid === undefined ? [] : descendantPids(child.pid);
    for (const d of tree.reverse()) signal(d, "SIGKILL");
    if (running(child)) child.kill("SIGKILL");
    await exited;
  };
  return { child, url, port, stop, kill, log: () => logs.join("") };
}

/** The exit code of a child (null when a signal ended it), once it exited. */
export function exitCodeOf(child: ChildProcess): Promise<number | null> {
  return new Promise((r) => (running(child) ? child.once("exit", (code) => r(code)) : r(child.exitCode)));
}

// ---- hosts ------------------------------------------------------------------------------------------

export interface HostOptions {
  /** the worker's URL: the host dials `<connect>/hosts/connect` */
  connect: string;
  /** its host token (`pkv admin host create NAME`) */
  token: string;
  /** the host's --metrics-token (GET /metrics needs it) */
  metricsToken?: string;
  kvPoolBytes?: number;
  threads?: number;
  args?: string[];
  echo?: (s: string) => void;
}

/** `pkv host --connect … --host-token …` as a child; not waited for (a refused token exits 1). */
export function spawnHostProcess(o: HostOptions): { child: ChildProcess; logs: string[] } {
  const cli = resolve(repoRoot(), "gpu-host", "dist", "src", "cli.js");
  const args = [
    cli,
    "host",
    "--connect",
    o.connect,
    "--host-token",
    o.token,
    "--port",
    "0",
    "--threads",
    String(o.threads ?? 2),
    ...(o.kvPoolBytes ? ["--kv-pool-bytes", String(o.kvPoolBytes)] : []),
    ...(o.args ?? []),
  ];
  return spawnLogged(args, {
    env: { ...process.env, ...(o.metricsToken !== undefined ? { PKV_METRICS_TOKEN: o.metricsToken } : {}) },
    echo: o.echo,
  });
}

/** A host started and listening (its HTTP /health and /metrics); whether it is connected to the
 * edge is the registry's to say (Stack.waitLive). */
export async function startHostProcess(o: HostOptions): Promise<Proc> {
  const { child, logs } = spawnHostProcess(o);
  const m = await waitFor(child, logs, /listening on [^ ]+:(\d+)/, "pkv host", 120_000);
  const port = Number(m[1]);
  return track(child, `http://127.0.0.1:${port}`, port, logs);
}

// ---- the worker ---------------------------------------------------------------------------------------

export interface WorkerOptions {
  adminToken: string;
  persistDir: string;
  /** EDGE_SECRET: keys the opaque host ids tenants see (optional) */
  secret?: string;
  port?: number;
  /** extra wrangler vars, e.g. PKV_PIECE_BYTES */
  vars?: Record<string, string>;
}

/**
 * The worker's own wrangler CLI (`bin/wrangler.js`), the version `worker/package.json` pins and
 * `worker/node_modules/.bin` runs. npm may hoist another version to the root's node_modules: the
 * Workers test pool's, which needs a newer Node than the CLI pinned for the worker.
 */
export function wranglerJs(): string {
  const pkg = createRequire(resolve(repoRoot(), "worker", "package.json")).resolve("wrangler/package.json");
  return resolve(dirname(pkg), "bin", "wrangler.js");
}

/** The edge worker in Miniflare (`wrangler dev`, local mode: Durable Objects, KV and R2 persisted
 * in persistDir, so a restart on the same directory keeps them). */
export async function startWorker(o: WorkerOptions): Promise<Proc> {
  const root = repoRoot();
  const port = o.port || (await freePort()); // 0: any free port
  mkdirSync(o.persistDir, { recursive: true });
  const vars = { ADMIN_TOKEN: o.adminToken, ...(o.secret ? { EDGE_SECRET: o.secret } : {}), ...o.vars };
  const args = [
    wranglerJs(),
    "dev",
    "--config",
    resolve(root, "worker", "wrangler.jsonc"),
    "--local",
    "--ip",
    "127.0.0.1",
    "--port",
    String(port),
    "--inspector-port",
    "0",
    "--persist-to",
    o.persistDir,
    "--show-interactive-dev-session=false",
    "--log-level",
    "warn",
    ...Object.entries(vars).flatMap(([k, v]) => ["--var", `${k}:${v}`]),
  ];
  const { child, logs } = spawnLogged(args, {
    cwd: resolve(root, "worker"),
    env: { ...process.env, WRANGLER_SEND_METRICS: "false", NO_UPDATE_NOTIFIER: "1" },
  });
  const url = `http://127.0.0.1:${port}`;
  const proc = track(child, url, port, logs);
  const exited = new Promise<never>((_, rej) =>
    child.once("exit", (code) => rej(new Error(`wrangler dev exited (${code}):\n${logs.join("").slice(-3000)}`))),
  );
  const ready = (async () => {
    for (let i = 0; i < 1200; i++) {
      try {
        if ((await fetch(`${url}/`)).ok) return;
      } catch {
        // not listening yet
      }
      await new Promise((r) => setTimeout(r, 100));
    }
    throw new Error(`wrangler dev did not answer on ${url} within 120 s:\n${logs.join("").slice(-3000)}`);
  })();
  try {
    await Promise.race([ready, exited]);
  } catch (e) {
    await proc.kill();
    throw e;
  }
  exited.catch(() => {});
  return proc;
}

// ---- the admin API ------------------------------------------------------------------------------------

/** One row of GET /admin/hosts (docs/WORKER.md). */
export interface HostRow {
  name: string;
  /** the opaque id tenants see for the host (session objects, usage) */
  id: string;
  connected: boolean;
  live: boolean;
  draining: boolean;
  model?: string;
  n_ctx?: number;
  pool_bytes?: number;
  free_bytes?: number;
  kv_used_bytes?: number;
  sessions?: number;
  active?: number;
  last_heartbeat_ms?: number;
  connected_at?: number;
}

export interface HostList {
  hosts: HostRow[];
  /** the registry's counters since its object woke: route() calls and storage reads */
  routing: { routes: number; storage_reads: number };
}

/** Host names: the token's name part (`pkvh.<name>.<hex>`). */
export const HOST_NAME = /^[a-z0-9][a-z0-9-]{0,62}$/;

/** The worker's admin API (/admin/*). */
export class AdminClient {
  constructor(
    readonly url: string,
    readonly token: string,
  ) {}

  async call<T = Record<string, unknown>>(method: string, path: string, body?: unknown): Promise<T> {
    const r = await fetch(`${this.url}${path}`, {
      method,
      headers: { authorization: `Bearer ${this.token}`, "content-type": "application/json" },
      ...(body === undefined ? {} : { body: JSON.stringify(body) }),
    });
    const text = await r.text();
    let json: unknown;
    try {
      json = JSON.parse(text);
    } catch {
      json = { raw: text };
    }
    if (!r.ok) {
      const msg = (json as { error?: { message?: string } }).error?.message ?? text;
      throw new Error(`${method} ${path}: HTTP ${r.status}: ${msg}`);
    }
    return json as T;
  }

  setTenant(
    name: string,
    limits: {
      kv_quota_bytes?: number;
      max_sessions?: number;
      requests_per_minute?: number;
      policy?: string;
      kv_method?: string;
      kv_budget?: number;
      session_ttl_s?: number;
      max_stored_bytes?: number;
      kv_cache?: string;
      cache_max_bytes?: number;
      cache_ttl_s?: number;
    },
  ) {
    return this.call("PUT", `/admin/tenants/${encodeURIComponent(name)}`, limits);
  }
  async createKey(tenant: string): Promise<string> {
    return (await this.call<{ key: string }>("POST", `/admin/tenants/${encodeURIComponent(tenant)}/keys`)).key;
  }
  tenant(name: string) {
    return this.call("GET", `/admin/tenants/${encodeURIComponent(name)}`);
  }
  tenants() {
    return this.call<{ data: string[] }>("GET", "/admin/tenants");
  }
  /** A host token for `name` (shown once; the edge keeps its hash). */
  createHost(name: string) {
    return this.call<{ name: string; token: string }>("POST", "/admin/hosts", { name });
  }
  /** Deletes the host's token and closes its live socket. */
  revokeHost(name: string) {
    return this.call("DELETE", `/admin/hosts/${encodeURIComponent(name)}`);
  }
  hosts() {
    return this.call<HostList>("GET", "/admin/hosts");
  }
  /** A fresh token for `name`: the old one revoked first when the name exists (a dev stack's
   * tokens from an earlier run cannot be shown again). */
  async renewHost(name: string): Promise<{ name: string; token: string }> {
    try {
      return await this.createHost(name);
    } catch (e) {
      if (!/HTTP 409/.test(String(e))) throw e;
      await this.revokeHost(name);
      return this.createHost(name);
    }
  }
}

export const newSecret = () => randomBytes(24).toString("hex");

/** GET /metrics of the host at `url` with its scrape token; throws on a refusal. */
export async function scrapeMetrics(url: string, token: string): Promise<string> {
  const r = await fetch(`${url}/metrics`, { headers: { authorization: `Bearer ${token}` } });
  if (!r.ok) throw new Error(`GET ${url}/metrics: HTTP ${r.status}: ${await r.text()}`);
  return r.text();
}

/** Polls `cond` every `everyMs` until it holds (true) or `timeoutMs` passed (false). */
export async function until(cond: () => Promise<boolean> | boolean, timeoutMs: number, everyMs = 200) {
  const end = Date.now() + timeoutMs;
  for (;;) {
    if (await cond()) return true;
    if (Date.now() > end) return false;
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

// ---- the stack ---------------------------------------------------------------------------------------

/** A process the stack can kill and start again; `child`, `url`, `port` and `log()` follow the
 * current run (log() holds every run's output). */
export class Restartable implements Proc {
  private past = "";
  constructor(
    private cur: Proc,
    private readonly launch: () => Promise<Proc>,
  ) {}
  get child() {
    return this.cur.child;
  }
  get url() {
    return this.cur.url;
  }
  get port() {
    return this.cur.port;
  }
  get running(): boolean {
    return running(this.cur.child);
  }
  stop() {
    return this.cur.stop();
  }
  kill() {
    return this.cur.kill();
  }
  log() {
    return this.past + this.cur.log();
  }
  /** Starts it again (killed first if it still runs). */
  async restart(): Promise<void> {
    if (this.running) await this.cur.kill();
    this.past += `${this.cur.log()}\n---- restarted ----\n`;
    this.cur = await this.launch();
  }
}

/** A GPU host of the stack: its name (and token) at the edge. */
export class StackHost extends Restartable {
  constructor(
    readonly name: string,
    readonly token: string,
    first: Proc,
    launch: () => Promise<Proc>,
  ) {
    super(first, launch);
  }
}

export interface Stack {
  /** the worker (wrangler dev); restartWorker() keeps its URL */
  worker: Restartable;
  hosts: StackHost[];
  admin: AdminClient;
  /** the worker's EDGE_SECRET */
  secret: string;
  /** the hosts' --metrics-token: GET /metrics with Authorization: Bearer <it> */
  metricsToken: string;
  /** GET /metrics of one of the hosts */
  metrics(host: Proc): Promise<string>;
  /** the host whose opaque id (as a session object names it) or name is `id` */
  hostById(id: string): Promise<StackHost | undefined>;
  /** GET /admin/hosts */
  listHosts(): Promise<HostList>;
  /** until every named host is live at the edge (default: the stack's hosts that run) */
  waitLive(names?: string[], timeoutMs?: number): Promise<void>;
  /** kill -9 of host i and its engine (the edge sees its socket close) */
  killHost(i: number): Promise<void>;
  /** starts host i again (same token, arguments and offload dir), until it is live */
  startHost(i: number): Promise<void>;
  /** SIGTERM to host i (drain: checkpoints to R2, disconnects); resolves with its exit code */
  drainHost(i: number): Promise<number | null>;
  /** a "deploy": wrangler and workerd killed, started again on the same port and storage; the
   * hosts reconnect by themselves (until live: waitLive()) */
  restartWorker(): Promise<void>;
  /** one more host (a new token named `name`), started and live */
  addHost(name: string, args?: string[]): Promise<StackHost>;
  stop(): Promise<void>;
}

export interface StackOptions {
  /** GPU hosts dialling in (0: the worker alone) */
  hosts?: number;
  kvPoolBytes?: number;
  persistDir: string;
  workerPort?: number;
  vars?: Record<string, string>;
  hostArgs?: string[];
  /** more arguments of host i (0-based) after hostArgs, e.g. its own --offload-dir */
  hostArgsEach?: (i: number) => string[];
  threads?: number;
  /** host names: `${hostPrefix}-${i}` (default "host") */
  hostPrefix?: string;
}

/** The worker, then N host tokens made through its admin API, then N hosts dialling in (their
 * engines load meanwhile), until the registry lists every one live. */
export async function startStack(o: StackOptions): Promise<Stack> {
  const secret = newSecret();
  const adminToken = newSecret();
  const metricsToken = newSecret();
  const workerOptions: WorkerOptions = {
    secret,
    adminToken,
    persistDir: o.persistDir,
    port: o.workerPort,
    vars: o.vars,
  };
  const firstWorker = await startWorker(workerOptions);
  const worker = new Restartable(firstWorker, () => startWorker({ ...workerOptions, port: firstWorker.port }));
  const admin = new AdminClient(worker.url, adminToken);
  const hosts: StackHost[] = [];
  const launchHost = (token: string, args: string[]) => () =>
    startHostProcess({
      connect: worker.url,
      token,
      metricsToken,
      kvPoolBytes: o.kvPoolBytes,
      threads: o.threads,
      args,
    });
  const listHosts = () => admin.hosts();
  const waitLive = async (names?: string[], timeoutMs = 120_000) => {
    const want = names ?? hosts.filter((h) => h.running).map((h) => h.name);
    let last: HostList | undefined;
    const ok = await until(async () => {
      try {
        last = await listHosts();
      } catch {
        return false; // the worker restarting
      }
      return want.every((n) => last!.hosts.some((h) => h.name === n && h.live));
    }, timeoutMs);
    if (!ok)
      throw new Error(
        `hosts ${want.join(", ")} not live at the edge within ${timeoutMs} ms: ${JSON.stringify(last?.hosts ?? null)}\n` +
          hosts.map((h) => `${h.name}:\n${h.log().slice(-1500)}`).join("\n"),
      );
  };
  const newHost = async (name: string, args: string[]): Promise<StackHost> => {
    const { token } = await admin.renewHost(name);
    const launch = launchHost(token, args);
    return new StackHost(name, token, await launch(), launch);
  };
  try {
    const prefix = o.hostPrefix ?? "host";
    const started = await Promise.allSettled(
      Array.from({ length: o.hosts ?? 1 }, (_, i) =>
        newHost(`${prefix}-${i}`, [...(o.hostArgs ?? []), ...(o.hostArgsEach?.(i) ?? [])]),
      ),
    );
    for (const s of started) if (s.status === "fulfilled") hosts.push(s.value);
    const failed = started.find((s) => s.status === "rejected");
    if (failed) throw (failed as PromiseRejectedResult).reason;
    await waitLive();
  } catch (e) {
    await Promise.all([...hosts.map((h) => h.kill()), worker.kill()]);
    throw e;
  }
  const stack: Stack = {
    worker,
    hosts,
    admin,
    secret,
    metricsToken,
    metrics: (h) => scrapeMetrics(h.url, metricsToken),
    listHosts,
    waitLive,
    async hostById(id) {
      const row = (await listHosts()).hosts.find((h) => h.id === id || h.name === id);
      return hosts.find((h) => h.name === (row?.name ?? id));
    },
    killHost: (i) => hosts[i]!.kill(),
    async startHost(i) {
      await hosts[i]!.restart();
      await waitLive([hosts[i]!.name]);
    },
    async drainHost(i) {
      const h = hosts[i]!;
      const code = exitCodeOf(h.child);
      h.child.kill("SIGTERM");
      return code;
    },
    async restartWorker() {
      await worker.restart();
    },
    async addHost(name, args = []) {
      const h = await newHost(name, [...(o.hostArgs ?? []), ...args]);
      hosts.push(h);
      await waitLive([name]);
      return h;
    },
    stop: async () => {
      await Promise.all(hosts.map((h) => h.stop()));
      await worker.stop();
    },
  };
  return stack;
}
