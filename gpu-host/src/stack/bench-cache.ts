// `pkv bench cache`: what the compressed prompt cache saves (docs/WORKER.md, "The prompt cache").
// The local stack: the worker (wrangler dev, local R2) and one host (CPU, the embedded model).
// (a) A chat of N turns over a long document (~6k tokens of the needle-haystack essays) through
// POST /v1/chat/completions (streamed, greedy), each turn sending the whole conversation back:
// per turn the prompt tokens, cached tokens (usage.prompt_tokens_details), the tokens the host
// prefilled (pkv_host_prefilled_tokens_total), the host's prefill time (pkv_host_request_seconds
// of its appends), its open time (a cached copy's restore) and snapshot time, the time to first
// token and to the last byte; the same turns with the cache on and with kv_cache "off", turn by
// turn alternating, so both see the same machine load. (b) S sessions opened at once
// (POST /v1/sessions) on one shared document: the time until all are ready, with reuse (one
// prefill, the others copies) and with kv_cache "off" (every one prefilled). Prints one JSON object
// (and writes it to --json FILE).
import { execFileSync } from "node:child_process";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { cpus, loadavg, tmpdir } from "node:os";
import { join } from "node:path";

import { repoRoot } from "../engine/engine-path.js";
import { directoryHaystack, essaysDir, generatedFiller } from "../eval/haystack.js";
import { defineCommand, int, string } from "../flags.js";
import { quantile } from "./bench-ttft.js";
import { metricSum } from "./soak.js";
import { readSse } from "./sse-client.js";
import { type Stack, startStack } from "./stack.js";

export interface CacheBenchOptions {
  turns: number;
  chars: number;
  sessions: number;
  sharedChars: number;
  budget: number;
  maxTokens: number;
  haystackDir?: string;
  json?: string;
}

const SYSTEM = "You are a helpful assistant. Answer questions about the document the user gives you, briefly.";
const QUESTIONS = [
  "What is the main topic of the document?",
  "Who is the author writing for?",
  "Name one example the document gives.",
  "What does the author recommend?",
  "What is the most surprising claim?",
  "Summarise the first paragraph in one sentence.",
  "What problem does the document describe?",
  "Which companies are mentioned?",
  "What is the conclusion?",
  "Give the document a short title.",
];
const TENANT = "bench";
const round = (x: number, digits = 1) => Math.round(x * 10 ** digits) / 10 ** digits;
const median = (xs: number[]) => quantile(xs, 0.5);
const sum = (xs: number[]) => xs.reduce((a, b) => a + b, 0);

type Msg = { role: string; content: string };

/** The host counters a turn is measured by. */
async function counters(stack: Stack) {
  const m = await stack.metrics(stack.hosts[0]!);
  const seconds = (type: string) => metricSum(m, "pkv_host_request_seconds_sum", { type });
  return {
    prefilled: metricSum(m, "pkv_host_prefilled_tokens_total", { tenant: TENANT }),
    append_s: seconds("append"),
    open_s: seconds("open_session"),
    snapshot_s: seconds("snapshot"),
    copies: metricSum(m, "pkv_host_cache_opens_total") - metricSum(m, "pkv_host_cache_opens_total", { source: "miss" }),
  };
}

/** The tree's commit (with "+" when it has local changes), or null outside a git checkout. */
function gitCommit(): string | null {
  try {
    const git = (...args: string[]) =>
      execFileSync("git", args, { encoding: "utf8", cwd: repoRoot(), stdio: ["ignore", "pipe", "ignore"] }).trim();
    const head = git("rev-parse", "--short", "HEAD");
    const dirty = git("status", "--porcelain", "--untracked-files=no");
    return dirty ? `${head}+` : head;
  } catch {
    return null;
  }
}

