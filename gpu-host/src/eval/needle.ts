// `pkv eval needle`: needle in a haystack as in the published set-up (docs/EVAL.md). The haystack
// (text files concatenated in sorted order and repeated, or RULER's noise sentences) is cut to
// `length − 200` tokens with the needle, the needle goes in at a token depth moved back to the
// previous sentence end, the question follows the document. Score: fraction of the answer's
// words in the response, ROUGE-1 recall beside it.
import { readdirSync, statSync } from "node:fs";

import { directoryHaystack } from "./haystack.js";
import { type Tokenized, sliceTokens } from "./engine-client.js";

export const NEEDLE_DEFAULTS = {
  needle: "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.",
  question: "The best thing to do in San Francisco is: ",
  answer: "eat a sandwich and sit in Dolores Park on a sunny day.",
};

/** Tokens reserved for the question, the chat template and the answer (the published set-up's 200). */
export const RESERVED_TOKENS = 200;
export const NEEDLE_MAX_NEW_TOKENS = 30;

/** RULER's noise haystack sentence group. */
export const NOISE_TEXT = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";

/** The raw haystack text: a directory's text files (sorted, concatenated, repeated) or noise, at least `chars` long. */
export function haystackText(source: { dir?: string; noise?: boolean }, chars: number): string {
  if (source.noise) return NOISE_TEXT.repeat(Math.ceil(chars / NOISE_TEXT.length));
  const dir = source.dir!;
  let files: string[];
  try {
    files = readdirSync(dir).filter((f) => statSync(`${dir}/${f}`).isFile());
  } catch {
    throw new Error(`--haystack-dir: cannot read directory '${dir}'`);
  }
  if (files.length === 0)
    throw new Error(`--haystack-dir: '${dir}' holds no files (give a directory of .txt files, or --haystack noise)`);
  return directoryHaystack(dir, chars);
}

/** Does a token's text end a sentence ('.', '!' or '?', possibly followed by a quote or bracket and spaces)? */
export function endsSentence(piece: string): boolean {
  return /[.!?]["')\]]?\s*$/.test(piece);
}

export interface PlacedNeedle {
  /** the context: haystack tokens with the needle inserted */
  context: string;
  /** haystack tokens before the needle */
  tokensBefore: number;
  /** haystack tokens used in all */
  haystackTokens: number;
}

/**
 * Cuts the tokenized haystack to `contextTokens − needleTokens` tokens and inserts the needle at
 * `depth` % of them, moved back to just after the previous sentence end (depth 100: at the end).
 */
export function placeNeedle(
  hay: Tokenized,
  contextTokens: number,
  needle: string,
  needleTokens: number,
  depth: number,
): PlacedNeedle {
  if (!(depth >= 0 && depth <= 100)) throw new Error(`--depths: ${depth} is outside 0–100`);
  const n = Math.min(hay.tokens.length, contextTokens - needleTokens);
  if (n <= 0) throw new Error(`--lengths: ${contextTokens} tokens leave no room for the haystack`);
  let at = depth >= 100 ? n : Math.floor((n * depth) / 100);
  if (at < n) while (at > 0 && !endsSentence(sliceTokens(hay, at - 1, at))) at--;
  const before = sliceTokens(hay, 0, at).trimEnd();
  const after = sliceTokens(hay, at, n).trimStart();
  const context = [before, needle, after].filter((s) => s.length > 0).join(" ");
  return { context, tokensBefore: at, haystackTokens: n };
}

/**
 * The prompt: the document, a blank line, then the question, a sentence the model completes.
 * With --chat-template the engine wraps it as a user turn instead (docs/EVAL.md).
 */
export function needlePrompt(context: string, question: string): string {
  return `${context}\n\n${question}`;
}

/** ChatML (SmolLM2, Qwen): one user turn, the assistant turn opened, optionally started with `prefix`. */
export function chatml(user: string, prefix = ""): string {
  return `<|im_start|>user\n${user}<|im_end|>\n<|im_start|>assistant\n${prefix}`;
}

/** `--lengths`: a comma list or start:stop:step (stop included). */
export function parseLengths(value: string, maxTokens: number, minTokens: number): number[] {
  let out: number[];
  const range = /^(\d+):(\d+):(\d+)$/.exec(value.trim());
  if (range) {
    const [a, b, s] = [Number(range[1]), Number(range[2]), Number(range[3])];
    if (s <= 0) throw new Error(`--lengths: step must be > 0 in '${value}'`);
    if (b < a) throw new Error(`--lengths: stop ${b} is below start ${a} in '${value}'`);
    out = [];
    for (let x = a; x <= b; x += s) out.push(x);
  } else {
    out = value.split(",").map((v) => {
      const n = Number(v.trim());
      if (!Number.isInteger(n))
        throw new Error(`--lengths: '${v}' is not an integer (give a list like 1024,2048 or start:stop:step)`);
      return n;
    });
  }
  for (const n of out) {
    if (n < minTokens || n > maxTokens)
      throw new Error(
        `--lengths: ${n} is outside [${minTokens}, ${maxTokens}] tokens (the model's context is ${maxTokens})`,
      );
  }
  return [...new Set(out)];
}

/** `--depths`: a count (evenly spaced 0…100, as the published grid: 11 → 0, 10, …, 100 rounded) or a comma list. */
export function parseDepths(value: string): number[] {
  const v = value.trim();
  if (/^\d+$/.test(v) && !v.includes(",")) {
    const count = Number(v);
    if (count < 1 || count > 101)
      throw new Error(`--depths: a count must be in [1, 101], got ${count} (or give a list like 0,50,100)`);
    if (count === 1) return [50];
    return [...new Set(Array.from({ length: count }, (_, i) => Math.round((i * 100) / (count - 1))))];
  }
  return v.split(",").map((x) => {
    const d = Number(x.trim());
    if (!Number.isFinite(d) || d < 0 || d > 100) throw new Error(`--depths: '${x}' is outside 0–100`);
    return d;
  });
}
