// Runs prompts through the engine the fast way: one exact prefill per prompt, every (method,
// budget) forked from it, all their generations issued at once so the engine batches the decode,
// every session closed as soon as its answer is in. Two prompts are in flight, so one prefills
// while the other's forks decode.
import { EXACT_METHOD, KV_METHODS, methodInfo } from "@pyramidkv/shared";

import type { EvalEngine, Generation } from "./engine-client.js";

/** How reports order the engine's methods: the exact one first, then as the paper compares them;
 * a method the engine adds later follows in the engine's order. */
const REPORT_PREFERENCE: readonly string[] = [EXACT_METHOD, "pyramidkv", "snapkv", "h2o", "streamingllm"];
const reportRank = (m: string) => {
  const i = REPORT_PREFERENCE.indexOf(m);
  return i >= 0 ? i : REPORT_PREFERENCE.length + KV_METHODS.indexOf(m as never);
};
/** Sorts method names into the reports' order. */
export const byReportOrder = (methods: readonly string[]): string[] =>
  [...methods].sort((a, b) => reportRank(a) - reportRank(b));

/** A method that keeps every entry: one setting, no budget (its budget would change nothing). */
export const isExact = (method: string): boolean => !methodInfo(method).compresses;

/** A setting's name in tables and pictures: FullKV, or method@budget. */
export const methodLabel = (method: string): string => (method === EXACT_METHOD ? "FullKV" : method);

/** One (method, budget) cell; FullKV has no budget. */
export interface Setting {
  method: string;
  budget: number | null;
}

export const settingKey = (s: Setting): string => (s.budget === null ? s.method : `${s.method}@${s.budget}`);
export const settingLabel = (s: Setting): string =>
  s.budget === null ? methodLabel(s.method) : `${s.method}@${s.budget}`;

/** Every setting of a grid: each exact method once (FullKV), then each other method at each budget. */
export function settingsGrid(methods: string[], budgets: number[]): Setting[] {
  const out: Setting[] = [];
  for (const m of methods) if (isExact(m)) out.push({ method: m, budget: null });
  for (const m of methods) if (!isExact(m)) for (const b of budgets) out.push({ method: m, budget: b });
  return out;
}

export interface PromptJob {
  /** unique among the run's prompts; with a setting's key, identifies a result row */
  id: string;
  text: string;
  /** wrap the text as a user turn in the model's chat template */
  chat: boolean;
  maxNewTokens: number;
  stop?: string[];
  /** the settings still to run for this prompt (resume drops done ones) */
  settings: Setting[];
}

export interface CellOutcome {
  job: PromptJob;
  setting: Setting;
  generation: Generation;
  promptTokens: number;
  kvBytes: number;
  fullKvBytes: number;
  meanLayerKv: number;
}

let sessionCounter = 0;

async function runJob(engine: EvalEngine, job: PromptJob, onCell: (c: CellOutcome) => void): Promise<void> {
  // an engine that dies under a long run (killed, out of memory) is restarted and the prompt's
  // unfinished settings run again from a new prefill; finished cells stay reported
  const finished = new Set<string>();
  for (let attempt = 1; ; attempt++) {
    const todo = { ...job, settings: job.settings.filter((s) => !finished.has(settingKey(s))) };
    try {
      await runJobOnce(engine, todo, (c) => {
        finished.add(settingKey(c.setting));
        onCell({ ...c, job });
      });
      return;
    } catch (e) {
      if (engine.alive || attempt >= 3) throw e;
      process.stderr.write(
        `\nthe engine died (${e instanceof Error ? e.message : String(e)}); restarting it and running prompt ${job.id} again\n`,
      );
      await engine.revive();
    }
  }
}

async function runJobOnce(engine: EvalEngine, job: PromptJob, onCell: (c: CellOutcome) => void): Promise<void> {
  if (job.settings.length === 0) return;
  const base = `eval-${process.pid}-${++sessionCounter}`;
  const forks: { session: string; setting: Setting }[] = [];
  let useSource: Setting | undefined;
  try {
    const { tokensSeen } = await engine.prefill(base, job.text, job.chat);
    for (const s of job.settings) {
      // The exact prefill is itself the exact setting's session: no fork for it.
      if (isExact(s.method) && useSource === undefined) {
        useSource = s;
        continue;
      }
      const session = `${base}-${settingKey(s)}`;
      await engine.fork(base, session, s.method, s.budget ?? 0);
      forks.push({ session, setting: s });
    }
    const all = [...forks];
    if (useSource) all.push({ session: base, setting: useSource });
    else await engine.close(base);
    await Promise.all(
      all.map(async ({ session, setting }) => {
        const st = await engine.stats(session);
        const generation = await engine.generate(session, job.maxNewTokens, job.stop ?? []);
        await engine.close(session);
        const mean = st.layerKvLengths.reduce((a, b) => a + b, 0) / Math.max(1, st.layerKvLengths.length);
        onCell({
          job,
          setting,
          generation,
          promptTokens: tokensSeen,
          kvBytes: st.kvBytes,
          fullKvBytes: st.fullKvBytes,
          meanLayerKv: mean,
        });
      }),
    );
  } catch (e) {
    // a failed prompt must not leave its sessions holding the KV pool
    if (engine.alive) {
      for (const { session } of forks) await engine.close(session).catch(() => {});
      await engine.close(base).catch(() => {});
    }
    throw e;
  }
}

/** Runs every job with `inFlight` prompts at a time; onCell is called once per finished cell. */
export async function runJobs(
  engine: EvalEngine,
  jobs: PromptJob[],
  onCell: (c: CellOutcome) => void,
  inFlight = 2,
): Promise<void> {
  let next = 0;
  const worker = async () => {
    while (next < jobs.length) {
      const job = jobs[next++]!;
      if (job.settings.length > 0) await runJob(engine, job, onCell);
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, inFlight) }, worker));
}
