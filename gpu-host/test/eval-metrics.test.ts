// Metrics on hand-written predictions whose scores are worked out by hand in the comments.
import assert from "node:assert/strict";
import { test } from "node:test";

import {
  answerWordScore,
  classificationScore,
  codeSimilarity,
  countScore,
  indelSimilarity,
  normalizeAnswer,
  qaF1,
  retrievalScore,
  rouge1Recall,
  rougeL,
  stringMatchAll,
  stringMatchPart,
} from "../src/eval/metrics.js";
import { postProcess, scoreSample } from "../src/eval/longbench.js";

const close = (a: number, b: number, what: string) => assert.ok(Math.abs(a - b) < 1e-9, `${what}: ${a} != ${b}`);

test("SQuAD normalisation: case, punctuation, articles, spaces", () => {
  assert.equal(normalizeAnswer("  The Cat's,   HAT!  "), "cats hat");
  assert.equal(normalizeAnswer("an apple a day"), "apple day");
  assert.equal(normalizeAnswer("theatre"), "theatre"); // 'the' only as a whole word
  assert.equal(normalizeAnswer("A-B"), "ab");
});

test("qa F1: overlap over normalised tokens", () => {
  // pred {cat, sat}, truth {cat, sat, down}: P 1, R 2/3, F1 0.8
  close(qaF1("the cat sat", "a cat sat down"), 0.8, "partial");
  close(qaF1("Paris.", "paris"), 1, "case and punctuation");
  close(qaF1("", "paris"), 0, "empty prediction");
  close(qaF1("the a an", "the"), 0, "only articles on both sides");
  // repeated tokens are clipped: pred {x, x}, truth {x}: same 1, P 1/2, R 1 → 2/3
  close(qaF1("x x", "x"), 2 / 3, "clipped counts");
});

test("ROUGE-L: sentence and summary level", () => {
  // one sentence: LCS "the cat on the mat" = 5 of 6 on both sides
  close(rougeL("the cat sat on the mat", "the cat lay on the mat"), 5 / 6, "one sentence");
  // reference sentences [a b c] [d e], candidate [a c] [d x e]: unions {a, c} and {d, e} → 4 / 5 both ways
  close(rougeL("a c. d x e", "a b c. d e"), 0.8, "summary level");
  close(rougeL("", "a b"), 0, "empty candidate");
  close(rougeL("x y", "a b"), 0, "no overlap");
});

test("classification: 1/k among the named labels, labels inside the truth not counted", () => {
  const classes = ["LOC", "NUM", "HUM"];
  close(classificationScore("LOC", "LOC", classes), 1, "exact");
  close(classificationScore("LOC or NUM", "LOC", classes), 0.5, "two labels named");
  close(classificationScore("HUM", "LOC", classes), 0, "wrong");
  close(classificationScore("Location", "Location", ["Location", "Loc"]), 1, "a label inside the truth is not a rival");
});

test("retrieval, count and code similarity", () => {
  close(retrievalScore("Paragraph 7", "Paragraph 7"), 1, "retrieval exact");
  close(retrievalScore("Paragraph 7 or Paragraph 12", "Paragraph 7"), 0.5, "retrieval split");
  close(retrievalScore("no idea", "Paragraph 7"), 0, "retrieval none");
  close(countScore("There are 12 unique, not 13", "12"), 0.5, "count");
  close(countScore("twelve", "12"), 0, "count without digits");
  close(indelSimilarity("abc", "abd"), 4 / 6, "indel");
  close(codeSimilarity("```python\n# the next line\nx = foo(1)\n```", "x = foo(1)"), 1, "fence and comment skipped");
  close(codeSimilarity("\n\ny = 2", "y = 2"), 1, "leading newlines dropped");
});

test("RULER string matching and needle scores", () => {
  close(stringMatchAll("The numbers are 123 and 456.", ["123", "456", "789"]), 2 / 3, "match all");
  close(stringMatchPart("The numbers are 123 and 456.", ["999", "456"]), 1, "match part");
  close(stringMatchAll("ABC-def", ["abc-DEF"]), 1, "case-insensitive");
  close(answerWordScore("eat a sandwich", "EAT... a Sandwich!"), 1, "needle words");
  close(answerWordScore("eat a sandwich and sit", "to eat a sandwich"), 3 / 5, "needle partial");
  close(rouge1Recall("a a b", "a b"), 2 / 3, "ROUGE-1 recall clips repeated words");
});

test("LongBench: first line only for few-shot sets, best over answers", () => {
  assert.equal(postProcess("trec", "\nLOC\nQuestion: what"), "LOC");
  assert.equal(postProcess("multi_news", "a\nb"), "a\nb");
  close(scoreSample("triviaqa", "Paris\nQuestion: next", ["London", "Paris"], null), 1, "best answer");
  close(scoreSample("hotpotqa", "Paris", ["paris france"], null), 2 / 3, "qa f1 via dataset");
});
