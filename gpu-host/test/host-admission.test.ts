// Admission without an engine: a table of fake sessions, an offload that the test controls, fixed
// quotas and pool. Within the quota it admits; over it the tenant's least recently used idle
// session goes first, then it refuses naming the numbers; busy sessions are never victims; other
// tenants' sessions make room only for the pool; policy auto shrinks the budget; the per-tenant
// lock keeps two admissions from both taking the last bytes.
import assert from "node:assert/strict";
import { test } from "node:test";

import { KvAccount } from "../src/host/account.js";
import { type Admissible, Admission } from "../src/host/admission.js";
import { HostError } from "../src/host/errors.js";
import { HostMetrics } from "../src/host/metrics.js";
import { Residency, type StateEngine } from "../src/host/residency.js";
import { HostSession, type OpenParams } from "../src/host/session.js";
import { StateStore } from "../src/host/store.js";
import {
  appendTokenBound,
  autoBudget,
  openReservationBytes,
  prefillPeakBytes,
  promptTokenBound,
} from "../src/host/tenants.js";

class FakeSession implements Admissible {
  readonly kv: KvAccount;
  busy = false;
  lost?: string;

  constructor(
    readonly tenant: string,
    readonly id: string,
    readonly lastUsed: number,
    steady?: number,
  ) {
    this.kv = new KvAccount(steady ?? 0);
    if (steady !== undefined) this.kv.opened();
  }
}

/** A resident session of `steady` bytes, used last at `lastUsed`. */
const resident = (tenant: string, id: string, steady: number, lastUsed: number) =>
  new FakeSession(tenant, id, lastUsed, steady);

/** A session being opened (busy, not in the engine yet). */
function opening(tenant: string, id: string): FakeSession {
  const s = new FakeSession(tenant, id, 1000);
  s.busy = true;
  return s;
}

function harness(table: FakeSession[], quotas: Record<string, number>, pool = 1 << 30) {
  const offloaded: string[] = [];
  const refused: string[] = [];
  let offload = async (s: FakeSession) => {
    offloaded.push(s.id);
    s.kv.offloaded();
    return true;
  };
  const admission = new Admission<FakeSession>({
    sessions: () => table,
    offload: (s) => offload(s),
    quota: (tenant) => quotas[tenant] ?? Number.MAX_SAFE_INTEGER,
    poolBytes: () => pool,
    refused: (tenant) => refused.push(tenant),
  });
  return {
    admission,
    offloaded,
    refused,
    setOffload(f: (s: FakeSession) => Promise<boolean>) {
      offload = f;
    },
  };
}

async function refusal(p: Promise<unknown>): Promise<HostError> {
  const e = await p.then(
    () => undefined,
    (err: unknown) => err,
  );
  assert.ok(e instanceof HostError, `expected a HostError, got ${String(e)}`);
  return e;
}

test("within the quota: admitted without offloading, the need reserved and accounted", async () => {
  const a = resident("t", "a", 30, 1);
  const s = opening("t", "s");
  const h = harness([a, s], { t: 100 });
  await h.admission.admit(s, 70);
  assert.deepEqual(h.offloaded, []);
  assert.equal(s.kv.reserved, 70);
  assert.equal(h.admission.usage("t"), 100);
  assert.equal(h.admission.usage(), 100);
});

test("over the quota: the tenant's least recently used idle sessions go first, busy and lost ones never; then quota_exceeded with the numbers", async () => {
  const busyOld = resident("t", "busy", 20, 0);
  busyOld.busy = true;
  const lostOld = resident("t", "lost", 5, 0);
  lostOld.lost = "the engine died before it was ever saved";
  const a = resident("t", "a", 40, 3);
  const b = resident("t", "b", 40, 1);
  const s = opening("t", "s");
  const h = harness([busyOld, lostOld, a, b, s], { t: 105 });
  await h.admission.admit(s, 50); // 105 in use: b (least recently used) goes, still 65 + 50 > 105: a goes
  assert.deepEqual(h.offloaded, ["b", "a"]);
  assert.equal(h.admission.usage("t"), 20 + 5 + 50);

  const s2 = opening("t", "s2");
  const e = await refusal(h.admission.admit(s2, 90));
  assert.equal(e.code, "quota_exceeded");
  assert.equal(
    e.message,
    "tenant 't' needs 90 KV bytes for session 's2'; its quota is 105, 75 in use by busy sessions",
  );
  assert.deepEqual(h.offloaded, ["b", "a"], "the busy and the lost session stayed");
  assert.deepEqual(h.refused, ["t"]);
  assert.equal(s2.kv.reserved, 0, "nothing granted");

  const s3 = opening("t", "s3"); // a refusal does not hold the tenant's lock
  await h.admission.admit(s3, 30);
  assert.equal(s3.kv.reserved, 30);
});

