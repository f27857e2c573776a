// Residency against a scripted engine: states cross in pieces (save from the next offset, restore
// in half-frame pieces), offload saves and closes an idle session, a restore is admitted and
// accounted (steady + the request's peak), a missing, truncated or damaged state loses the session,
// sessions saved by an earlier run are adopted as offloaded, a save the engine dies in keeps the
// previous checkpoint, and stored bytes stay within the tenant's bound.
import assert from "node:assert/strict";
import { mkdtempSync, readdirSync, rmSync, truncateSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";

import { MAX_FRAME_BYTES } from "@pyramidkv/shared";

import { Admission } from "../src/host/admission.js";
import { ENGINE_DIED, EngineProcess, EngineRequestError } from "../src/host/engine.js";
import { HostError } from "../src/host/errors.js";
import { HostMetrics } from "../src/host/metrics.js";
import type { RemoteStore } from "../src/host/edge-link.js";
import {
  Residency,
  restoreToEngine,
  StateConflictError,
  type StateEngine,
  saveFromEngine,
} from "../src/host/residency.js";
import { HostSession } from "../src/host/session.js";
import { encodeStateFile, StateStore, stateFileName } from "../src/host/store.js";

type Call = { type: string; session?: string; offset?: number; total?: number; state?: Uint8Array };

/** Answers save/restore/open/close like the engine; `pieceBytes` caps each 'saved' piece. */
class ScriptedEngine {
  readonly calls: Call[] = [];
  readonly states = new Map<string, Uint8Array>();
  failing?: string;
  /** the engine dies (its requests fail with ENGINE_DIED) when this says so */
  diesAt?: (c: Call) => boolean;
  /** the engine refuses a restore as a damaged state (its code 'invalid') when this says so */
  refusesRestore?: (c: Call) => boolean;
  /** called while a request is being answered (to look at the accounting mid-transfer) */
  during?: (c: Call) => void;

  constructor(private readonly pieceBytes = 1 << 30) {}

  call = (async (msg: Call) => {
    this.calls.push(msg);
    this.during?.(msg);
    if (msg.type === this.failing) throw new EngineRequestError("internal", `${msg.type} failed`);
    if (this.diesAt?.(msg)) throw new EngineRequestError(ENGINE_DIED, "the engine exited (SIGKILL)");
    if (msg.type === "restore" && this.refusesRestore?.(msg))
      throw new EngineRequestError("invalid", "truncated session state");
    const session = msg.session!;
    if (msg.type === "save") {
      const st = this.states.get(session) ?? new Uint8Array(0);
      const at = msg.offset ?? 0;
      return {
        type: "saved",
        id: 0,
        session,
        state: st.subarray(at, at + this.pieceBytes),
        offset: at,
        total: st.length,
      };
    }
    if (msg.type === "restore")
      return { type: "restored", id: 0, session, received: (msg.offset ?? 0) + msg.state!.length };
    return { type: msg.type === "open" ? "opened" : "closed", id: 0, session };
  }) as unknown as StateEngine["call"];
}

const bytes = (n: number) => Uint8Array.from({ length: n }, (_, i) => i % 251);

function setup(engine: ScriptedEngine, store = new StateStore(), maxStoredBytes?: (tenant: string) => number) {
  const sessions: HostSession[] = [];
  const metrics = new HostMetrics();
  const admission: Admission<HostSession> = new Admission<HostSession>({
    sessions: () => sessions,
    offload: (s): Promise<boolean> => residency.offload(s),
    quota: () => 1 << 30,
    poolBytes: () => 1 << 30,
    refused: () => {},
  });
  const residency: Residency = new Residency(
    store,
    { ready: Promise.resolve(engine) },
    admission,
    metrics,
    maxStoredBytes ? { maxStoredBytes } : {},
  );
  const open = (id: string, steady: number) => {
    const s = new HostSession("t", id, { method: "pyramidkv", budget: 64 });
    s.kv.grant(steady);
    s.kv.opened();
    s.kv.settle(steady);
    s.tokensSeen = 10;
    s.dirty = true;
    sessions.push(s);
    return s;
  };
  return { residency, metrics, open, sessions };
}

test("a state crosses in pieces: save asks from each next offset, restore sends half-frame pieces in order", async () => {
  const engine = new ScriptedEngine(4);
  engine.states.set("t/a", bytes(10));
  assert.deepEqual([...(await saveFromEngine(engine, "t/a"))], [...bytes(10)]);
  assert.deepEqual(
    engine.calls.map((c) => c.offset),
    [0, 4, 8],
  );

  const big = bytes(Math.floor(MAX_FRAME_BYTES / 2) + 5);
  const sink = new ScriptedEngine();
  await restoreToEngine(sink, "t/a", big);
  assert.deepEqual(
    sink.calls.map((c) => [c.offset, c.state!.length, c.total]),
    [
      [0, Math.floor(MAX_FRAME_BYTES / 2), big.length],
      [Math.floor(MAX_FRAME_BYTES / 2), 5, big.length],
    ],
  );
  const empty = new ScriptedEngine();
  await restoreToEngine(empty, "t/e", new Uint8Array(0));
  assert.equal(empty.calls.length, 1, "an empty state is one (empty) piece");

  const liar = new ScriptedEngine();
  liar.call = (async () => ({ type: "saved", state: bytes(1), offset: 3, total: 9 })) as unknown as StateEngine["call"];
  await assert.rejects(saveFromEngine(liar, "t/a"), (e: unknown) => e instanceof HostError && e.code === "internal");
});

test("offload saves a dirty idle session and closes it; restore is admitted at steady + peak and accounted", async () => {
  const engine = new ScriptedEngine();
  const { residency, metrics, open } = setup(engine);
  const s = open("a", 2000);
  engine.states.set("t/a", bytes(100));
  assert.equal(await residency.offload(s), true);
  assert.deepEqual(
    engine.calls.map((c) => c.type),
    ["save", "close"],
  );
  assert.deepEqual([s.resident, s.saved, s.dirty, s.busy], [false, true, false, false]);
  assert.equal(s.kv.accounted(s.busy), 0);
  assert.equal(metrics.offloads.get({ tenant: "t" }), 1);

  let whileRestoring = -1;
  engine.during = (c) => {
    if (c.type === "restore") whileRestoring = s.kv.accounted(true);
  };
  s.pendingOps++; // the request that needs it
  await residency.ensureResident(s, 300);
  assert.equal(whileRestoring, 2300, "steady + the request's peak, reserved while restoring");
  assert.deepEqual(engine.calls.at(-1)?.state, bytes(100));
  assert.deepEqual([s.resident, s.dirty, s.kv.reserved, s.kv.inFlight], [true, false, 0, 300]);
  assert.equal(s.kv.accounted(true), 2300);
  assert.equal(metrics.restores.get({ tenant: "t" }), 1);
  s.pendingOps--;
});

test("a busy session is not offloaded; a failed offload leaves it resident", async () => {
  const engine = new ScriptedEngine();
  const { residency, open } = setup(engine);
  const s = open("a", 500);
  s.pendingOps++;
  assert.equal(await residency.offload(s), false);
  assert.equal(engine.calls.length, 0);
  s.pendingOps--;
  engine.failing = "close";
  assert.equal(await residency.offload(s), false);
  assert.deepEqual([s.resident, s.busy], [true, false]);
});

test("a restore without a saved state loses the session; a failed restore releases its reservation", async () => {
  const engine = new ScriptedEngine();
  const { residency, open } = setup(engine);
  const s = open("gone", 700);
  s.kv.offloaded();
  s.pendingOps++;
  await assert.rejects(
    residency.ensureResident(s, 10),
    (e: unknown) => e instanceof HostError && e.code === "session_lost",
  );
  assert.equal(s.lost, "its saved state is missing");

  const r = open("r", 700);
  engine.states.set("t/r", bytes(8));
  assert.equal(await residency.offload(r), true);
  engine.failing = "restore";
  r.pendingOps++;
  await assert.rejects(residency.ensureResident(r, 10), EngineRequestError);
  assert.deepEqual([r.resident, r.kv.reserved, r.kv.accounted(true)], [false, 0, 0]);
});

test("sessions an earlier host saved to the offload directory are adopted as offloaded", async () => {
  const dir = mkdtempSync(join(tmpdir(), "pkv-residency-"));
  try {
    const engine = new ScriptedEngine();
    const first = setup(engine, new StateStore(dir));
    const s = first.open("kept", 4096);
    engine.states.set("t/kept", bytes(64));
    assert.equal(await first.residency.offload(s), true);

    const again = setup(engine, new StateStore(dir));
    const [adopted, ...rest] = await again.residency.adopt();
    assert.equal(rest.length, 0);
    assert.deepEqual(
      [adopted!.tenant, adopted!.id, adopted!.resident, adopted!.saved, adopted!.tokensSeen, adopted!.kv.steady],
      ["t", "kept", false, true, 10, 4096],
    );
    assert.deepEqual(adopted!.params, { method: "pyramidkv", budget: 64 });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

const quiet = (dir?: string) => new StateStore(dir, { log: () => {} });

test("a truncated state file at restore loses the session (session_lost, quarantined), not 'invalid' for ever", async () => {
  const dir = mkdtempSync(join(tmpdir(), "pkv-residency-"));
  try {
    const engine = new ScriptedEngine();
    const { residency, open } = setup(engine, quiet(dir));
    const s = open("cut", 700);
    engine.states.set("t/cut", bytes(5000));
    assert.equal(await residency.offload(s), true);
    truncateSync(join(dir, stateFileName("t", "cut")), 3000);
    s.pendingOps++;
    await assert.rejects(
      residency.ensureResident(s, 10),
      (e: unknown) => e instanceof HostError && e.code === "session_lost" && /truncated/.test(e.message),
    );
    assert.match(s.lost ?? "", /damaged/);
    assert.deepEqual([s.resident, s.kv.reserved, s.kv.accounted(true)], [false, 0, 0]);
    assert.equal(
      engine.calls.filter((c) => c.type === "restore").length,
      0,
      "the host told the truncation itself, without the engine",
    );
    assert.ok(readdirSync(dir).some((f) => f.startsWith(`${stateFileName("t", "cut")}.corrupt-`)));
    assert.equal(residency.storedBytes("t"), 0);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("a state the engine refuses as damaged (an old-format file, no header) loses the session too", async () => {
  const dir = mkdtempSync(join(tmpdir(), "pkv-residency-"));
  try {
    const params = { method: "pyramidkv", budget: 64 };
    writeFileSync(join(dir, stateFileName("t", "old")), bytes(20));
    writeFileSync(
      join(dir, "index.json"),
      JSON.stringify([{ tenant: "t", session: "old", params, tokens_seen: 5, kv_bytes: 900 }]),
    );
    const engine = new ScriptedEngine();
    engine.refusesRestore = () => true;
    const { residency, sessions } = setup(engine, quiet(dir));
    const [s] = await residency.adopt();
    sessions.push(s!);
    s!.pendingOps++;
    await assert.rejects(
      residency.ensureResident(s!, 10),
      (e: unknown) => e instanceof HostError && e.code === "session_lost",
    );
    assert.match(s!.lost ?? "", /truncated session state/);
    assert.equal(s!.kv.accounted(true), 0);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("the engine dies in the middle of a save: the previous checkpoint stays intact and restores", async () => {
  const dir = mkdtempSync(join(tmpdir(), "pkv-residency-"));
  try {
    const engine = new ScriptedEngine(4); // a state crosses in 4-byte pieces
    const { residency, open } = setup(engine, quiet(dir));
    const s = open("k", 700);
    engine.states.set("t/k", bytes(10));
    await residency.save(s, engine);
    s.tokensSeen = 20;
    s.dirty = true;
    engine.states.set(
      "t/k",
      Uint8Array.from({ length: 12 }, (_, i) => 200 - i),
    );
    engine.diesAt = (c) => c.type === "save" && (c.offset ?? 0) > 0; // after the first piece
    await assert.rejects(
      residency.save(s, engine),
      (e: unknown) => e instanceof EngineRequestError && e.code === ENGINE_DIED,
    );
    assert.equal(s.dirty, true, "the session is not marked saved");
    engine.diesAt = undefined;

    // A new host on the directory (after the crash) sees the previous checkpoint, whole.
    const again = setup(engine, quiet(dir));
    const [adopted] = await again.residency.adopt();
    assert.equal(adopted?.tokensSeen, 10);
    again.sessions.push(adopted!);
    adopted!.pendingOps++;
    await again.residency.ensureResident(adopted!, 10);
    assert.deepEqual(engine.calls.at(-1)?.state, bytes(10));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("stored bytes per tenant are bounded: an offload past the bound fails (stored_quota_exceeded), the session stays resident", async () => {
  for (const dir of [undefined, mkdtempSync(join(tmpdir(), "pkv-residency-"))]) {
    try {
      const engine = new ScriptedEngine();
      const { residency, open } = setup(engine, quiet(dir), (t) => (t === "t" ? 1000 : 0));
      const a = open("a", 700);
      const b = open("b", 700);
      engine.states.set("t/a", bytes(600));
      engine.states.set("t/b", bytes(600));
      assert.equal(await residency.offload(a), true);
      assert.equal(residency.storedBytes("t"), 600);
      assert.equal(await residency.offload(b), false);
      assert.deepEqual([b.resident, b.saved, b.dirty], [true, false, true]);
      await assert.rejects(
        residency.save(b, engine),
        (e: unknown) =>
          e instanceof HostError &&
          e.code === "stored_quota_exceeded" &&
          /'t'/.test(e.message) &&
          /1000/.test(e.message),
      );
      assert.equal(residency.storedBytes("t"), 600);
      // a's newer, larger state replaces its own: within the bound
      engine.states.set("t/a", bytes(1000));
      a.pendingOps++;
      await residency.ensureResident(a, 0);
      a.pendingOps--;
      a.dirty = true;
      assert.equal(await residency.offload(a), true);
      assert.equal(residency.storedBytes("t"), 1000);
      await residency.forget(a);
      assert.equal(residency.storedBytes("t"), 0);
      assert.equal(await residency.offload(b), true);
    } finally {
      if (dir) rmSync(dir, { recursive: true, force: true });
    }
  }
});

test("a real engine killed with SIGKILL in the middle of saving a large session: the previous checkpoint stays intact and restores", {
  timeout: 300_000,
}, async () => {
  const dir = mkdtempSync(join(tmpdir(), "pkv-residency-"));
  const options = {
    ...(process.env.PKV_TEST_ENGINE_BIN ? { bin: process.env.PKV_TEST_ENGINE_BIN } : {}),
    kvPoolBytes: 256 << 20,
    threads: 2,
  };
  let engine = await EngineProcess.start(options);
  try {
    const { residency, sessions } = setup(new ScriptedEngine(), quiet(dir));
    const s = new HostSession("t", "huge", { method: "full", budget: 0 });
    sessions.push(s);
    await engine.call({ type: "open", session: s.engineName, method: "full" });
    const words = "The quick brown fox jumps over the lazy dog near the river bank today. ";
    const first = await engine.call<"appended">({ type: "append", session: s.engineName, text: words.repeat(200) });
    s.tokensSeen = first.tokens_seen;
    s.kv.grant(first.kv_bytes);
    s.kv.opened();
    s.kv.settle(first.kv_bytes);
    await residency.save(s, engine);
    const checkpoint = await quiet(dir).get("t", "huge");
    assert.ok(checkpoint && checkpoint.length > MAX_FRAME_BYTES, `a state over one frame: ${checkpoint?.length}`);

    const more = await engine.call<"appended">({ type: "append", session: s.engineName, text: "Go on." });
    s.tokensSeen = more.tokens_seen;
    s.dirty = true;
    const killing = engine;
    let pieces = 0;
    const killedAfterFirstPiece: StateEngine = {
      call: (async (m: Parameters<StateEngine["call"]>[0]) => {
        const r = await killing.call(m);
        if (m.type === "save" && ++pieces === 1) {
          const exited = new Promise((res) => killing.once("exit", res));
          killing.kill("SIGKILL");
          await exited;
        }
        return r;
      }) as StateEngine["call"],
    };
    await assert.rejects(
      residency.save(s, killedAfterFirstPiece),
      (e: unknown) => e instanceof EngineRequestError && e.code === ENGINE_DIED,
    );
    assert.equal(pieces, 1);
    assert.deepEqual(
      readdirSync(dir)
        .filter((f) => !f.endsWith(".kvstate") && f !== "index.json")
        .sort(),
      [],
    );

    // The next host and engine find the previous checkpoint, whole, and the engine takes it back.
    engine = await EngineProcess.start(options);
    const again = setup(new ScriptedEngine(), quiet(dir));
    const [adopted] = await again.residency.adopt();
    assert.equal(adopted?.tokensSeen, first.tokens_seen);
    const restored = await quiet(dir).get("t", "huge");
    assert.equal(Buffer.compare(Buffer.from(restored!), Buffer.from(checkpoint)), 0);
    await restoreToEngine(engine, "t/huge-again", restored!);
    const st = await engine.call<"stats_result">({ type: "stats", session: "t/huge-again" });
    assert.equal(st.tokens_seen, first.tokens_seen);
  } finally {
    await engine.shutdown().catch(() => {});
    rmSync(dir, { recursive: true, force: true });
  }
});

test("a restore from the edge's store (the local copy missing) of another host's copy is refused; of its own, its numbers are the edge's", async () => {
  for (const edgeEtag of ["e2", "e1"]) {
    const engine = new ScriptedEngine();
    const store = new StateStore();
    const sessions: HostSession[] = [];
    const edgeMeta = {
      tenant: "t",
      session: "c",
      params: { method: "pyramidkv", budget: 64 },
      tokens_seen: 20,
      kv_bytes: 2000,
    };
    const remote: RemoteStore = {
      epoch: 1,
      connected: true,
      put: async () => "e1",
      head: async () => ({ etag: edgeEtag }),
      get: async () => ({ file: encodeStateFile(edgeMeta, bytes(50)), etag: edgeEtag, meta: {} }),
    };
    const admission: Admission<HostSession> = new Admission<HostSession>({
      sessions: () => sessions,
      offload: (s): Promise<boolean> => residency.offload(s),
      quota: () => 1 << 30,
      poolBytes: () => 1 << 30,
      refused: () => {},
    });
    const residency: Residency = new Residency(
      store,
      { ready: Promise.resolve(engine) },
      admission,
      new HostMetrics(),
      {
        remote,
      },
    );
    const s = new HostSession("t", "c", { method: "pyramidkv", budget: 64 });
    s.kv.grant(2000);
    s.kv.opened();
    s.kv.settle(2000);
    s.tokensSeen = 10;
    s.dirty = true;
    s.epoch = 1;
    sessions.push(s);
    engine.states.set("t/c", bytes(100));
    assert.equal(await residency.offload(s), true);
    assert.equal(s.etag, "e1", "checkpointed to the edge");
    await store.delete("t", "c"); // a cache that could not keep it
    if (edgeEtag === "e2") {
      await assert.rejects(residency.ensureResident(s, 0), (e: unknown) => e instanceof StateConflictError);
      assert.equal(s.resident, false);
      assert.equal(s.etag, "e1", "not taken as this session's");
      assert.equal(s.kv.accounted(false), 0, "its reservation released");
    } else {
      await residency.ensureResident(s, 0);
      assert.equal(s.resident, true);
      assert.equal(s.tokensSeen, 20, "the edge's copy's numbers");
    }
  }
});
