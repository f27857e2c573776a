// `pkv demo` (make demo): the full stack on this machine. A GPU host (CPU, embedded model) and
// the edge worker in Miniflare; a long document (~6k tokens) uploaded as a session in pieces with
// progress, two questions streamed back, then the session's KV bytes vs FullKV and the tenant's
// quota usage.
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

import {
  DEFAULT_NEEDLE,
  DEFAULT_QUESTION,
  directoryHaystack,
  essaysDir,
  generatedFiller,
  insertNeedle,
} from "../eval/haystack.js";
import { defineCommand, int, string } from "../flags.js";
import { readSse } from "./sse-client.js";
import { startStack } from "./stack.js";

export interface StackDemoOptions {
  chars: number;
  budget: number;
  method: string;
  maxTokens: number;
  haystackDir?: string;
}

export const STACK_DEMO_DEFAULTS: StackDemoOptions = { chars: 26_000, budget: 128, method: "pyramidkv", maxTokens: 40 };

const mib = (b: number) => `${(b / 1048576).toFixed(2)} MiB`;

export async function runStackDemo(
  o: StackDemoOptions,
  out: (s: string) => void = (s) => process.stdout.write(s),
): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), "pkv-demo-"));
  const line = (s = "") => out(`${s}\n`);
  line("starting a GPU host (CPU, embedded model) and the edge worker (Miniflare)...");
  const stack = await startStack({
    hosts: 1,
    kvPoolBytes: 512 << 20,
    persistDir: join(dir, "state"),
    vars: { PKV_PIECE_BYTES: "8192" },
  });
  try {
    // The quota must hold the prefill's peak (the whole document uncompressed; docs/HOST.md,
    // "Admission"), not just the compressed session.
    const quota = { kv_quota_bytes: 256 << 20, max_sessions: 4, requests_per_minute: 60 };
    await stack.admin.setTenant("demo", quota);
    const key = await stack.admin.createKey("demo");
    const api = (method: string, path: string, body?: unknown) =>
      fetch(`${stack.worker.url}${path}`, {
        method,
        headers: { authorization: `Bearer ${key}`, "content-type": "application/json" },
        ...(body === undefined ? {} : { body: JSON.stringify(body) }),
      });
    line(
      `worker ${stack.worker.url}, host ${stack.hosts[0]!.url}, tenant demo (quota ${mib(quota.kv_quota_bytes)} KV, ${quota.max_sessions} sessions, ${quota.requests_per_minute} requests/min)\n`,
    );

    const hayDir = o.haystackDir ?? essaysDir();
    const hay = existsSync(hayDir) ? directoryHaystack(hayDir, o.chars) : generatedFiller(o.chars);
    const document = insertNeedle(hay, DEFAULT_NEEDLE, 50);
    line(
      `POST /v1/sessions: a ${document.length}-character document (${existsSync(hayDir) ? "essays" : "generated filler"}, a needle at 50% depth), ${o.method} budget ${o.budget}`,
    );
    const t0 = performance.now();
    const res = await api("POST", "/v1/sessions", { document, kv_method: o.method, kv_budget: o.budget, stream: true });
    if (!res.ok) throw new Error(`POST /v1/sessions: HTTP ${res.status}: ${await res.text()}`);
    let session: Record<string, unknown> | undefined;
    let lastPrefill = -1;
    for await (const ev of readSse(res)) {
      if (ev.event === "progress") {
        const p = JSON.parse(ev.data) as { phase: string; done: number; total: number };
        if (p.phase === "upload") line(`  upload   ${p.done}/${p.total} bytes`);
        else if (p.done - lastPrefill >= 1024 || p.done === p.total) {
          line(`  prefill  ${p.done}/${p.total} tokens`);
          lastPrefill = p.done;
        }
      } else if (ev.event === "session") session = JSON.parse(ev.data) as Record<string, unknown>;
      else if (ev.data !== "[DONE]") throw new Error(`session upload failed: ${ev.data}`);
    }
    if (!session) throw new Error("no session event");
    line(
      `  session ${String(session.id)} on ${String(session.host)}: ${String(session.tokens)} tokens in ${((performance.now() - t0) / 1000).toFixed(1)} s\n`,
    );

    for (const q of [DEFAULT_QUESTION, "What is the document mostly about? Answer in one sentence."]) {
      line(`Q: ${q}`);
      out("A: ");
      const r = await api("POST", `/v1/sessions/${String(session.id)}/messages`, {
        content: q,
        max_tokens: o.maxTokens,
        stream: true,
      });
      if (!r.ok) throw new Error(`question: HTTP ${r.status}: ${await r.text()}`);
      for await (const ev of readSse(r)) {
        if (ev.data === "[DONE]") continue;
        const j = JSON.parse(ev.data) as { error?: { message: string }; choices?: { delta: { content?: string } }[] };
        if (j.error) throw new Error(j.error.message);
        out(j.choices?.[0]?.delta.content ?? "");
      }
      line("\n");
    }

    const s = (await (await api("GET", `/v1/sessions/${String(session.id)}`)).json()) as Record<string, number>;
    const u = (await (await api("GET", "/v1/usage")).json()) as {
      sessions: number;
      requests_last_minute: number;
      limits: { max_sessions: number; requests_per_minute: number };
      hosts: { host: string; kv_used_bytes?: number; kv_quota_bytes?: number }[];
    };
    line(
      `KV cache of the session (${o.method} @ ${o.budget}): ${mib(s.kv_bytes!)} for ${s.tokens} tokens; FullKV would hold ${mib(s.full_kv_bytes!)} → ${(s.full_kv_bytes! / s.kv_bytes!).toFixed(1)}x smaller`,
    );
    line(
      `tenant demo: ${u.sessions}/${u.limits.max_sessions} sessions, ${u.requests_last_minute}/${u.limits.requests_per_minute} requests in the last minute`,
    );
    for (const h of u.hosts)
      line(`  host ${h.host}: KV ${mib(h.kv_used_bytes ?? 0)} used of a ${mib(h.kv_quota_bytes ?? 0)} quota`);
    await api("DELETE", `/v1/sessions/${String(session.id)}`);
  } finally {
    await stack.stop();
    rmSync(dir, { recursive: true, force: true });
  }
}

export const command = defineCommand({
  flags: {
    chars: int({ min: 200, max: 30_000, default: STACK_DEMO_DEFAULTS.chars }),
    budget: int({ min: 16, max: 1 << 20, default: STACK_DEMO_DEFAULTS.budget }),
    method: string({ default: STACK_DEMO_DEFAULTS.method }),
    "max-tokens": int({ min: 1, max: 4096, default: STACK_DEMO_DEFAULTS.maxTokens }),
    "haystack-dir": string(),
  },
  async run(f) {
    await runStackDemo({
      chars: f.chars,
      budget: f.budget,
      method: f.method,
      maxTokens: f["max-tokens"],
      haystackDir: f["haystack-dir"],
    });
    return 0;
  },
});
