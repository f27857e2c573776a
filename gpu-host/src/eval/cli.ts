// `pkv eval needle | ruler | longbench`: flag parsing only; the work is in *-run.ts.
import { existsSync } from "node:fs";
import { parseArgs } from "node:util";

import { essaysDir } from "./haystack.js";
import { COMMON_FLAGS, commonOptions, parsePositiveInt } from "./common.js";
import { LONGBENCH_DATASETS, parseDatasets } from "./longbench.js";
import { runLongBench } from "./longbench-run.js";
import { NEEDLE_DEFAULTS, parseDepths, parseLengths } from "./needle.js";
import { runNeedle } from "./needle-run.js";
import { parseTasks, RULER_TASKS } from "./ruler.js";
import { runRuler } from "./ruler-run.js";

export const EVAL_USAGE = `usage: pkv eval <needle|ruler|longbench> [options]
common: [--model M] [--methods full,pyramidkv,snapkv,h2o,streamingllm] [--budgets 64,128,256,512]
        [--out DIR] [--resume] [--json] [--threads N]
  needle    [--lengths 1024,2048 | start:stop:step] [--depths 11 | 0,50,100] [--haystack-dir DIR | --haystack noise]
            [--needle S] [--question S] [--answer S] [--chat-template] [--report-only]
  ruler     [--tasks ${RULER_TASKS.join(",")}] [--lengths 4096] [--limit N] [--seed S] [--haystack-dir DIR]
  longbench --data-dir DIR [--datasets ${LONGBENCH_DATASETS.slice(0, 3).join(",")},…] [--limit N] [--max-length N]`;

/** The essays beside the repository (../shared/data/...), when present: the default haystack. */
function defaultHaystackDir(): string | undefined {
  const dir = process.env.PKV_HAYSTACK_DIR ?? essaysDir();
  return existsSync(dir) ? dir : undefined;
}

/** Conservative context bound for flag checks before the engine starts; the engine's n_ctx is checked again. */
const MAX_CONTEXT = 1 << 20;

export async function runEvalCli(args: string[]): Promise<number> {
  const [sub, ...rest] = args;
  if (sub === undefined || sub === "--help" || sub === "-h") {
    process.stdout.write(`${EVAL_USAGE}\n`);
    return sub === undefined ? 2 : 0;
  }
  if (sub === "needle") {
    const { values } = parseArgs({
      args: rest,
      options: {
        ...COMMON_FLAGS,
        lengths: { type: "string" },
        depths: { type: "string" },
        "haystack-dir": { type: "string" },
        haystack: { type: "string" },
        needle: { type: "string" },
        question: { type: "string" },
        answer: { type: "string" },
        "chat-template": { type: "boolean" },
        "report-only": { type: "boolean" },
      },
    });
    const common = commonOptions(values, "eval-results/needle");
    if (values.haystack !== undefined && values.haystack !== "noise")
      throw new Error(`--haystack: '${values.haystack}' is not supported (valid: noise; or give --haystack-dir DIR)`);
    const noise = values.haystack === "noise";
    const haystackDir = noise ? undefined : (values["haystack-dir"] ?? defaultHaystackDir());
    if (!noise && haystackDir === undefined)
      throw new Error("--haystack-dir: required (a directory of text files), or --haystack noise");
    const lengths = parseLengths(values.lengths ?? "1024,2048,4096,6144,8000", MAX_CONTEXT, 300);
    const depths = parseDepths(values.depths ?? "11");
    const needle = values.needle ?? NEEDLE_DEFAULTS.needle;
    const custom = values.needle !== undefined;
    if (custom && (values.question === undefined || values.answer === undefined)) {
      throw new Error("--needle: a custom needle needs --question and --answer too");
    }
    const r = await runNeedle({
      ...common,
      lengths,
      depths,
      haystackDir,
      noise,
      needle,
      question: values.question ?? NEEDLE_DEFAULTS.question,
      answer: values.answer ?? NEEDLE_DEFAULTS.answer,
      // raw completion by default: on the embedded 135M model FullKV finds the needle more often
      // without the chat template (docs/EVAL.md, "Chat template")
      chat: values["chat-template"] === true,
      reportOnly: values["report-only"] === true,
    });
    process.stdout.write(
      common.json ? `${JSON.stringify({ summary: r.summary, files: r.files, seconds: r.seconds })}\n` : `${r.table}\n`,
    );
    return 0;
  }
  if (sub === "ruler") {
    const { values } = parseArgs({
      args: rest,
      options: {
        ...COMMON_FLAGS,
        tasks: { type: "string" },
        lengths: { type: "string" },
        limit: { type: "string" },
        seed: { type: "string" },
        "haystack-dir": { type: "string" },
      },
    });
    const common = commonOptions(values, "eval-results/ruler");
    const tasks = parseTasks(values.tasks);
    const lengths = parseLengths(values.lengths ?? "4096", MAX_CONTEXT, 512);
    const limit = parsePositiveInt("limit", values.limit, 25, 1, 100000)!;
    const seed = parsePositiveInt("seed", values.seed, 42, 0, 2 ** 31)!;
    const haystackDir = values["haystack-dir"] ?? defaultHaystackDir();
    const r = await runRuler({ ...common, tasks, lengths, limit, seed, haystackDir });
    process.stdout.write(
      common.json ? `${JSON.stringify({ summary: r.summary, files: r.files, seconds: r.seconds })}\n` : `${r.table}\n`,
    );
    return 0;
  }
  if (sub === "longbench") {
    const { values } = parseArgs({
      args: rest,
      options: {
        ...COMMON_FLAGS,
        "data-dir": { type: "string" },
        datasets: { type: "string" },
        limit: { type: "string" },
        "max-length": { type: "string" },
      },
    });
    const common = commonOptions(values, "eval-results/longbench");
    const datasets = parseDatasets(values.datasets);
    if (values["data-dir"] === undefined)
      throw new Error("--data-dir: required (a directory holding LongBench's <dataset>.jsonl files)");
    const limit = parsePositiveInt("limit", values.limit, undefined, 1, 100000);
    const maxLength = parsePositiveInt("max-length", values["max-length"], undefined, 256, MAX_CONTEXT);
    const r = await runLongBench({ ...common, dataDir: values["data-dir"], datasets, limit, maxLength });
    process.stdout.write(
      common.json ? `${JSON.stringify({ summary: r.summary, files: r.files, seconds: r.seconds })}\n` : `${r.table}\n`,
    );
    return 0;
  }
  throw new Error(`eval: unknown subcommand '${sub}' (valid: needle, ruler, longbench)`);
}
