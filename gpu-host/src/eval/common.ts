// What every `pkv eval` subcommand shares: the common flags, the JSON-lines results file with
// --resume, and the summary table (mean score per setting, FullKV first).
import { appendFileSync, existsSync, mkdirSync, readFileSync } from "node:fs";
import { join } from "node:path";

import { KV_METHODS } from "@pyramidkv/shared";

import { bool, type FlagValues, int, ints, string } from "../flags.js";
import { byReportOrder, methodLabel, type Setting, settingKey, settingLabel, settingsGrid } from "./runner.js";

export interface CommonOptions {
  model?: string;
  settings: Setting[];
  out: string;
  resume: boolean;
  json: boolean;
  threads?: number;
  /** the engine's --kv-type (f16, q8_0, q4_0; default the engine's f16) */
  kvType?: string;
}

/** Every method the engine has, in the reports' order. */
export const DEFAULT_METHODS = byReportOrder(KV_METHODS);
export const DEFAULT_BUDGETS = [64, 128, 256, 512];

export function parseMethods(value: string | undefined): string[] {
  if (value === undefined) return DEFAULT_METHODS;
  const ms = value
    .split(",")
    .map((m) => m.trim())
    .filter(Boolean);
  if (ms.length === 0) throw new Error(`--methods: empty list (valid: ${KV_METHODS.join(", ")})`);
  for (const m of ms) {
    if (!(KV_METHODS as readonly string[]).includes(m))
      throw new Error(`--methods: unknown method '${m}' (valid: ${KV_METHODS.join(", ")})`);
  }
  return byReportOrder([...new Set(ms)]);
}

/** The flags every subcommand takes. Budgets: KV entries per layer per head, window included; > the window (8). */
export const COMMON_FLAGS = {
  model: string(),
  methods: string(),
  budgets: ints({ min: 9, max: 1_000_000, default: DEFAULT_BUDGETS }),
  out: string(),
  resume: bool(),
  json: bool(),
  threads: int({ min: 1, max: 1024 }),
  "kv-type": string(),
};

export function commonOptions(values: FlagValues<typeof COMMON_FLAGS>, defaultOut: string): CommonOptions {
  return {
    model: values.model,
    settings: settingsGrid(parseMethods(values.methods), [...new Set(values.budgets)]),
    out: values.out ?? defaultOut,
    resume: values.resume,
    json: values.json,
    threads: values.threads,
    kvType: values["kv-type"],
  };
}

/** The results file: one JSON object per cell, appended as cells finish (so --resume can continue). */
export class ResultsFile<Row extends object> {
  readonly path: string;
  private readonly done = new Set<string>();
  readonly rows: Row[] = [];

  constructor(
    dir: string,
    name: string,
    resume: boolean,
    private readonly keyOf: (r: Row) => string,
  ) {
    mkdirSync(dir, { recursive: true });
    this.path = join(dir, name);
    if (existsSync(this.path)) {
      if (!resume) throw new Error(`--out: ${this.path} exists; pass --resume to continue it or choose another --out`);
      for (const line of readFileSync(this.path, "utf8").split("\n")) {
        if (line.trim() === "") continue;
        try {
          const r = JSON.parse(line) as Row;
          this.rows.push(r);
          this.done.add(keyOf(r));
        } catch {
          // a line cut by an interrupted run: its cell runs again
        }
      }
    }
  }

  has(key: string): boolean {
    return this.done.has(key);
  }

  add(row: Row): void {
    appendFileSync(this.path, `${JSON.stringify(row)}\n`);
    this.rows.push(row);
    this.done.add(this.keyOf(row));
  }
}

export interface ScoredRow {
  method: string;
  budget: number | null;
  score: number;
  kv_bytes: number;
}

export interface SummaryRow {
  setting: string;
  method: string;
  budget: number | null;
  cells: number;
  mean_score: number;
  mean_kv_bytes: number;
}

/** Mean score (and KV bytes) per setting, in the grid's order: FullKV first, then methods × budgets. */
export function summarise(rows: ScoredRow[], settings: Setting[]): SummaryRow[] {
  const out: SummaryRow[] = [];
  for (const s of settings) {
    const mine = rows.filter((r) => r.method === s.method && (r.budget ?? null) === s.budget);
    if (mine.length === 0) continue;
    out.push({
      setting: settingLabel(s),
      method: s.method,
      budget: s.budget,
      cells: mine.length,
      mean_score: mine.reduce((a, r) => a + r.score, 0) / mine.length,
      mean_kv_bytes: mine.reduce((a, r) => a + r.kv_bytes, 0) / mine.length,
    });
  }
  return out;
}

/** Markdown table: one row per method, one column per budget (FullKV one row, its value in every column). */
export function methodBudgetTable(summary: SummaryRow[], digits = 3, scale = 1): string {
  const budgets = [...new Set(summary.filter((s) => s.budget !== null).map((s) => s.budget!))].sort((a, b) => a - b);
  const methods = [...new Set(summary.map((s) => s.method))];
  const cols = budgets.length > 0 ? budgets.map(String) : ["all"];
  const lines = [
    `| method | ${cols.map((c) => (c === "all" ? "score" : `budget ${c}`)).join(" | ")} |`,
    `|---|${cols.map(() => "---:").join("|")}|`,
  ];
  for (const m of methods) {
    const cells = cols.map((c) => {
      const row = summary.find((s) => s.method === m && (s.budget === null || String(s.budget) === c));
      return row ? (row.mean_score * scale).toFixed(digits) : "";
    });
    lines.push(`| ${methodLabel(m)} | ${cells.join(" | ")} |`);
  }
  return lines.join("\n");
}

export { settingKey };

/** Markdown table: one row per setting, one column per dataset/task, plus the average over the columns. */
export function settingByColumnTable(
  settings: Setting[],
  columns: string[],
  score: (s: Setting, column: string) => number | undefined,
  digits = 2,
): string {
  const lines = [`| setting | ${columns.join(" | ")} | average |`, `|---|${columns.map(() => "---:").join("|")}|---:|`];
  for (const s of settings) {
    const vals = columns.map((c) => score(s, c));
    const present = vals.filter((v): v is number => v !== undefined);
    if (present.length === 0) continue;
    const avg = present.reduce((a, b) => a + b, 0) / present.length;
    lines.push(
      `| ${settingLabel(s)} | ${vals.map((v) => (v === undefined ? "" : v.toFixed(digits))).join(" | ")} | ${avg.toFixed(digits)} |`,
    );
  }
  return lines.join("\n");
}
