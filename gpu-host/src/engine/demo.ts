// `pkv demo engine` (make demo-engine): a needle-in-a-haystack prompt (~4k tokens) answered with
// FullKV and with PyramidKV, side by side: the answers, KV bytes and their ratio, prefill time and
// decode speed.
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

import { EXACT_METHOD } from "@pyramidkv/shared";

import {
  answerWordRecall,
  DEFAULT_NEEDLE,
  DEFAULT_QUESTION,
  directoryHaystack,
  generatedFiller,
  insertNeedle,
} from "../eval/haystack.js";
import { defineCommand, int, string } from "../flags.js";
import { generate, type GenerateResult } from "./engine-run.js";

export interface DemoOptions {
  chars: number; // haystack length in characters (~4.3 characters per token for English)
  depth: number; // needle depth, percent
  budget: number;
  haystackDir?: string;
  model?: string;
  maxNewTokens: number;
  chunkSize?: number; // engine default when absent
}

export const DEMO_DEFAULTS: DemoOptions = { chars: 21000, depth: 50, budget: 128, maxNewTokens: 40 };

const mib = (bytes: number) => `${(bytes / 1048576).toFixed(2)} MiB`;

export function formatSideBySide(full: GenerateResult, pyr: GenerateResult, answer: string): string {
  const rows: [string, string, string][] = [
    ["", "FullKV", `PyramidKV @ ${pyr.budget}`],
    ["prompt tokens", String(full.prompt_tokens), String(pyr.prompt_tokens)],
    [
      "KV entries / layer (min-max)",
      `${Math.min(...full.layer_kv_lengths)}-${Math.max(...full.layer_kv_lengths)}`,
      `${Math.min(...pyr.layer_kv_lengths)}-${Math.max(...pyr.layer_kv_lengths)}`,
    ],
    ["KV bytes after prefill", mib(full.kv_bytes), mib(pyr.kv_bytes)],
    ["KV ratio vs FullKV", "1.0x", `${(full.kv_bytes / pyr.kv_bytes).toFixed(1)}x smaller`],
    ["prefill", `${full.prefill_seconds.toFixed(2)} s`, `${pyr.prefill_seconds.toFixed(2)} s`],
    ["decode", `${full.decode_tokens_per_second.toFixed(1)} tok/s`, `${pyr.decode_tokens_per_second.toFixed(1)} tok/s`],
    [
      "needle words found",
      answerWordRecall(answer, full.text).toFixed(2),
      answerWordRecall(answer, pyr.text).toFixed(2),
    ],
  ];
  const w0 = Math.max(...rows.map((r) => r[0].length));
  const w1 = Math.max(...rows.map((r) => r[1].length));
  const table = rows.map(([a, b, c]) => `${a.padEnd(w0)}  ${b.padEnd(w1)}  ${c}`).join("\n");
  const answers =
    `FullKV answer:    ${full.text.trim().replace(/\s+/g, " ")}\n` +
    `PyramidKV answer: ${pyr.text.trim().replace(/\s+/g, " ")}`;
  return `${table}\n\n${answers}\n`;
}

export async function runDemo(
  o: DemoOptions,
  log: (line: string) => void = console.log,
): Promise<[GenerateResult, GenerateResult]> {
  const haystack = o.haystackDir ? directoryHaystack(o.haystackDir, o.chars) : generatedFiller(o.chars);
  const prompt = insertNeedle(haystack, DEFAULT_NEEDLE, o.depth);
  const dir = mkdtempSync(join(tmpdir(), "pkv-demo-"));
  try {
    const file = join(dir, "prompt.txt");
    writeFileSync(file, prompt);
    log(`haystack: ${o.haystackDir ?? "generated filler"}, ${prompt.length} characters, needle at ${o.depth}% depth`);
    log(`question: ${DEFAULT_QUESTION}\n`);
    const common = {
      promptFile: file,
      question: DEFAULT_QUESTION,
      maxNewTokens: o.maxNewTokens,
      model: o.model,
      chunkSize: o.chunkSize,
    };
    const full = await generate({ ...common, method: EXACT_METHOD, budget: o.budget });
    const pyr = await generate({ ...common, method: "pyramidkv", budget: o.budget });
    log(formatSideBySide(full, pyr, DEFAULT_NEEDLE.replace(/^The best thing to do in San Francisco is /, "")));
    return [full, pyr];
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

export const command = defineCommand({
  flags: {
    chars: int({ min: 200, max: 1_000_000, default: DEMO_DEFAULTS.chars }),
    depth: int({ min: 0, max: 100, default: DEMO_DEFAULTS.depth }),
    budget: int({ min: 9, max: 1_000_000, default: DEMO_DEFAULTS.budget }),
    "haystack-dir": string(),
    model: string(),
    "max-new-tokens": int({ min: 1, max: 4096, default: DEMO_DEFAULTS.maxNewTokens }),
    "chunk-size": int({ min: 0, max: 1 << 24 }),
  },
  async run(f) {
    await runDemo({
      chars: f.chars,
      depth: f.depth,
      budget: f.budget,
      maxNewTokens: f["max-new-tokens"],
      chunkSize: f["chunk-size"],
      haystackDir: f["haystack-dir"],
      model: f.model,
    });
    return 0;
  },
});
