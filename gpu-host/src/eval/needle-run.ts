// Runs the needle grid: one exact prefill per (length, depth), every setting forked from it.
import { writeFileSync } from "node:fs";
import { join } from "node:path";

import { type CommonOptions, methodBudgetTable, ResultsFile, summarise, type SummaryRow } from "./common.js";
import { EvalEngine, type Tokenized } from "./engine-client.js";
import { type HeatCell, heatmapSvg, overviewSvg, svgToPng } from "./heatmap.js";
import { answerWordScore, rouge1Recall } from "./metrics.js";
import { haystackText, NEEDLE_MAX_NEW_TOKENS, needlePrompt, placeNeedle, RESERVED_TOKENS } from "./needle.js";
import { Progress } from "./progress.js";
import { type PromptJob, runJobs, settingKey, settingLabel } from "./runner.js";

export interface NeedleRunOptions extends CommonOptions {
  /** context lengths in tokens; with reportOnly, undefined = every length in the results file */
  lengths?: number[];
  depths: number[];
  haystackDir?: string;
  noise: boolean;
  needle: string;
  question: string;
  answer: string;
  chat: boolean;
  /** no model work: tables and pictures from the results file's rows at these lengths (any depth) */
  reportOnly?: boolean;
}

export interface NeedleRow {
  task: "needle";
  method: string;
  budget: number | null;
  length: number;
  depth: number;
  score: number;
  rouge1_recall: number;
  response: string;
  kv_bytes: number;
  full_kv_bytes: number;
  mean_layer_kv: number;
  prompt_tokens: number;
  needle_token: number;
}

const rowKey = (r: { length: number; depth: number; method: string; budget: number | null }) =>
  `${r.length}|${r.depth}|${settingKey(r)}`;

export interface NeedleSummary {
  summary: SummaryRow[];
  table: string;
  files: string[];
  seconds: number;
}

export async function runNeedle(
  o: NeedleRunOptions,
  log: (s: string) => void = (s) => process.stderr.write(`${s}\n`),
): Promise<NeedleSummary> {
  const t0 = Date.now();
  // a bad --haystack-dir fails before the engine starts; a report needs no haystack
  if (!o.reportOnly) haystackText({ dir: o.haystackDir, noise: o.noise }, 1);
  const results = new ResultsFile<NeedleRow>(o.out, "needle.jsonl", o.resume || o.reportOnly === true, rowKey);
  if (o.reportOnly && results.rows.length === 0) throw new Error(`--report-only: ${results.path} holds no results`);
  const lengths = o.lengths;
  if (!o.reportOnly) {
    if (lengths === undefined) throw new Error("--lengths: required unless --report-only");
    await runGrid({ ...o, lengths }, results);
  }
  // tables and pictures from every row of the grid (this run's and resumed ones)
  const rows = results.rows.filter(
    (r) => (lengths === undefined || lengths.includes(r.length)) && (o.reportOnly || o.depths.includes(r.depth)),
  );
  const summary = summarise(rows, o.settings);
  const table = methodBudgetTable(summary);
  const files = [results.path];
  const tiles: { row: number; col: number; title: string; cells: HeatCell[] }[] = [];
  const methods = [...new Set(o.settings.map((s) => s.method))];
  const budgets = [...new Set(o.settings.filter((s) => s.budget !== null).map((s) => s.budget!))];
  for (const s of o.settings) {
    const cells = rows
      .filter((r) => r.method === s.method && r.budget === s.budget)
      .map((r) => ({ length: r.length, depth: r.depth, score: r.score }));
    if (cells.length === 0) continue;
    const name = join(o.out, `needle-${s.method}${s.budget === null ? "" : `-${s.budget}`}.png`);
    writeFileSync(name, svgToPng(heatmapSvg(settingLabel(s), cells)));
    files.push(name);
    tiles.push({
      row: methods.indexOf(s.method),
      col: s.budget === null ? 0 : budgets.indexOf(s.budget),
      title: settingLabel(s),
      cells,
    });
  }
  if (tiles.length > 0) {
    const name = join(o.out, "needle-overview.png");
    writeFileSync(name, svgToPng(overviewSvg(tiles)));
    files.push(name);
  }
  const md = join(o.out, "needle-summary.md");
  const depthsSeen = [...new Set(rows.map((r) => r.depth))].sort((a, b) => a - b);
  const lengthsSeen = [...new Set(rows.map((r) => r.length))].sort((a, b) => a - b);
  writeFileSync(
    md,
    `mean needle score (0–1), lengths ${lengthsSeen.join(", ")} × depths ${depthsSeen.join(", ")} (${rows.length} cells)\n\n${table}\n`,
  );
  files.push(md);
  const seconds = (Date.now() - t0) / 1000;
  log(`wrote ${files.join(", ")} in ${seconds.toFixed(0)} s`);
  return { summary, table, files, seconds };
}

async function runGrid(o: NeedleRunOptions & { lengths: number[] }, results: ResultsFile<NeedleRow>): Promise<void> {
  const engine = await EvalEngine.start({ model: o.model, threads: o.threads, kvType: o.kvType });
  try {
    const maxLen = Math.max(...o.lengths);
    if (maxLen + NEEDLE_MAX_NEW_TOKENS > engine.nCtx + RESERVED_TOKENS) {
      throw new Error(`--lengths: ${maxLen} is beyond the model's context of ${engine.nCtx} tokens`);
    }
    // enough characters for the longest context (English runs ~4–5 characters per token)
    let hay: Tokenized | undefined;
    for (let chars = maxLen * 6; ; chars *= 2) {
      hay = await engine.tokenize(haystackText({ dir: o.haystackDir, noise: o.noise }, chars));
      if (hay.tokens.length >= maxLen) break;
    }
    const needleTokens = (await engine.tokenize(` ${o.needle} `)).tokens.length;
    const jobs: PromptJob[] = [];
    const meta = new Map<string, { length: number; depth: number; needleToken: number }>();
    for (const length of o.lengths) {
      for (const depth of o.depths) {
        const settings = o.settings.filter((s) => !results.has(rowKey({ length, depth, ...s })));
        if (settings.length === 0) continue;
        const placed = placeNeedle(hay, length - RESERVED_TOKENS, o.needle, needleTokens, depth);
        const id = `${length}|${depth}`;
        meta.set(id, { length, depth, needleToken: placed.tokensBefore });
        jobs.push({
          id,
          text: needlePrompt(placed.context, o.question),
          chat: o.chat,
          maxNewTokens: NEEDLE_MAX_NEW_TOKENS,
          settings,
        });
      }
    }
    const total = jobs.reduce((a, j) => a + j.settings.length, 0);
    const progress = new Progress("needle", total, process.stderr, !o.json || process.stderr.isTTY === true);
    await runJobs(engine, jobs, (c) => {
      const m = meta.get(c.job.id)!;
      results.add({
        task: "needle",
        method: c.setting.method,
        budget: c.setting.budget,
        length: m.length,
        depth: m.depth,
        score: answerWordScore(o.answer, c.generation.text),
        rouge1_recall: rouge1Recall(o.answer, c.generation.text),
        response: c.generation.text,
        kv_bytes: c.kvBytes,
        full_kv_bytes: c.fullKvBytes,
        mean_layer_kv: c.meanLayerKv,
        prompt_tokens: c.promptTokens,
        needle_token: m.needleToken,
      });
      progress.tick();
    });
    progress.finish();
  } finally {
    await engine.shutdown();
  }
}
