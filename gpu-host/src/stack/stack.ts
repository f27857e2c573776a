// The local stack: GPU hosts (`pkv host` child processes, CPU, the embedded model) and the edge
// worker in Miniflare (`wrangler dev`), wired together through the worker's admin API. Used by
// `npm run dev` (pkv dev), `pkv demo`, `pkv bench ttft` and the end-to-end tests.
import { type ChildProcess, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdirSync } from "node:fs";
import { createServer } from "node:net";
import { resolve } from "node:path";

import { repoRoot } from "../engine/engine-path.js";

export interface Proc {
  child: ChildProcess;
  url: string;
  port: number;
  /** SIGTERM (SIGKILL after 5 s); resolves when it exited */
  stop(): Promise<void>;
  /** SIGKILL now: a host that disappears */
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

function track(child: ChildProcess, url: string, port: number, logs: string[]): Proc {
  const exited = new Promise<void>((r) =>
    child.exitCode !== null || child.signalCode !== null ? r() : child.once("exit", () => r()),
  );
  const stop = async () => {
    if (child.exitCode === null && child.signalCode === null) child.kill("SIGTERM");
    const t = setTimeout(() => child.kill("SIGKILL"), 5000);
    await exited;
    clearTimeout(t);
  };
  const kill = async () => {
    if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
    await exited;
  };
  return { child, url, port, stop, kill, log: () => logs.join("") };
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
    for (const s of [child.stdout, child.stderr])
      s?.setEncoding("utf8").on("data", (d: string) => {
        logs.push(d);
        check();
      });
    child.once("exit", (code) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      rej(new Error(`${what} exited (${code}) before it was ready:\n${logs.join("").slice(-2000)}`));
    });
  });
}

export interface HostOptions {
  secret: string;
  /** the host's --metrics-token (GET /metrics needs it) */
  metricsToken?: string;
  kvPoolBytes?: number;
  threads?: number;
  args?: string[];
}

export async function startHostProcess(o: HostOptions): Promise<Proc> {
  const cli = resolve(repoRoot(), "gpu-host", "dist", "src", "cli.js");
  const args = [
    cli,
    "host",
    "--port",
    "0",
    "--threads",
    String(o.threads ?? 2),
    ...(o.kvPoolBytes ? ["--kv-pool-bytes", String(o.kvPoolBytes)] : []),
    ...(o.args ?? []),
  ];
  const child = spawn(process.execPath, args, {
    stdio: ["ignore", "pipe", "pipe"],
    env: {
      ...process.env,
      PKV_EDGE_SECRET: o.secret,
      ...(o.metricsToken !== undefined ? { PKV_METRICS_TOKEN: o.metricsToken } : {}),
    },
  });
  const logs: string[] = [];
  const m = await waitFor(child, logs, /listening on [^ ]+:(\d+)/, "pkv host", 120_000);
  const port = Number(m[1]);
  return track(child, `http://127.0.0.1:${port}`, port, logs);
}

export interface WorkerOptions {
  secret: string;
  adminToken: string;
  persistDir: string;
  port?: number;
  /** extra wrangler vars, e.g. PKV_PIECE_BYTES */
  vars?: Record<string, string>;
}

