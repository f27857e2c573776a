// The evaluation's view of one engine process (pkv-engine serve --stdio): an exact prefill per
// prompt, forks of it per (method, budget), generation, stats. Tokenizing goes through the engine's
// `tokenize` command (same tokenizer as the served model), so needles and lengths are placed in tokens.
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

import { EXACT_METHOD } from "@pyramidkv/shared";

import { runEngineJson } from "../engine/engine-run.js";
import { EngineProcess } from "../host/engine.js";

export interface Tokenized {
  tokens: number[];
  /** byte offset (UTF-8) where each token's piece starts in the tokenized text */
  offsets: number[];
  /** the UTF-8 bytes of the tokenized text */
  bytes: Buffer;
}

export interface Generation {
  text: string;
  reason: string;
  newTokens: number;
}

export interface SessionStats {
  kvBytes: number;
  fullKvBytes: number;
  layerKvLengths: number[];
}

/** Tokenizes through `pkv-engine tokenize` (a short-lived process; no chat template applied). */
export function tokenizeWithEngine(text: string, model?: string): Promise<Tokenized> {
  const dir = mkdtempSync(join(tmpdir(), "pkv-tok-"));
  const file = join(dir, "text.txt");
  writeFileSync(file, text);
  const args = ["tokenize", "--json", "--prompt-file", file, "--threads", "1"];
  if (model !== undefined) args.push("--model", model);
  return runEngineJson<{ tokens: number[]; offsets: number[] }>(args)
    .then((j) => ({ tokens: j.tokens, offsets: j.offsets, bytes: Buffer.from(text, "utf8") }))
    .finally(() => rmSync(dir, { recursive: true, force: true }));
}

/** Text of tokens [from, to) of a tokenized text. */
export function sliceTokens(t: Tokenized, from: number, to: number): string {
  const start = from >= t.offsets.length ? t.bytes.length : t.offsets[from]!;
  const end = to >= t.offsets.length ? t.bytes.length : t.offsets[to]!;
  return t.bytes.subarray(start, end).toString("utf8");
}

export interface EvalEngineOptions {
  model?: string;
  threads?: number;
  kvPoolBytes?: number;
  /** storage type of the KV entries (the engine's --kv-type; forks inherit the source's) */
  kvType?: string;
}

export class EvalEngine {
  private reviving: Promise<void> | undefined;

  private constructor(
    private proc: EngineProcess,
    private readonly options: EvalEngineOptions,
  ) {}

  static async start(o: EvalEngineOptions = {}): Promise<EvalEngine> {
    return new EvalEngine(await EvalEngine.spawn(o), o);
  }

  private static spawn(o: EvalEngineOptions): Promise<EngineProcess> {
    // chunk size 0: the exact prefill is one-shot, as in the published set-ups
    // two prompts in flight, each a full prefill plus its forks: 1 GiB holds two 8k SmolLM2 prompts with 16 forks each
    return EngineProcess.start({
      model: o.model,
      threads: o.threads,
      kvPoolBytes: o.kvPoolBytes ?? 1 << 30,
      chunkSize: 0,
      kvType: o.kvType,
    });
  }

  get model(): string | undefined {
    return this.options.model;
  }

  get alive(): boolean {
    return this.proc.alive;
  }

  /** Starts a fresh engine after the old one died (its sessions are gone); concurrent callers share one restart. */
  async revive(): Promise<void> {
    if (this.proc.alive) return;
    this.reviving ??= EvalEngine.spawn(this.options).then(
      (p) => {
        this.proc = p;
        this.reviving = undefined;
      },
      (e: unknown) => {
        this.reviving = undefined;
        throw e;
      },
    );
    await this.reviving;
  }

  get nCtx(): number {
    return this.proc.hello.n_ctx;
  }

  get modelName(): string {
    return this.proc.hello.model;
  }

  tokenize(text: string): Promise<Tokenized> {
    return tokenizeWithEngine(text, this.model);
  }

  /** Opens an exact (FullKV, scores kept) session and prefills `text`; returns the tokens seen. */
  async prefill(session: string, text: string, chat: boolean): Promise<{ tokensSeen: number; kvBytes: number }> {
    await this.proc.call({ type: "open", session, method: EXACT_METHOD, keep_scores: true, chunk_size: 0 });
    const r = await this.proc.call<"appended">({ type: "append", session, text, chat });
    return { tokensSeen: r.tokens_seen, kvBytes: r.kv_bytes };
  }

  async fork(source: string, session: string, method: string, budget: number): Promise<void> {
    await this.proc.call({ type: "fork", session: source, new_session: session, method, budget });
  }

  async stats(session: string): Promise<SessionStats> {
    const r = await this.proc.call<"stats_result">({ type: "stats", session });
    return { kvBytes: r.kv_bytes ?? 0, fullKvBytes: r.full_kv_bytes ?? 0, layerKvLengths: r.layer_kv_lengths ?? [] };
  }

  /** Greedy generation (stops at the end of turn / EOS, a stop string, or maxTokens). */
  async generate(session: string, maxTokens: number, stop: string[] = []): Promise<Generation> {
    const r = await this.proc.call<"done">({
      type: "generate",
      session,
      max_tokens: maxTokens,
      temperature: 0,
      ...(stop.length ? { stop } : {}),
    });
    return { text: r.text, reason: r.reason, newTokens: r.new_tokens };
  }

  async close(session: string): Promise<void> {
    await this.proc.call({ type: "close", session });
  }

  async shutdown(): Promise<void> {
    await this.proc.shutdown();
  }
}
