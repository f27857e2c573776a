// LongBench v1 (English and code sets): prompt templates, max new tokens, chat-template rules,
// middle truncation and metrics, re-typed from the benchmark's published definitions.
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";

import type { Tokenized } from "./engine-client.js";
import { sliceTokens } from "./engine-client.js";
import { classificationScore, codeSimilarity, countScore, qaF1, retrievalScore, rougeL } from "./metrics.js";

type Metric = "qa_f1" | "rouge_l" | "classification" | "retrieval" | "count" | "code_sim";

interface DatasetSpec {
  template: string;
  maxNewTokens: number;
  metric: Metric;
}

const QA_PASSAGES =
  "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\n" +
  "The following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:";

const QASPER_RULES =
  "Answer the question as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered " +
  'based on the information in the article, write "unanswerable". If the question is a yes/no question, answer "yes", "no", or "unanswerable". Do not provide any explanation.';

/** The paper's 16 English/code datasets. */
export const LONGBENCH_SPECS: Record<string, DatasetSpec> = {
  narrativeqa: {
    template:
      "You are given a story, which can be either a novel or a movie script, and a question. Answer the question asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\n" +
      "Story: {context}\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    maxNewTokens: 128,
    metric: "qa_f1",
  },
  qasper: {
    template: `You are given a scientific article and a question. ${QASPER_RULES}\n\nArticle: {context}\n\n Answer the question based on the above article as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write "unanswerable". If the question is a yes/no question, answer "yes", "no", or "unanswerable". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:`,
    maxNewTokens: 128,
    metric: "qa_f1",
  },
  multifieldqa_en: {
    template:
      "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    maxNewTokens: 64,
    metric: "qa_f1",
  },
  hotpotqa: { template: QA_PASSAGES, maxNewTokens: 32, metric: "qa_f1" },
  "2wikimqa": { template: QA_PASSAGES, maxNewTokens: 32, metric: "qa_f1" },
  musique: { template: QA_PASSAGES, maxNewTokens: 32, metric: "qa_f1" },
  gov_report: {
    template:
      "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
    maxNewTokens: 512,
    metric: "rouge_l",
  },
  qmsum: {
    template:
      "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\n" +
      "Now, answer the query based on the above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
    maxNewTokens: 512,
    metric: "rouge_l",
  },
  multi_news: {
    template:
      "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:",
    maxNewTokens: 512,
    metric: "rouge_l",
  },
  trec: {
    template:
      "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
    maxNewTokens: 64,
    metric: "classification",
  },
  triviaqa: {
    template:
      "Answer the question based on the given passage. Only give me the answer and do not output any other words. The following are some examples.\n\n{context}\n\n{input}",
    maxNewTokens: 32,
    metric: "qa_f1",
  },
  samsum: {
    template:
      "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
    maxNewTokens: 128,
    metric: "rouge_l",
  },
  passage_count: {
    template:
      "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read these paragraphs and determine how many unique paragraphs there are after removing duplicates. " +
      "In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing duplicates. " +
      "The output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ",
    maxNewTokens: 32,
    metric: "count",
  },
  passage_retrieval_en: {
    template:
      "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\n" +
      'Please enter the number of the paragraph that the abstract is from. The answer format must be like "Paragraph 1", "Paragraph 2", etc.\n\nThe answer is: ',
    maxNewTokens: 32,
    metric: "retrieval",
  },
  lcc: {
    template: "Please complete the code given below. \n{context}Next line of code:\n",
    maxNewTokens: 64,
    metric: "code_sim",
  },
  "repobench-p": {
    template: "Please complete the code given below. \n{context}{input}Next line of code:\n",
    maxNewTokens: 64,
    metric: "code_sim",
  },
};

export const LONGBENCH_DATASETS = Object.keys(LONGBENCH_SPECS);

/** Few-shot and code sets are prompted raw; the others go through the chat template. */
export const NO_CHAT_TEMPLATE = new Set(["trec", "triviaqa", "samsum", "lcc", "repobench-p"]);
/** Sets whose prediction is cut to its first line before scoring (they would continue the few-shot pattern). */
const FIRST_LINE_ONLY = new Set(["trec", "triviaqa", "samsum"]);