test("a resident session's request is granted as in-flight bytes on top of what it holds", async () => {
  const s = resident("t", "s", 40, 1);
  const h = harness([s], { t: 100 });
  s.busy = true;
  await h.admission.admit(s, s.kv.held + 60);
  assert.equal(s.kv.inFlight, 60);
  await refusal(h.admission.admit(s, s.kv.held + 61)); // its own bytes are not counted twice
  assert.equal(h.refused.length, 1);
});

test("other tenants' idle sessions are offloaded for the pool, never for a tenant's quota", async () => {
  const theirs = resident("u", "theirs", 60, 0);
  const s = opening("t", "s");
  const h = harness([theirs, s], { t: 100 }, 100);
  const e = await refusal(h.admission.admit(s, 120));
  assert.equal(e.code, "quota_exceeded");
  assert.deepEqual(h.offloaded, [], "the other tenant's session is not offloaded for t's quota");

  await h.admission.admit(s, 50); // within t's quota, but 60 + 50 > the pool of 100
  assert.deepEqual(h.offloaded, ["theirs"]);
  assert.equal(h.admission.usage(), 50);
});

test("policy auto: the budget shrinks to the largest that fits the tenant's free bytes; refused when none does", async () => {
  const g = { nLayer: 30, bytesPerEntry: 768, chunkSize: 512 };
  const quota = 3_500_000;
  const other = resident("t", "other", 1_000_000, 0);
  other.busy = true;
  const s = opening("t", "s");
  const h = harness([other, s], { t: quota });
  let budget = 200;
  const fit = (free: number) => {
    const shrunk = autoBudget(g, "pyramidkv", 32, 8, free);
    if (!shrunk) return null;
    budget = shrunk.budget;
    return shrunk.reservation;
  };
  await h.admission.admit(s, openReservationBytes(g, "pyramidkv", budget, 32), fit);
  const free = quota - 1_000_000;
  assert.equal(budget, Math.floor(free / (30 * 768)) - 32);
  assert.equal(s.kv.reserved, openReservationBytes(g, "pyramidkv", budget, 32));
  assert.ok(s.kv.reserved <= free);
  assert.ok(openReservationBytes(g, "pyramidkv", budget + 1, 32) > free, "the largest budget that fits");

  // Not even window + 1 entries (plus the prompt) fit beside a bigger busy session.
  const crowd = resident("t", "crowd", quota - 30 * 768 * 40, 0);
  crowd.busy = true;
  const s2 = opening("t", "s2");
  const tight = harness([crowd, s2], { t: quota });
  const e = await refusal(tight.admission.admit(s2, openReservationBytes(g, "pyramidkv", 200, 32), fit));
  assert.equal(e.code, "quota_exceeded");
  assert.equal(autoBudget(g, "full", 32, 8, 1 << 30), null, "FullKV has no budget to shrink");
});

test("the per-tenant lock: two admissions cannot both take the tenant's last bytes while one waits for the pool", async () => {
  // t's quota holds one of two 60-byte requests; the pool (150) needs u's idle session offloaded first.
  const theirs = resident("u", "theirs", 100, 0);
  const s1 = opening("t", "s1");
  const s2 = opening("t", "s2");
  const h = harness([theirs, s1, s2], { t: 100 }, 150);
  let finishOffload!: () => void;
  const offloadStarted = new Promise<void>((started) =>
    h.setOffload(
      (victim) =>
        new Promise<boolean>((done) => {
          victim.busy = true; // as residency.ts marks it while saving
          started();
          finishOffload = () => {
            victim.kv.offloaded();
            victim.busy = false;
            done(true);
          };
        }),
    ),
  );
  const first = h.admission.admit(s1, 60);
  const second = h.admission.admit(s2, 60);
  await offloadStarted;
  // Meanwhile another tenant is not held up by t's lock.
  const other = opening("v", "other");
  await h.admission.admit(other, 10);
  finishOffload();
  await first;
  const e = await refusal(second);
  assert.equal(e.code, "quota_exceeded");
  assert.equal(s1.kv.reserved, 60);
  assert.equal(s2.kv.reserved, 0);
  assert.ok(h.admission.usage("t") <= 100, `t accounts ${h.admission.usage("t")}`);
});

/** An offload that fails for the named sessions (a state that cannot be saved: context exactly
 * full, a disk error, or the store refusing it with stored_quota_exceeded) and records each try. */
function failingFor(h: ReturnType<typeof harness>, failing: Set<string>): string[] {
  const tried: string[] = [];
  h.setOffload(async (v) => {
    tried.push(v.id);
    if (failing.has(v.id)) return false;
    h.offloaded.push(v.id);
    v.kv.offloaded();
    return true;
  });
  return tried;
}

