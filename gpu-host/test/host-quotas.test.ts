// Tenants and quotas through the host protocol: admission, refusal, policy auto, offload of idle
// sessions to admit others, transparent restore with an identical (greedy) continuation, session
// limits, set_tenant, and tenant isolation.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { expectType, HostClient, scrape, startTestHost } from "./host-client.js";

const PROMPT =
  "The ocean covers most of the planet. It holds many fish, whales and coral reefs. Describe it in one sentence.";
const TENANTS = JSON.stringify({
  small: { kv_quota_bytes: 3_500_000, max_sessions: 2, policy: "refuse" },
  stretchy: { kv_quota_bytes: 3_500_000, max_sessions: 4, policy: "auto" },
  big: { kv_quota_bytes: 40_000_000, max_sessions: 10 },
  fullkv: { kv_quota_bytes: 20_000_000, max_sessions: 4 },
});

let host: Awaited<ReturnType<typeof startTestHost>>;
let c: HostClient;

before(async () => {
  host = await startTestHost({}, ["--kv-pool-bytes", String(64 << 20), "--tenants", TENANTS, "--idle-seconds", "3600"]);
  c = await HostClient.connect(host.url);
});
after(async () => {
  c.close();
  await host.stop();
});

async function turn(tenant: string, session: string, text: string, maxTokens: number): Promise<string> {
  expectType(await c.call({ type: "append", tenant, session, text, chat: true }), "appended");
  return expectType(await c.call({ type: "generate", tenant, session, max_tokens: maxTokens }), "done").text;
}

test("admission within the quota, refusal over it, auto budget, session limit", { timeout: 60_000 }, async () => {
  const bpe = c.hello as { bytes_per_entry: number; n_layer: number };
  assert.equal(bpe.bytes_per_entry, 768);
  const opened = expectType(
    await c.call({ type: "open_session", tenant: "small", session: "s1", budget: 64, prompt_tokens: 32 }),
    "opened",
  );
  assert.equal(opened.reserved_bytes, 30 * (64 + 32) * 768);
  const refused = expectType(
    await c.call({ type: "open_session", tenant: "small", session: "huge", budget: 200, prompt_tokens: 32 }),
    "error",
  );
  assert.equal(refused.code, "quota_exceeded");
  const auto = expectType(
    await c.call({ type: "open_session", tenant: "stretchy", session: "a1", budget: 200, prompt_tokens: 32 }),
    "opened",
  );
  assert.equal(auto.budget, Math.floor(3_500_000 / (30 * 768)) - 32);
  assert.ok(auto.reserved_bytes <= 3_500_000);
  expectType(await c.call({ type: "close", tenant: "stretchy", session: "a1" }), "closed");
  const metrics = await scrape(host.address.port);
  assert.match(metrics, /pkv_host_quota_refusals_total\{tenant="small",reason="kv_quota"\} 1/);
});

test("an idle session is offloaded to admit another, restored on its next request, and continues identically", {
  timeout: 90_000,
}, async () => {
  // Reference: the same turns in a roomy tenant, never offloaded.
  expectType(await c.call({ type: "open_session", tenant: "big", session: "ref", budget: 64 }), "opened");
  const ref1 = await turn("big", "ref", PROMPT, 6);
  const ref2 = await turn("big", "ref", "Why?", 6);

  const first = await turn("small", "s1", PROMPT, 6);
  assert.equal(first, ref1);
  // s2's reservation does not fit beside s1: s1 (idle) is offloaded to admit it.
  expectType(
    await c.call({ type: "open_session", tenant: "small", session: "s2", budget: 64, prompt_tokens: 64 }),
    "opened",
  );
  const tenantStats = expectType(await c.call({ type: "stats", tenant: "small" }), "stats_result");
  assert.equal(tenantStats.offloaded, 1);
  assert.ok((tenantStats.kv_used_bytes ?? 0) <= 3_500_000);
  assert.equal(
    expectType(await c.call({ type: "stats", tenant: "small", session: "s1" }), "stats_result").resident,
    false,
  );
  // s1 comes back transparently (s2, idle, makes room) and continues as if never offloaded.
  const second = await turn("small", "s1", "Why?", 6);
  assert.equal(second, ref2);
  assert.equal(
    expectType(await c.call({ type: "stats", tenant: "small", session: "s1" }), "stats_result").resident,
    true,
  );
  assert.equal(
    expectType(await c.call({ type: "stats", tenant: "small", session: "s2" }), "stats_result").resident,
    false,
  );
  // Session limit (2), then raised by the edge.
  assert.equal(
    expectType(await c.call({ type: "open_session", tenant: "small", session: "s3", budget: 16 }), "error").code,
    "session_limit",
  );
  const set = expectType(await c.call({ type: "set_tenant", tenant: "small", max_sessions: 3 }), "tenant_set");
  assert.deepEqual([set.max_sessions, set.kv_quota_bytes, set.policy], [3, 3_500_000, "refuse"]);
  expectType(await c.call({ type: "open_session", tenant: "small", session: "s3", budget: 16 }), "opened");
});

