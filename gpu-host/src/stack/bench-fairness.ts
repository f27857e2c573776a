// `pkv bench fairness`: tenant B's stream while tenant A floods the host with generations. Two real
// hosts (engine on CPU, in this process, dialled in to an in-process DirectEdge) differ only in
// their decode lanes: "unbounded" (every generation in the
// engine at once: each decode step carries all of A's) and "bounded" (--decode-lanes,
// --tenant-decode-lanes: A's extra generations queue). Each run measures both, in alternating
// order, so both see the same machine load; B's time to first token and inter-token gaps are
// reported per run, and the medians of the runs with the ratio unbounded / bounded, as JSON.
import { execFileSync } from "node:child_process";
import { cpus, loadavg } from "node:os";

import type { FromHostMessage } from "@pyramidkv/shared";

import { defineCommand, int } from "../flags.js";
import { parseHostConfig } from "../host/config.js";
import { DirectEdge, hostToken } from "../host/direct-edge.js";
import { type RunningHost, startHost } from "../host/main.js";
import { DirectClient } from "./direct-client.js";

export interface FairnessOptions {
  /** concurrent generations of tenant A */
  flood: number;
  /** tokens of each of A's generations (they outlast B's stream) */
  floodTokens: number;
  /** tokens of B's generation */
  tokens: number;
  runs: number;
  /** the bounded host's lanes */
  decodeLanes: number;
  tenantDecodeLanes: number;
  threads?: number;
}

const FLOOD_PROMPT = "Count from 1 to 1000, separated by commas.";
const STREAM_PROMPT = "Write a short story about a lighthouse keeper and a storm.";
/** lanes of the unbounded host: the flag's maximum, more than any flood here */
const UNBOUNDED = 65536;

function quantile(xs: number[], q: number): number {
  if (xs.length === 0) return Number.NaN;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil(q * s.length) - 1))]!;
}

const median = (xs: number[]) => quantile(xs, 0.5);
const round = (x: number, digits = 1) => Math.round(x * 10 ** digits) / 10 ** digits;

/** Tokens in a frame: a token frame, or several coalesced under backpressure. */
function tokensIn(f: FromHostMessage): number {
  if (f.type !== "token") return 0;
  const many = (f as { tokens?: number[] }).tokens;
  return many ? many.length : 1;
}

export interface StreamSample {
  /** B's generate sent → its first token (ms) */
  ttft_ms: number;
  gap_p50_ms: number;
  gap_p95_ms: number;
  /** B's tokens over its stream (first token → done) */
  tokens_per_s: number;
  /** A's tokens per second in all while B streamed */
  flood_tokens_per_s: number;
}

