// RULER's synthetic tasks, generated here from a seed (our own text and word lists, following the
// published task definitions): needle retrieval (single with noise / essay haystacks, multikey,
// multivalue, multiquery), variable tracking, common- and frequent-words extraction. Each sample
// is sized to a target length in tokens (the whole prompt as sent, chat template included).
import { chatml, endsSentence } from "./needle.js";
import type { Tokenized } from "./engine-client.js";
import { sliceTokens } from "./engine-client.js";
import { seededRandom } from "./haystack.js";

export { seededRandom };

export const RULER_TASKS = [
  "niah_single_1",
  "niah_single_2",
  "niah_multikey_1",
  "niah_multivalue",
  "niah_multiquery",
  "vt",
  "cwe",
  "fwe",
] as const;
export type RulerTask = (typeof RULER_TASKS)[number];

/** Tasks whose haystack is the essays (the others use noise sentences or word lists). */
export const ESSAY_TASKS = new Set<RulerTask>([
  "niah_single_2",
  "niah_multikey_1",
  "niah_multivalue",
  "niah_multiquery",
]);

export function parseTasks(value: string | undefined): RulerTask[] {
  if (value === undefined) return [...RULER_TASKS];
  const ts = value
    .split(",")
    .map((t) => t.trim())
    .filter(Boolean);
  for (const t of ts) {
    if (!(RULER_TASKS as readonly string[]).includes(t))
      throw new Error(`--tasks: unknown task '${t}' (valid: ${RULER_TASKS.join(", ")})`);
  }
  if (ts.length === 0) throw new Error(`--tasks: empty list (valid: ${RULER_TASKS.join(", ")})`);
  return [...new Set(ts)] as RulerTask[];
}

function hashString(s: string): number {
  let h = 2166136261;
  for (let i = 0; i < s.length; i++) h = Math.imul(h ^ s.charCodeAt(i), 16777619);
  return h >>> 0;
}

const ADJECTIVES = [
  "amber",
  "brave",
  "calm",
  "dusty",
  "eager",
  "faint",
  "gentle",
  "hollow",
  "icy",
  "jolly",
  "keen",
  "lively",
  "mellow",
  "narrow",
  "odd",
  "polite",
  "quiet",
  "rough",
  "sharp",
  "tidy",
  "upset",
  "vivid",
  "wary",
  "young",
  "zealous",
  "bitter",
  "clever",
  "damp",
  "early",
  "fancy",
  "giant",
  "hasty",
  "itchy",
  "jumpy",
  "lazy",
  "misty",
  "noisy",
  "plain",
  "rapid",
  "silly",
];
const NOUNS = [
  "anchor",
  "basket",
  "candle",
  "desk",
  "engine",
  "feather",
  "garden",
  "hammer",
  "island",
  "jacket",
  "kettle",
  "ladder",
  "marble",
  "needle",
  "orchard",
  "pillow",
  "quarry",
  "river",
  "saddle",
  "tunnel",
  "umbrella",
  "valley",
  "wagon",
  "yard",
  "zipper",
  "bottle",
  "cabin",
  "drum",
  "fence",
  "glove",
  "harbor",
  "jewel",
  "kitten",
  "lantern",
  "mirror",
  "napkin",
  "oven",
  "pepper",
  "rocket",
  "spoon",
];

const SYLLABLES = [
  "ba",
  "ko",
  "mi",
  "tu",
  "re",
  "sa",
  "lo",
  "ni",
  "ve",
  "da",
  "pu",
  "ga",
  "fi",
  "zo",
  "he",
  "ru",
  "ta",
  "mo",
  "li",
  "ke",
];

export interface RulerSample {
  task: RulerTask;
  /** the whole prompt as sent to the engine (ChatML, answer prefix included) */
  prompt: string;
  /** every one must appear in the answer (string_match_all) */
  answers: string[];
  /** tokens of the prompt as measured by the tokenizer */
  tokens: number;
  maxNewTokens: number;
}

type Rng = () => number;
const pick = <T>(rng: Rng, xs: readonly T[]): T => xs[Math.floor(rng() * xs.length)]!;
const int = (rng: Rng, lo: number, hi: number) => lo + Math.floor(rng() * (hi - lo + 1));

function distinct<T>(rng: Rng, n: number, make: (r: Rng) => T): T[] {
  const out = new Set<T>();
  for (let tries = 0; out.size < n && tries < n * 1000; tries++) out.add(make(rng));
  return [...out];
}

const keyWord = (rng: Rng) => `${pick(rng, ADJECTIVES)}-${pick(rng, NOUNS)}`;
const magicNumber = (rng: Rng) => String(int(rng, 1_000_000, 9_999_999));
const varName = (rng: Rng) =>
  Array.from({ length: 5 }, () => String.fromCharCode(65 + Math.floor(rng() * 26))).join("");
