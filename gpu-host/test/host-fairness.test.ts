// Fair decode lanes without an engine: generations in the engine at once are bounded in all
// (decodeLanes) and per tenant (tenantDecodeLanes); when a lane frees up the tenant served least
// recently goes next, so a flooding tenant's extra generations queue while another tenant's new
// one starts at once. Ordering and counts only, no timing; the last test through a real host.
import assert from "node:assert/strict";
import { test } from "node:test";

import { parseHostConfig } from "../src/host/config.js";
import { hostToken } from "../src/host/direct-edge.js";
import { FairScheduler } from "../src/host/scheduler.js";
import { expectType, HostClient, startTestHost } from "./host-client.js";

/** Decode jobs that run until the test finishes them, by name. */
function lanes(s: FairScheduler) {
  const started: string[] = [];
  const finish = new Map<string, () => void>();
  const promises: Promise<void>[] = [];
  return {
    started,
    push(tenant: string, name: string) {
      const job = s.run(
        tenant,
        "decode",
        () =>
          new Promise<void>((resolve) => {
            started.push(name);
            finish.set(name, resolve);
          }),
      );
      promises.push(job.promise);
      return job;
    },
    async finish(name: string) {
      const f = finish.get(name);
      assert.ok(f, `${name} is not running`);
      f();
      await new Promise((r) => setImmediate(r)); // the scheduler's bookkeeping runs on settled promises
    },
    all: () => Promise.all(promises),
  };
}

test("decode lanes: a flooding tenant holds at most tenantDecodeLanes; another tenant's generation starts at once", async () => {
  const s = new FairScheduler({ prefill: 1, decode: 4, tenantDecode: 2 });
  const l = lanes(s);
  for (let i = 0; i < 10; i++) l.push("a", `a${i}`);
  assert.deepEqual(l.started, ["a0", "a1"], "a's other 8 wait although 2 lanes are free");
  assert.equal(s.queued("decode"), 8);
  l.push("b", "b0");
  assert.deepEqual(l.started, ["a0", "a1", "b0"], "b does not wait behind a's queue");
  assert.equal(s.queued("decode"), 8);
  await l.finish("a0");
  assert.deepEqual(l.started, ["a0", "a1", "b0", "a2"], "a's freed lane goes to a's next");
  assert.equal(s.queued("decode"), 7);
});

test("decode lanes: when every lane is taken, freed lanes go round-robin to the tenants served least recently", async () => {
  const s = new FairScheduler({ prefill: 1, decode: 2, tenantDecode: 2 });
  const l = lanes(s);
  for (let i = 0; i < 5; i++) l.push("a", `a${i}`);
  l.push("b", "b0");
  l.push("b", "b1");
  l.push("c", "c0");
  assert.deepEqual(l.started, ["a0", "a1"]);
  assert.equal(s.queued("decode"), 6);
  for (const name of ["a0", "a1", "b0", "c0", "a2", "b1", "a3"]) await l.finish(name);
  assert.deepEqual(l.started, ["a0", "a1", "b0", "c0", "a2", "b1", "a3", "a4"]);
  await l.finish("a4");
  await l.all();
  assert.equal(s.queued("decode"), 0);
});

test("decode lanes: a queued generation can be cancelled without taking a lane", async () => {
  const s = new FairScheduler({ prefill: 1, decode: 2, tenantDecode: 1 });
  const l = lanes(s);
  l.push("a", "a0");
  const queued = l.push("a", "a1");
  assert.equal(queued.abort(new Error("cancelled while queued")), true);
  await assert.rejects(queued.promise, /cancelled while queued/);
  l.push("b", "b0");
  assert.deepEqual(l.started, ["a0", "b0"]);
  assert.equal(s.queued("decode"), 0);
});

test("the host's scheduler takes --decode-lanes and --tenant-decode-lanes", () => {
  const c = parseHostConfig(["--decode-lanes", "3", "--tenant-decode-lanes", "1", "--max-prefills", "1"], {
    PKV_EDGE_URL: "http://127.0.0.1:9",
    PKV_HOST_TOKEN: hostToken("h0"),
  });
  const s = FairScheduler.forHost(c);
  const l = lanes(s);
  for (let i = 0; i < 3; i++) l.push("a", `a${i}`);
  for (let i = 0; i < 3; i++) l.push(`t${i}`, `t${i}`);
  assert.deepEqual(l.started, ["a0", "t0", "t1"], "1 lane per tenant, 3 in all");
  assert.equal(s.queued("decode"), 3);
});

test("through the host (--tenant-decode-lanes 1): a flooding tenant's generations run one at a time, another tenant's beside them", {
  timeout: 300_000,
}, async () => {
  const host = await startTestHost({}, [
    "--decode-lanes",
    "4",
    "--tenant-decode-lanes",
    "1",
    "--idle-seconds",
    "3600",
    "--checkpoint",
    "off",
  ]);
  const c = await HostClient.connect(host.url, { tenant: "a" });
  try {
    const flood = ["a0", "a1", "a2"];
    const all: [string, string][] = [...flood.map((s): [string, string] => ["a", s]), ["b", "b0"]];
    for (const [tenant, session] of all) {
      expectType(await c.call({ type: "open_session", tenant, session, budget: 64 }), "opened");
      expectType(
        await c.call({
          type: "append",
          tenant,
          session,
          text: "Count from 1 to 100, separated by commas.",
          chat: true,
        }),
        "appended",
      );
    }
    const tokensOfA: string[] = []; // A's token frames in arrival order (one connection: the host's order)
    const ends: string[] = [];
    const gen = (tenant: string, session: string) =>
      c
        .request({ type: "generate", tenant, session, max_tokens: 8, temperature: 0 }, (f) => {
          if (f.type === "token" && tenant === "a") tokensOfA.push(session);
        })
        .then((frames) => {
          expectType(frames[frames.length - 1]!, "done");
          ends.push(session);
        });
    const runs = [...flood.map((s) => gen("a", s)), gen("b", "b0")];
    await Promise.all(runs);
    // Each of A's generations ran alone: its tokens are one contiguous run among A's.
    const runsOf = tokensOfA.filter((s, i) => i === 0 || tokensOfA[i - 1] !== s);
    assert.deepEqual(runsOf, flood, `A's tokens interleaved: ${tokensOfA.join(" ")}`);
    // B did not wait for A's queue: it ended before A's last generation (16 decode steps later).
    assert.ok(ends.indexOf("b0") < ends.indexOf("a2"), `ends: ${ends.join(" ")}`);
  } finally {
    c.close();
    await host.stop();
  }
});
