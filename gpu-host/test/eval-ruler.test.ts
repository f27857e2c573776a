// RULER generators: deterministic under a seed, answers recoverable from the text, lengths ±1 %.
import assert from "node:assert/strict";
import { test } from "node:test";

import { tokenizeWithEngine } from "../src/eval/engine-client.js";
import { haystackText, NOISE_TEXT } from "../src/eval/needle.js";
import { generateSample, type Haystacks, parseTasks, RULER_TASKS, sampleSeed } from "../src/eval/ruler.js";
import { ESSAYS } from "./eval-data.js";

let hay: Haystacks | undefined;
async function haystacks(): Promise<Haystacks> {
  hay ??= {
    noise: await tokenizeWithEngine(NOISE_TEXT.repeat(200)),
    essay: await tokenizeWithEngine(haystackText({ dir: ESSAYS }, 12000)),
  };
  return hay;
}
const count = async (t: string) => (await tokenizeWithEngine(t)).tokens.length;

test("every task: the length is within ±1 % of the target and the answers can be read off the text", async () => {
  const h = await haystacks();
  const target = 1024;
  for (const task of RULER_TASKS) {
    const s = await generateSample(task, target, sampleSeed(7, task, target, 0), h, count);
    assert.ok(Math.abs(s.tokens - target) <= target * 0.01, `${task}: ${s.tokens} tokens for ${target}`);
    assert.equal(await count(s.prompt), s.tokens, `${task}: reported length is the prompt's`);
    assert.ok(s.answers.length >= 1, task);
    const body = s.prompt.slice(0, s.prompt.lastIndexOf("<|im_end|>"));
    if (task.startsWith("niah")) {
      // each answer sits in a needle sentence whose key is asked for in the question
      const question = body.slice(body.lastIndexOf("\n"));
      for (const a of s.answers) {
        const m = new RegExp(`One of the special magic numbers for ([a-z]+-[a-z]+) is: ${a}\\.`).exec(body);
        assert.ok(m, `${task}: needle with ${a}`);
        assert.ok(question.includes(m[1]!), `${task}: key ${m[1]} asked for`);
      }
    } else if (task === "vt") {
      // the chain starts at the value in the question and every name is assigned along it
      const value = /assigned the value (\d+)/.exec(body)![1]!;
      let current = new RegExp(`VAR ([A-Z]{5}) = ${value}\\.`).exec(body)![1]!;
      const found = [current];
      for (
        let next = new RegExp(`VAR ([A-Z]{5}) = VAR ${current}\\.`).exec(body);
        next;
        next = new RegExp(`VAR ([A-Z]{5}) = VAR ${current}\\.`).exec(body)
      ) {
        current = next[1]!;
        found.push(current);
      }
      assert.deepEqual(found, s.answers);
    } else {
      // the answers are exactly the most frequent words of the list
      const text =
        task === "cwe"
          ? body.slice(body.indexOf("\n1. "), body.lastIndexOf("\nQuestion"))
          : body.slice(body.indexOf("coded words. ") + 13, body.lastIndexOf("\nQuestion"));
      const words =
        task === "cwe" ? [...text.matchAll(/\d+\. (\S+)/g)].map((m) => m[1]!) : text.split(/\s+/).filter(Boolean);
      const freq = new Map<string, number>();
      for (const w of words) freq.set(w, (freq.get(w) ?? 0) + 1);
      const k = s.answers.length;
      const minAnswer = Math.min(...s.answers.map((a) => freq.get(a) ?? 0));
      const others = [...freq.entries()].filter(([w]) => !s.answers.includes(w)).map(([, c]) => c);
      assert.equal(k, task === "cwe" ? 10 : 3);
      assert.ok(
        minAnswer > Math.max(0, ...others) || (task === "fwe" && minAnswer >= Math.max(0, ...others)),
        `${task}: answers are the top ${k}`,
      );
    }
  }
});

test("the same seed gives the same sample; another seed another one", async () => {
  const h = await haystacks();
  for (const task of ["niah_multikey_1", "vt", "fwe"] as const) {
    const a = await generateSample(task, 800, sampleSeed(1, task, 800, 3), h, count);
    const b = await generateSample(task, 800, sampleSeed(1, task, 800, 3), h, count);
    const c = await generateSample(task, 800, sampleSeed(2, task, 800, 3), h, count);
    assert.equal(a.prompt, b.prompt, task);
    assert.deepEqual(a.answers, b.answers, task);
    assert.notEqual(a.prompt, c.prompt, task);
  }
});

test("--tasks refuses unknown tasks, listing the valid ones", () => {
  assert.deepEqual(parseTasks("vt,cwe"), ["vt", "cwe"]);
  assert.throws(
    () => parseTasks("niah_single_9"),
    /--tasks: unknown task 'niah_single_9' \(valid: niah_single_1, .*fwe\)/,
  );
});