const pseudoWord = (rng: Rng) => Array.from({ length: int(rng, 2, 3) }, () => pick(rng, SYLLABLES)).join("");
const codedWord = (rng: Rng) =>
  Array.from({ length: int(rng, 3, 6) }, () => String.fromCharCode(97 + Math.floor(rng() * 26))).join("");

function shuffle<T>(rng: Rng, xs: T[]): T[] {
  for (let i = xs.length - 1; i > 0; i--) {
    const j = Math.floor(rng() * (i + 1));
    [xs[i], xs[j]] = [xs[j]!, xs[i]!];
  }
  return xs;
}

/** The first `n` haystack tokens, cut back to a sentence end, with `inserts` put at sentence ends at their relative depths (0–1, in order). */
function haystackWith(hay: Tokenized, n: number, inserts: { depth: number; text: string }[]): string {
  let end = Math.min(n, hay.tokens.length);
  while (end > 1 && !endsSentence(sliceTokens(hay, end - 1, end))) end--;
  const cuts = inserts.map((x) => {
    let at = Math.floor(end * x.depth);
    while (at > 0 && !endsSentence(sliceTokens(hay, at - 1, at))) at--;
    return at;
  });
  const parts: string[] = [];
  let from = 0;
  inserts.forEach((x, i) => {
    const at = Math.max(from, cuts[i]!);
    parts.push(sliceTokens(hay, from, at).trim(), x.text);
    from = at;
  });
  parts.push(sliceTokens(hay, from, end).trim());
  return parts.filter((p) => p.length > 0).join(" ");
}

/** A generated sample at one size (haystack tokens, or list items for the word tasks). */
interface Built {
  user: string;
  prefix: string;
  answers: string[];
  maxNewTokens: number;
}

export interface Haystacks {
  noise: Tokenized;
  essay?: Tokenized;
}

const NIAH_INSTRUCTION =
  "Some special magic numbers are hidden within the following text. Make sure to memorize it. I will quiz you about the numbers afterwards.";
const needleSentence = (key: string, value: string) => `One of the special magic numbers for ${key} is: ${value}.`;

function joinKeys(keys: string[]): string {
  return keys.length === 1 ? keys[0]! : `${keys.slice(0, -1).join(", ")} and ${keys[keys.length - 1]}`;
}