async function measure(
  edge: DirectEdge,
  host: string,
  o: FairnessOptions,
  lanes: number,
  run: number,
): Promise<StreamSample> {
  const a = await DirectClient.open(edge, "flood", host);
  const b = await DirectClient.open(edge, "stream", host);
  const floodIds = Array.from({ length: o.flood }, (_, i) => `a${run}-${i}`);
  try {
    await Promise.all(
      floodIds.map(async (session) => {
        await a.call({ type: "open_session", session, budget: 256 });
        await a.call({
          type: "append",
          session,
          messages: [{ role: "user", content: FLOOD_PROMPT }],
          add_generation_prompt: true,
        });
      }),
    );
    const streamId = `b${run}`;
    await b.call({ type: "open_session", session: streamId, budget: 256 });
    await b.call({
      type: "append",
      session: streamId,
      messages: [{ role: "user", content: STREAM_PROMPT }],
      add_generation_prompt: true,
    });

    // A floods; B starts once A's generations are decoding.
    let floodTokens = 0;
    let decoding!: () => void;
    const started = new Promise<void>((r) => (decoding = r));
    const firstOf = new Set<string>();
    const flood = floodIds.map((session) =>
      a
        .call({ type: "generate", session, max_tokens: o.floodTokens, temperature: 0 }, (f) => {
          const n = tokensIn(f);
          floodTokens += n;
          if (n > 0 && !firstOf.has(session)) {
            firstOf.add(session);
            if (firstOf.size >= Math.min(o.flood, lanes)) decoding();
          }
        })
        .catch((e: Error) => (e.message.includes("cancelled") ? undefined : Promise.reject(e))),
    );
    await started;

    const times: number[] = [];
    const t0 = performance.now();
    const floodAtStart = floodTokens;
    await b.call({ type: "generate", session: streamId, max_tokens: o.tokens, temperature: 0 }, (f) => {
      const n = tokensIn(f);
      const now = performance.now();
      for (let i = 0; i < n; i++) times.push(now);
    });
    const t1 = performance.now();
    const floodDuring = floodTokens - floodAtStart;
    for (const session of floodIds) await a.call({ type: "cancel", session });
    await Promise.all(flood);
    for (const session of floodIds) await a.call({ type: "close", session });
    await b.call({ type: "close", session: streamId });

    if (times.length < 2) throw new Error(`tenant B got ${times.length} tokens; it needs at least 2 for a gap`);
    const gaps = times.slice(1).map((t, i) => t - times[i]!);
    return {
      ttft_ms: round(times[0]! - t0),
      gap_p50_ms: round(quantile(gaps, 0.5)),
      gap_p95_ms: round(quantile(gaps, 0.95)),
      tokens_per_s: round(((times.length - 1) * 1000) / (times[times.length - 1]! - times[0]!)),
      flood_tokens_per_s: round((floodDuring * 1000) / (t1 - t0)),
    };
  } finally {
    a.close();
    b.close();
  }
}

function hostConfigFor(
  o: FairnessOptions,
  edge: DirectEdge,
  name: string,
  decodeLanes: number,
  tenantDecodeLanes: number,
) {
  return parseHostConfig(
    [
      "--port",
      "0",
      "--connect",
      edge.url,
      "--host-token",
      hostToken(name),
      "--kv-pool-bytes",
      String(512 << 20),
      "--idle-seconds",
      "3600",
      "--checkpoint",
      "off",
      "--decode-lanes",
      String(decodeLanes),
      "--tenant-decode-lanes",
      String(tenantDecodeLanes),
      ...(o.threads ? ["--threads", String(o.threads)] : []),
    ],
    {},
  );
}

function summary(samples: StreamSample[]) {
  return {
    ttft_ms: round(median(samples.map((s) => s.ttft_ms))),
    gap_p50_ms: round(median(samples.map((s) => s.gap_p50_ms))),
    gap_p95_ms: round(median(samples.map((s) => s.gap_p95_ms))),
    tokens_per_s: round(median(samples.map((s) => s.tokens_per_s))),
    flood_tokens_per_s: round(median(samples.map((s) => s.flood_tokens_per_s))),
  };
}

