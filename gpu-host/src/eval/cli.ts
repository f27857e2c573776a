// `pkv eval needle | ruler | longbench`: each subcommand's flags, and the call; the work is in
// *-run.ts.
import { existsSync } from "node:fs";

import { bool, defineCommand, int, string } from "../flags.js";
import { COMMON_FLAGS, commonOptions } from "./common.js";
import { essaysDir } from "./haystack.js";
import { LONGBENCH_DATASETS, parseDatasets } from "./longbench.js";
import { runLongBench } from "./longbench-run.js";
import { NEEDLE_DEFAULTS, parseDepths, parseLengths } from "./needle.js";
import { runNeedle } from "./needle-run.js";
import { parseTasks, RULER_TASKS } from "./ruler.js";
import { runRuler } from "./ruler-run.js";

export const EVAL_USAGE = `usage: pkv eval <needle|ruler|longbench> [options]
common: [--model M] [--methods full,pyramidkv,snapkv,h2o,streamingllm] [--budgets 64,128,256,512]
        [--out DIR] [--resume] [--json] [--threads N] [--kv-type f16|q8_0|q4_0]
  needle    [--lengths 1024,2048 | start:stop:step] [--depths 11 | 0,50,100] [--haystack-dir DIR | --haystack noise]
            [--needle S] [--question S] [--answer S] [--chat-template] [--report-only]
  ruler     [--tasks ${RULER_TASKS.join(",")}] [--lengths 4096] [--limit N] [--seed S] [--haystack-dir DIR]
  longbench --data-dir DIR [--datasets ${LONGBENCH_DATASETS.slice(0, 3).join(",")},…] [--limit N] [--max-length N]`;

/** The essays beside the repository (../shared/data/…, test data), when present: the default haystack. */
function defaultHaystackDir(): string | undefined {
  const dir = process.env.PKV_HAYSTACK_DIR ?? essaysDir();
  return existsSync(dir) ? dir : undefined;
}

/** Conservative context bound for flag checks before the engine starts; the engine's n_ctx is checked again. */
const MAX_CONTEXT = 1 << 20;

/** What each subcommand prints: the summary as one JSON object, or the Markdown table. */
function report(json: boolean, r: { summary: unknown; files: string[]; seconds: number; table: string }): number {
  process.stdout.write(
    json ? `${JSON.stringify({ summary: r.summary, files: r.files, seconds: r.seconds })}\n` : `${r.table}\n`,
  );
  return 0;
}

export const needle = defineCommand({
  flags: {
    ...COMMON_FLAGS,
    lengths: string(),
    depths: string({ default: "11" }),
    "haystack-dir": string(),
    haystack: string(),
    needle: string(),
    question: string(),
    answer: string(),
    "chat-template": bool(),
    "report-only": bool(),
  },
  help: EVAL_USAGE,
  async run(f) {
    const common = commonOptions(f, "eval-results/needle");
    if (f.haystack !== undefined && f.haystack !== "noise")
      throw new Error(`--haystack: '${f.haystack}' is not supported (valid: noise; or give --haystack-dir DIR)`);
    const noise = f.haystack === "noise";
    const reportOnly = f["report-only"];
    const haystackDir = noise ? undefined : (f["haystack-dir"] ?? defaultHaystackDir());
    if (!noise && haystackDir === undefined && !reportOnly)
      throw new Error("--haystack-dir: required (a directory of text files), or --haystack noise");
    // --report-only without --lengths: every length in the results file
    const lengths =
      reportOnly && f.lengths === undefined
        ? undefined
        : parseLengths(f.lengths ?? "1024,2048,4096,6144,8000", MAX_CONTEXT, 300);
    const depths = parseDepths(f.depths);
    const custom = f.needle !== undefined;
    if (custom && (f.question === undefined || f.answer === undefined)) {
      throw new Error("--needle: a custom needle needs --question and --answer too");
    }
    const r = await runNeedle({
      ...common,
      lengths,
      depths,
      haystackDir,
      noise,
      needle: f.needle ?? NEEDLE_DEFAULTS.needle,
      question: f.question ?? NEEDLE_DEFAULTS.question,
      answer: f.answer ?? NEEDLE_DEFAULTS.answer,
      // raw completion by default: on the embedded 135M model FullKV finds the needle more often
      // without the chat template (docs/EVAL.md, "Chat template")
      chat: f["chat-template"],
      reportOnly,
    });
    return report(common.json, r);
  },
});

export const ruler = defineCommand({
  flags: {
    ...COMMON_FLAGS,
    tasks: string(),
    lengths: string({ default: "4096" }),
    limit: int({ min: 1, max: 100000, default: 25 }),
    seed: int({ min: 0, max: 2 ** 31, default: 42 }),
    "haystack-dir": string(),
  },
  help: EVAL_USAGE,
  async run(f) {
    const common = commonOptions(f, "eval-results/ruler");
    const tasks = parseTasks(f.tasks);
    const lengths = parseLengths(f.lengths, MAX_CONTEXT, 512);
    const haystackDir = f["haystack-dir"] ?? defaultHaystackDir();
    return report(
      common.json,
      await runRuler({ ...common, tasks, lengths, limit: f.limit, seed: f.seed, haystackDir }),
    );
  },
});

export const longbench = defineCommand({
  flags: {
    ...COMMON_FLAGS,
    "data-dir": string(),
    datasets: string(),
    limit: int({ min: 1, max: 100000 }),
    "max-length": int({ min: 256, max: MAX_CONTEXT }),
  },
  help: EVAL_USAGE,
  async run(f) {
    const common = commonOptions(f, "eval-results/longbench");
    const datasets = parseDatasets(f.datasets);
    const dataDir = f["data-dir"];
    if (dataDir === undefined)
      throw new Error("--data-dir: required (a directory holding LongBench's <dataset>.jsonl files)");
    const r = await runLongBench({ ...common, dataDir, datasets, limit: f.limit, maxLength: f["max-length"] });
    return report(common.json, r);
  },
});
