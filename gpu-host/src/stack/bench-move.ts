// `pkv bench move`: what it costs to move a long compressed session to another host, against
// prefilling it again there. Two hosts dialled in to the worker (Miniflare, local R2). Each run: a
// ~8k-token document opened as a session (PyramidKV at the budget) on host X; X drained (SIGTERM:
// every session checkpointed to R2, drained, disconnected, exit 0); the session's next request
// (GET: its host restores it from R2) lands on host Y, then a question's first token. Against:
// the same document opened again on Y (upload + prefill) and the same question's first token.
// Sessions per GiB: the session's kv_bytes (the host's stats_result) before and after the move.
// Prints one JSON object: every run and the medians.
import { execFileSync } from "node:child_process";
import { existsSync, mkdtempSync, readdirSync, rmSync, statSync } from "node:fs";
import { cpus, loadavg, tmpdir } from "node:os";
import { join } from "node:path";

import { directoryHaystack, essaysDir, generatedFiller } from "../eval/haystack.js";
import { defineCommand, int, string } from "../flags.js";
import { quantile } from "./bench-ttft.js";
import { readSse } from "./sse-client.js";
import { startStack } from "./stack.js";

export interface MoveOptions {
  runs: number;
  chars: number;
  budget: number;
  maxTokens: number;
  haystackDir?: string;
}

const QUESTION = "What is the main topic of the document? Answer in one sentence.";
const GIB = 1 << 30;
const round = (x: number, digits = 1) => Math.round(x * 10 ** digits) / 10 ** digits;
const median = (xs: number[]) => quantile(xs, 0.5);

type SessionObject = { id: string; host: string; tokens: number; kv_bytes: number; full_kv_bytes: number | null };

/** Bytes of the largest file under Miniflare's local R2 storage (the session's state object). */
function largestR2File(persistDir: string): number | null {
  const root = join(persistDir, "v3", "r2");
  if (!existsSync(root)) return null;
  let best = 0;
  const walk = (d: string) => {
    for (const e of readdirSync(d, { withFileTypes: true })) {
      const p = join(d, e.name);
      if (e.isDirectory()) walk(p);
      else if (!e.name.endsWith(".sqlite") && !e.name.includes("sqlite-")) best = Math.max(best, statSync(p).size);
    }
  };
  walk(root);
  return best;
}

