// Needle placement: at the token depth asked for, moved back to a sentence end; flag parsing.
import assert from "node:assert/strict";
import { resolve } from "node:path";
import { test } from "node:test";

import { sliceTokens, type Tokenized, tokenizeWithEngine } from "../src/eval/engine-client.js";
import { haystackText, parseDepths, parseLengths, placeNeedle } from "../src/eval/needle.js";
import { ESSAYS } from "./eval-data.js";

/** A word-level tokenization of `text` (each token a word with its leading space). */
function wordTokens(text: string): Tokenized {
  const bytes = Buffer.from(text, "utf8");
  const offsets: number[] = [];
  const re = /\s*\S+/g;
  for (let m = re.exec(text); m; m = re.exec(text)) offsets.push(Buffer.byteLength(text.slice(0, m.index)));
  return { tokens: offsets.map((_, i) => i), offsets, bytes };
}

const NEEDLE = "The needle is here.";

test("the needle goes at the token depth, moved back to the previous sentence end", () => {
  // 10 sentences of 5 words: sentence ends after tokens 5, 10, 15, …
  const text = Array.from({ length: 10 }, (_, i) => `Sentence ${i} has some words.`).join(" ");
  const hay = wordTokens(text);
  assert.equal(hay.tokens.length, 50);
  for (const depth of [0, 10, 33, 50, 77, 99]) {
    const p = placeNeedle(hay, 54, NEEDLE, 4, depth); // 54 − 4 needle tokens → all 50 haystack tokens
    assert.equal(p.haystackTokens, 50);
    const target = Math.floor((50 * depth) / 100);
    assert.equal(p.tokensBefore, Math.floor(target / 5) * 5, `depth ${depth}`);
    const before = p.context.slice(0, p.context.indexOf(NEEDLE)).trimEnd();
    assert.ok(before === "" || before.endsWith("."), `depth ${depth}: '${before.slice(-20)}'`);
    assert.equal(p.context.replace(` ${NEEDLE}`, "").replace(`${NEEDLE} `, ""), text, "nothing of the haystack lost");
  }
  const end = placeNeedle(hay, 54, NEEDLE, 4, 100);
  assert.ok(end.context.endsWith(` ${NEEDLE}`));
  // the context is cut to make room for the needle
  assert.equal(placeNeedle(hay, 24, NEEDLE, 4, 50).haystackTokens, 20);
  assert.throws(() => placeNeedle(hay, 54, NEEDLE, 4, 101), /--depths: 101 is outside 0–100/);
});

test("on the essays with the model's tokenizer the needle lands at its depth, after a sentence", async () => {
  const hay = await tokenizeWithEngine(haystackText({ dir: ESSAYS }, 20000));
  const n = 3000;
  for (const depth of [0, 25, 50, 75, 100]) {
    const p = placeNeedle(hay, n, NEEDLE, 6, depth);
    assert.equal(p.haystackTokens, n - 6);
    const target = depth === 100 ? p.haystackTokens : Math.floor((p.haystackTokens * depth) / 100);
    assert.ok(
      p.tokensBefore <= target && target - p.tokensBefore < 200,
      `depth ${depth}: needle at token ${p.tokensBefore}, target ${target}`,
    );
    // at 100 % the needle simply ends the context; elsewhere it starts a sentence
    if (p.tokensBefore > 0 && depth < 100)
      assert.match(sliceTokens(hay, p.tokensBefore - 1, p.tokensBefore), /[.!?]["')\]]?\s*$/);
    // the real token count of the context is the haystack plus the needle, give or take the joins
    const counted = (await tokenizeWithEngine(p.context)).tokens.length;
    assert.ok(Math.abs(counted - n) <= 4, `depth ${depth}: ${counted} tokens for ${n}`);
  }
});

test("--lengths and --depths parse lists and ranges and refuse bad values", () => {
  assert.deepEqual(parseLengths("1000:3000:1000", 8192, 300), [1000, 2000, 3000]);
  assert.deepEqual(parseLengths("1024,2048", 8192, 300), [1024, 2048]);
  assert.throws(() => parseLengths("9000", 8192, 300), /--lengths: 9000 is outside \[300, 8192\]/);
  assert.throws(() => parseLengths("abc", 8192, 300), /--lengths: 'abc' is not an integer/);
  assert.deepEqual(parseDepths("11"), [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]);
  assert.deepEqual(parseDepths("10"), [0, 11, 22, 33, 44, 56, 67, 78, 89, 100]);
  assert.deepEqual(parseDepths("0,50,100"), [0, 50, 100]);
  assert.throws(() => parseDepths("0,150"), /--depths: '150' is outside 0–100/);
  assert.throws(() => parseDepths("-5,10"), /outside 0–100/);
});

test("a haystack directory without files is refused", async () => {
  const { mkdtempSync } = await import("node:fs");
  const { tmpdir } = await import("node:os");
  const empty = mkdtempSync(resolve(tmpdir(), "pkv-empty-"));
  assert.throws(() => haystackText({ dir: empty }, 1000), /--haystack-dir: .* holds no files/);
  assert.throws(() => haystackText({ dir: resolve(empty, "nope") }, 1000), /--haystack-dir: cannot read directory/);
});
