// CLI entries of the edge-worker stack: pkv dev, pkv demo (full stack), pkv bench ttft, pkv admin.
// Thin: parse, call, print.
import { parseArgs } from "node:util";

import { runAdmin } from "./admin.js";
import { runTtftBench } from "./bench-ttft.js";
import { runDev } from "./dev.js";
import { runStackDemo, STACK_DEMO_DEFAULTS } from "./stack-demo.js";

export const STACK_USAGE = `  demo [--chars N] [--budget B] [--method M] [--max-tokens N] [--haystack-dir DIR]
       the full stack: GPU host + edge worker (Miniflare); a ~6k-token document as a session, two questions streamed
  demo engine [...]   the engine alone: FullKV vs PyramidKV on one needle prompt (the options below)
  dev [--port 8787] [--hosts 1] [--kv-pool-bytes N]   (npm run dev) GPU host on CPU + worker in Miniflare, a test API key
  admin ... (pkv admin --help)   tenants, API keys, quotas, GPU hosts of a worker (local or --remote URL)
  bench ttft [--requests 20] [--max-tokens 4] [--budget 128]   time to first token: through the worker vs straight to the host`;

function int(name: string, value: string | undefined, fallback: number, lo: number, hi: number): number {
  if (value === undefined) return fallback;
  const n = Number(value);
  if (!Number.isInteger(n) || n < lo || n > hi)
    throw new Error(`--${name}: '${value}' is not an integer in [${lo}, ${hi}]`);
  return n;
}

export async function runStackCli(command: string, rest: string[]): Promise<number> {
  if (command === "admin") return runAdmin(rest);
  if (rest.includes("--help") || rest.includes("-h")) {
    process.stdout.write(`usage: pkv <command> [options]\n${STACK_USAGE}\n`);
    return 0;
  }
  if (command === "dev") {
    const { values } = parseArgs({
      args: rest,
      options: { port: { type: "string" }, hosts: { type: "string" }, "kv-pool-bytes": { type: "string" } },
    });
    return runDev({
      port: int("port", values.port, 8787, 0, 65535),
      hosts: int("hosts", values.hosts, 1, 1, 8),
      kvPoolBytes: int("kv-pool-bytes", values["kv-pool-bytes"], 512 << 20, 1 << 20, Number.MAX_SAFE_INTEGER),
    });
  }
  if (command === "demo") {
    const { values } = parseArgs({
      args: rest,
      options: {
        chars: { type: "string" },
        budget: { type: "string" },
        method: { type: "string" },
        "max-tokens": { type: "string" },
        "haystack-dir": { type: "string" },
      },
    });
    await runStackDemo({
      chars: int("chars", values.chars, STACK_DEMO_DEFAULTS.chars, 200, 30_000),
      budget: int("budget", values.budget, STACK_DEMO_DEFAULTS.budget, 16, 1 << 20),
      method: values.method ?? STACK_DEMO_DEFAULTS.method,
      maxTokens: int("max-tokens", values["max-tokens"], STACK_DEMO_DEFAULTS.maxTokens, 1, 4096),
      haystackDir: values["haystack-dir"],
    });
    return 0;
  }
  if (command === "bench") {
    const { values } = parseArgs({
      args: rest.slice(1),
      options: { requests: { type: "string" }, "max-tokens": { type: "string" }, budget: { type: "string" } },
    });
    await runTtftBench({
      requests: int("requests", values.requests, 20, 1, 10_000),
      maxTokens: int("max-tokens", values["max-tokens"], 4, 1, 4096),
      budget: int("budget", values.budget, 128, 16, 1 << 20),
    });
    return 0;
  }
  throw new Error(`unknown command '${command}'`);
}