export async function runCacheBench(
  o: CacheBenchOptions,
  out: (s: string) => void = (s) => process.stdout.write(`${s}\n`),
  log: (s: string) => void = (s) => process.stderr.write(`bench cache: ${s}\n`),
): Promise<Record<string, unknown>> {
  const uptime = () => execFileSync("uptime", { encoding: "utf8" }).trim();
  const uptimeBefore = uptime();
  const dir = mkdtempSync(join(tmpdir(), "pkv-cache-"));
  const hayDir = o.haystackDir ?? essaysDir();
  const fromDir = existsSync(hayDir);
  const text = (chars: number, offset: number) =>
    fromDir ? directoryHaystack(hayDir, chars + offset).slice(offset) : generatedFiller(chars, offset + 1);
  const document = text(o.chars, 0);
  // another part of the essays: nothing of (a) is a prefix of it
  const shared = text(o.sharedChars, o.chars + 1000);
  log("starting the worker and 1 host");
  const stack = await startStack({ hosts: 1, kvPoolBytes: 1 << 30, persistDir: join(dir, "state"), threads: 2 });
  try {
    await stack.admin.setTenant(TENANT, { requests_per_minute: 100_000, max_sessions: 4 * o.sessions + 8 });
    const key = await stack.admin.createKey(TENANT);
    const api = (method: string, path: string, body?: unknown) =>
      fetch(`${stack.worker.url}${path}`, {
        method,
        headers: { authorization: `Bearer ${key}`, "content-type": "application/json" },
        ...(body === undefined ? {} : { body: JSON.stringify(body) }),
      });

    /** One streamed, greedy chat turn: its answer, usage, TTFT and what the host did meanwhile. */
    const turn = async (messages: Msg[], kvCache: "on" | "off") => {
      const c0 = await counters(stack);
      const t0 = performance.now();
      const r = await api("POST", "/v1/chat/completions", {
        model: "default",
        messages,
        max_tokens: o.maxTokens,
        temperature: 0,
        kv_budget: o.budget,
        kv_cache: kvCache,
        stream: true,
        stream_options: { include_usage: true },
      });
      if (!r.ok) throw new Error(`chat (${kvCache}): HTTP ${r.status}: ${await r.text()}`);
      let first = 0;
      let answer = "";
      let usage: { prompt_tokens: number; prompt_tokens_details?: { cached_tokens?: number } } | undefined;
      for await (const ev of readSse(r)) {
        if (ev.data === "[DONE]") continue;
        const j = JSON.parse(ev.data) as {
          error?: { message?: string };
          usage?: typeof usage;
          choices?: { delta?: { content?: string } }[];
        };
        if (j.error) throw new Error(`chat (${kvCache}): ${j.error.message}`);
        if (j.usage) usage = j.usage;
        const piece = j.choices?.[0]?.delta?.content;
        if (piece) {
          if (first === 0) first = performance.now();
          answer += piece;
        }
      }
      const total = performance.now() - t0;
      const c1 = await counters(stack);
      if (!usage) throw new Error(`chat (${kvCache}): no usage chunk`);
      return {
        answer,
        row: {
          prompt_tokens: usage.prompt_tokens,
          cached_tokens: usage.prompt_tokens_details?.cached_tokens ?? null,
          prefilled_tokens: c1.prefilled - c0.prefilled,
          prefill_ms: round((c1.append_s - c0.append_s) * 1000),
          open_ms: round((c1.open_s - c0.open_s) * 1000),
          snapshot_ms: round((c1.snapshot_s - c0.snapshot_s) * 1000),
          ttft_ms: round((first || performance.now()) - t0),
          total_ms: round(total),
        },
      };
    };

    // a fresh engine's first graphs, and the worker's first requests, before anything is measured
    for (let i = 0; i < 3; i++) {
      const r = await api("POST", "/v1/chat/completions", {
        model: "default",
        messages: [{ role: "user", content: `Say ${i}.` }],
        max_tokens: 2,
        kv_cache: "off",
      });
      if (!r.ok) throw new Error(`warm-up: HTTP ${r.status}: ${await r.text()}`);
      await r.text();
    }

    // (a) the chat, cache on and off alternating turn by turn
    const convo: Record<"on" | "off", Msg[]> = {
      on: [
        { role: "system", content: SYSTEM },
        { role: "user", content: document },
      ],
      off: [
        { role: "system", content: SYSTEM },
        { role: "user", content: document },
      ],
    };
    type Row = Awaited<ReturnType<typeof turn>>["row"];
    const rows: { turn: number; on: Row; off: Row }[] = [];
    for (let k = 0; k < o.turns; k++) {
      const q = QUESTIONS[k % QUESTIONS.length]!;
      const row = { turn: k + 1 } as { turn: number; on: Row; off: Row };
      // the order alternates too: neither path always runs right after the other's prefill
      for (const mode of k % 2 === 0 ? (["on", "off"] as const) : (["off", "on"] as const)) {
        convo[mode].push({ role: "user", content: q });
        const t = await turn(convo[mode], mode);
        convo[mode].push({ role: "assistant", content: t.answer });
        row[mode] = t.row;
      }
      rows.push(row);
      log(`turn ${k + 1}/${o.turns}: ${JSON.stringify(row)}`);
    }
    const total = (mode: "on" | "off", k: keyof Row) => round(sum(rows.map((r) => (r[mode][k] as number) ?? 0)));
    const totals = (mode: "on" | "off") => ({
      prompt_tokens: total(mode, "prompt_tokens"),
      cached_tokens: total(mode, "cached_tokens"),
      prefilled_tokens: total(mode, "prefilled_tokens"),
      prefill_ms: total(mode, "prefill_ms"),
      open_ms: total(mode, "open_ms"),
      snapshot_ms: total(mode, "snapshot_ms"),
      ttft_ms: total(mode, "ttft_ms"),
      total_ms: total(mode, "total_ms"),
    });
    const later = rows.slice(1);
    const chat = {
      document_tokens: rows[0] ? rows[0].on.prompt_tokens : null,
      turns: rows,
      totals: { on: totals("on"), off: totals("off") },
      ratios_off_over_on: {
        prefilled_tokens: round(totals("off").prefilled_tokens / totals("on").prefilled_tokens, 2),
        prefill_ms: round(totals("off").prefill_ms / totals("on").prefill_ms, 2),
        prefill_open_snapshot_ms: round(
          (totals("off").prefill_ms + totals("off").open_ms + totals("off").snapshot_ms) /
            (totals("on").prefill_ms + totals("on").open_ms + totals("on").snapshot_ms),
          2,
        ),
        ttft_ms: round(totals("off").ttft_ms / totals("on").ttft_ms, 2),
        total_ms: round(totals("off").total_ms / totals("on").total_ms, 2),
      },
      // per-turn cost against the history's length: turns 2..N with the cache on
      later_turns_on: {
        prefilled_tokens: {
          min: Math.min(...later.map((r) => r.on.prefilled_tokens)),
          max: Math.max(...later.map((r) => r.on.prefilled_tokens)),
        },
        ttft_ms_median: round(median(later.map((r) => r.on.ttft_ms))),
        ttft_ms_turn_2: later[0]?.on.ttft_ms ?? null,
        ttft_ms_last: later.at(-1)?.on.ttft_ms ?? null,
        prefill_ms_median: round(median(later.map((r) => r.on.prefill_ms))),
      },
    };

    // (a)'s results kept before (b) runs
    if (o.json) writeFileSync(o.json, `${JSON.stringify({ partial: true, chat }, null, 2)}\n`);

    // (b) S sessions opened at once on one shared document
    const openAll = async (kvCache: "on" | "off") => {
      const c0 = await counters(stack);
      const t0 = performance.now();
      let retries = 0;
      const each = await Promise.all(
        Array.from({ length: o.sessions }, async () => {
          for (;;) {
            const r = await api("POST", "/v1/sessions", {
              system: SYSTEM,
              document: shared,
              kv_budget: o.budget,
              kv_cache: kvCache,
            });
            const body = await r.text();
            // the host's KV pool holds only so many prefills at once: a client retries after Retry-After
            if (r.status === 429 && body.includes("quota_exceeded")) {
              retries++;
              const after = Math.max(2, Number(r.headers.get("retry-after")) || 2);
              await new Promise((res) => setTimeout(res, 1000 * after));
              continue;
            }
            if (r.status !== 201)
              throw new Error(`POST /v1/sessions (${kvCache}): HTTP ${r.status}: ${body.slice(0, 500)}`);
            const s = JSON.parse(body) as { id: string; tokens: number; cached_tokens?: number };
            return { ...s, ready_ms: performance.now() - t0 };
          }
        }),
      );
      const allReady = performance.now() - t0;
      const c1 = await counters(stack);
      for (const s of each) await api("DELETE", `/v1/sessions/${s.id}`);
      const ready = each.map((s) => s.ready_ms);
      return {
        all_ready_ms: round(allReady),
        first_ready_ms: round(Math.min(...ready)),
        median_ready_ms: round(median(ready)),
        document_tokens: each[0]?.tokens ?? null,
        from_copy: each.filter((s) => (s.cached_tokens ?? 0) > 0).length,
        prefilled_tokens: c1.prefilled - c0.prefilled,
        host_copies: c1.copies - c0.copies,
        /** 429 quota_exceeded answers retried (the pool's room for concurrent prefills) */
        retries_429: retries,
      };
    };
    log(`${o.sessions} sessions on one document, reuse`);
    const reuse = await openAll("on");
    log(JSON.stringify(reuse));
    log(`${o.sessions} sessions on one document, kv_cache off`);
    const off = await openAll("off");
    log(JSON.stringify(off));

    const result = {
      command:
        `pkv bench cache --turns ${o.turns} --chars ${o.chars} --sessions ${o.sessions} --shared-chars ${o.sharedChars} ` +
        `--budget ${o.budget} --max-tokens ${o.maxTokens}`,
      commit: gitCommit(),
      cpu: cpus()[0]?.model ?? "unknown",
      cores: cpus().length,
      uptime_before: uptimeBefore,
      uptime_after: uptime(),
      loadavg_after: loadavg().map((x) => round(x, 2)),
      setup:
        `worker (wrangler dev, local R2) + 1 host (CPU, embedded model, 2 threads); pyramidkv budget ${o.budget}, greedy, ` +
        `${o.maxTokens} tokens per answer; documents from ${fromDir ? "the needle-haystack essays" : "generated filler"}. ` +
        "(a) streamed chat completions, each turn the whole conversation; on and off alternate turn by turn. " +
        "prefilled_tokens: the host's pkv_host_prefilled_tokens_total; prefill_ms / open_ms / snapshot_ms: the host's " +
        "pkv_host_request_seconds of its append / open_session / snapshot requests; ttft_ms and total_ms at the client. " +
        `(b) ${o.sessions} POST /v1/sessions at once on one shared document, with the cache (reuse) then with kv_cache off; ` +
        "an open the host's KV pool has no room for yet (429 quota_exceeded) is retried after Retry-After (at least 2 s), as a client would.",
      chat,
      shared_document: {
        sessions: o.sessions,
        reuse,
        off,
        all_ready_off_over_reuse: round(off.all_ready_ms / reuse.all_ready_ms, 2),
        prefilled_tokens_off_over_reuse: round(off.prefilled_tokens / reuse.prefilled_tokens, 2),
      },
    };
    const json = JSON.stringify(result, null, 2);
    if (o.json) writeFileSync(o.json, `${json}\n`);
    out(json);
    return result;
  } finally {
    await stack.stop();
    rmSync(dir, { recursive: true, force: true });
  }
}

export const command = defineCommand({
  flags: {
    turns: int({ min: 2, max: 100, default: 10 }),
    chars: int({ min: 2000, max: 200_000, default: 25_000 }),
    sessions: int({ min: 2, max: 256, default: 16 }),
    "shared-chars": int({ min: 2000, max: 200_000, default: 12_500 }),
    budget: int({ min: 16, max: 1 << 20, default: 128 }),
    "max-tokens": int({ min: 1, max: 4096, default: 16 }),
    "haystack-dir": string(),
    json: string(),
  },
  async run(f) {
    await runCacheBench({
      turns: f.turns,
      chars: f.chars,
      sessions: f.sessions,
      sharedChars: f["shared-chars"],
      budget: f.budget,
      maxTokens: f["max-tokens"],
      haystackDir: f["haystack-dir"],
      json: f.json,
    });
    return 0;
  },
});