test("a failed offload is not room: the next victim is tried, and when none is left the request is refused, never admitted past the quota", async () => {
  const a = resident("t", "a", 40, 1); // least recently used: its offload fails
  const b = resident("t", "b", 40, 2);
  const s = opening("t", "s");
  const h = harness([a, b, s], { t: 100 });
  const tried = failingFor(h, new Set(["a"]));
  await h.admission.admit(s, 50);
  assert.deepEqual(tried, ["a", "b"], "a failed, so b was tried");
  assert.deepEqual(h.offloaded, ["b"]);
  assert.ok(h.admission.usage("t") <= 100, `t accounts ${h.admission.usage("t")}`);

  // Now only a (unsaveable) is idle: a second request is refused with the reason, a tried once.
  const s2 = opening("t", "s2");
  tried.length = 0;
  const e = await refusal(h.admission.admit(s2, 20));
  assert.equal(e.code, "quota_exceeded");
  assert.match(e.message, /its quota is 100, 90 in use/);
  assert.match(e.message, /1 idle session could not be offloaded/);
  assert.deepEqual(tried, ["a"], "each victim is tried once per admission");
  assert.equal(s2.kv.reserved, 0, "nothing granted");
  assert.ok(h.admission.usage("t") <= 100, `t accounts ${h.admission.usage("t")}`);
  assert.deepEqual(h.refused, ["t"]);
});

test("the pool: a failed offload of another tenant's session tries the next one, then refuses with pool_full", async () => {
  const x = resident("u", "x", 60, 1); // its state cannot be stored (the store refused it)
  const y = resident("u", "y", 30, 2);
  const s = opening("t", "s");
  const small = opening("t", "small");
  const h = harness([x, y, s, small], {}, 100);
  const tried = failingFor(h, new Set(["x"]));
  const e = await refusal(h.admission.admit(s, 50));
  assert.equal(e.code, "pool_full");
  assert.match(e.message, /needs 50 KV bytes .* the pool holds 100, 60 in use/);
  assert.deepEqual(tried, ["x", "y"]);
  assert.equal(s.kv.reserved, 0, "nothing granted");
  assert.ok(h.admission.usage() <= 100, `the pool accounts ${h.admission.usage()}`);

  await h.admission.admit(small, 40); // what fits beside x is admitted
  assert.equal(h.admission.usage(), 100);
});

test("an offload refused for stored_quota_exceeded counts as failed: the tenant's other sessions make room, or the request is refused", async () => {
  // residency.ts's offload answers false when the store refuses the state (the tenant's
  // max_stored_bytes is spent); admission must not take that for room made.
  const big = resident("t", "big", 70, 1);
  const small = resident("t", "small", 20, 2);
  const s = opening("t", "s");
  const h = harness([big, small, s], { t: 100 });
  const tried = failingFor(h, new Set(["big", "small"]));
  const e = await refusal(h.admission.admit(s, 30));
  assert.equal(e.code, "quota_exceeded");
  assert.match(e.message, /2 idle sessions could not be offloaded/);
  assert.deepEqual(tried, ["big", "small"]);
  assert.equal(h.admission.usage("t"), 90);
});

test("quota 0 (no quota of its own): another tenant's idle sessions are offloaded for the pool only while that tenant holds more than its fair share", async () => {
  // u uses 40 of a 100-byte pool shared by two tenants: within its fair share (50).
  const u1 = resident("u", "u1", 30, 0);
  const u2 = resident("u", "u2", 10, 1);
  const z1 = resident("z", "z1", 40, 5);
  const s = opening("z", "s");
  const h = harness([u1, u2, z1, s], { u: 100, z: 100 /* quota 0, resolved to the pool */ }, 100);
  await h.admission.admit(s, 50); // 130 > 100: z's own idle session goes, not u's
  assert.deepEqual(h.offloaded, ["z1"]);

  const s2 = opening("z", "s2");
  const e = await refusal(h.admission.admit(s2, 45)); // within z's quota, not within the pool
  assert.equal(e.code, "pool_full");
  assert.deepEqual(h.offloaded, ["z1"], "u's sessions stayed: u holds only its fair share");
  assert.equal(u1.kv.resident && u2.kv.resident, true);
  assert.equal(s2.kv.reserved, 0);

  // A tenant above its fair share does give up its idle sessions (least recently used first).
  const v1 = resident("v", "v1", 40, 0);
  const v2 = resident("v", "v2", 30, 1);
  const w = opening("w", "w");
  const h2 = harness([v1, v2, w], { v: 100, w: 100 }, 100);
  await h2.admission.admit(w, 50); // v holds 70 > 50: v1 goes, then 30 + 50 fits
  assert.deepEqual(h2.offloaded, ["v1"]);
  assert.equal(h2.admission.usage(), 80);
});

