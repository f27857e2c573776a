// `pkv soak --minutes N`: a bounded soak of the whole stack (not in CI). Two GPU hosts (each with
// its own offload directory) and the edge worker in Miniflare; three tenants with KV quotas (one
// small); for N minutes clients send random long documents (files under --data, else generated
// filler) and questions through the sessions API and chat completions, some of them aborted by
// the client, while at random times an engine (kill -9) or a whole host (kill -9, started again
// with the same token and offload directory; its sessions meanwhile continue on the other host
// from R2) dies. Every host's tenant stats are sampled every few seconds.
// At the end it prints one JSON object of counts and checks (docs/BENCHMARKS.md, "Soak"); the exit
// code is 1 when a check failed. The process helpers here (engine pids, killing a process tree,
// reading a host's /metrics) are the fault tests' too (test/worker-faults.test.ts).
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { loadavg, tmpdir } from "node:os";
import { join, resolve } from "node:path";

import { repoRoot } from "../engine/engine-path.js";
import { generatedFiller, seededRandom } from "../eval/haystack.js";
import { defineCommand, int, string } from "../flags.js";
import { readSse } from "./sse-client.js";
import { descendantPids, killTree, type Proc, signal, type Stack, startStack, until } from "./stack.js";

// ---- processes ------------------------------------------------------------------------------------

/** The pid of a host's engine process (a child of `pkv host` named pkv-engine), if it runs. */
export function enginePidOf(host: Proc): number | undefined {
  const pid = host.child.pid;
  if (pid === undefined) return undefined;
  return descendantPids(pid).find((p) => commOf(p).startsWith("pkv-engine"));
}

function commOf(pid: number): string {
  try {
    return readFileSync(`/proc/${pid}/comm`, "utf8").trim();
  } catch {
    return "";
  }
}

export { descendantPids, killTree, signal, until };

// ---- a host's /metrics -----------------------------------------------------------------------------

