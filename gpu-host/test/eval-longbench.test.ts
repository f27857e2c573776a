// LongBench prompt building and middle truncation on a real row of multi_news.
import assert from "node:assert/strict";
import { resolve } from "node:path";
import { test } from "node:test";

import { tokenizeWithEngine } from "../src/eval/engine-client.js";
import {
  buildPrompt,
  defaultMaxLength,
  maxNewTokens,
  parseDatasets,
  readDataset,
  restoreNewlines,
  truncateMiddle,
} from "../src/eval/longbench.js";
import { DATA_DIR } from "./eval-data.js";

const LB = resolve(DATA_DIR, "longbench");

test("multi_news prompt: official template, NEWLINE_CHAR restored", () => {
  const row = readDataset(LB, "multi_news")[0]!;
  assert.ok(row.context.includes("NEWLINE_CHAR"));
  const prompt = buildPrompt("multi_news", row);
  assert.ok(
    prompt.startsWith(
      "You are given several news passages. Write a one-page summary of all news. \n\nNews:\nPassage 1:\n",
    ),
  );
  assert.ok(prompt.endsWith("\n\nNow, write a one-page summary of all the news.\n\nSummary:"));
  assert.ok(!prompt.includes("NEWLINE_CHAR"));
  assert.ok(prompt.includes("Nov. 28. (David M Warren / Staff Photographer)\n\nAbout 100 Occupy Philly"));
  assert.equal(restoreNewlines("multi_news", "a NEWLINE_CHAR NEWLINE_CHAR b"), "a\n\nb");
  assert.equal(maxNewTokens("multi_news"), 512);
  assert.equal(defaultMaxLength(8192, "multi_news"), 8192 - 512 - 32);
});

test("middle truncation keeps the first and last halves of the tokens", async () => {
  const rows = readDataset(LB, "multi_news");
  const row = rows.reduce((a, b) => (b.length > a.length ? b : a));
  const tokenized = await tokenizeWithEngine(buildPrompt("multi_news", row));
  const max = 1000;
  assert.ok(tokenized.tokens.length > max);
  const cut = truncateMiddle(tokenized, max);
  const full = tokenized.bytes.toString("utf8");
  // the instruction at the start and the question at the end survive, the middle is gone
  assert.ok(cut.startsWith("You are given several news passages."));
  assert.ok(cut.endsWith("Summary:"));
  assert.ok(cut.length < full.length / 2);
  const again = await tokenizeWithEngine(cut);
  assert.ok(Math.abs(again.tokens.length - max) <= 2, `${again.tokens.length} tokens after cutting to ${max}`);
  // a prompt within the limit is untouched
  assert.equal(truncateMiddle(tokenized, tokenized.tokens.length), full);
});

test("--datasets refuses unknown datasets, listing the valid ones", () => {
  assert.deepEqual(parseDatasets("multi_news,trec"), ["multi_news", "trec"]);
  assert.throws(
    () => parseDatasets("multinews"),
    /--datasets: unknown dataset 'multinews' \(valid: narrativeqa, .*repobench-p\)/,
  );
  assert.throws(() => readDataset(LB, "qasper"), /--data-dir: .*qasper\.jsonl not found/);
});
