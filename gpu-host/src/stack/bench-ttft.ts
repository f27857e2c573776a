// `pkv bench ttft`: time to first token through the edge worker (Miniflare, openai-style stream)
// vs straight to the GPU host (its WebSocket protocol), the same prompt and settings, requests
// alternating between the two paths so both see the same machine load.
import { mkdtempSync, rmSync } from "node:fs";
import { loadavg, tmpdir } from "node:os";
import { join } from "node:path";

import { decodeHostMessage, encodeHostMessage, type FromHostMessage, type ToHostMessage } from "@pyramidkv/shared";
import { WebSocket } from "ws";

import { defineCommand, int } from "../flags.js";
import { makeEdgeToken } from "../host/auth.js";
import { readSse } from "./sse-client.js";
import { startStack } from "./stack.js";

export interface TtftOptions {
  requests: number;
  maxTokens: number;
  budget: number;
}

const QUESTION = "What is the capital of France? Answer in one word.";

function quantile(xs: number[], q: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.ceil(q * s.length) - 1)]!;
}

class DirectClient {
  private next = 1;
  private readonly waiters = new Map<number, (f: FromHostMessage) => void>();
  private constructor(private readonly ws: WebSocket) {
    ws.on("message", (data: Buffer) => {
      const d = decodeHostMessage(new Uint8Array(data), "from_host");
      if (!d.ok) return;
      const m = d.message;
      if ("id" in m && m.id !== undefined) this.waiters.get(m.id)?.(m);
    });
  }
  static async connect(url: string, secret: string): Promise<DirectClient> {
    const ws = new WebSocket(url.replace(/^http/, "ws"), {
      headers: { authorization: `Bearer ${makeEdgeToken(secret, { tenant: "bench", host: new URL(url).host })}` },
    });
    const c = new DirectClient(ws);
    await new Promise<void>((res, rej) => {
      ws.once("open", () => res());
      ws.once("error", rej);
    });
    return c;
  }
  /** Sends; resolves with the final frame; onFrame sees every frame. */
  call(msg: Omit<ToHostMessage, "id">, onFrame?: (f: FromHostMessage) => void): Promise<FromHostMessage> {
    const id = this.next++;
    return new Promise((resolve) => {
      this.waiters.set(id, (f) => {
        onFrame?.(f);
        if (f.type !== "token" && f.type !== "progress") {
          this.waiters.delete(id);
          resolve(f);
        }
      });
      this.ws.send(encodeHostMessage({ ...msg, id } as never));
    });
  }
  close(): void {
    this.ws.close();
  }
}

async function direct(c: DirectClient, n: number, o: TtftOptions): Promise<number> {
  const session = `bench-${n}`;
  const t0 = performance.now();
  const ok = (f: FromHostMessage, type: string) => {
    if (f.type !== type) throw new Error(`direct: expected ${type}, got ${JSON.stringify(f)}`);
  };
  ok(await c.call({ type: "open_session", tenant: "bench", session, budget: o.budget } as never), "opened");
  // the same messages the worker sends (the engine renders them with the model's template)
  const messages = [{ role: "user", content: QUESTION }];
  ok(
    await c.call({ type: "append", tenant: "bench", session, messages, add_generation_prompt: true } as never),
    "appended",
  );
  let first = 0;
  ok(
    await c.call({ type: "generate", tenant: "bench", session, max_tokens: o.maxTokens } as never, (f) => {
      if (f.type === "token" && first === 0) first = performance.now();
    }),
    "done",
  );
  await c.call({ type: "close", tenant: "bench", session } as never);
  return first - t0;
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

export async function runTtftBench(
  o: TtftOptions,
  out: (s: string) => void = (s) => process.stdout.write(`${s}\n`),
): Promise<{ direct: number[]; worker: number[] }> {
  const dir = mkdtempSync(join(tmpdir(), "pkv-ttft-"));
  const stack = await startStack({ hosts: 1, kvPoolBytes: 256 << 20, persistDir: join(dir, "state") });
  try {
    await stack.admin.setTenant("bench", { requests_per_minute: 100_000 });
    const key = await stack.admin.createKey("bench");
    const c = await DirectClient.connect(stack.hosts[0]!.url, stack.secret);
    await direct(c, 0, o); // warm-up of both paths
    await viaWorker(stack.worker.url, key, o);
    const d: number[] = [];
    const w: number[] = [];
    for (let i = 1; i <= o.requests; i++) {
      if (i % 2) {
        d.push(await direct(c, i, o));
        w.push(await viaWorker(stack.worker.url, key, o));
      } else {
        w.push(await viaWorker(stack.worker.url, key, o));
        d.push(await direct(c, i, o));
      }
    }
    c.close();
    const fmt = (xs: number[]) =>
      `p50 ${quantile(xs, 0.5).toFixed(1)} ms  p95 ${quantile(xs, 0.95).toFixed(1)} ms  min ${Math.min(...xs).toFixed(1)} ms`;
    out(
      `time to first token, ${o.requests} requests each, a ${QUESTION.length}-character question, budget ${o.budget}, 1 host (CPU), load average ${loadavg()[0]!.toFixed(1)}:`,
    );
    out(`  straight to the host (WebSocket, open+append+generate): ${fmt(d)}`);
    out(`  through the worker (wrangler dev; auth, rate check, routing probe, new host WebSocket, SSE): ${fmt(w)}`);
    const diffs = w.map((x, i) => x - d[i]!);
    out(
      `  worker overhead: p50 ${(quantile(w, 0.5) - quantile(d, 0.5)).toFixed(1)} ms; median of the paired differences ${quantile(diffs, 0.5).toFixed(1)} ms`,
    );
    return { direct: d, worker: w };
  } finally {
    await stack.stop();
    rmSync(dir, { recursive: true, force: true });
  }
}

export const command = defineCommand({
  flags: {
    requests: int({ min: 1, max: 10_000, default: 20 }),
    "max-tokens": int({ min: 1, max: 4096, default: 4 }),
    budget: int({ min: 16, max: 1 << 20, default: 128 }),
  },
  async run(f) {
    await runTtftBench({ requests: f.requests, maxTokens: f["max-tokens"], budget: f.budget });
    return 0;
  },
});