/** The builder of one sample: given a size, the same seed always gives the same text. */
function builder(task: RulerTask, seed: number, hay: Haystacks): (size: number) => Built {
  return (size: number) => {
    const rng = seededRandom(seed);
    if (task.startsWith("niah")) {
      const nNeedles = task === "niah_single_1" || task === "niah_single_2" ? 1 : 4;
      const keys = distinct(rng, task === "niah_multivalue" ? 1 : nNeedles, keyWord);
      const values = distinct(rng, nNeedles, magicNumber);
      const needles = values.map((v, i) => needleSentence(keys[task === "niah_multivalue" ? 0 : i]!, v));
      // multikey: the first needle is asked for, the others are distractors with other keys
      const query = task === "niah_multiquery" ? keys : [keys[0]!];
      const answers = task === "niah_multiquery" || task === "niah_multivalue" ? values : [values[0]!];
      const depths = needles.map(() => rng()).sort((a, b) => a - b);
      const order = shuffle(
        rng,
        needles.map((_, i) => i),
      );
      const source = task === "niah_single_1" ? hay.noise : hay.essay!;
      const context = haystackWith(
        source,
        size,
        depths.map((d, i) => ({ depth: d, text: needles[order[i]!]! })),
      );
      const q = joinKeys(query);
      return {
        user: `${NIAH_INSTRUCTION}\n${context}\nWhat are all the special magic numbers for ${q} mentioned in the provided text?`,
        prefix: `The special magic numbers for ${q} mentioned in the provided text are`,
        answers,
        maxNewTokens: 128,
      };
    }
    if (task === "vt") {
      const names = distinct(rng, 5, varName);
      const value = String(int(rng, 10000, 99999));
      const chain = names.map((n, i) => (i === 0 ? `VAR ${n} = ${value}.` : `VAR ${n} = VAR ${names[i - 1]}.`));
      const depths = chain.map(() => rng()).sort((a, b) => a - b);
      const context = haystackWith(
        hay.noise,
        size,
        depths.map((d, i) => ({ depth: d, text: chain[i]! })),
      );
      return {
        user: `Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n${context}\nQuestion: Find all variables that are assigned the value ${value} in the text above.`,
        prefix: `Answer: According to the chain(s) of variable assignment in the text above, ${names.length} variables are assigned the value ${value}, they are: `,
        answers: names,
        maxNewTokens: 30,
      };
    }
    if (task === "cwe") {
      // 10 common words, each many times; enough rare words (3 times each) to reach the size
      const vocabulary = distinct(rng, 10 + Math.ceil(size / 3), pseudoWord);
      const common = vocabulary.slice(0, 10);
      const rare = vocabulary.slice(10, 10 + Math.max(0, Math.floor((size - 10 * commonFrequency(size)) / 3)));
      const list = shuffle(rng, [
        ...common.flatMap((w) => Array<string>(commonFrequency(size)).fill(w)),
        ...rare.flatMap((w) => [w, w, w]),
      ]);
      const context = list.map((w, i) => `${i + 1}. ${w}`).join(" ");
      return {
        user: `Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that appear most often.\n${context}\nQuestion: What are the 10 most common words in the above list?`,
        prefix: "Answer: The top 10 words that appear most often in the list are:",
        answers: common,
        maxNewTokens: 120,
      };
    }
    // fwe: coded words drawn from a Zipf distribution (exponent 2); the three most frequent are the answer
    const vocabulary = distinct(rng, 200, codedWord);
    const weights = vocabulary.map((_, k) => 1 / (k + 1) ** 2);
    const sum = weights.reduce((a, b) => a + b, 0);
    const cdf: number[] = [];
    let acc = 0;
    for (const w of weights) {
      acc += w / sum;
      cdf.push(acc);
    }
    const text: string[] = [];
    const count = new Map<string, number>();
    for (let i = 0; i < size; i++) {
      const u = rng();
      const w =
        vocabulary[
          Math.min(
            vocabulary.length - 1,
            cdf.findIndex((c) => u <= c),
          )
        ]!;
      text.push(w);
      count.set(w, (count.get(w) ?? 0) + 1);
    }
    const top = [...count.entries()]
      .sort((a, b) => b[1] - a[1] || vocabulary.indexOf(a[0]) - vocabulary.indexOf(b[0]))
      .slice(0, 3)
      .map(([w]) => w);
    return {
      user: `Read the following coded text and track the frequency of each coded word. Find the three most frequently appeared coded words. ${text.join(" ")}\nQuestion: Do not provide any explanation. What are the three most frequently appeared words in the above coded text?`,
      prefix: "Answer: According to the coded text above, the three most frequently appeared words are:",
      answers: top,
      maxNewTokens: 50,
    };
  };
}

/** How often each common word appears in cwe: 30 as published at long lengths, fewer when the list is short. */
function commonFrequency(items: number): number {
  return Math.max(4, Math.min(30, Math.floor((items * 0.3) / 10)));
}

/** Seed of one sample: the run's seed, the task, the length and the index. */
export function sampleSeed(seed: number, task: RulerTask, length: number, index: number): number {
  return hashString(`${seed}|${task}|${length}|${index}`);
}

/**
 * Generates one sample of `targetTokens` (±1 %): sizes the haystack by secant steps on the
 * measured token count of the whole prompt (chat template and answer prefix included).
 */
export async function generateSample(
  task: RulerTask,
  targetTokens: number,
  seed: number,
  hay: Haystacks,
  countTokens: (text: string) => Promise<number>,
): Promise<RulerSample> {
  if (ESSAY_TASKS.has(task) && !hay.essay) throw new Error(`--haystack-dir: task ${task} needs the essay haystack`);
  const build = builder(task, seed, hay);
  const render = (b: Built) => chatml(b.user, b.prefix);
  const wordTask = task === "cwe" || task === "fwe";
  // first guess: word lists take ~3 tokens per item, haystacks 1 token per token
  let size = Math.max(10, Math.floor(wordTask ? targetTokens / (task === "cwe" ? 5 : 3) : targetTokens - 150));
  let built = build(size);
  let tokens = await countTokens(render(built));
  let prev: { size: number; tokens: number } | undefined;
  for (let step = 0; step < 8 && Math.abs(tokens - targetTokens) > targetTokens * 0.005; step++) {
    const slope =
      prev && prev.size !== size
        ? (tokens - prev.tokens) / (size - prev.size)
        : wordTask
          ? task === "cwe"
            ? 5
            : 2
          : 1;
    prev = { size, tokens };
    size = Math.max(10, Math.round(size + (targetTokens - tokens) / Math.max(0.1, slope)));
    if (size === prev.size) size += targetTokens > tokens ? 1 : -1;
    built = build(size);
    tokens = await countTokens(render(built));
  }
  return { task, prompt: render(built), answers: built.answers, tokens, maxNewTokens: built.maxNewTokens };
}
