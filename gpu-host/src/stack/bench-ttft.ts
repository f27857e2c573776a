// `pkv bench ttft`: time to first token through the edge worker (Miniflare: auth, rate check, the
// registry's route from its heartbeat table, the host's Durable Object relaying one channel of
// the host's socket, SSE) vs straight to a host (a second host process, same flags, dialled in
// to an in-process DirectEdge: host/direct-edge.ts; a channel of its socket, open + append +
// generate). The same prompt and settings; requests alternate between the two paths so both see
// the same machine load. Prints one JSON object (p50/p95/min of each, the added p50, the median
// of the paired differences).
import { execFileSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { cpus, loadavg, tmpdir } from "node:os";
import { join } from "node:path";

import { defineCommand, int } from "../flags.js";
import { DirectEdge, hostToken } from "../host/direct-edge.js";
import { DirectClient } from "./direct-client.js";
import { readSse } from "./sse-client.js";
import { type Proc, startHostProcess, startStack } from "./stack.js";

export interface TtftOptions {
  requests: number;
  maxTokens: number;
  budget: number;
}

const QUESTION = "What is the capital of France? Answer in one word.";
const KV_POOL = 256 << 20;
const WARM_UP = 5;

export function quantile(xs: number[], q: number): number {
  if (xs.length === 0) return Number.NaN;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil(q * s.length) - 1))]!;
}

const round = (x: number, digits = 1) => Math.round(x * 10 ** digits) / 10 ** digits;

async function direct(edge: DirectEdge, n: number, o: TtftOptions): Promise<number> {
  const session = `bench-${n}`;
  const t0 = performance.now();
  // a channel per request, as the worker opens one per request
  const c = await DirectClient.open(edge, "bench", "direct");
  try {
    await c.call({ type: "open_session", session, budget: o.budget, ephemeral: true });
    // the same messages the worker sends (the engine renders them with the model's template)
    await c.call({
      type: "append",
      session,
      messages: [{ role: "user", content: QUESTION }],
      add_generation_prompt: true,
    });
    let first = 0;
    await c.call({ type: "generate", session, max_tokens: o.maxTokens, temperature: 0 }, (f) => {
      if (f.type === "token" && first === 0) first = performance.now();
    });
    await c.call({ type: "close", session });
    return first - t0;
  } finally {
    c.close();
  }
}

async function viaWorker(url: string, key: string, o: TtftOptions): Promise<number> {
  const t0 = performance.now();
  const r = await fetch(`${url}/v1/chat/completions`, {
    method: "POST",
    headers: { authorization: `Bearer ${key}`, "content-type": "application/json" },
    body: JSON.stringify({
      model: "default",
      stream: true,
      max_tokens: o.maxTokens,
      temperature: 0,
      kv_budget: o.budget,
      messages: [{ role: "user", content: QUESTION }],
    }),
  });
  if (!r.ok) throw new Error(`worker: HTTP ${r.status}: ${await r.text()}`);
  let first = 0;
  for await (const ev of readSse(r)) {
    if (first === 0 && ev.data.includes('"content":"') && !ev.data.includes('"content":""')) first = performance.now();
  }
  return first - t0;
}

const stats = (xs: number[]) => ({
  p50_ms: round(quantile(xs, 0.5)),
  p95_ms: round(quantile(xs, 0.95)),
  min_ms: round(Math.min(...xs)),
});

export async function runTtftBench(
  o: TtftOptions,
  out: (s: string) => void = (s) => process.stdout.write(`${s}\n`),
): Promise<Record<string, unknown>> {
  const uptime = () => execFileSync("uptime", { encoding: "utf8" }).trim();
  const uptimeBefore = uptime();
  const dir = mkdtempSync(join(tmpdir(), "pkv-ttft-"));
  const stack = await startStack({ hosts: 1, kvPoolBytes: KV_POOL, persistDir: join(dir, "state") });
  const token = hostToken("direct");
  const edge = await DirectEdge.start({ tokens: [token] });
  let host: Proc | undefined;
  try {
    host = await startHostProcess({ connect: edge.url, token, kvPoolBytes: KV_POOL });
    await edge.waitHost("direct");
    await stack.admin.setTenant("bench", { requests_per_minute: 100_000 });
    const key = await stack.admin.createKey("bench");
    // warm-up of both paths (a fresh engine's first graphs, the worker's first requests)
    for (let i = 0; i < WARM_UP; i++) {
      await direct(edge, -1 - i, o);
      await viaWorker(stack.worker.url, key, o);
    }
    const d: number[] = [];
    const w: number[] = [];
    for (let i = 1; i <= o.requests; i++) {
      if (i % 2) {
        d.push(await direct(edge, i, o));
        w.push(await viaWorker(stack.worker.url, key, o));
      } else {
        w.push(await viaWorker(stack.worker.url, key, o));
        d.push(await direct(edge, i, o));
      }
    }
    const diffs = w.map((x, i) => x - d[i]!);
    const result = {
      command: `pkv bench ttft --requests ${o.requests} --max-tokens ${o.maxTokens} --budget ${o.budget}`,
      cpu: cpus()[0]?.model ?? "unknown",
      cores: cpus().length,
      uptime_before: uptimeBefore,
      uptime_after: uptime(),
      loadavg_after: loadavg().map((x) => round(x, 2)),
      setup:
        `chat completion of a ${QUESTION.length}-character question, greedy, budget ${o.budget}, ${o.maxTokens} tokens; ` +
        "two hosts of the same flags (CPU, embedded model): one dialled in to the worker (wrangler dev), one to an " +
        "in-process DirectEdge; requests alternate between the paths",
      requests: o.requests,
      warm_up_requests: WARM_UP,
      straight_to_host: {
        path: "a channel of the host's socket to an in-process DirectEdge: channel_open, open_session, append, generate",
        ...stats(d),
      },
      through_worker: {
        path: "POST /v1/chat/completions (stream): auth, rate check, registry route, HostConn channel, SSE",
        ...stats(w),
      },
      added_p50_ms: round(quantile(w, 0.5) - quantile(d, 0.5)),
      added_p95_ms: round(quantile(w, 0.95) - quantile(d, 0.95)),
      paired_difference_median_ms: round(quantile(diffs, 0.5)),
      samples_ms: { straight_to_host: d.map((x) => round(x)), through_worker: w.map((x) => round(x)) },
    };
    out(JSON.stringify(result, null, 2));
    return result;
  } finally {
    await host?.stop();
    await edge.close();
    await stack.stop();
    rmSync(dir, { recursive: true, force: true });
  }
}

export const command = defineCommand({
  flags: {
    requests: int({ min: 1, max: 10_000, default: 50 }),
    "max-tokens": int({ min: 1, max: 4096, default: 4 }),
    budget: int({ min: 16, max: 1 << 20, default: 128 }),
  },
  async run(f) {
    await runTtftBench({ requests: f.requests, maxTokens: f["max-tokens"], budget: f.budget });
    return 0;
  },
});
