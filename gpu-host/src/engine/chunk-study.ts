// `pkv bench chunking`: needle accuracy of chunked prefill against one-shot compression, the
// measurement behind the engine's default --chunk-size. For every length × depth the same prompt
// is answered with each chunk size (0 = one-shot); score = fraction of the needle's words found.
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

import { defineCommand, int, ints, string } from "../flags.js";
import { generate } from "./engine-run.js";
import {
  answerWordRecall,
  DEFAULT_NEEDLE,
  DEFAULT_QUESTION,
  directoryHaystack,
  generatedFiller,
  insertNeedle,
} from "../eval/haystack.js";

export interface ChunkStudyOptions {
  lengthsChars: number[];
  depths: number[];
  chunkSizes: number[];
  method: string;
  budget: number;
  haystackDir?: string;
  model?: string;
}

export interface ChunkStudyCell {
  chars: number;
  promptTokens: number;
  depth: number;
  chunkSize: number;
  score: number;
  response: string;
}

const ANSWER = DEFAULT_NEEDLE.replace(/^The best thing to do in San Francisco is /, "");

export async function runChunkStudy(
  o: ChunkStudyOptions,
  log: (line: string) => void = console.log,
): Promise<ChunkStudyCell[]> {
  const dir = mkdtempSync(join(tmpdir(), "pkv-chunks-"));
  const cells: ChunkStudyCell[] = [];
  try {
    for (const chars of o.lengthsChars) {
      const hay = o.haystackDir ? directoryHaystack(o.haystackDir, chars) : generatedFiller(chars);
      for (const depth of o.depths) {
        const file = join(dir, `p-${chars}-${depth}.txt`);
        writeFileSync(file, insertNeedle(hay, DEFAULT_NEEDLE, depth));
        for (const chunkSize of o.chunkSizes) {
          const r = await generate({
            promptFile: file,
            question: DEFAULT_QUESTION,
            method: o.method,
            budget: o.budget,
            maxNewTokens: 30,
            model: o.model,
            chunkSize,
          });
          const cell = {
            chars,
            promptTokens: r.prompt_tokens,
            depth,
            chunkSize,
            score: answerWordRecall(ANSWER, r.text),
            response: r.text,
          };
          cells.push(cell);
          log(
            `tokens ${cell.promptTokens} depth ${depth}% chunk ${chunkSize || "one-shot"}: ${cell.score.toFixed(2)}  ${r.text.trim().replace(/\s+/g, " ").slice(0, 80)}`,
          );
        }
      }
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  log("");
  log(`mean needle score, ${o.method}@${o.budget}, ${o.lengthsChars.length} lengths x ${o.depths.length} depths`);
  for (const chunkSize of o.chunkSizes) {
    const mine = cells.filter((c) => c.chunkSize === chunkSize);
    const mean = mine.reduce((a, c) => a + c.score, 0) / Math.max(1, mine.length);
    log(`  chunk ${String(chunkSize || "one-shot").padEnd(9)} ${mean.toFixed(3)}`);
  }
  return cells;
}

export const command = defineCommand({
  flags: {
    chars: ints({ min: 200, max: 10_000_000, default: [12000, 24000] }),
    depths: ints({ min: 0, max: 100, default: [25, 50, 75] }),
    "chunk-sizes": ints({ min: 0, max: 1 << 24, default: [0, 1024, 2048, 4096] }),
    method: string({ default: "pyramidkv" }),
    budget: int({ min: 9, max: 1_000_000, default: 128 }),
    "haystack-dir": string(),
    model: string(),
  },
  async run(f) {
    await runChunkStudy({
      lengthsChars: f.chars,
      depths: f.depths,
      chunkSizes: f["chunk-sizes"],
      method: f.method,
      budget: f.budget,
      haystackDir: f["haystack-dir"],
      model: f.model,
    });
    return 0;
  },
});