/** The sum of the series of metric `name` whose labels include `labels`. */
export function metricSum(text: string, name: string, labels: Record<string, string> = {}): number {
  let sum = 0;
  for (const line of text.split("\n")) {
    if (!line.startsWith(name) || (line[name.length] !== "{" && line[name.length] !== " ")) continue;
    const m = /^[^{ ]+(?:\{(.*)\})? (\S+)$/.exec(line);
    if (!m) continue;
    const have = Object.fromEntries([...(m[1] ?? "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)].map((x) => [x[1], x[2]]));
    if (Object.entries(labels).every(([k, v]) => have[k] === v)) sum += Number(m[2]);
  }
  return sum;
}

/** Open sessions (every state) of each tenant on a host, from its /metrics. */
export function sessionsByTenant(text: string): Record<string, number> {
  const out: Record<string, number> = {};
  for (const m of text.matchAll(/^pkv_host_sessions\{tenant="([^"]*)",state="[a-z_]+"\} (\d+)$/gm))
    out[m[1]!] = (out[m[1]!] ?? 0) + Number(m[2]);
  return out;
}

// ---- the soak ---------------------------------------------------------------------------------------

export interface SoakOptions {
  minutes: number;
  seed: number;
  /** documents: a directory of text files (or one holding haystack/paul_graham_essays); absent: filler */
  data?: string;
  /** concurrent clients */
  clients: number;
  /** the tenants' session TTL (edge and hosts) */
  ttlSeconds: number;
  /** restored sessions re-asked on fresh twins at the end */
  verify: number;
  out?: string;
  log?: (line: string) => void;
}

const TENANTS = {
  alpha: { kv_quota_bytes: 128 << 20, max_sessions: 8 },
  beta: { kv_quota_bytes: 128 << 20, max_sessions: 8 },
  small: { kv_quota_bytes: 16 << 20, max_sessions: 4 },
} as const;
type TenantName = keyof typeof TENANTS;
const TENANT_NAMES = Object.keys(TENANTS) as TenantName[];
const MODEL = "default";
/** errors a client retries: the host or its engine is restarting, or busy */
const RETRYABLE = ["host_unavailable", "engine_restarted", "checkpoint_failed", "timeout", "busy", "pool_full"];
const QUESTIONS = [
  "What is the secret code mentioned in the document?",
  "Summarise the document in one sentence.",
  "What is the main topic of the document?",
  "Name one person or place the document mentions.",
  "What does the author recommend?",
];

/** Where a request ended: ok, aborted by the client, a typed error (its code), or untyped. */
type Outcome =
  | { kind: "ok"; text: string }
  | { kind: "aborted" }
  | { kind: "typed"; code: string; message?: string }
  | { kind: "untyped"; why: string };

interface Turn {
  question: string;
  maxTokens: number;
  answer: string;
  /** a kill on the session's host came between the session's open and this turn */
  afterKill: boolean;
}

interface Tracked {
  tenant: TenantName;
  id: string;
  hostIndex: number;
  document: string;
  kv: Record<string, unknown>;
  turns: Turn[];
  /** every turn answered, none aborted: its answers can be compared with a twin's */
  clean: boolean;
  openedAt: number;
}

class Counts {
  total = 0;
  ok = 0;
  aborted = 0;
  typed: Record<string, number> = {};
  /** the first few messages of each code */
  typedSamples: Record<string, string[]> = {};
  untyped: string[] = [];
  byKind: Record<string, Record<string, number>> = {};
  add(kind: string, o: Outcome): void {
    this.total++;
    const key = o.kind === "typed" ? o.code : o.kind;
    if (o.kind === "ok") this.ok++;
    else if (o.kind === "aborted") this.aborted++;
    else if (o.kind === "typed") {
      this.typed[o.code] = (this.typed[o.code] ?? 0) + 1;
      const samples = this.typedSamples[o.code] ?? [];
      if (samples.length < 3) samples.push(`${kind}: ${o.message ?? ""}`.slice(0, 300));
      this.typedSamples[o.code] = samples;
    } else this.untyped.push(`${kind}: ${o.why}`.slice(0, 300));
    const k = this.byKind[kind] ?? {};
    k[key] = (k[key] ?? 0) + 1;
    this.byKind[kind] = k;
  }
}

/** The documents: random slices of a corpus (files under `data`, else generated filler). */
function corpus(data: string | undefined, seed: number): string {
  const dirs = data === undefined ? [] : [join(data, "haystack", "paul_graham_essays"), data];
  for (const d of dirs) {
    if (!existsSync(d)) continue;
    const files = readdirSync(d)
      .filter((f) => f.endsWith(".txt"))
      .sort();
    if (files.length === 0) continue;
    const text = files.map((f) => readFileSync(join(d, f), "utf8")).join("\n\n");
    if (text.length > 20_000) return text;
  }
  return generatedFiller(200_000, seed);
}

/** An OpenAI-style error body's code, or the SSE stream's error event code. */
async function outcomeOf(res: Response): Promise<Outcome> {
  const text = await res.text();
  if (res.ok) return { kind: "ok", text };
  try {
    const error = (JSON.parse(text) as { error?: { code?: unknown; message?: unknown } }).error;
    if (typeof error?.code === "string" && error.code !== "")
      return { kind: "typed", code: error.code, message: String(error.message ?? "") };
  } catch {
    // not JSON
  }
  return { kind: "untyped", why: `HTTP ${res.status} without an error code: ${text.slice(0, 200)}` };
}

/** Reads a completion stream to its end: ok (finish + [DONE]), a typed error event, or untyped. */
async function streamOutcome(res: Response, onToken?: (n: number) => void): Promise<Outcome> {
  if (!res.ok) return outcomeOf(res);
  let text = "";
  let done = false;
  let finish = false;
  let tokens = 0;
  for await (const ev of readSse(res)) {
    if (ev.data === "[DONE]") {
      done = true;
      continue;
    }
    if (ev.event === "session") {
      // POST /v1/sessions streams progress, then the session object
      finish = true;
      text = ev.data;
      continue;
    }
    const j = JSON.parse(ev.data) as {
      error?: { code?: string; message?: string };
      choices?: { delta?: { content?: string }; finish_reason?: string | null }[];
      object?: string;
    };
    if (j.error) {
      return typeof j.error.code === "string" && j.error.code !== ""
        ? { kind: "typed", code: j.error.code, message: j.error.message }
        : { kind: "untyped", why: `an error event without a code: ${ev.data.slice(0, 200)}` };
    }
    const c = j.choices?.[0];
    if (c?.delta?.content) {
      text += c.delta.content;
      onToken?.(++tokens);
    }
    if (c?.finish_reason) finish = true;
  }
  if (!done) return { kind: "untyped", why: "the stream ended without [DONE] or an error event" };
  if (!finish) return { kind: "untyped", why: "the stream ended without a finish_reason" };
  return { kind: "ok", text };
}

export async function runSoak(o: SoakOptions): Promise<{ report: Record<string, unknown>; ok: boolean }> {
  const log = o.log ?? ((l: string) => process.stderr.write(`soak: ${l}\n`));
  const rnd = seededRandom(o.seed);
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rnd() * xs.length)]!;
  const between = (a: number, b: number) => a + Math.floor(rnd() * (b - a + 1));
  const text = corpus(o.data, o.seed);
  const dir = mkdtempSync(join(tmpdir(), "pkv-soak-"));
  const offload = [0, 1].map((i) => join(dir, `offload-${i}`));
  const hostArgs = ["--chunk-size", "512", "--decode-lanes", "8", "--tenant-decode-lanes", "4"];
  const kvPoolBytes = 512 << 20;
  const load0 = loadavg();
  log(`starting 2 hosts + the worker (${dir})`);
  const stack: Stack = await startStack({
    hosts: 2,
    kvPoolBytes,
    persistDir: join(dir, "edge"),
    threads: 2,
    hostArgs,
    hostArgsEach: (i) => ["--offload-dir", offload[i]!],
  });
  const hosts = stack.hosts;
  const hostDown = [false, false];
  const keys: Record<string, string> = {};
  const counts = new Counts();
  const kills: { at_s: number; kind: "engine" | "host"; host: number; restart_s?: number; error?: string }[] = [];
  const killTimes: number[][] = [[], []];
  const tracked: Tracked[] = [];
  const quota: Record<string, { quota: number; peak_used: number; samples: number; over: number }> = {};
  const t0 = Date.now();
  const at = () => Math.round((Date.now() - t0) / 100) / 10;
  let hostIds = new Map<string, number>();
  let running = true;
  try {
    for (const [name, limits] of Object.entries(TENANTS)) {
      await stack.admin.setTenant(name, { ...limits, requests_per_minute: 100_000, session_ttl_s: o.ttlSeconds });
      keys[name] = await stack.admin.createKey(name);
      quota[name] = { quota: limits.kv_quota_bytes, peak_used: 0, samples: 0, over: 0 };
    }
    const refreshIds = async () => {
      const list = (await stack.admin.hosts()).hosts;
      hostIds = new Map(list.map((h) => [h.id, hosts.findIndex((p) => p.name === h.name)]));
    };
    await refreshIds();
    const api = (tenant: string, method: string, path: string, body?: unknown, signal?: AbortSignal) =>
      fetch(`${stack.worker.url}${path}`, {
        method,
        headers: { authorization: `Bearer ${keys[tenant]}`, "content-type": "application/json" },
        ...(body === undefined ? {} : { body: JSON.stringify(body) }),
        signal,
      });
    /** One request, its outcome counted; `abortAfter` tokens (streams) or ms (whole) aborts it. */
    const request = async (
      kind: string,
      tenant: string,
      method: string,
      path: string,
      body: Record<string, unknown> | undefined,
      abort?: { tokens?: number; ms?: number },
    ): Promise<Outcome> => {
      const ctl = new AbortController();
      let aborted = false;
      const doAbort = () => {
        aborted = true;
        ctl.abort();
      };
      const timer = abort?.ms !== undefined ? setTimeout(doAbort, abort.ms) : undefined;
      let out: Outcome;
      try {
        const res = await api(tenant, method, path, body, ctl.signal);
        out =
          body?.stream === true
            ? await streamOutcome(res, (n) => {
                if (abort?.tokens !== undefined && n >= abort.tokens) doAbort();
              })
            : await outcomeOf(res);
      } catch (e) {
        out = aborted
          ? { kind: "aborted" }
          : { kind: "untyped", why: `fetch: ${e instanceof Error ? e.message : String(e)}` };
      } finally {
        clearTimeout(timer);
      }
      if (aborted && out.kind !== "ok") out = { kind: "aborted" };
      counts.add(kind, out);
      return out;
    };
    const documentOf = () => {
      const len = between(1_500, 8_000);
      const from = between(0, Math.max(0, text.length - len - 1));
      const start = text.indexOf(". ", from);
      const body = text.slice(start < 0 ? from : start + 2, (start < 0 ? from : start + 2) + len);
      const code = `${pick(["amber", "cobalt", "willow", "granite", "saffron", "harbour"])}-${between(100, 999)}`;
      const cut = body.indexOf(". ", Math.floor(body.length * rnd()));
      const at = cut < 0 ? body.length : cut + 2;
      return `${body.slice(0, at)}The secret code is ${code}. ${body.slice(at)}`;
    };
    const kvOf = (tenant: TenantName): Record<string, unknown> =>
      tenant === "small"
        ? { kv_method: "pyramidkv", kv_budget: 64 }
        : pick([
            { kv_method: "pyramidkv", kv_budget: 128 },
            { kv_method: "pyramidkv", kv_budget: 64 },
            { kv_method: "snapkv", kv_budget: 128 },
            { kv_method: "full" },
          ]);
    const tenantOf = (): TenantName => (rnd() < 0.2 ? "small" : rnd() < 0.5 ? "alpha" : "beta");
    const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

    /** A sessions-API conversation: open, 1-3 questions, then delete (or leave it to its TTL). */
    const conversation = async () => {
      const tenant = tenantOf();
      const clean = rnd() < 0.6;
      const document = documentOf();
      const kv = kvOf(tenant);
      const openedAt = Date.now();
      const stream = rnd() < 0.5;
      const opened = await request(
        "session_open",
        tenant,
        "POST",
        "/v1/sessions",
        { document, ...kv, stream },
        !clean && rnd() < 0.2 ? { ms: between(200, 3000) } : undefined,
      );
      if (opened.kind !== "ok") return;
      let session: { id: string; host: string } | undefined;
      try {
        session = JSON.parse(opened.text) as { id: string; host: string };
      } catch {
        counts.add("session_open_body", { kind: "untyped", why: `not a session object: ${opened.text.slice(0, 200)}` });
      }
      if (!session) return;
      if (!hostIds.has(session.host)) await refreshIds().catch(() => {});
      const t: Tracked = {
        tenant,
        id: session.id,
        hostIndex: hostIds.get(session.host) ?? -1,
        document,
        kv,
        turns: [],
        clean,
        openedAt,
      };
      tracked.push(t);
      const questions = between(1, 3);
      for (let q = 0; q < questions && running; q++) {
        await sleep(between(300, 4000));
        const question = pick(QUESTIONS);
        const maxTokens = between(8, 24);
        const startedAt = Date.now();
        const streamed = rnd() < 0.5;
        const abort =
          !clean && rnd() < 0.4 ? (streamed ? { tokens: between(1, 6) } : { ms: between(100, 2000) }) : undefined;
        const r = await request(
          "message",
          tenant,
          "POST",
          `/v1/sessions/${t.id}/messages`,
          { content: question, max_tokens: maxTokens, temperature: 0, stream: streamed },
          abort,
        );
        if (r.kind !== "ok") {
          t.clean = false;
          if (
            r.kind === "typed" &&
            ["session_lost", "session_expired", "session_not_found", "unknown_session"].includes(r.code)
          )
            return;
          continue;
        }
        const answer = streamed
          ? r.text
          : ((JSON.parse(r.text) as { choices?: { message?: { content?: string } }[] }).choices?.[0]?.message
              ?.content ?? "");
        const k = t.hostIndex >= 0 ? killTimes[t.hostIndex]! : [];
        t.turns.push({ question, maxTokens, answer, afterKill: k.some((x) => x >= t.openedAt && x <= startedAt) });
      }
      if (rnd() < 0.8) await request("session_delete", tenant, "DELETE", `/v1/sessions/${t.id}`, undefined);
    };

    /** A chat completion: a slice of a document and a question, streamed or whole, sometimes aborted. */
    const chat = async () => {
      const tenant = tenantOf();
      const doc = documentOf().slice(0, between(200, 4000));
      const streamed = rnd() < 0.6;
      const abort = rnd() < 0.3 ? (streamed ? { tokens: between(1, 8) } : { ms: between(100, 3000) }) : undefined;
      await request(
        "chat",
        tenant,
        "POST",
        "/v1/chat/completions",
        {
          model: MODEL,
          messages: [{ role: "user", content: `${doc}\n\n${pick(QUESTIONS)}` }],
          max_tokens: between(4, 32),
          temperature: 0,
          stream: streamed,
        },
        abort,
      );
    };

    const client = async () => {
      while (running) {
        try {
          if (rnd() < 0.55) await conversation();
          else await chat();
        } catch (e) {
          counts.add("client", { kind: "untyped", why: `client: ${e instanceof Error ? e.message : String(e)}` });
        }
        await sleep(between(200, 2000));
      }
    };

    const sample = async () => {
      for (const [i, h] of hosts.entries()) {
        if (hostDown[i]) continue;
        let m: string;
        try {
          m = await stack.metrics(h);
        } catch {
          continue;
        }
        for (const tenant of TENANT_NAMES) {
          const used = metricSum(m, "pkv_host_tenant_kv_bytes", { tenant });
          const q = quota[tenant]!;
          q.samples++;
          q.peak_used = Math.max(q.peak_used, used);
          if (q.quota > 0 && used > q.quota) q.over++;
        }
      }
    };
    const sampler = (async () => {
      while (running) {
        await sample();
        await sleep(3000);
      }
    })();

    // Faults: kill -9 of an engine or a whole host at random times, at least one of each in a run.
    const kill = async (kind: "engine" | "host", victim?: number) => {
      const i = victim ?? between(0, 1);
      const h = hosts[i]!;
      const ev: (typeof kills)[number] = { at_s: at(), kind, host: i };
      kills.push(ev);
      killTimes[i]!.push(Date.now());
      log(`${ev.at_s} s: kill -9 of ${kind === "engine" ? `host ${i}'s engine` : `host ${i} (and its engine)`}`);
      if (kind === "engine") {
        const pid = enginePidOf(h);
        if (pid === undefined || !signal(pid, "SIGKILL")) ev.error = "no engine process found";
        return;
      }
      hostDown[i] = true;
      await killTree(h);
      const t = Date.now();
      try {
        await stack.startHost(i);
        ev.restart_s = Math.round((Date.now() - t) / 100) / 10;
      } catch (e) {
        ev.error = `restart failed: ${e instanceof Error ? e.message : String(e)}`;
      }
      hostDown[i] = false;
    };
    /** A message on a session, retried while the answer is a retryable error (a host restarting). */
    const askUntil = async (t: Tracked, question: string, maxTokens: number, afterKill: boolean) => {
      const until = Date.now() + 120_000;
      for (;;) {
        const r = await request("witness_message", t.tenant, "POST", `/v1/sessions/${t.id}/messages`, {
          content: question,
          max_tokens: maxTokens,
          temperature: 0,
          stream: false,
        });
        if (r.kind === "ok") {
          const answer =
            (JSON.parse(r.text) as { choices?: { message?: { content?: string } }[] }).choices?.[0]?.message?.content ??
            "";
          t.turns.push({ question, maxTokens, answer, afterKill });
          return true;
        }
        const retry = r.kind === "typed" && RETRYABLE.includes(r.code);
        if (!retry || Date.now() > until) return r.kind === "typed" ? r.code : r.kind;
        await sleep(3000);
      }
    };
    // Each kill has a witness: a session opened and asked once on the victim just before, asked
    // again after the kill (its state restored from the checkpoint or the offload directory).
    const witnesses: { kill: number; session: string; after: string | true }[] = [];
    const witnessed = async (kind: "engine" | "host") => {
      const tenant: TenantName = "alpha";
      const document = documentOf().slice(0, 3000);
      const kv = { kv_method: "pyramidkv", kv_budget: 128 };
      const opened = await request("witness_open", tenant, "POST", "/v1/sessions", { document, ...kv });
      const session = opened.kind === "ok" ? (JSON.parse(opened.text) as { id: string; host: string }) : undefined;
      if (session && !hostIds.has(session.host)) await refreshIds().catch(() => {});
      const victim = session ? hostIds.get(session.host) : undefined;
      if (!session || victim === undefined || victim < 0 || hostDown[victim]) return kill(kind);
      const t: Tracked = {
        tenant,
        id: session.id,
        hostIndex: victim,
        document,
        kv,
        turns: [],
        clean: true,
        openedAt: Date.now(),
      };
      tracked.push(t);
      if ((await askUntil(t, pick(QUESTIONS), 16, false)) !== true) t.clean = false;
      await kill(kind, victim);
      const after = await askUntil(t, pick(QUESTIONS), 16, true);
      if (after !== true) t.clean = false;
      witnesses.push({ kill: kills.length - 1, session: t.id, after });
    };
    const endAt = t0 + o.minutes * 60_000;
    const faults = (async () => {
      const span = endAt - t0;
      const plan: { at: number; kind: "engine" | "host" }[] = [
        { at: t0 + span * (0.2 + 0.15 * rnd()), kind: "engine" },
        { at: t0 + span * (0.5 + 0.15 * rnd()), kind: "host" },
      ];
      // one more random fault every ~4 minutes beyond the first three
      for (let x = t0 + 180_000; x < endAt - 30_000; x += between(120_000, 360_000))
        plan.push({ at: x + between(0, 60_000), kind: rnd() < 0.6 ? "engine" : "host" });
      plan.sort((a, b) => a.at - b.at);
      for (const p of plan) {
        while (running && Date.now() < p.at) await sleep(250);
        if (!running || Date.now() > endAt) break;
        await witnessed(p.kind);
      }
    })();

    log(`${o.clients} clients for ${o.minutes} min (seed ${o.seed})`);
    const clients = Array.from({ length: o.clients }, () => client());
    while (Date.now() < endAt) await sleep(500);
    running = false;
    log(`${at()} s: stopping the clients`);
    await Promise.all(clients);
    await faults;
    await sample();
    running = true;
    await sampler.catch(() => {});
    running = false;

    // Twins: sessions that answered after a kill on their host, re-asked on fresh sessions now.
    const restoredCandidates = tracked.filter((t) => t.clean && t.turns.some((x) => x.afterKill));
    const twins = {
      candidates: restoredCandidates.length,
      verified: 0,
      equal: 0,
      differ: 0,
      failed: 0,
      samples: [] as unknown[],
    };
    for (const t of restoredCandidates.slice(0, o.verify)) {
      const r = await api(t.tenant, "POST", "/v1/sessions", { document: t.document, ...t.kv });
      if (r.status !== 201) {
        twins.failed++;
        twins.samples.push({ session: t.id, twin_open: r.status, body: (await r.text()).slice(0, 200) });
        continue;
      }
      const twin = (await r.json()) as { id: string };
      let same = true;
      for (const turn of t.turns) {
        const a = await api(t.tenant, "POST", `/v1/sessions/${twin.id}/messages`, {
          content: turn.question,
          max_tokens: turn.maxTokens,
          temperature: 0,
          stream: false,
        });
        const j = (await a.json()) as { choices?: { message?: { content?: string } }[] };
        const answer = j.choices?.[0]?.message?.content;
        if (answer !== turn.answer) {
          same = false;
          twins.samples.push({ session: t.id, question: turn.question, restored: turn.answer, twin: answer ?? j });
          break;
        }
      }
      await api(t.tenant, "DELETE", `/v1/sessions/${twin.id}`);
      twins.verified++;
      if (same) twins.equal++;
      else twins.differ++;
    }

    // Leaks: the edge's sessions and the hosts' per tenant, now and once the TTL has passed.
    const census = async () => {
      const out: Record<string, { edge: number; hosts: number }> = {};
      const per = await Promise.all(
        hosts.map((h) => stack.metrics(h).then(sessionsByTenant, () => ({}) as Record<string, number>)),
      );
      for (const tenant of TENANT_NAMES) {
        const edge = ((await stack.admin.tenant(tenant)) as { sessions?: number }).sessions ?? -1;
        out[tenant] = { edge, hosts: per.reduce((n, p) => n + (p[tenant] ?? 0), 0) };
      }
      return out;
    };
    const atStop = await census();
    log(`sessions at the end (edge vs hosts): ${JSON.stringify(atStop)}; waiting for their TTL (${o.ttlSeconds} s)`);
    let afterTtl = atStop;
    const empty = (c: typeof atStop) => Object.values(c).every((x) => x.edge === 0 && x.hosts === 0);
    await until(
      async () => {
        afterTtl = await census();
        return empty(afterTtl);
      },
      (o.ttlSeconds * 2 + 90) * 1000,
      2000,
    );

    const checks = {
      every_request_typed_or_ok: counts.untyped.length === 0,
      no_session_leaked: empty(afterTtl),
      no_tenant_over_quota: Object.values(quota).every((q) => q.over === 0),
      restored_equal_twins: twins.differ === 0 && twins.failed === 0,
      witnesses_answered_after_their_kill: witnesses.every((w) => w.after === true),
      faults_injected:
        kills.some((k) => k.kind === "engine" && !k.error) && kills.some((k) => k.kind === "host" && !k.error),
    };
    const report = {
      minutes: o.minutes,
      seed: o.seed,
      clients: o.clients,
      documents: o.data !== undefined && text.length > 0 ? o.data : "generated filler",
      load_average: {
        start: load0.map((x) => Math.round(x * 10) / 10),
        end: loadavg().map((x) => Math.round(x * 10) / 10),
      },
      requests: {
        total: counts.total,
        ok: counts.ok,
        aborted_by_client: counts.aborted,
        typed_errors: counts.typed,
        typed_samples: counts.typedSamples,
        untyped: counts.untyped.length,
        untyped_samples: counts.untyped.slice(0, 10),
        by_kind: counts.byKind,
      },
      kills,
      witnesses,
      sessions: {
        opened: tracked.length,
        restored_after_kill: restoredCandidates.length,
        at_stop: atStop,
        after_ttl: afterTtl,
      },
      quota,
      twins,
      checks,
    };
    return { report, ok: Object.values(checks).every(Boolean) };
  } finally {
    running = false;
    await stack.stop().catch(() => {});
    rmSync(dir, { recursive: true, force: true });
  }
}

/** The default documents: ../shared/data beside the repository, when it exists. */
function defaultData(): string | undefined {
  const d = resolve(repoRoot(), "..", "shared", "data");
  return existsSync(d) ? d : undefined;
}

export const command = defineCommand({
  flags: {
    minutes: int({ min: 1, max: 24 * 60, default: 20 }),
    seed: int({ min: 0, default: 1 }),
    data: string(),
    out: string(),
    clients: int({ min: 1, max: 64, default: 4 }),
    "ttl-seconds": int({ min: 5, max: 3600, default: 90 }),
    verify: int({ min: 0, max: 1000, default: 8 }),
  },
  async run(f) {
    const { report, ok } = await runSoak({
      minutes: f.minutes,
      seed: f.seed,
      data: f.data ?? defaultData(),
      clients: f.clients,
      ttlSeconds: f["ttl-seconds"],
      verify: f.verify,
    });
    const json = JSON.stringify(report, null, 2);
    process.stdout.write(`${json}\n`);
    if (f.out !== undefined) writeFileSync(f.out, `${json}\n`);
    return ok ? 0 : 1;
  },
});
