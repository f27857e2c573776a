// Runs RULER tasks: samples generated from the seed, one exact prefill each, every setting forked;
// score = string_match_all × 100, per task × setting, plus the average over tasks.
import { writeFileSync } from "node:fs";
import { join } from "node:path";

import { type CommonOptions, ResultsFile, settingByColumnTable, type SummaryRow } from "./common.js";
import { EvalEngine } from "./engine-client.js";
import { stringMatchAll } from "./metrics.js";
import { haystackText, NOISE_TEXT } from "./needle.js";
import { Progress } from "./progress.js";
import { ESSAY_TASKS, generateSample, type Haystacks, type RulerTask, sampleSeed } from "./ruler.js";
import { type PromptJob, runJobs, settingKey } from "./runner.js";

export interface RulerRunOptions extends CommonOptions {
  tasks: RulerTask[];
  lengths: number[];
  limit: number;
  seed: number;
  haystackDir?: string;
}

export interface RulerRow {
  task: "ruler";
  ruler_task: RulerTask;
  length: number;
  index: number;
  method: string;
  budget: number | null;
  score: number;
  response: string;
  answers: string[];
  kv_bytes: number;
  prompt_tokens: number;
}

const rowKey = (r: { ruler_task: string; length: number; index: number; method: string; budget: number | null }) =>
  `${r.ruler_task}|${r.length}|${r.index}|${settingKey(r)}`;

export async function runRuler(o: RulerRunOptions, log: (s: string) => void = (s) => process.stderr.write(`${s}\n`)) {
  const t0 = Date.now();
  if (o.tasks.some((t) => ESSAY_TASKS.has(t)) && o.haystackDir === undefined) {
    throw new Error(
      `--haystack-dir: required for ${o.tasks.filter((t) => ESSAY_TASKS.has(t)).join(", ")} (a directory of text files)`,
    );
  }
  const results = new ResultsFile<RulerRow>(o.out, "ruler.jsonl", o.resume, rowKey);
  const engine = await EvalEngine.start({ model: o.model, threads: o.threads, kvType: o.kvType });
  try {
    const maxLen = Math.max(...o.lengths);
    if (maxLen + 128 > engine.nCtx)
      throw new Error(`--lengths: ${maxLen} (+128 new tokens) is beyond the model's context of ${engine.nCtx} tokens`);
    const hay: Haystacks = {
      noise: await engine.tokenize(NOISE_TEXT.repeat(Math.ceil((maxLen * 6) / NOISE_TEXT.length))),
    };
    if (o.haystackDir !== undefined && o.tasks.some((t) => ESSAY_TASKS.has(t)))
      hay.essay = await engine.tokenize(haystackText({ dir: o.haystackDir }, maxLen * 6));
    const count = async (text: string) => (await engine.tokenize(text)).tokens.length;
    const jobs: PromptJob[] = [];
    const meta = new Map<string, { task: RulerTask; length: number; index: number; answers: string[] }>();
    for (const length of o.lengths) {
      for (const task of o.tasks) {
        for (let index = 0; index < o.limit; index++) {
          const settings = o.settings.filter((s) => !results.has(rowKey({ ruler_task: task, length, index, ...s })));
          if (settings.length === 0) continue;
          const sample = await generateSample(task, length, sampleSeed(o.seed, task, length, index), hay, count);
          const id = `${task}|${length}|${index}`;
          meta.set(id, { task, length, index, answers: sample.answers });
          jobs.push({ id, text: sample.prompt, chat: false, maxNewTokens: sample.maxNewTokens, settings });
        }
      }
    }
    const total = jobs.reduce((a, j) => a + j.settings.length, 0);
    const progress = new Progress("ruler", total, process.stderr, !o.json || process.stderr.isTTY === true);
    await runJobs(engine, jobs, (c) => {
      const m = meta.get(c.job.id)!;
      results.add({
        task: "ruler",
        ruler_task: m.task,
        length: m.length,
        index: m.index,
        method: c.setting.method,
        budget: c.setting.budget,
        score: stringMatchAll(c.generation.text, m.answers),
        response: c.generation.text,
        answers: m.answers,
        kv_bytes: c.kvBytes,
        prompt_tokens: c.promptTokens,
      });
      progress.tick();
    });
    progress.finish();
  } finally {
    await engine.shutdown();
  }
  const rows = results.rows.filter(
    (r) => o.tasks.includes(r.ruler_task) && o.lengths.includes(r.length) && r.index < o.limit,
  );
  const summary: (SummaryRow & { ruler_task: string; length: number })[] = [];
  for (const s of o.settings) {
    for (const length of o.lengths) {
      for (const task of o.tasks) {
        const mine = rows.filter(
          (r) => r.ruler_task === task && r.length === length && r.method === s.method && r.budget === s.budget,
        );
        if (mine.length === 0) continue;
        summary.push({
          ruler_task: task,
          length,
          setting: settingKey(s),
          method: s.method,
          budget: s.budget,
          cells: mine.length,
          mean_score: (100 * mine.reduce((a, r) => a + r.score, 0)) / mine.length,
          mean_kv_bytes: mine.reduce((a, r) => a + r.kv_bytes, 0) / mine.length,
        });
      }
    }
  }
  const tables = o.lengths.map(
    (length) =>
      `length ${length}\n\n` +
      settingByColumnTable(
        o.settings,
        o.tasks,
        (s, t) =>
          summary.find(
            (x) => x.length === length && x.ruler_task === t && x.method === s.method && x.budget === s.budget,
          )?.mean_score,
      ),
  );
  const table = tables.join("\n\n");
  const md = join(o.out, "ruler-summary.md");
  writeFileSync(md, `RULER scores (string_match_all × 100), ${o.limit} samples per task, seed ${o.seed}\n\n${table}\n`);
  const seconds = (Date.now() - t0) / 1000;
  log(`wrote ${results.path}, ${md} in ${seconds.toFixed(0)} s`);
  return { summary, table, files: [results.path, md], seconds };
}
