// Scoring, re-implemented from the published definitions (no code copied):
// - needle: fraction of the answer's words found in the response, and ROUGE-1 recall;
// - RULER: string_match_all (share of the references found in the prediction) and
//   string_match_part (1 if any reference is found), case-insensitive, × 100 over samples;
// - LongBench v1: SQuAD-style normalised token F1 (qa), ROUGE-L F (Lin 2004, summary level:
//   union LCS over the reference sentences), classification (1/k when the truth is among the k
//   labels named), retrieval and count (share of the numbers in the answer that are right), code
//   similarity (normalised InDel similarity of the first non-comment line); a sample scores the
//   max over its reference answers, a dataset 100 × the mean over samples.

/** Lower-case words (letters and digits) of a text. */
export function words(s: string): string[] {
  return s
    .toLowerCase()
    .replace(/[^\p{L}\p{N}\s]/gu, " ")
    .split(/\s+/)
    .filter(Boolean);
}

/** Needle score: the fraction of the answer's distinct-position words present in the response (0–1). */
export function answerWordScore(answer: string, response: string): number {
  const expected = words(answer);
  if (expected.length === 0) return 0;
  const got = new Set(words(response));
  return expected.filter((w) => got.has(w)).length / expected.length;
}

function counts(xs: string[]): Map<string, number> {
  const m = new Map<string, number>();
  for (const x of xs) m.set(x, (m.get(x) ?? 0) + 1);
  return m;
}

function overlap(a: string[], b: string[]): number {
  const cb = counts(b);
  let n = 0;
  for (const [w, c] of counts(a)) n += Math.min(c, cb.get(w) ?? 0);
  return n;
}

/** ROUGE-1 recall: clipped unigram overlap / reference unigrams (lower-cased words). */
export function rouge1Recall(reference: string, candidate: string): number {
  const ref = words(reference);
  if (ref.length === 0) return 0;
  return overlap(ref, words(candidate)) / ref.length;
}

// ---------------------------------------------------------------- RULER

/** Share of the references found (case-insensitive substring) in the prediction, 0–1. */
export function stringMatchAll(prediction: string, references: string[]): number {
  if (references.length === 0) return 0;
  const p = prediction.toLowerCase();
  return references.filter((r) => p.includes(r.toLowerCase())).length / references.length;
}

/** 1 if any reference is found (case-insensitive substring) in the prediction, else 0. */
export function stringMatchPart(prediction: string, references: string[]): number {
  const p = prediction.toLowerCase();
  return references.some((r) => p.includes(r.toLowerCase())) ? 1 : 0;
}

// ---------------------------------------------------------------- LongBench