export async function runMoveBench(
  o: MoveOptions,
  out: (s: string) => void = (s) => process.stdout.write(`${s}\n`),
  log: (s: string) => void = (s) => process.stderr.write(`bench move: ${s}\n`),
): Promise<Record<string, unknown>> {
  const uptime = () => execFileSync("uptime", { encoding: "utf8" }).trim();
  const uptimeBefore = uptime();
  const dir = mkdtempSync(join(tmpdir(), "pkv-move-"));
  const persistDir = join(dir, "state");
  const hayDir = o.haystackDir ?? essaysDir();
  const document = existsSync(hayDir) ? directoryHaystack(hayDir, o.chars) : generatedFiller(o.chars);
  log("starting the worker and 2 hosts");
  const stack = await startStack({ hosts: 2, kvPoolBytes: 1 << 30, persistDir, threads: 2 });
  try {
    await stack.admin.setTenant("bench", { requests_per_minute: 100_000, max_sessions: 16 });
    const key = await stack.admin.createKey("bench");
    const api = (method: string, path: string, body?: unknown) =>
      fetch(`${stack.worker.url}${path}`, {
        method,
        headers: { authorization: `Bearer ${key}`, "content-type": "application/json" },
        ...(body === undefined ? {} : { body: JSON.stringify(body) }),
      });
    const json = async <T>(r: Response, what: string): Promise<T> => {
      const text = await r.text();
      if (!r.ok) throw new Error(`${what}: HTTP ${r.status}: ${text.slice(0, 500)}`);
      return JSON.parse(text) as T;
    };
    const open = async () =>
      json<SessionObject>(
        await api("POST", "/v1/sessions", { document, kv_method: "pyramidkv", kv_budget: o.budget }),
        "POST /v1/sessions",
      );
    const get = async (id: string) => json<SessionObject>(await api("GET", `/v1/sessions/${id}`), `GET ${id}`);
    /** ms to the question's first token, and the answer */
    const ask = async (id: string): Promise<{ ttft: number; text: string }> => {
      const t0 = performance.now();
      const r = await api("POST", `/v1/sessions/${id}/messages`, {
        content: QUESTION,
        max_tokens: o.maxTokens,
        temperature: 0,
        stream: true,
      });
      if (!r.ok) throw new Error(`message: HTTP ${r.status}: ${await r.text()}`);
      let first = 0;
      let text = "";
      for await (const ev of readSse(r)) {
        if (ev.data === "[DONE]") continue;
        const j = JSON.parse(ev.data) as {
          error?: { message?: string };
          choices?: { delta?: { content?: string } }[];
        };
        if (j.error) throw new Error(`message: ${j.error.message}`);
        const piece = j.choices?.[0]?.delta?.content;
        if (piece) {
          if (first === 0) first = performance.now();
          text += piece;
        }
      }
      return { ttft: first - t0, text };
    };

    const runs: Record<string, unknown>[] = [];
    for (let r = 0; r < o.runs; r++) {
      const tOpen = performance.now();
      const s = await open();
      const openMs = performance.now() - tOpen;
      const before = await get(s.id);
      const r2Bytes = largestR2File(persistDir);
      const from = await stack.hostById(s.host);
      if (!from) throw new Error(`the session's host ${s.host} is not one of the stack's`);
      const x = stack.hosts.indexOf(from);
      // the move: drain X, the session restored on Y by its next request, then the first token
      const t0 = performance.now();
      const code = await stack.drainHost(x);
      const t1 = performance.now();
      if (code !== 0) throw new Error(`the drained host exited ${code}:\n${from.log().slice(-2000)}`);
      const moved = await get(s.id);
      const t2 = performance.now();
      if (moved.host === s.host) throw new Error("the session did not move");
      const q = await ask(s.id);
      const afterQ = await get(s.id);
      // against: the same document prefilled again on Y (the only live host now)
      const t3 = performance.now();
      const again = await open();
      const t4 = performance.now();
      const qa = await ask(again.id);
      const againQ = await get(again.id);
      const run = {
        tokens: before.tokens,
        /** the first open (upload + prefill) on X, for reference */
        open_ms: round(openMs),
        kv_bytes_before_move: before.kv_bytes,
        kv_bytes_after_move: moved.kv_bytes,
        full_kv_bytes: before.full_kv_bytes,
        r2_object_bytes: r2Bytes,
        drain_ms: round(t1 - t0),
        restore_ms: round(t2 - t1),
        first_token_ms: round(q.ttft),
        move_ms: round(t1 - t0 + (t2 - t1) + q.ttft),
        reprefill_open_ms: round(t4 - t3),
        reprefill_first_token_ms: round(qa.ttft),
        reprefill_ms: round(t4 - t3 + qa.ttft),
        answers_equal: q.text === qa.text,
        kv_bytes_after_question: { moved: afterQ.kv_bytes, reprefilled: againQ.kv_bytes },
      };
      runs.push(run);
      log(`run ${r + 1}/${o.runs}: ${JSON.stringify(run)}`);
      for (const id of [s.id, again.id]) await api("DELETE", `/v1/sessions/${id}`);
      await stack.startHost(x);
    }
    const col = (k: string) => runs.map((x) => x[k] as number);
    const before = median(col("kv_bytes_before_move"));
    const afterMove = median(col("kv_bytes_after_move"));
    const result = {
      command: `pkv bench move --runs ${o.runs} --chars ${o.chars} --budget ${o.budget} --max-tokens ${o.maxTokens}`,
      cpu: cpus()[0]?.model ?? "unknown",
      cores: cpus().length,
      uptime_before: uptimeBefore,
      uptime_after: uptime(),
      loadavg_after: loadavg().map((x) => round(x, 2)),
      setup:
        `a ${median(col("tokens"))}-token document (embedded model, CPU) as a session, pyramidkv budget ${o.budget}; 2 hosts ` +
        "dialled in to the worker (wrangler dev, local R2). move = drain the session's host (SIGTERM → exit 0: " +
        "checkpoint to R2, drained, disconnected) + the session's next request on the other host (GET: restore from R2) " +
        `+ a question's first token; reprefill = the same document opened again there + the same question's first token (${o.maxTokens} tokens, greedy)`,
      runs,
      median: {
        move_ms: median(col("move_ms")),
        drain_ms: median(col("drain_ms")),
        restore_ms: median(col("restore_ms")),
        first_token_ms: median(col("first_token_ms")),
        reprefill_ms: median(col("reprefill_ms")),
        reprefill_open_ms: median(col("reprefill_open_ms")),
        reprefill_first_token_ms: median(col("reprefill_first_token_ms")),
      },
      reprefill_over_move: round(median(col("reprefill_ms")) / median(col("move_ms")), 2),
      sessions_per_gib: {
        before_move: Math.floor(GIB / before),
        after_move: Math.floor(GIB / afterMove),
        fullkv: Math.floor(GIB / median(col("full_kv_bytes"))),
      },
    };
    out(JSON.stringify(result, null, 2));
    return result;
  } finally {
    await stack.stop();
    rmSync(dir, { recursive: true, force: true });
  }
}

export const command = defineCommand({
  flags: {
    runs: int({ min: 1, max: 100, default: 3 }),
    chars: int({ min: 1000, max: 200_000, default: 31_500 }),
    budget: int({ min: 16, max: 1 << 20, default: 128 }),
    "max-tokens": int({ min: 1, max: 4096, default: 8 }),
    "haystack-dir": string(),
  },
  async run(f) {
    await runMoveBench({
      runs: f.runs,
      chars: f.chars,
      budget: f.budget,
      maxTokens: f["max-tokens"],
      haystackDir: f["haystack-dir"],
    });
    return 0;
  },
});