/** The edge worker in Miniflare (`wrangler dev`, local mode, storage persisted in persistDir). */
export async function startWorker(o: WorkerOptions): Promise<Proc> {
  const root = repoRoot();
  const port = o.port ?? (await freePort());
  mkdirSync(o.persistDir, { recursive: true });
  const vars = { EDGE_SECRET: o.secret, ADMIN_TOKEN: o.adminToken, ...o.vars };
  const args = [
    resolve(root, "node_modules", "wrangler", "bin", "wrangler.js"),
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
  const child = spawn(process.execPath, args, {
    cwd: resolve(root, "worker"),
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, WRANGLER_SEND_METRICS: "false", NO_UPDATE_NOTIFIER: "1" },
  });
  const logs: string[] = [];
  const url = `http://127.0.0.1:${port}`;
  const proc = track(child, url, port, logs);
  const exited = new Promise<never>((_, rej) =>
    child.once("exit", (code) => rej(new Error(`wrangler dev exited (${code}):\n${logs.join("").slice(-3000)}`))),
  );
  for (const s of [child.stdout, child.stderr]) s?.setEncoding("utf8").on("data", (d: string) => logs.push(d));
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
  addHost(url: string) {
    return this.call("POST", "/admin/hosts", { url });
  }
  removeHost(url: string) {
    return this.call("DELETE", `/admin/hosts?url=${encodeURIComponent(url)}`);
  }
  hosts() {
    // id: the opaque name tenants see for the host (session objects, usage)
    return this.call<{ data: { url: string; id: string; down_until: number; health: Record<string, unknown> }[] }>(
      "GET",
      "/admin/hosts",
    );
  }
  /** Replaces the registered hosts with `urls`. */
  async setHosts(urls: string[]): Promise<void> {
    for (const h of (await this.hosts()).data) if (!urls.includes(h.url)) await this.removeHost(h.url);
    for (const u of urls) await this.addHost(u);
  }
}

export const newSecret = () => randomBytes(24).toString("hex");

export interface Stack {
  worker: Proc;
  hosts: Proc[];
  admin: AdminClient;
  secret: string;
  /** the hosts' --metrics-token: GET /metrics with Authorization: Bearer <it> */
  metricsToken: string;
  /** GET /metrics of one of the hosts */
  metrics(host: Proc): Promise<string>;
  stop(): Promise<void>;
}

/** GET /metrics of the host at `url` with its scrape token; throws on a refusal. */
export async function scrapeMetrics(url: string, token: string): Promise<string> {
  const r = await fetch(`${url}/metrics`, { headers: { authorization: `Bearer ${token}` } });
  if (!r.ok) throw new Error(`GET ${url}/metrics: HTTP ${r.status}: ${await r.text()}`);
  return r.text();
}

export interface StackOptions {
  hosts?: number;
  kvPoolBytes?: number;
  persistDir: string;
  workerPort?: number;
  vars?: Record<string, string>;
  hostArgs?: string[];
  /** more arguments of host i (0-based) after hostArgs, e.g. its own --offload-dir */
  hostArgsEach?: (i: number) => string[];
  threads?: number;
}

/** Hosts and worker started side by side (their start-ups overlap), then the hosts registered. */
export async function startStack(o: StackOptions): Promise<Stack> {
  const secret = newSecret();
  const adminToken = newSecret();
  const metricsToken = newSecret();
  const started: Proc[] = [];
  const keep = <T extends Proc>(p: Promise<T>) =>
    p.then((x) => {
      started.push(x);
      return x;
    });
  try {
    const [worker, ...hosts] = await Promise.all([
      keep(startWorker({ secret, adminToken, persistDir: o.persistDir, port: o.workerPort, vars: o.vars })),
      ...Array.from({ length: o.hosts ?? 1 }, (_, i) =>
        keep(
          startHostProcess({
            secret,
            metricsToken,
            kvPoolBytes: o.kvPoolBytes,
            args: [...(o.hostArgs ?? []), ...(o.hostArgsEach?.(i) ?? [])],
            threads: o.threads,
          }),
        ),
      ),
    ]);
    const admin = new AdminClient(worker!.url, adminToken);
    await admin.setHosts(hosts.map((h) => h.url));
    return {
      worker: worker!,
      hosts,
      admin,
      secret,
      metricsToken,
      metrics: (h) => scrapeMetrics(h.url, metricsToken),
      stop: async () => void (await Promise.all(started.map((p) => p.stop()))),
    };
  } catch (e) {
    await Promise.all(started.map((p) => p.kill()));
    throw e;
  }
}