/** SQuAD normalisation: lower case, punctuation removed, articles a/an/the removed, spaces collapsed. */
export function normalizeAnswer(s: string): string {
  const lower = s.toLowerCase();
  const noPunct = lower.replace(/[!"#$%&'()*+,\-./:;<=>?@[\\\]^_`{|}~]/g, "");
  const noArticles = noPunct.replace(/\b(a|an|the)\b/g, " ");
  return noArticles.split(/\s+/).filter(Boolean).join(" ");
}

function f1(predTokens: string[], truthTokens: string[]): number {
  const same = overlap(predTokens, truthTokens);
  if (same === 0) return 0;
  const precision = same / predTokens.length;
  const recall = same / truthTokens.length;
  return (2 * precision * recall) / (precision + recall);
}

/** QA F1 over whitespace tokens of the normalised prediction and ground truth. */
export function qaF1(prediction: string, truth: string): number {
  const p = normalizeAnswer(prediction).split(" ").filter(Boolean);
  const t = normalizeAnswer(truth).split(" ").filter(Boolean);
  return f1(p, t);
}

function lcsTable(a: string[], b: string[]): number[][] {
  const t: number[][] = Array.from({ length: a.length + 1 }, () => new Array<number>(b.length + 1).fill(0));
  for (let i = 1; i <= a.length; i++) {
    for (let j = 1; j <= b.length; j++) {
      t[i]![j] = a[i - 1] === b[j - 1] ? t[i - 1]![j - 1]! + 1 : Math.max(t[i - 1]![j]!, t[i]![j - 1]!);
    }
  }
  return t;
}

/** Positions of `ref` on one longest common subsequence with `cand`. */
function lcsPositions(ref: string[], cand: string[]): number[] {
  const t = lcsTable(ref, cand);
  const out: number[] = [];
  let i = ref.length;
  let j = cand.length;
  while (i > 0 && j > 0) {
    if (ref[i - 1] === cand[j - 1]) {
      out.push(i - 1);
      i--;
      j--;
    } else if (t[i - 1]![j]! >= t[i]![j - 1]!) i--;
    else j--;
  }
  return out;
}

/** Sentences (split at '.') as lists of whitespace tokens, empty ones dropped. */
function sentences(s: string): string[][] {
  return s
    .split(".")
    .map((x) => x.split(/\s+/).filter(Boolean))
    .filter((x) => x.length > 0);
}

/**
 * ROUGE-L F1, summary level (Lin 2004 §3.2): for every reference sentence, the union of its words
 * on a longest common subsequence with each candidate sentence; R = Σ|union| / reference words,
 * P = Σ|union| / candidate words, F = 2PR / (P + R). Tokens are whitespace-separated, case kept.
 */
export function rougeL(candidate: string, reference: string): number {
  const refS = sentences(reference);
  const candS = sentences(candidate);
  const m = refS.reduce((a, s) => a + s.length, 0);
  const n = candS.reduce((a, s) => a + s.length, 0);
  if (m === 0 || n === 0) return 0;
  let hits = 0;
  for (const r of refS) {
    const union = new Set<number>();
    for (const c of candS) for (const p of lcsPositions(r, c)) union.add(p);
    hits += union.size;
  }
  const recall = hits / m;
  const precision = hits / n;
  return hits === 0 ? 0 : (2 * precision * recall) / (precision + recall);
}

/** 1/k if the truth is among the k class labels named in the prediction (labels inside the truth not counted). */
export function classificationScore(prediction: string, truth: string, allClasses: string[]): number {
  const named = allClasses.filter((c) => prediction.includes(c)).filter((c) => !(truth.includes(c) && c !== truth));
  return named.includes(truth) ? 1 / named.length : 0;
}

/** Share of the numbers in the prediction equal to the paragraph number in the truth ("Paragraph 7"). */
export function retrievalScore(prediction: string, truth: string): number {
  const id = /Paragraph (\d+)/.exec(truth)?.[1];
  const numbers = prediction.match(/\d+/g) ?? [];
  if (id === undefined || numbers.length === 0) return 0;
  return numbers.filter((x) => x === id).length / numbers.length;
}

/** Share of the numbers in the prediction equal to the true count. */
export function countScore(prediction: string, truth: string): number {
  const numbers = prediction.match(/\d+/g) ?? [];
  if (numbers.length === 0) return 0;
  return numbers.filter((x) => x === truth.trim()).length / numbers.length;
}

/** 2·LCS(chars) / (|a| + |b|): the InDel-normalised similarity of two strings, 0–1. */
export function indelSimilarity(a: string, b: string): number {
  if (a.length + b.length === 0) return 1;
  let prev = new Array<number>(b.length + 1).fill(0);
  for (let i = 1; i <= a.length; i++) {
    const cur = new Array<number>(b.length + 1).fill(0);
    for (let j = 1; j <= b.length; j++) {
      cur[j] = a[i - 1] === b[j - 1] ? prev[j - 1]! + 1 : Math.max(prev[j]!, cur[j - 1]!);
    }
    prev = cur;
  }
  return (2 * prev[b.length]!) / (a.length + b.length);
}

/**
 * Code similarity: the prediction's first line (leading newlines dropped) holding no comment or
 * fence marker ('`', '#', '//') against the true next line; the whole prediction if none qualifies.
 */
export function codeSimilarity(prediction: string, truth: string): number {
  const lines = prediction.replace(/^\n+/, "").split("\n");
  const line = lines.find((l) => !l.includes("`") && !l.includes("#") && !l.includes("//")) ?? prediction;
  return indelSimilarity(line, truth);
}
