import assert from "node:assert/strict";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";

import {
  answerWordRecall,
  DEFAULT_NEEDLE,
  directoryHaystack,
  generatedFiller,
  insertNeedle,
} from "../src/eval/haystack.js";

test("generated filler is deterministic for a seed, long enough, and made of sentences", () => {
  const a = generatedFiller(5000, 7);
  assert.equal(a, generatedFiller(5000, 7));
  assert.notEqual(a, generatedFiller(5000, 8));
  assert.ok(a.length >= 5000);
  assert.ok(a.endsWith("."));
});

test("the needle lands at the requested depth, moved back to a sentence start", () => {
  const hay = generatedFiller(10000, 3);
  for (const depth of [0, 11, 50, 89, 100]) {
    const text = insertNeedle(hay, DEFAULT_NEEDLE, depth);
    const at = text.indexOf(DEFAULT_NEEDLE);
    assert.ok(at >= 0, `needle missing at depth ${depth}`);
    assert.ok(at <= Math.floor((hay.length * depth) / 100) + 1, "never after the requested depth");
    if (depth > 0 && depth < 100) {
      assert.ok(at > (hay.length * depth) / 100 - 120, "close to the requested depth (one sentence at most)");
      assert.match(text.slice(0, at), /[.!?] $/, "the needle follows a sentence end");
    }
    assert.equal(text.replace(` ${DEFAULT_NEEDLE}`, "").replace(`${DEFAULT_NEEDLE} `, "").length, hay.trimEnd().length);
  }
  assert.equal(insertNeedle(hay, DEFAULT_NEEDLE, 0).indexOf(DEFAULT_NEEDLE), 0);
  assert.throws(() => insertNeedle(hay, DEFAULT_NEEDLE, 101), /depth: 101 is outside 0–100/);
});

test("a directory haystack concatenates files in sorted order and repeats to length", () => {
  const dir = mkdtempSync(join(tmpdir(), "pkv-hay-"));
  writeFileSync(join(dir, "b.txt"), "Second file.");
  writeFileSync(join(dir, "a.txt"), "First file.");
  const text = directoryHaystack(dir, 60);
  assert.equal(text.length, 60);
  assert.ok(text.startsWith("First file.\n\nSecond file.\n\nFirst file."));
  const empty = mkdtempSync(join(tmpdir(), "pkv-hay-empty-"));
  assert.throws(() => directoryHaystack(empty, 10), /--haystack-dir: no text found/);
});

test("answer word recall counts the answer's words found in the response", () => {
  assert.equal(answerWordRecall("eat a sandwich in Dolores Park", "Eat a sandwich, in Dolores park!"), 1);
  assert.equal(answerWordRecall("eat a sandwich in Dolores Park", "Go to Dolores Park."), 2 / 6);
  assert.equal(answerWordRecall("eat a sandwich", "nothing relevant"), 0);
  assert.equal(answerWordRecall("", "anything"), 0);
});
