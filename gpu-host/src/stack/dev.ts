// `npm run dev` (pkv dev): the edge worker in Miniflare and N GPU hosts on CPU with the embedded
// model, each dialling in to the worker with a host token made through its admin API; prints the
// URL and a test API key, runs until Ctrl-C. `--hosts 0`: the worker alone, and how to start a
// host by hand. Storage (tenants, keys, host tokens, the sessions map, R2's session states)
// persists in .pkv-dev/state between runs.
import { mkdirSync, writeFileSync } from "node:fs";
import { resolve } from "node:path";

import { defineCommand, int } from "../flags.js";
import { devDir, type DevInfo } from "./admin.js";
import { startStack } from "./stack.js";

export interface DevOptions {
  port: number;
  hosts: number;
  kvPoolBytes: number;
}

export async function runDev(o: DevOptions): Promise<number> {
  const dir = devDir();
  mkdirSync(dir, { recursive: true });
  process.stdout.write(
    o.hosts === 0
      ? "starting the worker (wrangler dev)...\n"
      : `starting the worker (wrangler dev), then ${o.hosts} GPU host(s) dialling in...\n`,
  );
  const stack = await startStack({
    hosts: o.hosts,
    kvPoolBytes: o.kvPoolBytes,
    persistDir: resolve(dir, "state"),
    workerPort: o.port,
    hostPrefix: "dev",
  });
  await stack.admin.setTenant("dev", {});
  const key = await stack.admin.createKey("dev");
  const info: DevInfo = { url: stack.worker.url, admin_token: stack.admin.token };
  writeFileSync(resolve(dir, "dev.json"), `${JSON.stringify(info, null, 2)}\n`, { mode: 0o600 });
  const url = stack.worker.url;
  const hosts =
    stack.hosts.length === 0
      ? `  GPU hosts none yet; start one by hand (in another terminal):
    npx pkv admin host create my-gpu        # prints {"name", "token"} once
    npx pkv host --connect ${url} --host-token <token>
    npx pkv admin host list                 # connected, live, free KV`
      : `${stack.hosts.map((h) => `  GPU host  ${h.name}   (CPU, embedded model; connected to the worker; /health ${h.url}/health)`).join("\n")}
  metrics   curl -H "Authorization: Bearer ${stack.metricsToken}" ${stack.hosts[0]!.url}/metrics   (the hosts' --metrics-token)`;
  process.stdout.write(`
pyramidkv dev stack
  worker    ${url}   (Miniflare; storage and R2 in .pkv-dev/state)
${hosts}
  tenant    dev
  API key   ${key}

try:
  curl -N ${url}/v1/chat/completions -H "Authorization: Bearer ${key}" -H "content-type: application/json" \\
    -d '{"model": "default", "stream": true, "max_tokens": 40, "messages": [{"role": "user", "content": "Hello!"}]}'
  npx pkv admin tenant show dev
  npx pkv admin host list
Ctrl-C stops everything.
`);
  await new Promise<void>((r) => {
    process.once("SIGINT", r);
    process.once("SIGTERM", r);
  });
  process.stdout.write("stopping (the hosts drain their sessions to R2 first)...\n");
  await stack.stop();
  return 0;
}

export const command = defineCommand({
  flags: {
    port: int({ min: 0, max: 65535, default: 8787 }),
    hosts: int({ min: 0, max: 8, default: 1 }),
    "kv-pool-bytes": int({ min: 1 << 20, max: Number.MAX_SAFE_INTEGER, default: 512 << 20 }),
  },
  run: (f) => runDev({ port: f.port, hosts: f.hosts, kvPoolBytes: f["kv-pool-bytes"] }),
});