export function parseDatasets(value: string | undefined): string[] {
  if (value === undefined) return ["multi_news"];
  const ds = value
    .split(",")
    .map((d) => d.trim())
    .filter(Boolean);
  for (const d of ds) {
    if (!(d in LONGBENCH_SPECS))
      throw new Error(`--datasets: unknown dataset '${d}' (valid: ${LONGBENCH_DATASETS.join(", ")})`);
  }
  if (ds.length === 0) throw new Error(`--datasets: empty list (valid: ${LONGBENCH_DATASETS.join(", ")})`);
  return [...new Set(ds)];
}

export interface LongBenchRow {
  input: string;
  context: string;
  answers: string[];
  all_classes: string[] | null;
  length: number;
  dataset: string;
  _id: string;
}

/** Rows of `<dir>/<dataset>.jsonl` (the official release's format). */
export function readDataset(dir: string, dataset: string): LongBenchRow[] {
  const file = join(dir, `${dataset}.jsonl`);
  if (!existsSync(file)) throw new Error(`--data-dir: ${file} not found (LongBench's ${dataset}.jsonl)`);
  const rows: LongBenchRow[] = [];
  readFileSync(file, "utf8")
    .split("\n")
    .forEach((line, i) => {
      if (line.trim() === "") return;
      let r: LongBenchRow;
      try {
        r = JSON.parse(line) as LongBenchRow;
      } catch {
        throw new Error(`--data-dir: ${file} line ${i + 1} is not JSON`);
      }
      if (typeof r.context !== "string" || !Array.isArray(r.answers))
        throw new Error(`--data-dir: ${file} line ${i + 1} lacks 'context' or 'answers'`);
      rows.push(r);
    });
  if (rows.length === 0) throw new Error(`--data-dir: ${file} holds no rows`);
  return rows;
}

/** multi_news writes the articles' newlines as the word NEWLINE_CHAR (as the Multi-News release does); restore them. */
export function restoreNewlines(dataset: string, text: string): string {
  return dataset === "multi_news" ? text.replace(/ ?NEWLINE_CHAR ?/g, "\n") : text;
}

/** The dataset's prompt for one row, before truncation. */
export function buildPrompt(dataset: string, row: Pick<LongBenchRow, "input" | "context">): string {
  const spec = LONGBENCH_SPECS[dataset]!;
  const context = restoreNewlines(dataset, row.context);
  // placeholders replaced in one pass so a '{input}' inside the context stays as it is
  return spec.template.replace(/\{(context|input)\}/g, (_, k: string) => (k === "context" ? context : row.input));
}

/** Middle truncation: a prompt longer than maxTokens keeps its first and last maxTokens/2 tokens. */
export function truncateMiddle(prompt: Tokenized, maxTokens: number): string {
  const n = prompt.tokens.length;
  if (n <= maxTokens) return prompt.bytes.toString("utf8");
  const half = Math.floor(maxTokens / 2);
  return sliceTokens(prompt, 0, half) + sliceTokens(prompt, n - (maxTokens - half), n);
}

/** Default prompt length for a model with context nCtx: what is left after the answer and the chat template's tokens. */
export function defaultMaxLength(nCtx: number, dataset: string): number {
  return nCtx - LONGBENCH_SPECS[dataset]!.maxNewTokens - 32;
}

export function postProcess(dataset: string, prediction: string): string {
  return FIRST_LINE_ONLY.has(dataset) ? (prediction.replace(/^\n+/, "").split("\n")[0] ?? "") : prediction;
}

/** A sample's score (0–1): the best over its reference answers. */
export function scoreSample(
  dataset: string,
  prediction: string,
  answers: string[],
  allClasses: string[] | null,
): number {
  const spec = LONGBENCH_SPECS[dataset]!;
  const p = postProcess(dataset, prediction);
  let best = 0;
  for (const a of answers) {
    let s: number;
    switch (spec.metric) {
      case "qa_f1":
        s = qaF1(p, a);
        break;
      case "rouge_l":
        s = rougeL(p, a);
        break;
      case "classification":
        s = classificationScore(p, a, allClasses ?? []);
        break;
      case "retrieval":
        s = retrievalScore(p, a);
        break;
      case "count":
        s = countScore(p, a);
        break;
      case "code_sim":
        s = codeSimilarity(p, a);
        break;
    }
    best = Math.max(best, s);
  }
  return best;
}

export function maxNewTokens(dataset: string): number {
  return LONGBENCH_SPECS[dataset]!.maxNewTokens;
}