export async function runFairnessBench(
  o: FairnessOptions,
  out: (s: string) => void = (s) => process.stdout.write(`${s}\n`),
): Promise<unknown> {
  const load = () => execFileSync("uptime", { encoding: "utf8" }).trim();
  const loadBefore = load();
  const edge = await DirectEdge.start({ tokens: [hostToken("unbounded"), hostToken("bounded")] });
  const modes = {
    unbounded: hostConfigFor(o, edge, "unbounded", UNBOUNDED, UNBOUNDED),
    bounded: hostConfigFor(o, edge, "bounded", o.decodeLanes, o.tenantDecodeLanes),
  } as const;
  const hosts: Partial<Record<keyof typeof modes, RunningHost>> = {};
  const samples: Record<keyof typeof modes, StreamSample[]> = { unbounded: [], bounded: [] };
  try {
    for (const [mode, config] of Object.entries(modes) as [keyof typeof modes, (typeof modes)[keyof typeof modes]][]) {
      hosts[mode] = await startHost(config);
      await edge.waitHost(mode);
    }
    // warm-up of both (first prefill and decode of a fresh engine are slower)
    const warm = { ...o, flood: 1, floodTokens: 8, tokens: 4 };
    await measure(edge, "unbounded", warm, 1, -1);
    await measure(edge, "bounded", warm, 1, -1);
    for (let r = 0; r < o.runs; r++) {
      const order: (keyof typeof modes)[] = r % 2 === 0 ? ["unbounded", "bounded"] : ["bounded", "unbounded"];
      for (const mode of order) {
        const s = await measure(edge, mode, o, modes[mode].tenantDecodeLanes, r);
        samples[mode].push(s);
        process.stderr.write(`run ${r + 1}/${o.runs} ${mode}: ${JSON.stringify(s)}\n`);
      }
    }
  } finally {
    for (const h of Object.values(hosts)) await h?.stop();
    await edge.close();
  }
  const unbounded = summary(samples.unbounded);
  const bounded = summary(samples.bounded);
  const result = {
    command: `pkv bench fairness --flood ${o.flood} --flood-tokens ${o.floodTokens} --tokens ${o.tokens} --runs ${o.runs} --decode-lanes ${o.decodeLanes} --tenant-decode-lanes ${o.tenantDecodeLanes}${o.threads ? ` --threads ${o.threads}` : ""}`,
    cpu: cpus()[0]?.model ?? "unknown",
    cores: cpus().length,
    uptime_before: loadBefore,
    uptime_after: load(),
    loadavg_after: loadavg().map((x) => round(x, 2)),
    setup: `tenant A: ${o.flood} concurrent generations of ${o.floodTokens} tokens (greedy); tenant B: one of ${o.tokens}, started once A's are decoding`,
    modes: {
      unbounded: { decode_lanes: UNBOUNDED, tenant_decode_lanes: UNBOUNDED },
      bounded: { decode_lanes: o.decodeLanes, tenant_decode_lanes: o.tenantDecodeLanes },
    },
    runs: samples,
    median: { unbounded, bounded },
    ratio_unbounded_over_bounded: {
      ttft: round(unbounded.ttft_ms / bounded.ttft_ms, 2),
      gap_p50: round(unbounded.gap_p50_ms / bounded.gap_p50_ms, 2),
      gap_p95: round(unbounded.gap_p95_ms / bounded.gap_p95_ms, 2),
      flood_tokens_per_s: round(unbounded.flood_tokens_per_s / bounded.flood_tokens_per_s, 2),
    },
  };
  out(JSON.stringify(result, null, 2));
  return result;
}

export const command = defineCommand({
  flags: {
    flood: int({ min: 1, max: 4096, default: 32 }),
    "flood-tokens": int({ min: 2, max: 4096, default: 256 }),
    tokens: int({ min: 2, max: 4096, default: 32 }),
    runs: int({ min: 1, max: 100, default: 3 }),
    "decode-lanes": int({ min: 1, max: 65536, default: 64 }),
    "tenant-decode-lanes": int({ min: 1, max: 65536, default: 4 }),
    threads: int({ min: 0, max: 1024, default: 0 }),
  },
  async run(f) {
    if (f["tenant-decode-lanes"] > f["decode-lanes"])
      throw new Error(
        `--tenant-decode-lanes: ${f["tenant-decode-lanes"]} is more than --decode-lanes ${f["decode-lanes"]}; it must be 1..${f["decode-lanes"]}`,
      );
    await runFairnessBench({
      flood: f.flood,
      floodTokens: f["flood-tokens"],
      tokens: f.tokens,
      runs: f.runs,
      decodeLanes: f["decode-lanes"],
      tenantDecodeLanes: f["tenant-decode-lanes"],
      threads: f.threads === 0 ? undefined : f.threads,
    });
    return 0;
  },
});