test("quota overshoot (issue's numbers): a FullKV session with a 20 MB quota and chunk 512 is refused before prefilling a long prompt, or admitted within the quota", async () => {
  const g = { nLayer: 30, bytesPerEntry: 768, chunkSize: 512 };
  const quota = 20_000_000;
  const nCtx = 8192;
  const prompt = "The ocean covers most of the planet. ".repeat(330); // 12,210 bytes, ~3,000 tokens
  const promptTokens = 3000; // what the engine keeps of it (FullKV keeps every token)
  const bytes = Buffer.byteLength(prompt, "utf8");

  // An edge that sends prompt_bytes: refused at open.
  const s = opening("t", "s");
  const h = harness([s], { t: quota });
  const atOpen = openReservationBytes(g, "full", 128, promptTokenBound(undefined, bytes, nCtx));
  const e = await refusal(h.admission.admit(s, atOpen));
  assert.equal(e.code, "quota_exceeded");

  // An edge without prompt_bytes (reservation of nothing): the append's own peak refuses it.
  const s2 = opening("t", "s2");
  const h2 = harness([s2], { t: quota });
  await h2.admission.admit(s2, openReservationBytes(g, "full", 128, promptTokenBound(undefined, undefined, nCtx)));
  s2.kv.opened();
  let peak = h2.admission.usage("t");
  let refusedAt: string | undefined;
  try {
    const extra = prefillPeakBytes(g, appendTokenBound(prompt, undefined, true), "full", nCtx - 0);
    await h2.admission.admit(s2, s2.kv.held + extra);
    s2.kv.settle(g.nLayer * promptTokens * g.bytesPerEntry); // the engine prefilled it: FullKV's exact size
    peak = Math.max(peak, h2.admission.usage("t"));
  } catch (err) {
    assert.ok(err instanceof HostError);
    refusedAt = err.code;
  }
  assert.ok(peak <= quota, `peak sampled ${peak} > quota ${quota}`);
  assert.equal(refusedAt, "quota_exceeded");

  // A short prompt fits: admitted, and its exact size is within the quota.
  const s3 = opening("t", "s3");
  const h3 = harness([s3], { t: quota });
  const short = "Hello there.";
  await h3.admission.admit(
    s3,
    openReservationBytes(g, "full", 128, promptTokenBound(undefined, Buffer.byteLength(short), nCtx)),
  );
  s3.kv.opened();
  await h3.admission.admit(
    s3,
    s3.kv.held + prefillPeakBytes(g, appendTokenBound(short, undefined, true), "full", nCtx),
  );
  assert.ok(h3.admission.usage("t") <= quota);
});

test("with the real residency and store: a session the store refuses (stored_quota_exceeded) stays resident, the next victim goes, and then the request is refused", async () => {
  // Engine states of 200 bytes (a) and 100 bytes (b); the tenant may store 150 bytes.
  const sizes: Record<string, number> = { "t/a": 200, "t/b": 100 };
  const engine = {
    call: async (m: { type: string; session: string; offset?: number }) =>
      m.type === "save"
        ? { type: "saved", offset: 0, state: new Uint8Array(sizes[m.session] ?? 0), total: sizes[m.session] ?? 0 }
        : { type: `${m.type}d` },
  } as unknown as StateEngine;
  const params = { method: "pyramidkv", budget: 64 } as OpenParams;
  const table: HostSession[] = [];
  const store = new StateStore(undefined);
  let residency!: Residency;
  const admission = new Admission<HostSession>({
    sessions: () => table,
    offload: (s) => residency.offload(s),
    quota: () => 300,
    poolBytes: () => 1 << 30,
    refused: () => {},
  });
  residency = new Residency(store, { ready: Promise.resolve(engine) }, admission, new HostMetrics(), {
    maxStoredBytes: () => 150,
  });
  const session = (id: string, steady: number, lastUsed: number) => {
    const s = new HostSession("t", id, params);
    s.kv.opened();
    s.kv.settle(steady);
    s.dirty = true;
    s.lastUsed = lastUsed;
    table.push(s);
    return s;
  };
  const a = session("a", 150, 1);
  const b = session("b", 150, 2);
  const s = new HostSession("t", "s", params);
  s.pendingOps++; // being opened: busy
  table.push(s);
  await admission.admit(s, 100);
  assert.equal(a.resident, true, "a's state was refused by the store: a is still in the engine");
  assert.equal(b.resident, false, "b was offloaded instead");
  assert.equal(store.storedBytes("t"), 100);
  assert.equal(admission.usage("t"), 250);

  const s2 = new HostSession("t", "s2", params);
  s2.pendingOps++;
  table.push(s2);
  const e = await refusal(admission.admit(s2, 100));
  assert.equal(e.code, "quota_exceeded");
  assert.match(e.message, /1 idle session could not be offloaded/);
  assert.ok(admission.usage("t") <= 300);
});
