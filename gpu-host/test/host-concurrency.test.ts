// Many sessions multiplexed over few connections: 32 sessions over 4 connections all complete;
// time to first token at 1, 8 and 32 concurrent sessions is reported (diagnostics, not asserted).
import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { expectType, HostClient, scrape, startTestHost } from "./host-client.js";

let host: Awaited<ReturnType<typeof startTestHost>>;
let clients: HostClient[] = [];

before(async () => {
  host = await startTestHost({}, ["--kv-pool-bytes", String(64 << 20)]);
  clients = await Promise.all([0, 1, 2, 3].map(() => HostClient.connect(host.url)));
});
after(async () => {
  for (const c of clients) c.close();
  await host.stop();
});

const pct = (xs: number[], p: number) =>
  [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor((p / 100) * xs.length))]!;

async function round(n: number, tag: string): Promise<number[]> {
  const tenants = ["ta", "tb"];
  const ttft: number[] = [];
  await Promise.all(
    Array.from({ length: n }, async (_, i) => {
      const c = clients[i % clients.length]!;
      const tenant = tenants[i % 2]!;
      const session = `${tag}-${i}`;
      expectType(await c.call({ type: "open_session", tenant, session, budget: 32 }), "opened");
      const t0 = performance.now();
      expectType(
        await c.call({ type: "append", tenant, session, text: `Say hi to number ${i}.`, chat: true }),
        "appended",
      );
      let first = 0;
      const frames = await c.request({ type: "generate", tenant, session, max_tokens: 4 }, (f) => {
        if (f.type === "token" && first === 0) first = performance.now();
      });
      const done = expectType(frames[frames.length - 1]!, "done");
      assert.ok(done.new_tokens >= 1 || done.reason === "end");
      ttft.push((first || performance.now()) - t0);
      expectType(await c.call({ type: "close", tenant, session }), "closed");
    }),
  );
  return ttft;
}

test("32 concurrent sessions over 4 connections all complete; TTFT at 1, 8, 32", { timeout: 300_000 }, async (t) => {
  for (const n of [1, 8, 32]) {
    const ttft = await round(n, `c${n}`);
    assert.equal(ttft.length, n);
    t.diagnostic(
      `ttft (append + first token) at ${n} concurrent: p50 ${pct(ttft, 50).toFixed(0)} ms, p95 ${pct(ttft, 95).toFixed(0)} ms`,
    );
  }
  const metrics = await scrape(host.address.port);
  assert.match(metrics, /pkv_host_generated_tokens_total\{tenant="ta"\} \d+/);
});
