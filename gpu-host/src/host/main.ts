// `pkv host`: start the engine and the sessions, serve GET /health and /metrics, dial the edge
// (edge-link.ts). SIGTERM/SIGINT drain: `draining` to the edge (out of routing, new channels
// dropped), in-flight work finishes, every resident session checkpointed to the edge's store,
// `drained`, the socket closed 1000, exit 0. `pkv host --drain --pid-file P` signals the host
// whose pid P holds and waits for it to exit.
import { readFileSync, rmSync, writeFileSync } from "node:fs";
import type { AddressInfo } from "node:net";

import { defineCommand } from "../flags.js";
import { HOST_FLAGS, HOST_USAGE, type HostConfig, hostConfig } from "./config.js";
import { EdgeLink } from "./edge-link.js";
import { hostLog } from "./log.js";
import { HostMetrics } from "./metrics.js";
import { HostServer } from "./server.js";
import { SessionHost } from "./sessions.js";

export interface RunningHost {
  /** GET /health and /metrics */
  address: AddressInfo;
  sessions: SessionHost;
  server: HostServer;
  metrics: HostMetrics;
  link: EdgeLink;
  /** rejects when the edge refused the host token (the line to print) */
  fatal: Promise<never>;
  /** The drain: draining, in-flight work ends, every session checkpointed to the edge, drained,
   * the socket closed, the engine stopped. */
  stop(): Promise<void>;
}

/** gpu-host's package version (host_hello.host_version), from dist/src/host/ three folders up. */
function hostVersion(): string | undefined {
  try {
    const pkg = JSON.parse(readFileSync(new URL("../../../package.json", import.meta.url), "utf8")) as {
      version?: unknown;
    };
    return typeof pkg.version === "string" ? pkg.version : undefined;
  } catch {
    return undefined;
  }
}

export async function startHost(
  config: HostConfig,
  hooks: { welcomed?: (name: string, epoch: number) => void } = {},
): Promise<RunningHost> {
  const metrics = new HostMetrics();
  let fatal!: (line: string) => void;
  const fatalP = new Promise<never>((_, reject) => (fatal = (line) => reject(new Error(line))));
  fatalP.catch(() => {});
  const swept: { host?: SessionHost } = {};
  const link = new EdgeLink({
    url: config.connect,
    token: config.hostToken,
    heartbeatMs: config.heartbeatMs,
    highWaterBytes: config.highWaterBytes,
    maxBufferedBytes: config.maxBufferedBytes,
    timeoutMs: config.edgeTimeoutMs,
    hostVersion: hostVersion(),
    fatal: (line) => fatal(line),
    welcomed: (name, epoch) => {
      metrics.edgeConnects.inc();
      // The copies here another host continued meanwhile go (in the background).
      void swept.host
        ?.sweepStale(epoch)
        .catch((e) => hostLog(`checking sessions against the edge: ${e instanceof Error ? e.message : String(e)}`));
      hooks.welcomed?.(name, epoch);
    },
  });
  const sessions = await SessionHost.start(config, metrics, link);
  swept.host = sessions;
  const server = new HostServer(sessions, config, metrics, link);
  const address = await server.listen();
  link.start(sessions);
  let stopping: Promise<void> | undefined;
  const stop = () =>
    (stopping ??= (async () => {
      link.drain();
      await sessions.drain(() => link.channelCount === 0);
      await link.finish();
      await sessions.shutdown();
      await server.close();
    })());
  return { address, sessions, server, metrics, link, fatal: fatalP, stop };
}

/** The CLI's entry: prints the bound address and each connection to the edge, runs until
 * SIGTERM/SIGINT (drain, exit 0) or until the edge refuses the token (exit 1). */
export async function runHost(config: HostConfig): Promise<number> {
  const host = await startHost(config, {
    welcomed: (name, epoch) =>
      process.stdout.write(`pkv host connected to ${config.connect} as '${name}' (connection ${epoch})\n`),
  });
  if (config.pidFile) writeFileSync(config.pidFile, `${process.pid}\n`);
  const h = host.sessions.hello;
  process.stdout.write(
    `pkv host listening on ${host.address.address}:${host.address.port} ` +
      `(model ${h.model}, KV pool ${h.pool_bytes} bytes, offload ${config.offloadDir ?? "memory"}; dialling ${config.connect})\n`,
  );
  const code = await new Promise<number>((resolve) => {
    const onSignal = (sig: string) => {
      process.stderr.write(`pkv host: ${sig}: draining, checkpointing sessions to the edge\n`);
      void host.stop().then(
        () => resolve(0),
        (e) => {
          hostLog(`drain failed: ${e instanceof Error ? e.message : String(e)}`);
          resolve(1);
        },
      );
    };
    process.once("SIGTERM", () => onSignal("SIGTERM"));
    process.once("SIGINT", () => onSignal("SIGINT"));
    host.fatal.catch((e: Error) => {
      process.stderr.write(`${e.message}\n`);
      void host.sessions
        .shutdown()
        .then(() => host.server.close())
        .finally(() => resolve(1));
    });
  });
  if (config.pidFile) rmSync(config.pidFile, { force: true });
  return code;
}

/** `pkv host --drain --pid-file P`: SIGTERM to the pid in P, then waits for that process to end. */
export async function drainHost(pidFile: string | undefined, timeoutMs = 30 * 60_000): Promise<number> {
  if (!pidFile) {
    process.stderr.write("pkv host --drain: needs --pid-file P (the file the running host was started with)\n");
    return 2;
  }
  let pid: number;
  try {
    pid = Number(readFileSync(pidFile, "utf8").trim());
  } catch (e) {
    process.stderr.write(`pkv host --drain: cannot read --pid-file '${pidFile}': ${(e as Error).message}\n`);
    return 1;
  }
  if (!Number.isSafeInteger(pid) || pid <= 1) {
    process.stderr.write(`pkv host --drain: --pid-file '${pidFile}' holds no pid\n`);
    return 1;
  }
  const alive = () => {
    try {
      process.kill(pid, 0);
      return true;
    } catch (e) {
      return (e as NodeJS.ErrnoException).code === "EPERM";
    }
  };
  try {
    process.kill(pid, "SIGTERM");
  } catch (e) {
    process.stderr.write(`pkv host --drain: no process ${pid} (from '${pidFile}'): ${(e as Error).message}\n`);
    return 1;
  }
  const end = Date.now() + timeoutMs;
  while (alive()) {
    if (Date.now() > end) {
      process.stderr.write(`pkv host --drain: process ${pid} still runs after ${timeoutMs / 1000} s\n`);
      return 1;
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  process.stdout.write(`pkv host --drain: process ${pid} drained and exited\n`);
  return 0;
}

export const command = defineCommand({
  flags: HOST_FLAGS,
  help: HOST_USAGE,
  run: (f) => (f.drain ? drainHost(f["pid-file"]) : runHost(hostConfig(f))),
});
