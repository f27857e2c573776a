// Test helpers for the GPU host: a host started in this process (or as a child process) with the
// embedded model, dialling a DirectEdge (gpu-host/src/host/direct-edge.ts) on a random loopback
// port, and a client of the host protocol speaking over that edge's channels.
import { type ChildProcess, spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { after } from "node:test";

import type { FromHostMessage, ToHostMessage } from "@pyramidkv/shared";

import { repoRoot } from "../src/engine/engine-path.js";
import { type HostConfig, parseHostConfig, TENANT_NAME } from "../src/host/config.js";
import { DirectEdge, directEdgeAt, type EdgeChannel, hostToken } from "../src/host/direct-edge.js";
import { type RunningHost, startHost } from "../src/host/main.js";
import { fakeEngineBin } from "./fake-engine.js";

/** the test hosts' --metrics-token */
export const METRICS_TOKEN = "test-metrics-token-0123456789";

const FINAL = new Set([
  "opened",
  "appended",
  "buffered",
  "done",
  "cancelled",
  "closed",
  "stats_result",
  "tenant_set",
  "snapshotted",
  "error",
]);

/** PKV_TEST_ENGINE_BIN: the host tests run on another build of the engine (a helper's own build
 * directory, before the shared build has its change); unset: the shared build. */
const ENGINE_ARGS = process.env.PKV_TEST_ENGINE_BIN ? ["--engine", process.env.PKV_TEST_ENGINE_BIN] : [];
/** What every test host starts with, in process (testConfig) or as a child (pkv host). */
const TEST_HOST_ARGS = ["--port", "0", "--metrics-token", METRICS_TOKEN, "--threads", "2", ...ENGINE_ARGS];

let hostSeq = 0;
/** A new host name (each test host its own token). */
export const newHostName = () => `h${process.pid}-${++hostSeq}`;

/** The flags that make a host dial `edge` as `name`. */
export const connectArgs = (edge: DirectEdge, name: string) => ["--connect", edge.url, "--host-token", hostToken(name)];

/** A host's config; without `edge`, one dialling an edge at a placeholder URL (config tests). */
export function testConfig(
  over: Partial<HostConfig> = {},
  argv: string[] = [],
  edge?: { url: string; name: string },
): HostConfig {
  const at = edge ?? { url: "http://127.0.0.1:9", name: "h0" };
  return {
    ...parseHostConfig([...TEST_HOST_ARGS, "--connect", at.url, "--host-token", hostToken(at.name), ...argv], {}),
    ...over,
  };
}

export type TestHost = RunningHost & {
  /** what HostClient.connect takes: the edge's URL */
  url: string;
  edge: DirectEdge;
  name: string;
  /** the host's own stop (the drain of SIGTERM), channels left open */
  drain: () => Promise<void>;
};

/** A host in this process dialling its own DirectEdge (`o.edge` to share one), once welcomed.
 * stop() closes the edge's channels, drains the host and closes its own edge. */
export async function startTestHost(
  over: Partial<HostConfig> = {},
  argv: string[] = [],
  o: { edge?: DirectEdge; name?: string } = {},
): Promise<TestHost> {
  const name = o.name ?? newHostName();
  const edge = o.edge ?? (await DirectEdge.start({ tokens: [] }));
  edge.allow(hostToken(name));
  const host = await startHost(testConfig(over, argv, { url: edge.url, name }));
  await Promise.race([edge.waitHost(name), host.fatal]);
  const stop = async () => {
    for (const h of edge.hosts.values()) if (h.name === name) for (const c of [...h.channels.values()]) c.close();
    await host.stop();
    if (!o.edge) await edge.close();
  };
  return { ...host, stop, drain: host.stop, url: edge.url, edge, name };
}

/**
 * A client of the host protocol through a DirectEdge: one channel per tenant it sends for (opened
 * on first use; the host serves a channel only frames of its tenant); `ws` and `hello` are the
 * first one's, `raw` sends on it. `host` names the edge's host to open channels on (the first
 * welcomed one when absent).
 */
export class HostClient {
  private nextId = 1;
  private readonly waiters = new Map<
    number,
    { frames: FromHostMessage[]; resolve: (f: FromHostMessage[]) => void; onFrame?: (f: FromHostMessage) => void }
  >();
  readonly unsolicited: FromHostMessage[] = [];
  hello?: FromHostMessage;
  private readonly others = new Map<string, Promise<EdgeChannel>>();

  private constructor(
    private readonly edge: DirectEdge,
    /** the first channel: `terminate()` is a client that vanishes, `close()` one that leaves */
    readonly ws: EdgeChannel,
    readonly tenant: string,
    private readonly host?: string,
  ) {}

  private listen(ch: EdgeChannel): void {
    ch.listen((m) => {
      if (m.type === "hello") {
        if (ch === this.ws) this.hello = m;
        return;
      }
      const id = "id" in m ? m.id : undefined;
      const w = id === undefined ? undefined : this.waiters.get(id);
      if (!w) return void this.unsolicited.push(m);
      w.frames.push(m);
      w.onFrame?.(m);
      if (FINAL.has(m.type)) {
        this.waiters.delete(id!);
        w.resolve(w.frames);
      }
    });
  }

  /** `tenant`'s client (default "t") of the hosts of the DirectEdge at `url`. */
  static async connect(url: string, o: { tenant?: string; host?: string } = {}): Promise<HostClient> {
    const edge = directEdgeAt(url);
    if (!edge) throw new Error(`HostClient.connect: no DirectEdge at ${url} in this process`);
    const tenant = o.tenant ?? "t";
    const ch = await edge.channel(tenant, o.host);
    const c = new HostClient(edge, ch, tenant, o.host);
    c.listen(ch);
    return c;
  }

  private channelOf(tenant: unknown): EdgeChannel | Promise<EdgeChannel> {
    if (typeof tenant !== "string" || tenant === this.tenant || !TENANT_NAME.test(tenant)) return this.ws;
    let ch = this.others.get(tenant);
    if (!ch) {
      ch = this.edge.channel(tenant, this.host).then((c) => {
        this.listen(c);
        return c;
      });
      this.others.set(tenant, ch);
    }
    return ch;
  }

  /** Sends a request (id assigned) and resolves with every frame answering it, the final last. */
  request(
    msg: Omit<ToHostMessage, "id"> & Record<string, unknown>,
    onFrame?: (f: FromHostMessage) => void,
  ): Promise<FromHostMessage[]> {
    const id = this.nextId++;
    const frames = new Promise<FromHostMessage[]>((resolve) => {
      this.waiters.set(id, { frames: [], resolve, onFrame });
    });
    const full = { ...msg, id } as ToHostMessage;
    const ch = this.channelOf(msg.tenant);
    if (!(ch instanceof Promise)) ch.send(full);
    else void ch.then((c) => c.send(full));
    return frames;
  }

  /** The final frame of a request. */
  async call(msg: Omit<ToHostMessage, "id"> & Record<string, unknown>): Promise<FromHostMessage> {
    const frames = await this.request(msg);
    return frames[frames.length - 1]!;
  }

  /** Raw payload bytes on the first channel; resolves with the next frame carrying no waiter. */
  async raw(bytes: Uint8Array): Promise<FromHostMessage> {
    const before = this.unsolicited.length;
    this.ws.sendRaw(bytes);
    for (let i = 0; i < 400; i++) {
      if (this.unsolicited.length > before) return this.unsolicited[before]!;
      await new Promise((r) => setTimeout(r, 10));
    }
    throw new Error("no answer to a raw frame");
  }

  close(): void {
    this.ws.close();
    for (const ch of this.others.values())
      void ch.then(
        (c) => c.close(),
        () => {},
      );
  }
}

/** GET /metrics of the host on `port`, with the test hosts' scrape token. */
export async function scrape(port: number): Promise<string> {
  const r = await fetch(`http://127.0.0.1:${port}/metrics`, { headers: { authorization: `Bearer ${METRICS_TOKEN}` } });
  if (!r.ok) throw new Error(`GET /metrics: HTTP ${r.status}: ${await r.text()}`);
  return r.text();
}

export function expectType<T extends FromHostMessage["type"]>(
  m: FromHostMessage,
  type: T,
): Extract<FromHostMessage, { type: T }> {
  if (m.type !== type) throw new Error(`expected ${type}, got ${JSON.stringify(m)}`);
  return m as Extract<FromHostMessage, { type: T }>;
}

/** `pkv host` as a child process dialling `edge` (a new DirectEdge when absent); resolves once
 * it printed its HTTP port and the edge welcomed it. */
export async function spawnHostProcess(
  args: string[],
  o: { edge?: DirectEdge; name?: string; env?: Record<string, string> } = {},
): Promise<{
  child: ChildProcess;
  port: number;
  exit: Promise<number | null>;
  url: string;
  edge: DirectEdge;
  name: string;
  stderr: () => string;
}> {
  const name = o.name ?? newHostName();
  const edge = o.edge ?? (await DirectEdge.start({ tokens: [] }));
  edge.allow(hostToken(name));
  const cli = resolve(repoRoot(), "gpu-host", "dist", "src", "cli.js");
  const child = spawn(process.execPath, [cli, "host", ...TEST_HOST_ARGS, ...connectArgs(edge, name), ...args], {
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, ...o.env },
  });
  const exit = new Promise<number | null>((r) => child.on("exit", (code) => r(code)));
  let err = "";
  child.stderr!.setEncoding("utf8").on("data", (d: string) => (err += d));
  const port = await new Promise<number>((res, rej) => {
    let out = "";
    child.stdout!.setEncoding("utf8").on("data", (d: string) => {
      out += d;
      const m = /listening on [^ ]+:(\d+)/.exec(out);
      if (m) res(Number(m[1]));
    });
    void exit.then((code) => rej(new Error(`pkv host exited ${code}: ${err}`)));
  });
  await Promise.race([
    edge.waitHost(name),
    exit.then((code) => Promise.reject(new Error(`pkv host exited ${code}: ${err}`))),
  ]);
  return { child, port, exit, url: edge.url, edge, name, stderr: () => err };
}

const testDirs: string[] = [];
after(() => {
  for (const d of testDirs) rmSync(d, { recursive: true, force: true });
});

/** A temporary directory, removed when the test file ends. */
export function testDir(prefix = "pkv-test-"): string {
  const d = mkdtempSync(join(tmpdir(), prefix));
  testDirs.push(d);
  return d;
}

/** Polls `cond` every 25 ms until it holds; fails naming `what` after `ms`. */
export async function until(cond: () => boolean | Promise<boolean>, what: string, ms = 30_000): Promise<void> {
  const end = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

/** A host in this process on the stand-in engine (test/fake-engine.ts), dialling `o.edge` or an edge of its own. */
export const fakeHost = (argv: string[] = [], o: { edge?: DirectEdge; name?: string } = {}) =>
  startTestHost({ engineBin: fakeEngineBin(join(testDir(), "engine.log")) }, argv, o);
