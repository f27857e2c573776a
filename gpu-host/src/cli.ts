#!/usr/bin/env node
// `npx pkv …`: the project's TypeScript CLI. Thin: parse, call, print.
import { parseArgs } from "node:util";

import { runChunkStudy } from "./engine/chunk-study.js";
import { DEMO_DEFAULTS, runDemo } from "./engine/demo.js";
import { runEvalCli } from "./eval/cli.js";
import { HOST_USAGE, parseHostConfig } from "./host/config.js";
import { runHost } from "./host/main.js";
import { runStackCli, STACK_USAGE } from "./stack/stack-cli.js";

const USAGE = `usage: pkv <command> [options]
${STACK_USAGE}
  demo engine [--chars N] [--depth 0-100] [--budget B] [--haystack-dir DIR] [--model M] [--max-new-tokens N] [--chunk-size N]
       a needle prompt (~4k tokens) answered with FullKV and PyramidKV side by side
  bench chunking [--chars 12000,24000] [--depths 25,50,75] [--chunk-sizes 0,1024,2048,4096] [--method pyramidkv]
       [--budget 128] [--haystack-dir DIR] [--model M]
       needle accuracy of chunked prefill vs one-shot compression (chunk size 0)
  host [--port N] [--edge-secret S] [--kv-pool-bytes N] [--offload-dir DIR] [--tenants FILE|JSON] ... (pkv host --help)
       the GPU host: engine supervisor, WebSocket server for the edge, /health, /metrics
  eval needle|ruler|longbench [--methods M,…] [--budgets B,…] [--out DIR] [--resume] [--json] ... (pkv eval --help)
       long-context accuracy per method × budget: one exact prefill per prompt, every setting forked from it`;

function intList(name: string, value: string | undefined, fallback: number[], lo: number, hi: number): number[] {
  if (value === undefined) return fallback;
  return value.split(",").map((v) => intOption(name, v, 0, lo, hi));
}

function intOption(name: string, value: string | undefined, fallback: number, lo: number, hi: number): number {
  if (value === undefined) return fallback;
  const n = Number(value);
  if (!Number.isInteger(n) || n < lo || n > hi)
    throw new Error(`--${name}: '${value}' is not an integer in [${lo}, ${hi}]`);
  return n;
}

async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  if (
    command === "admin" ||
    command === "dev" ||
    (command === "demo" && rest[0] !== "engine") ||
    (command === "bench" && rest[0] === "ttft")
  ) {
    return runStackCli(command, rest);
  }
  if (command === "demo") {
    const { values } = parseArgs({
      args: rest.slice(1),
      options: {
        chars: { type: "string" },
        depth: { type: "string" },
        budget: { type: "string" },
        "haystack-dir": { type: "string" },
        model: { type: "string" },
        "max-new-tokens": { type: "string" },
        "chunk-size": { type: "string" },
      },
    });
    await runDemo({
      chars: intOption("chars", values.chars, DEMO_DEFAULTS.chars, 200, 1_000_000),
      depth: intOption("depth", values.depth, DEMO_DEFAULTS.depth, 0, 100),
      budget: intOption("budget", values.budget, DEMO_DEFAULTS.budget, 9, 1_000_000),
      maxNewTokens: intOption("max-new-tokens", values["max-new-tokens"], DEMO_DEFAULTS.maxNewTokens, 1, 4096),
      chunkSize:
        values["chunk-size"] === undefined ? undefined : intOption("chunk-size", values["chunk-size"], 0, 0, 1 << 24),
      haystackDir: values["haystack-dir"],
      model: values.model,
    });
    return 0;
  }
  if (command === "eval") return runEvalCli(rest);
  if (command === "host") {
    if (rest.includes("--help")) {
      process.stdout.write(`${HOST_USAGE}\n`);
      return 0;
    }
    return runHost(parseHostConfig(rest));
  }
  if (command === "bench" && rest[0] === "chunking") {
    const { values } = parseArgs({
      args: rest.slice(1),
      options: {
        chars: { type: "string" },
        depths: { type: "string" },
        "chunk-sizes": { type: "string" },
        method: { type: "string" },
        budget: { type: "string" },
        "haystack-dir": { type: "string" },
        model: { type: "string" },
      },
    });
    await runChunkStudy({
      lengthsChars: intList("chars", values.chars, [12000, 24000], 200, 10_000_000),
      depths: intList("depths", values.depths, [25, 50, 75], 0, 100),
      chunkSizes: intList("chunk-sizes", values["chunk-sizes"], [0, 1024, 2048, 4096], 0, 1 << 24),
      method: values.method ?? "pyramidkv",
      budget: intOption("budget", values.budget, 128, 9, 1_000_000),
      haystackDir: values["haystack-dir"],
      model: values.model,
    });
    return 0;
  }
  process.stderr.write(`${USAGE}\n`);
  return command === undefined || command === "--help" ? 0 : 2;
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (e: unknown) => {
    process.stderr.write(`error: ${e instanceof Error ? e.message : String(e)}\n`);
    process.exit(2);
  },
);
