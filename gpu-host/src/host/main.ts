// `pkv host`: start the engine, the sessions and the server; SIGTERM/SIGINT drain and exit 0.
import type { AddressInfo } from "node:net";

import { defineCommand } from "../flags.js";
import { HOST_FLAGS, HOST_USAGE, type HostConfig, hostConfig } from "./config.js";
import { HostMetrics } from "./metrics.js";
import { HostServer } from "./server.js";
import { SessionHost } from "./sessions.js";

export interface RunningHost {
  address: AddressInfo;
  sessions: SessionHost;
  server: HostServer;
  metrics: HostMetrics;
  stop(): Promise<void>;
}

export async function startHost(config: HostConfig): Promise<RunningHost> {
  const metrics = new HostMetrics();
  const sessions = await SessionHost.start(config, metrics);
  const server = new HostServer(sessions, config, metrics);
  const address = await server.listen();
  let stopping: Promise<void> | undefined;
  const stop = () =>
    (stopping ??= (async () => {
      server.stopAccepting();
      await sessions.shutdown();
      await server.close();
    })());
  return { address, sessions, server, metrics, stop };
}

/** The CLI's entry: prints one line with the bound address, runs until SIGTERM/SIGINT. */
export async function runHost(config: HostConfig): Promise<number> {
  const host = await startHost(config);
  const h = host.sessions.hello;
  process.stdout.write(
    `pkv host listening on ${host.address.address}:${host.address.port} ` +
      `(model ${h.model}, KV pool ${h.pool_bytes} bytes, offload ${config.offloadDir ?? "memory"})\n`,
  );
  await new Promise<void>((resolve) => {
    const onSignal = (sig: string) => {
      process.stderr.write(`pkv host: ${sig}: draining, saving sessions\n`);
      void host.stop().then(resolve);
    };
    process.once("SIGTERM", () => onSignal("SIGTERM"));
    process.once("SIGINT", () => onSignal("SIGINT"));
  });
  return 0;
}

export const command = defineCommand({
  flags: HOST_FLAGS,
  help: HOST_USAGE,
  run: (f) => runHost(hostConfig(f)),
});
