// Needle-in-a-haystack prompts: a haystack of filler text (generated here, or text files from a
// directory concatenated in sorted order and repeated to length) with a needle sentence inserted
// at a depth, moved back to the previous sentence end so no sentence is cut.
import { readdirSync, readFileSync, statSync } from "node:fs";
import { join, resolve } from "node:path";

import { repoRoot } from "../engine/engine-path.js";

/** The needle-haystack essays beside the repository (../shared/data/haystack/paul_graham_essays). */
export function essaysDir(): string {
  return resolve(repoRoot(), "..", "shared", "data", "haystack", "paul_graham_essays");
}

export const DEFAULT_NEEDLE =
  "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.";
export const DEFAULT_QUESTION = "What is the best thing to do in San Francisco?";

const SUBJECTS = [
  "The committee",
  "A young engineer",
  "The old harbour",
  "Every winter the village",
  "The museum",
  "Our neighbour",
  "The river",
  "A quiet library",
  "The orchestra",
  "The baker on the corner",
  "The research team",
  "A travelling merchant",
];
const VERBS = [
  "described",
  "remembered",
  "questioned",
  "rebuilt",
  "measured",
  "painted",
  "discussed",
  "ignored",
  "celebrated",
  "studied",
  "repaired",
  "catalogued",
];
const OBJECTS = [
  "the northern bridge",
  "a forgotten map",
  "the annual harvest",
  "an unusual clock",
  "the tidal records",
  "a box of letters",
  "the railway timetable",
  "the weather of the valley",
  "a collection of shells",
  "the recipe for rye bread",
  "the price of copper",
  "a set of wooden chairs",
];
const TAILS = [
  "before the first snow.",
  "with great patience.",
  "for the third time that year.",
  "while the lamps were lit.",
  "as the market opened.",
  "without telling anyone.",
  "in the spring of that year.",
  "because nobody else would.",
  "after a long discussion.",
  "under a grey sky.",
];

/** Deterministic pseudo-random generator (mulberry32), so the same seed gives the same text. */
export function seededRandom(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Filler prose of at least `chars` characters made of simple, unrelated sentences. */
export function generatedFiller(chars: number, seed = 1): string {
  const next = seededRandom(seed);
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(next() * xs.length)] as T;
  const out: string[] = [];
  let length = 0;
  while (length < chars) {
    const sentence = `${pick(SUBJECTS)} ${pick(VERBS)} ${pick(OBJECTS)} ${pick(TAILS)}`;
    out.push(sentence);
    length += sentence.length + 1;
  }
  return out.join(" ");
}

/** Text files of a directory concatenated in sorted order, repeated until `chars` long. */
export function directoryHaystack(dir: string, chars: number): string {
  const files = readdirSync(dir)
    .filter((f) => statSync(join(dir, f)).isFile())
    .sort();
  const text = files.map((f) => readFileSync(join(dir, f), "utf8")).join("\n\n");
  if (text.trim().length === 0) throw new Error(`--haystack-dir: no text found in '${dir}'`);
  let out = text;
  while (out.length < chars) out += `\n\n${text}`;
  return out.slice(0, chars);
}

/**
 * Insert `needle` at `depthPercent` (0–100) of `haystack`, moved back to the previous sentence
 * end ('.', '!' or '?' followed by whitespace) so the needle starts a sentence.
 */
export function insertNeedle(haystack: string, needle: string, depthPercent: number): string {
  if (!(depthPercent >= 0 && depthPercent <= 100)) throw new Error(`depth: ${depthPercent} is outside 0–100`);
  let at = Math.floor((haystack.length * depthPercent) / 100);
  if (at >= haystack.length) return `${haystack.trimEnd()} ${needle}`;
  while (at > 0 && !(/[.!?]/.test(haystack[at - 1] ?? "") && /\s/.test(haystack[at] ?? ""))) at--;
  const before = haystack.slice(0, at).trimEnd();
  const after = haystack.slice(at).trimStart();
  return before.length === 0 ? `${needle} ${after}` : `${before} ${needle} ${after}`;
}

/** Fraction of the answer's words found in the response (case- and punctuation-insensitive). */
export function answerWordRecall(answer: string, response: string): number {
  const words = (s: string) =>
    s
      .toLowerCase()
      .replace(/[^a-z0-9\s]/g, " ")
      .split(/\s+/)
      .filter(Boolean);
  const expected = words(answer);
  const got = new Set(words(response));
  if (expected.length === 0) return 0;
  return expected.filter((w) => got.has(w)).length / expected.length;
}
