// `npm run dev` (pkv dev): a GPU host on CPU with the embedded model and the edge worker in
// Miniflare, wired together; prints the URL and a test API key, runs until Ctrl-C. Storage
// (tenants, keys, sessions map) persists in .pkv-dev/state between runs.
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
  process.stdout.write("starting the GPU host(s) and the worker (wrangler dev)...\n");
  const stack = await startStack({
    hosts: o.hosts,
    kvPoolBytes: o.kvPoolBytes,
    persistDir: resolve(dir, "state"),
    workerPort: o.port,
  });
  await stack.admin.setTenant("dev", {});
  const key = await stack.admin.createKey("dev");
  const info: DevInfo = { url: stack.worker.url, admin_token: stack.admin.token };
  writeFileSync(resolve(dir, "dev.json"), `${JSON.stringify(info, null, 2)}\n`, { mode: 0o600 });
  const url = stack.worker.url;
  process.stdout.write(`
pyramidkv dev stack
  worker    ${url}   (Miniflare; storage in .pkv-dev/state)
${stack.hosts.map((h) => `  GPU host  ${h.url}   (CPU, embedded model)`).join("\n")}
  metrics   curl -H "Authorization: Bearer ${stack.metricsToken}" ${stack.hosts[0]!.url}/metrics   (the hosts' --metrics-token)
  tenant    dev
  API key   ${key}

try:
  curl -N ${url}/v1/chat/completions -H "Authorization: Bearer ${key}" -H "content-type: application/json" \\
    -d '{"model": "default", "stream": true, "max_tokens": 40, "messages": [{"role": "user", "content": "Hello!"}]}'
  npx pkv admin tenant show dev
Ctrl-C stops everything.
`);
  await new Promise<void>((r) => {
    process.once("SIGINT", r);
    process.once("SIGTERM", r);
  });
  process.stdout.write("stopping...\n");
  await stack.stop();
  return 0;
}

export const command = defineCommand({
  flags: {
    port: int({ min: 0, max: 65535, default: 8787 }),
    hosts: int({ min: 1, max: 8, default: 1 }),
    "kv-pool-bytes": int({ min: 1 << 20, max: Number.MAX_SAFE_INTEGER, default: 512 << 20 }),
  },
  run: (f) => runDev({ port: f.port, hosts: f.hosts, kvPoolBytes: f["kv-pool-bytes"] }),
});
