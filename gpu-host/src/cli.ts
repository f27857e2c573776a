#!/usr/bin/env node
// `npx pkv …`: the project's TypeScript CLI. One table: each command (or command + subcommand) →
// its usage line and the module that owns it, loaded only when it runs. A module exports
// `command` (flags.ts): its flag schema and `run`. Thin: parse, call, print.
import { realpathSync } from "node:fs";
import { fileURLToPath } from "node:url";

import { type Command, parseFlags } from "./flags.js";

export interface CommandEntry {
  /** the words that select it: "demo", "demo engine", "eval needle" */
  name: string;
  /** its flags, as `pkv --help` lists them */
  usage: string;
  /** what it does, one line */
  summary: string;
  load(): Promise<Command>;
}

export const COMMANDS: CommandEntry[] = [
  {
    name: "demo",
    usage: "[--chars N] [--budget B] [--method M] [--max-tokens N] [--haystack-dir DIR]",
    summary:
      "the full stack: GPU host + edge worker (Miniflare); a ~6k-token document as a session, two questions streamed",
    load: async () => (await import("./stack/stack-demo.js")).command,
  },
  {
    name: "demo engine",
    usage:
      "[--chars N] [--depth 0-100] [--budget B] [--haystack-dir DIR] [--model M] [--max-new-tokens N] [--chunk-size N]",
    summary: "the engine alone: a needle prompt (~4k tokens) answered with FullKV and PyramidKV side by side",
    load: async () => (await import("./engine/demo.js")).command,
  },
  {
    name: "dev",
    usage: "[--port 8787] [--hosts 1] [--kv-pool-bytes N]",
    summary:
      "(npm run dev) worker in Miniflare + N GPU hosts on CPU dialling in (--hosts 0: the worker alone), a test API key",
    load: async () => (await import("./stack/dev.js")).command,
  },
  {
    name: "admin",
    usage: "... (pkv admin --help)",
    summary: "tenants, API keys, quotas, GPU hosts' tokens of a worker (local or --remote URL)",
    load: async () => (await import("./stack/admin.js")).command,
  },
  {
    name: "bench ttft",
    usage: "[--requests 50] [--max-tokens 4] [--budget 128]",
    summary: "time to first token: through the worker vs straight to a host (an in-process direct edge); JSON",
    load: async () => (await import("./stack/bench-ttft.js")).command,
  },
  {
    name: "bench move",
    usage: "[--runs 3] [--chars 31500] [--budget 128] [--max-tokens 8] [--haystack-dir DIR]",
    summary:
      "an ~8k-token session moved to another host through R2 (drain, restore, first token) vs prefilled again; JSON",
    load: async () => (await import("./stack/bench-move.js")).command,
  },
  {
    name: "bench cache",
    usage: "[--turns 10] [--chars 25000] [--sessions 16] [--shared-chars 12500] [--max-tokens 16] [--json FILE]",
    summary:
      "the prompt cache: a 10-turn chat over a ~6k-token document, and 16 sessions on one ~3k-token document, cache on vs off; JSON",
    load: async () => (await import("./stack/bench-cache.js")).command,
  },
  {
    name: "bench fairness",
    usage: "[--flood 32] [--flood-tokens 256] [--tokens 32] [--runs 3] [--decode-lanes 64] [--tenant-decode-lanes 4]",
    summary: "tenant B's inter-token gap while tenant A floods: decode lanes unbounded vs bounded",
    load: async () => (await import("./stack/bench-fairness.js")).command,
  },
  {
    name: "soak",
    usage: "[--minutes 20] [--seed 1] [--out FILE] [--data DIR] [--clients 4] [--ttl-seconds 45] [--verify 8]",
    summary:
      "(not in CI) 2 hosts + the worker, 3 tenants, random documents, questions, aborts, engine and host kills; JSON counts and checks",
    load: async () => (await import("./stack/soak.js")).command,
  },
  {
    name: "bench chunking",
    usage:
      "[--chars 12000,24000] [--depths 25,50,75] [--chunk-sizes 0,1024,2048,4096] [--method pyramidkv] [--budget 128] [--haystack-dir DIR] [--model M]",
    summary: "needle accuracy of chunked prefill vs one-shot compression (chunk size 0)",
    load: async () => (await import("./engine/chunk-study.js")).command,
  },
  {
    name: "host",
    usage:
      "--connect URL --host-token T [--port N] [--kv-pool-bytes N] [--offload-dir DIR] [--tenants FILE|JSON] ... (pkv host --help)",
    summary: "the GPU host: engine supervisor dialling in to the edge (one WebSocket), /health, /metrics",
    load: async () => (await import("./host/main.js")).command,
  },
  {
    name: "eval needle",
    usage: "[--lengths L,…] [--depths 11] [--haystack-dir DIR | --haystack noise] ... (pkv eval --help)",
    summary: "needle in a haystack: accuracy per method × budget over context lengths × depths",
    load: async () => (await import("./eval/cli.js")).needle,
  },
  {
    name: "eval ruler",
    usage: "[--tasks T,…] [--lengths 4096] [--limit 25] [--seed 42] ... (pkv eval --help)",
    summary: "RULER's tasks, generated locally: accuracy per method × budget",
    load: async () => (await import("./eval/cli.js")).ruler,
  },
  {
    name: "eval longbench",
    usage: "--data-dir DIR [--datasets D,…] [--limit N] [--max-length N] ... (pkv eval --help)",
    summary: "LongBench v1 with its official prompts and metrics: accuracy per method × budget",
    load: async () => (await import("./eval/cli.js")).longbench,
  },
];

