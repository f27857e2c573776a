// Runs `pkv-engine generate --json` (or another JSON-printing command) and returns its one JSON object (the CLI contract).
import { spawn } from "node:child_process";

import { engineBinary } from "./engine-path.js";

export interface GenerateResult {
  text: string;
  model: string;
  method: string;
  budget: number;
  prompt_tokens: number;
  new_tokens: number;
  layer_kv_lengths: number[];
  kv_bytes: number;
  full_kv_bytes: number;
  prefill_seconds: number;
  decode_tokens_per_second: number;
}

export interface GenerateOptions {
  promptFile: string;
  question?: string;
  method: string;
  budget: number;
  maxNewTokens: number;
  model?: string;
  threads?: number;
  chunkSize?: number; // chunked prefill: compress after every chunk of this many tokens; 0 = one-shot
}

export class EngineError extends Error {
  constructor(
    message: string,
    readonly exitCode: number | null,
  ) {
    super(message);
  }
}

export function generate(o: GenerateOptions): Promise<GenerateResult> {
  const args = [
    "generate",
    "--json",
    "--prompt-file",
    o.promptFile,
    "--method",
    o.method,
    "--budget",
    String(o.budget),
    "--max-new-tokens",
    String(o.maxNewTokens),
  ];
  if (o.question !== undefined) args.push("--question", o.question);
  if (o.model !== undefined) args.push("--model", o.model);
  if (o.threads !== undefined) args.push("--threads", String(o.threads));
  if (o.chunkSize !== undefined) args.push("--chunk-size", String(o.chunkSize));
  return runEngineJson<GenerateResult>(args);
}

/** Runs the engine CLI with these arguments and parses the one JSON object it prints. */
export function runEngineJson<T>(args: string[]): Promise<T> {
  return new Promise((resolve, reject) => {
    const child = spawn(engineBinary(), args, { stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    let err = "";
    child.stdout.setEncoding("utf8").on("data", (d: string) => (out += d));
    child.stderr.setEncoding("utf8").on("data", (d: string) => (err += d));
    child.on("error", reject);
    child.on("close", (code) => {
      if (code !== 0)
        return reject(new EngineError(`pkv-engine ${args[0]} failed: ${err.trim() || `exit code ${code}`}`, code));
      try {
        resolve(JSON.parse(out) as T);
      } catch {
        reject(new EngineError(`pkv-engine ${args[0]} printed no JSON object: ${out.slice(0, 200)}`, code));
      }
    });
  });
}
