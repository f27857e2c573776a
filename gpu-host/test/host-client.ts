// Test helpers for the GPU host: a client speaking the host protocol over ws, and a host started
// in this process (or as a child process) on a random loopback port with the embedded model.
import { type ChildProcess, spawn } from "node:child_process";
import { resolve } from "node:path";

import {
  type AnyHostMessage,
  decodeHostMessage,
  encodeHostMessage,
  type FromHostMessage,
  type ToHostMessage,
} from "@pyramidkv/shared";
import { WebSocket } from "ws";

import { repoRoot } from "../src/engine/engine-path.js";
import { makeEdgeToken, type TokenFor } from "../src/host/auth.js";
import { type HostConfig, parseHostConfig, TENANT_NAME } from "../src/host/config.js";
import { type RunningHost, startHost } from "../src/host/main.js";

export const SECRET = "test-secret-0123456789abcdef";
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
  "error",
]);

/** PKV_TEST_ENGINE_BIN: the host tests run on another build of the engine (a helper's own build
 * directory, before the shared build has its change); unset: the shared build. */
const ENGINE_ARGS = process.env.PKV_TEST_ENGINE_BIN ? ["--engine", process.env.PKV_TEST_ENGINE_BIN] : [];
/** What every test host starts with, in process (testConfig) or as a child (pkv host). */
const TEST_HOST_ARGS = [
  "--port",
  "0",
  "--edge-secret",
  SECRET,
  "--metrics-token",
  METRICS_TOKEN,
  "--threads",
  "2",
  ...ENGINE_ARGS,
];

export function testConfig(over: Partial<HostConfig> = {}, argv: string[] = []): HostConfig {
  return {
    ...parseHostConfig([...TEST_HOST_ARGS, ...argv], {}),
    ...over,
  };
}

export async function startTestHost(
  over: Partial<HostConfig> = {},
  argv: string[] = [],
): Promise<RunningHost & { url: string }> {
  const host = await startHost(testConfig(over, argv));
  return { ...host, url: `ws://127.0.0.1:${host.address.port}` };
}

/** A token for `tenant`'s link to the host at `url` (its host[:port], as the edge dials it). */
export const tokenFor = (url: string, tenant = "t", over: Partial<TokenFor> = {}) =>
  makeEdgeToken(SECRET, { tenant, host: new URL(url).host, ...over });

/**
 * A client of the host protocol. The host serves a connection only frames of its token's tenant,
 * so this keeps one WebSocket per tenant it sends for (opened on first use, each with its own
 * token); `ws` and `hello` are the first one's, `raw` sends on it.
 */
export class HostClient {
  private nextId = 1;
  private readonly waiters = new Map<
    number,
    { frames: FromHostMessage[]; resolve: (f: FromHostMessage[]) => void; onFrame?: (f: FromHostMessage) => void }
  >();
  readonly unsolicited: FromHostMessage[] = [];
  hello?: FromHostMessage;
  private readonly others = new Map<string, Promise<WebSocket>>();

  private constructor(
    private readonly url: string,
    readonly ws: WebSocket,
    readonly tenant: string,
  ) {}

  private listen(ws: WebSocket): Promise<void> {
    let gotHello!: () => void;
    const helloWait = new Promise<void>((r) => (gotHello = r));
    ws.on("message", (data: Buffer) => {
      const d = decodeHostMessage(new Uint8Array(data), "from_host");
      if (!d.ok) throw new Error(`bad frame from host: ${d.error}`);
      const m = d.message;
      if (m.type === "hello") {
        if (ws === this.ws) this.hello = m;
        return gotHello();
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
    return new Promise<void>((res, rej) => {
      ws.once("open", () => res());
      ws.once("error", rej);
    }).then(() => helloWait);
  }

  /** `tenant`'s client (default "t"); `token` replaces the token minted for it. */
  static async connect(url: string, o: { tenant?: string; token?: string } = {}): Promise<HostClient> {
    const tenant = o.tenant ?? "t";
    const ws = new WebSocket(url, { headers: { authorization: `Bearer ${o.token ?? tokenFor(url, tenant)}` } });
    const c = new HostClient(url, ws, tenant);
    await c.listen(ws); // listening before 'open': hello may come in the upgrade's packet
    return c;
  }

  private socketOf(tenant: unknown): WebSocket | Promise<WebSocket> {
    if (typeof tenant !== "string" || tenant === this.tenant || !TENANT_NAME.test(tenant)) return this.ws;
    let ws = this.others.get(tenant);
    if (!ws) {
      const sock = new WebSocket(this.url, { headers: { authorization: `Bearer ${tokenFor(this.url, tenant)}` } });
      ws = this.listen(sock).then(() => sock);
      this.others.set(tenant, ws);
    }
    return ws;
  }

  /** Sends a request (id assigned) and resolves with every frame answering it, the final last. */
  request(
    msg: Omit<ToHostMessage, "id"> & Record<string, unknown>,
    onFrame?: (f: FromHostMessage) => void,
  ): Promise<FromHostMessage[]> {
    const id = this.nextId++;
    let failed!: (e: unknown) => void;
    const frames = new Promise<FromHostMessage[]>((resolve, reject) => {
      this.waiters.set(id, { frames: [], resolve, onFrame });
      failed = reject;
    });
    const bytes = encodeHostMessage({ ...msg, id } as AnyHostMessage);
    const ws = this.socketOf(msg.tenant);
    if (ws instanceof WebSocket) ws.send(bytes);
    else
      void ws.then(
        (s) => s.send(bytes),
        (e) => {
          this.waiters.delete(id);
          failed(e);
        },
      );
    return frames;
  }

  /** The final frame of a request. */
  async call(msg: Omit<ToHostMessage, "id"> & Record<string, unknown>): Promise<FromHostMessage> {
    const frames = await this.request(msg);
    return frames[frames.length - 1]!;
  }

  /** Raw bytes; resolves with the next unsolicited/any frame carrying no waiter. */
  async raw(bytes: Uint8Array | string, binary = true): Promise<FromHostMessage> {
    const before = this.unsolicited.length;
    this.ws.send(bytes, { binary });
    for (let i = 0; i < 400; i++) {
      if (this.unsolicited.length > before) return this.unsolicited[before]!;
      await new Promise((r) => setTimeout(r, 10));
    }
    throw new Error("no answer to a raw frame");
  }

  close(): void {
    this.ws.close();
    for (const ws of this.others.values())
      void ws.then(
        (s) => s.close(),
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

/** `pkv host` as a child process; resolves once it printed its port. */
export async function spawnHostProcess(
  args: string[],
): Promise<{ child: ChildProcess; port: number; exit: Promise<number | null> }> {
  const cli = resolve(repoRoot(), "gpu-host", "dist", "src", "cli.js");
  const child = spawn(process.execPath, [cli, "host", ...TEST_HOST_ARGS, ...args], {
    stdio: ["ignore", "pipe", "pipe"],
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
  return { child, port, exit };
}