/**
 * Commands whose first word alone is no command: `pkv eval` prints the group's usage (exit 2; 0 for
 * --help), and a subcommand outside the table is an error naming the valid ones.
 */
const GROUPS: Record<string, () => Promise<string>> = {
  eval: async () => (await import("./eval/cli.js")).EVAL_USAGE,
};

export function usage(): string {
  const lines = COMMANDS.map((c) => `  ${c.name} ${c.usage}\n       ${c.summary}`);
  return `usage: pkv <command> [options]\n${lines.join("\n")}`;
}

export interface Io {
  out(s: string): void;
  err(s: string): void;
}

const processIo: Io = { out: (s) => process.stdout.write(s), err: (s) => process.stderr.write(s) };

const wantsHelp = (args: string[]) => args.includes("--help") || args.includes("-h");

/** The entry whose words begin argv; the longest wins ("demo engine" over "demo"). */
function find(argv: string[]): CommandEntry | undefined {
  let best: CommandEntry | undefined;
  for (const c of COMMANDS) {
    const words = c.name.split(" ");
    if (words.every((w, i) => argv[i] === w) && words.length > (best?.name.split(" ").length ?? 0)) best = c;
  }
  return best;
}

/** Runs `pkv ARGV`; resolves with the exit code. Errors print one `error: …` line (exit 2). */
export async function pkv(argv: string[], io: Io = processIo): Promise<number> {
  try {
    const entry = find(argv);
    if (entry === undefined) {
      const [first, sub] = argv;
      const group = first === undefined ? undefined : GROUPS[first];
      if (group !== undefined && (sub === undefined || wantsHelp([sub]))) {
        io.out(`${await group()}\n`);
        return sub === undefined ? 2 : 0;
      }
      if (group !== undefined) {
        const valid = COMMANDS.filter((c) => c.name.startsWith(`${first} `)).map((c) => c.name.split(" ")[1]);
        throw new Error(`${first}: unknown subcommand '${sub}' (valid: ${valid.join(", ")})`);
      }
      io.err(`${usage()}\n`);
      return first === undefined || first === "--help" || first === "-h" ? 0 : 2;
    }
    const args = argv.slice(entry.name.split(" ").length);
    const command = await entry.load();
    if (wantsHelp(args)) {
      io.out(`${command.help ?? `usage: pkv ${entry.name} ${entry.usage}\n  ${entry.summary}`}\n`);
      return 0;
    }
    const { values, positionals } = parseFlags(command.flags, args, { positionals: command.positionals });
    return await command.run(values, positionals);
  } catch (e) {
    io.err(`error: ${e instanceof Error ? e.message : String(e)}\n`);
    return 2;
  }
}

/** Run as a program (node cli.js, the `pkv` bin's symlink), not when a test imports the table. */
function isMain(): boolean {
  try {
    return process.argv[1] !== undefined && realpathSync(process.argv[1]) === fileURLToPath(import.meta.url);
  } catch {
    return false;
  }
}

if (isMain()) void pkv(process.argv.slice(2)).then((code) => process.exit(code));