test("tenants are isolated: another tenant's session id is unknown, and can be reused", {
  timeout: 30_000,
}, async () => {
  for (const msg of [
    { type: "append", tenant: "big", session: "s1", text: "hi" },
    { type: "generate", tenant: "big", session: "s1", max_tokens: 2 },
    { type: "stats", tenant: "big", session: "s1" },
    { type: "close", tenant: "big", session: "s1" },
    { type: "cancel", tenant: "big", session: "s1" },
  ] as const) {
    assert.equal(expectType(await c.call(msg), "error").code, "unknown_session", msg.type);
  }
  expectType(await c.call({ type: "open_session", tenant: "big", session: "s1", budget: 32 }), "opened");
  const small = expectType(await c.call({ type: "stats", tenant: "small" }), "stats_result");
  assert.equal(small.sessions, 3); // big's s1 counts for big only
  assert.equal(
    expectType(await c.call({ type: "stats", tenant: "small", session: "s1" }), "stats_result").tokens_seen! > 0,
    true,
  );
});

test("quota overshoot: a FullKV open whose prompt_bytes cannot fit the quota is refused before prefilling, nothing accounted", {
  timeout: 30_000,
}, async () => {
  const hello = c.hello as { n_layer: number; bytes_per_entry: number; n_ctx: number };
  const prompt = "The ocean covers most of the planet. ".repeat(330); // 12,210 bytes, ~3k tokens: 69 MB of FullKV
  const refused = expectType(
    await c.call({
      type: "open_session",
      tenant: "fullkv",
      session: "long",
      method: "full",
      prompt_bytes: Buffer.byteLength(prompt, "utf8"),
    }),
    "error",
  );
  assert.equal(refused.code, "quota_exceeded");
  const needed = hello.n_layer * Math.min(Buffer.byteLength(prompt, "utf8") + 64, hello.n_ctx) * hello.bytes_per_entry;
  assert.match(refused.message, new RegExp(`needs ${needed} KV bytes .* its quota is 20000000`));
  const st = expectType(await c.call({ type: "stats", tenant: "fullkv" }), "stats_result");
  assert.deepEqual([st.sessions, st.kv_used_bytes], [0, 0]);
  // A short prompt is admitted within the quota, and stays within it once prefilled.
  const opened = expectType(
    await c.call({ type: "open_session", tenant: "fullkv", session: "short", method: "full", prompt_bytes: 40 }),
    "opened",
  );
  assert.ok(opened.reserved_bytes <= 20_000_000);
  expectType(
    await c.call({ type: "append", tenant: "fullkv", session: "short", text: "Hello, ocean.", chat: true }),
    "appended",
  );
  const after = expectType(await c.call({ type: "stats", tenant: "fullkv" }), "stats_result");
  assert.ok((after.kv_used_bytes ?? 0) > 0 && (after.kv_used_bytes ?? 0) <= 20_000_000, `used ${after.kv_used_bytes}`);
  expectType(await c.call({ type: "close", tenant: "fullkv", session: "short" }), "closed");
});
