// Engine supervision with fake engines: an unexpected exit puts every session back to its last
// checkpoint and restarts the engine, retrying with backoff; an exit during shutdown, or of an
// engine already replaced, restarts nothing.
import assert from "node:assert/strict";
import { EventEmitter } from "node:events";
import { test } from "node:test";

import { HostSession } from "../src/host/session.js";
import { EngineSupervisor, restartDelayMs } from "../src/host/supervisor.js";

class FakeEngine extends EventEmitter<{ exit: [code: number | null, signal: NodeJS.Signals | null] }> {
  alive = true;
  constructor(readonly n: number) {
    super();
  }
  die(): void {
    this.alive = false;
    this.emit("exit", null, "SIGKILL");
  }
}

// `tokensSeen`: what the session held when it was saved (or, unsaved, what the edge was told);
// `unsavedTokens`: tokens of a result after that checkpoint, not acknowledged yet.
function session(
  id: string,
  o: { resident: boolean; saved: boolean; dirty?: boolean; tokensSeen?: number; unsavedTokens?: number },
) {
  const s = new HostSession("t", id, { method: "pyramidkv", budget: 64 });
  s.kv.grant(1000);
  if (o.resident) s.kv.opened();
  s.kv.grant(s.kv.held + 200);
  s.tokensSeen = o.tokensSeen ?? 0;
  s.ackedTokens = s.tokensSeen;
  s.saved = o.saved;
  s.dirty = o.dirty ?? false;
  s.tokensSeen += o.unsavedTokens ?? 0;
  return s;
}

function supervised(sessions: HostSession[], failures = 0) {
  let spawned = 0;
  const delays: number[] = [];
  let died = 0;
  const sup = new EngineSupervisor<FakeEngine>({
    spawn: async () => {
      spawned++;
      if (spawned > 1 && failures-- > 0) throw new Error(`spawn ${spawned} failed`);
      return new FakeEngine(spawned);
    },
    sessions: () => sessions,
    died: () => died++,
    sleep: async (ms) => {
      delays.push(ms);
    },
  });
  return { sup, delays, died: () => died, spawned: () => spawned };
}

test("an engine death puts sessions back to their checkpoint and restarts the engine", async () => {
  const checkpointed = session("checkpointed", {
    resident: true,
    saved: true,
    dirty: true,
    tokensSeen: 50,
    unsavedTokens: 7,
  });
  const empty = session("empty", { resident: true, saved: false });
  const unsaved = session("unsaved", { resident: true, saved: false, tokensSeen: 9 });
  const offloaded = session("offloaded", { resident: false, saved: true, tokensSeen: 5 });
  const h = supervised([checkpointed, empty, unsaved, offloaded]);
  const first = await h.sup.start();
  assert.equal(await h.sup.ready, first);
  first.die();
  assert.equal(h.died(), 1);
  assert.deepEqual(
    [checkpointed.resident, checkpointed.dirty, checkpointed.lost, checkpointed.kv.inFlight],
    [false, false, undefined, 0],
  );
  assert.equal(checkpointed.tokensSeen, 50, "tokens_seen is the checkpoint's, not the lost result's");
  assert.deepEqual([empty.resident, empty.reopen, empty.lost], [false, true, undefined]);
  assert.deepEqual([unsaved.resident, unsaved.lost], [false, "the engine died before it was ever saved"]);
  assert.deepEqual([offloaded.reopen, offloaded.lost, offloaded.kv.reserved], [undefined, undefined, 1200]);
  const second = await h.sup.ready;
  assert.equal(second.n, 2);
  assert.equal(h.sup.engine, second);
});

test("a failing restart is retried with backoff: 200 ms doubling, at most 5 s", async () => {
  const h = supervised([], 3);
  (await h.sup.start()).die();
  const engine = await h.sup.ready;
  assert.equal(engine.n, 5);
  assert.deepEqual(h.delays, [200, 400, 800]);
  assert.deepEqual([0, 1, 4, 5, 10].map(restartDelayMs), [200, 400, 3200, 5000, 5000]);
});

test("an exit after stop(), or of an engine already replaced, restarts nothing", async () => {
  const h = supervised([]);
  const first = await h.sup.start();
  first.die();
  const second = await h.sup.ready;
  first.emit("exit", 1, null); // the old engine again: ignored
  assert.equal(h.spawned(), 2);
  h.sup.stop();
  second.die();
  assert.equal(h.died(), 1);
  assert.equal(h.spawned(), 2);
  assert.equal(h.sup.stopped, true);
});
