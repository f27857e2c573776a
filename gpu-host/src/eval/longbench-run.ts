// Runs LongBench datasets: per row one exact prefill of the (middle-truncated) official prompt,
// every setting forked from it; per-dataset × setting scores (100 × mean of per-sample best).
import { writeFileSync } from "node:fs";
import { join } from "node:path";

import { type CommonOptions, ResultsFile, settingByColumnTable, type SummaryRow } from "./common.js";
import { EvalEngine } from "./engine-client.js";
import {
  buildPrompt,
  defaultMaxLength,
  maxNewTokens,
  NO_CHAT_TEMPLATE,
  readDataset,
  scoreSample,
  truncateMiddle,
} from "./longbench.js";
import { Progress } from "./progress.js";
import { type PromptJob, runJobs, settingKey, settingLabel } from "./runner.js";

export interface LongBenchRunOptions extends CommonOptions {
  dataDir: string;
  datasets: string[];
  limit?: number;
  maxLength?: number;
}

export interface LongBenchResultRow {
  task: "longbench";
  dataset: string;
  id: string;
  method: string;
  budget: number | null;
  score: number;
  response: string;
  kv_bytes: number;
  prompt_tokens: number;
  truncated: boolean;
}

const rowKey = (r: { dataset: string; id: string; method: string; budget: number | null }) =>
  `${r.dataset}|${r.id}|${settingKey(r)}`;

export async function runLongBench(
  o: LongBenchRunOptions,
  log: (s: string) => void = (s) => process.stderr.write(`${s}\n`),
) {
  const t0 = Date.now();
  // read and check every dataset before starting the engine
  const data = o.datasets.map((d) => ({ dataset: d, rows: readDataset(o.dataDir, d).slice(0, o.limit ?? Infinity) }));
  const results = new ResultsFile<LongBenchResultRow>(o.out, "longbench.jsonl", o.resume, rowKey);
  const engine = await EvalEngine.start({ model: o.model, threads: o.threads, kvType: o.kvType });
  try {
    const jobs: PromptJob[] = [];
    const meta = new Map<
      string,
      { dataset: string; id: string; answers: string[]; classes: string[] | null; truncated: boolean }
    >();
    for (const { dataset, rows } of data) {
      const maxLength = o.maxLength ?? defaultMaxLength(engine.nCtx, dataset);
      if (maxLength + maxNewTokens(dataset) > engine.nCtx) {
        throw new Error(
          `--max-length: ${maxLength} + ${maxNewTokens(dataset)} new tokens for ${dataset} exceed the model's context of ${engine.nCtx}`,
        );
      }
      for (const [i, row] of rows.entries()) {
        const id = row._id ?? String(i);
        const settings = o.settings.filter((s) => !results.has(rowKey({ dataset, id, ...s })));
        if (settings.length === 0) continue;
        const tokenized = await engine.tokenize(buildPrompt(dataset, row));
        const text = truncateMiddle(tokenized, maxLength);
        const key = `${dataset}|${id}`;
        meta.set(key, {
          dataset,
          id,
          answers: row.answers,
          classes: row.all_classes,
          truncated: tokenized.tokens.length > maxLength,
        });
        jobs.push({
          id: key,
          text,
          chat: !NO_CHAT_TEMPLATE.has(dataset),
          maxNewTokens: maxNewTokens(dataset),
          settings,
        });
      }
    }
    const total = jobs.reduce((a, j) => a + j.settings.length, 0);
    const progress = new Progress("longbench", total, process.stderr, !o.json || process.stderr.isTTY === true);
    await runJobs(engine, jobs, (c) => {
      const m = meta.get(c.job.id)!;
      results.add({
        task: "longbench",
        dataset: m.dataset,
        id: m.id,
        method: c.setting.method,
        budget: c.setting.budget,
        score: scoreSample(m.dataset, c.generation.text, m.answers, m.classes),
        response: c.generation.text,
        kv_bytes: c.kvBytes,
        prompt_tokens: c.promptTokens,
        truncated: m.truncated,
      });
      progress.tick();
    });
    progress.finish();
  } finally {
    await engine.shutdown();
  }
  const wanted = new Set(data.flatMap(({ dataset, rows }) => rows.map((r, i) => `${dataset}|${r._id ?? String(i)}`)));
  const rows = results.rows.filter((r) => wanted.has(`${r.dataset}|${r.id}`));
  const summary: (SummaryRow & { dataset: string })[] = [];
  for (const s of o.settings) {
    for (const { dataset } of data) {
      const mine = rows.filter((r) => r.dataset === dataset && r.method === s.method && r.budget === s.budget);
      if (mine.length === 0) continue;
      summary.push({
        dataset,
        setting: settingLabel(s),
        method: s.method,
        budget: s.budget,
        cells: mine.length,
        mean_score: (100 * mine.reduce((a, r) => a + r.score, 0)) / mine.length,
        mean_kv_bytes: mine.reduce((a, r) => a + r.kv_bytes, 0) / mine.length,
      });
    }
  }
  const ds = data.map((d) => d.dataset);
  const table = settingByColumnTable(
    o.settings,
    ds,
    (s, d) => summary.find((x) => x.dataset === d && x.method === s.method && x.budget === s.budget)?.mean_score,
  );
  const md = join(o.out, "longbench-summary.md");
  writeFileSync(md, `LongBench scores (100 × mean of per-sample best over answers)\n\n${table}\n`);
  const seconds = (Date.now() - t0) / 1000;
  log(`wrote ${results.path}, ${md} in ${seconds.toFixed(0)} s`);
  return { summary, table, files: [results.path, md], seconds };
}
