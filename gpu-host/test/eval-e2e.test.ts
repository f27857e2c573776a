// Tiny end-to-end runs of `pkv eval needle | ruler | longbench` through the CLI, --resume, and
// bad input refused with a clear error before any model work.
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { test } from "node:test";

import { repoRoot } from "../src/engine/engine-path.js";
import { DATA_DIR, ESSAYS } from "./eval-data.js";

const CLI = resolve(repoRoot(), "gpu-host", "dist", "src", "cli.js");

// one engine thread: these runs are tiny, and on a shared 2-core machine spinning threads of two
// engines slow each other down by far more than one thread loses
function pkv(...args: string[]) {
  const threads = ["needle", "ruler", "longbench"].includes(args[0] ?? "") ? ["--threads", "1"] : [];
  const r = spawnSync(process.execPath, [CLI, "eval", ...args, ...threads], { encoding: "utf8" });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

const lines = (file: string) =>
  readFileSync(file, "utf8")
    .split("\n")
    .filter(Boolean)
    .map((l) => JSON.parse(l) as Record<string, unknown>);

test("needle: a 2×1 grid with FullKV and one compressed method, then --resume adds only the missing cells", () => {
  const out = mkdtempSync(join(tmpdir(), "pkv-eval-needle-"));
  const common = ["--haystack-dir", ESSAYS, "--methods", "full,streamingllm", "--budgets", "32", "--out", out];
  const r = pkv("needle", "--lengths", "400,500", "--depths", "1", ...common, "--json");
  assert.equal(r.code, 0, r.stderr);
  const rows = lines(join(out, "needle.jsonl"));
  assert.equal(rows.length, 4);
  for (const row of rows) {
    for (const k of ["method", "budget", "length", "depth", "score", "response", "kv_bytes", "rouge1_recall"])
      assert.ok(k in row, k);
    assert.ok((row.score as number) >= 0 && (row.score as number) <= 1);
  }
  const full = rows.find((x) => x.method === "full" && x.length === 500)!;
  const sl = rows.find((x) => x.method === "streamingllm" && x.length === 500)!;
  assert.equal(full.budget, null);
  assert.ok((sl.kv_bytes as number) * 4 < (full.kv_bytes as number), `${sl.kv_bytes} vs ${full.kv_bytes}`);
  const summary = JSON.parse(r.stdout) as { summary: { setting: string; cells: number }[]; files: string[] };
  assert.deepEqual(
    summary.summary.map((s) => s.setting),
    ["FullKV", "streamingllm@32"],
  );
  for (const f of ["needle-full.png", "needle-streamingllm-32.png", "needle-overview.png", "needle-summary.md"]) {
    assert.ok(existsSync(join(out, f)), f);
  }
  assert.equal(readFileSync(join(out, "needle-overview.png")).subarray(1, 4).toString(), "PNG");
  // without --resume an existing results file is not overwritten
  assert.match(
    pkv("needle", "--lengths", "400", "--depths", "1", ...common).stderr,
    /--out: .*needle\.jsonl exists; pass --resume/,
  );
  const again = pkv("needle", "--lengths", "400,500", "--depths", "0,50", ...common, "--resume");
  assert.equal(again.code, 0, again.stderr);
  const after = lines(join(out, "needle.jsonl"));
  assert.equal(after.length, 8, "only depth 0 was run again");
  assert.equal(after.filter((x) => x.depth === 50).length, 4);
  assert.match(again.stdout, /\| FullKV \|/);
  // --report-only redraws tables and pictures from the results file alone, for the lengths asked
  const report = pkv(
    "needle",
    "--report-only",
    "--lengths",
    "500",
    "--methods",
    "full,streamingllm",
    "--budgets",
    "32",
    "--out",
    out,
    "--json",
  );
  assert.equal(report.code, 0, report.stderr);
  const cells = (JSON.parse(report.stdout) as { summary: { cells: number }[] }).summary.map((s) => s.cells);
  assert.deepEqual(cells, [2, 2]);
  // without --lengths, every row of the file; a report needs no haystack (none found here)
  for (const f of ["needle-overview.png", "needle-full.png", "needle-streamingllm-32.png"]) rmSync(join(out, f));
  const whole = spawnSync(
    process.execPath,
    [
      CLI,
      "eval",
      "needle",
      "--report-only",
      "--methods",
      "full,streamingllm",
      "--budgets",
      "32",
      "--out",
      out,
      "--json",
    ],
    { encoding: "utf8", env: { ...process.env, PKV_HAYSTACK_DIR: join(out, "no-such-dir") } },
  );
  assert.equal(whole.status, 0, whole.stderr);
  const all = (JSON.parse(whole.stdout) as { summary: { cells: number }[] }).summary.map((s) => s.cells);
  assert.deepEqual(all, [4, 4]);
  for (const f of ["needle-overview.png", "needle-full.png", "needle-streamingllm-32.png"])
    assert.ok(existsSync(join(out, f)), f);
});

test("ruler: one sample of one task, scored", () => {
  const out = mkdtempSync(join(tmpdir(), "pkv-eval-ruler-"));
  const r = pkv(
    "ruler",
    "--tasks",
    "niah_single_1",
    "--lengths",
    "600",
    "--limit",
    "1",
    "--methods",
    "full,snapkv",
    "--budgets",
    "64",
    "--out",
    out,
    "--json",
  );
  assert.equal(r.code, 0, r.stderr);
  const rows = lines(join(out, "ruler.jsonl"));
  assert.equal(rows.length, 2);
  for (const row of rows) {
    assert.equal(row.ruler_task, "niah_single_1");
    assert.ok(Math.abs((row.prompt_tokens as number) - 600) <= 6, `prompt of ${row.prompt_tokens} tokens`);
    assert.equal((row.answers as string[]).length, 1);
  }
  assert.ok(existsSync(join(out, "ruler-summary.md")));
});

test("longbench: one multi_news row, truncated, scored with ROUGE-L", () => {
  const out = mkdtempSync(join(tmpdir(), "pkv-eval-lb-"));
  const r = pkv(
    "longbench",
    "--data-dir",
    resolve(DATA_DIR, "longbench"),
    "--datasets",
    "multi_news",
    "--limit",
    "1",
    "--max-length",
    "400",
    "--methods",
    "full,pyramidkv",
    "--budgets",
    "64",
    "--out",
    out,
  );
  assert.equal(r.code, 0, r.stderr);
  const rows = lines(join(out, "longbench.jsonl"));
  assert.equal(rows.length, 2);
  for (const row of rows) {
    assert.equal(row.dataset, "multi_news");
    assert.equal(row.truncated, true);
    assert.ok((row.prompt_tokens as number) <= 400 + 16, `prompt of ${row.prompt_tokens} tokens`);
  }
  assert.match(r.stdout, /\| setting \| multi_news \| average \|/);
  assert.match(r.stdout, /\| FullKV \| \d+\.\d\d \| \d+\.\d\d \|/);
});

test("bad input is refused before any model work, naming the parameter and the valid values", () => {
  const out = join(tmpdir(), `pkv-eval-bad-${process.pid}`);
  const cases: [string[], RegExp][] = [
    [["ruler", "--tasks", "niah_9", "--out", out], /--tasks: unknown task 'niah_9' \(valid: niah_single_1/],
    [
      ["longbench", "--data-dir", DATA_DIR, "--datasets", "bogus", "--out", out],
      /--datasets: unknown dataset 'bogus' \(valid: narrativeqa/,
    ],
    [["needle", "--depths", "0,120", "--out", out], /--depths: '120' is outside 0–100/],
    [["needle", "--lengths", "2000000", "--out", out], /--lengths: 2000000 is outside/],
    [
      ["needle", "--haystack-dir", join(tmpdir(), "pkv-no-such-dir"), "--out", out],
      /--haystack-dir: cannot read directory/,
    ],
    [
      ["needle", "--methods", "full,magic", "--out", out],
      /--methods: unknown method 'magic' \(valid: full, streamingllm, h2o, snapkv, pyramidkv\)/,
    ],
    [["needle", "--budgets", "4", "--out", out], /--budgets: '4' is not an integer in \[9, 1000000\]/],
    [["bogus"], /eval: unknown subcommand 'bogus' \(valid: needle, ruler, longbench\)/],
  ];
  for (const [args, message] of cases) {
    const r = pkv(...args);
    assert.equal(r.code, 2, `${args.join(" ")}: ${r.stderr}`);
    assert.match(r.stderr, message);
  }
  assert.ok(!existsSync(join(out, "needle.jsonl")));
});

test("a length beyond the model's context is refused before any prompt is run", () => {
  const out = mkdtempSync(join(tmpdir(), "pkv-eval-ctx-"));
  const r = pkv(
    "needle",
    "--haystack-dir",
    ESSAYS,
    "--lengths",
    "1000,20000",
    "--depths",
    "1",
    "--methods",
    "full",
    "--out",
    out,
  );
  assert.equal(r.code, 2);
  assert.match(r.stderr, /--lengths: 20000 is beyond the model's context of 8192 tokens/);
  assert.ok(!existsSync(join(out, "needle.jsonl")));
});
