// The host's side of the compressed prompt cache (issue 14, host protocol 3.1): `snapshot` stores a
// copy of a session's state as the tenant's cached state (this host's snapshot memory and the
// edge's store, cache/<tenant>/<key>); `open_session.from_cache` opens a new session as a copy of
// it, on this host (from memory) or any other host of the model (from the edge's store). On the
// real engine with the embedded model: a copy continues exactly as the original (greedy: the same
// answer to the same turn), copies are independent, a copy prefills only its new turn. On the
// stand-in engine: the refusals (cache_miss, invalid, too_large, checkpoint_failed) leave nothing
// behind and the session untouched. One real-engine host runs at a time.
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";

import { type FromHostMessage, HOST_STATE_PART_BYTES } from "@pyramidkv/shared";

import { parseHostConfig } from "../src/host/config.js";
import { DirectEdge, hostToken } from "../src/host/direct-edge.js";
import { decodeStateFile, encodeStateFile, SnapshotMemory, stateFileName } from "../src/host/store.js";
import {
  expectType,
  fakeHost,
  HostClient,
  scrape,
  startTestHost,
  type TestHost,
  testConfig,
  testDir,
  until,
} from "./host-client.js";

const POOL = ["--kv-pool-bytes", String(160 << 20)];
const DOC = "The quick brown fox jumps over the lazy dog near the river bank today. ".repeat(30);
const KEY = "a".repeat(64);
const OTHER_KEY = "b".repeat(64);
const FULL_KEY = "d".repeat(64);
/** The flags every host needs (config tests). */
const connect = ["--connect", "http://127.0.0.1:9", "--host-token", hostToken("h0")];

const codeOf = (m: FromHostMessage) => expectType(m, "error").code;
const errorOf = (m: FromHostMessage) => expectType(m, "error");

async function turn(c: HostClient, session: string, text: string, maxTokens = 8): Promise<string> {
  expectType(await c.call({ type: "append", tenant: "t", session, text, chat: true }), "appended");
  return expectType(
    await c.call({ type: "generate", tenant: "t", session, max_tokens: maxTokens, temperature: 0 }),
    "done",
  ).text;
}

/** A turn (`turn`) and what its append prefilled: the host's counter's rise, the session's new tokens. */
async function counted(
  h: TestHost,
  c: HostClient,
  session: string,
  text: string,
): Promise<{ text: string; prefilled: number; added: number }> {
  const before = await tokensSeen(c, session);
  const counter = h.metrics.promptTokens.get({ tenant: "t" });
  const appended = expectType(
    await c.call({ type: "append", tenant: "t", session, text, chat: true }),
    "appended",
  ).tokens_seen;
  const prefilled = h.metrics.promptTokens.get({ tenant: "t" }) - counter;
  const answer = expectType(
    await c.call({ type: "generate", tenant: "t", session, max_tokens: 8, temperature: 0 }),
    "done",
  ).text;
  return { text: answer, prefilled, added: appended - before };
}

const tokensSeen = async (c: HostClient, session: string) =>
  expectType(await c.call({ type: "stats", tenant: "t", session }), "stats_result").tokens_seen!;

test("a snapshot continues exactly: copies on the same host (memory) and on another host (the edge's store) answer a turn as the original; copies are independent and prefill only their new turn", {
  timeout: 300_000,
}, async () => {
  const edge = await DirectEdge.start({ tokens: [] });
  try {
    const a = await startTestHost({}, POOL, { edge });
    const ca = await HostClient.connect(edge.url, { host: a.name });
    let snap: Extract<FromHostMessage, { type: "snapshotted" }>;
    let reference: string;
    let fullReference: string;
    try {
      expectType(
        await ca.call({ type: "open_session", tenant: "t", session: "orig", method: "pyramidkv", budget: 64 }),
        "opened",
      );
      await turn(ca, "orig", `${DOC}\nWhat does the fox do?`, 6);
      // Queued right behind the generate (not awaited): taken after it, its last token counted.
      const gen = ca.call({ type: "generate", tenant: "t", session: "orig", max_tokens: 3, temperature: 0 });
      const snapped = ca.call({ type: "snapshot", tenant: "t", session: "orig", key: KEY });
      expectType(await gen, "done");
      snap = expectType(await snapped, "snapshotted");
      assert.equal(snap.key, KEY);
      assert.equal(snap.tokens_seen, await tokensSeen(ca, "orig"), "the snapshot holds every token, the last too");
      const stored = edge.cachedState("t", KEY);
      assert.ok(stored, "the edge's store has the cached state");
      assert.equal(stored.file.length, snap.bytes);
      assert.equal(decodeStateFile(stored.file, "t", KEY).meta.tokens_seen, snap.tokens_seen);

      // Two copies on this host, from its memory: one kept (checkpointed to the edge before opened),
      // one ephemeral (never at the edge).
      const kept = expectType(
        await ca.call({ type: "open_session", tenant: "t", session: "copy1", from_cache: KEY, budget: 7 }),
        "opened",
      );
      assert.deepEqual(
        [kept.method, kept.budget, kept.tokens_seen, kept.cached_bytes],
        ["pyramidkv", 64, snap.tokens_seen, snap.bytes],
        "the cached state's settings and tokens; the open's budget is ignored",
      );
      const copy1 = edge.state("t", "copy1");
      assert.ok(copy1, "a copy that is not ephemeral is in the edge's store when opened");
      assert.equal(decodeStateFile(copy1.file, "t", "copy1").meta.tokens_seen, snap.tokens_seen);
      expectType(
        await ca.call({ type: "open_session", tenant: "t", session: "copy2", from_cache: KEY, ephemeral: true }),
        "opened",
      );
      assert.equal(edge.state("t", "copy2"), undefined, "an ephemeral copy never goes to the edge");
      assert.equal(a.metrics.cacheOpens.get({ source: "memory" }), 2);

      // A turn in copy1 does not show in copy2 (nor in the original).
      await turn(ca, "copy1", "Forget the fox. Name three colours.", 6);
      assert.equal(await tokensSeen(ca, "copy2"), snap.tokens_seen);
      const copy2 = await counted(a, ca, "copy2", "And the dog?");
      assert.equal(copy2.prefilled, copy2.added, "copy2 prefilled its new turn only");
      assert.ok(copy2.added > 0 && copy2.added < 40, `the turn's tokens (${copy2.added})`);
      reference = await turn(ca, "orig", "And the dog?");
      assert.ok(reference.length > 0);
      assert.equal(copy2.text, reference, "the copy answers as the original");

      // A FullKV document's state, over HOST_STATE_PART_BYTES: to the edge's store in parts.
      expectType(await ca.call({ type: "open_session", tenant: "t", session: "full", method: "full" }), "opened");
      expectType(
        await ca.call({
          type: "append",
          tenant: "t",
          session: "full",
          text: `${DOC}\nWhat does the fox do?`,
          chat: true,
        }),
        "appended",
      );
      const full = expectType(
        await ca.call({ type: "snapshot", tenant: "t", session: "full", key: FULL_KEY }),
        "snapshotted",
      );
      assert.ok(full.bytes > HOST_STATE_PART_BYTES, `${full.bytes} bytes`);
      fullReference = expectType(
        await ca.call({ type: "generate", tenant: "t", session: "full", max_tokens: 8, temperature: 0 }),
        "done",
      ).text;
    } finally {
      ca.close();
      await a.stop();
    }

    // Another host of the model: the copy comes from the edge's store. Without checkpoints, so that
    // nothing but the snapshot decodes a generation's last token before it is taken.
    const b = await startTestHost({}, [...POOL, "--checkpoint", "off"], { edge });
    const cb = await HostClient.connect(edge.url, { host: b.name });
    try {
      const opened = expectType(
        await cb.call({ type: "open_session", tenant: "t", session: "copy3", from_cache: KEY, ephemeral: true }),
        "opened",
      );
      assert.equal(opened.tokens_seen, snap.tokens_seen);
      assert.equal(b.metrics.cacheOpens.get({ source: "edge" }), 1);
      assert.equal(b.metrics.promptTokens.get({ tenant: "t" }), 0, "a copy's cached tokens are not prefilled");
      const copy3 = await counted(b, cb, "copy3", "And the dog?");
      assert.equal(copy3.text, reference, "the copy on another host answers as the original");
      assert.equal(b.metrics.promptTokens.get({ tenant: "t" }), copy3.added, "b prefilled the new turn only");
      // Kept in b's memory now: the next copy on b does not read the edge's store again.
      expectType(
        await cb.call({ type: "open_session", tenant: "t", session: "copy4", from_cache: KEY, ephemeral: true }),
        "opened",
      );
      assert.equal(b.metrics.cacheOpens.get({ source: "memory" }), 1);
      // The FullKV state comes from the edge in parts, each acknowledged, and continues exactly.
      const acks = () => edge.controls.filter((m) => m.type === "data_ack" && m.host === b.name && m.part === 1).length;
      const acked = acks();
      expectType(
        await cb.call({
          type: "open_session",
          tenant: "t",
          session: "full-copy",
          from_cache: FULL_KEY,
          ephemeral: true,
        }),
        "opened",
      );
      assert.equal(acks(), acked + 1, "its second part acknowledged");
      assert.equal(
        expectType(
          await cb.call({ type: "generate", tenant: "t", session: "full-copy", max_tokens: 8, temperature: 0 }),
          "done",
        ).text,
        fullReference,
      );
      expectType(await cb.call({ type: "close", tenant: "t", session: "full-copy" }), "closed");
      // A reply's snapshot, right after its generate: the copy holds every token (the last one
      // too) and continues as the session it was taken from.
      const reply = expectType(
        await cb.call({ type: "snapshot", tenant: "t", session: "copy3", key: OTHER_KEY }),
        "snapshotted",
      );
      assert.equal(reply.tokens_seen, await tokensSeen(cb, "copy3"));
      const copy5 = expectType(
        await cb.call({ type: "open_session", tenant: "t", session: "copy5", from_cache: OTHER_KEY, ephemeral: true }),
        "opened",
      );
      assert.equal(copy5.tokens_seen, reply.tokens_seen);
      const next = await counted(b, cb, "copy5", "Thanks. One more word?");
      assert.equal(next.prefilled, next.added, "the copy's tokens are the state's: it prefills its new turn only");
      assert.equal(next.text, await turn(cb, "copy3", "Thanks. One more word?"), "as the session it was taken from");
      // A state file that is whole (its CRC holds) but that the engine refuses: a miss too, nothing left.
      const h = b.sessions.helloFields();
      const junkKey = "e".repeat(64);
      edge.cached.set(`t\0${junkKey}`, {
        etag: "junk",
        meta: {},
        file: encodeStateFile(
          { tenant: "t", session: junkKey, params: { method: "pyramidkv", budget: 64 }, tokens_seen: 5, kv_bytes: 1 },
          new TextEncoder().encode("not an engine state"),
          { model: h.model, n_layer: h.n_layer, bytes_per_entry: h.bytes_per_entry },
        ),
      });
      const junk = errorOf(await cb.call({ type: "open_session", tenant: "t", session: "junk", from_cache: junkKey }));
      assert.equal(junk.code, "cache_miss", junk.message);
      assert.match(junk.message, /cannot be restored here/);
      assert.equal(junk.reason, "damaged", "the engine refused it: the edge may forget it");
      assert.equal(codeOf(await cb.call({ type: "stats", tenant: "t", session: "junk" })), "unknown_session");
      // An ephemeral copy is restored from the bytes themselves: refused the same.
      const junk2 = errorOf(
        await cb.call({ type: "open_session", tenant: "t", session: "junk", from_cache: junkKey, ephemeral: true }),
      );
      assert.deepEqual([junk2.code, junk2.reason], ["cache_miss", "damaged"], junk2.message);
      assert.equal(codeOf(await cb.call({ type: "stats", tenant: "t", session: "junk" })), "unknown_session");
      assert.equal(edge.state("t", "junk"), undefined);
      const metrics = await scrape(b.address.port);
      assert.match(metrics, /pkv_host_cache_opens_total\{source="edge"\} 2/);
      assert.match(metrics, /pkv_host_cache_memory_bytes [1-9]/);
    } finally {
      cb.close();
      await b.stop();
    }
  } finally {
    await edge.close();
  }
});

test("from_cache of a key nobody stored: cache_miss (reason missing), nothing left open; the edge's store failing: reason unavailable; a bad key: invalid naming from_cache", {
  timeout: 60_000,
}, async () => {
  const host = await fakeHost();
  const c = await HostClient.connect(host.url);
  try {
    const miss = errorOf(await c.call({ type: "open_session", tenant: "t", session: "m", from_cache: KEY }));
    assert.equal(miss.code, "cache_miss", miss.message);
    assert.match(miss.message, /missing/);
    assert.equal(miss.reason, "missing");
    assert.equal(host.metrics.cacheOpens.get({ source: "miss" }), 1);
    host.edge.faults.cacheGet = { code: "internal", message: "R2 is down" };
    const down = errorOf(await c.call({ type: "open_session", tenant: "t", session: "m", from_cache: KEY }));
    host.edge.faults.cacheGet = undefined;
    assert.equal(down.code, "cache_miss", down.message);
    assert.match(down.message, /could not be read .*R2 is down/);
    assert.equal(down.reason, "unavailable", "the edge's entry may be fine: not to be forgotten");
    assert.equal(host.metrics.cacheOpens.get({ source: "miss" }), 2);
    assert.equal(codeOf(await c.call({ type: "stats", tenant: "t", session: "m" })), "unknown_session");
    const tenant = expectType(await c.call({ type: "stats", tenant: "t" }), "stats_result");
    assert.equal(tenant.sessions, 0, "nothing left open");
    expectType(await c.call({ type: "open_session", tenant: "t", session: "m" }), "opened"); // the id is free
    for (const bad of ["A".repeat(64), "a".repeat(63), `${"a".repeat(63)}g`, ""]) {
      const e = errorOf(await c.call({ type: "open_session", tenant: "t", session: "n", from_cache: bad }));
      assert.equal(e.code, "invalid", bad);
      assert.equal(e.reason, undefined, "only a cache_miss has a reason");
      assert.match(e.message, /from_cache .* 64 lowercase hex/);
    }
    const key = errorOf(await c.call({ type: "snapshot", tenant: "t", session: "m", key: "xyz" }));
    assert.equal(key.code, "invalid");
    assert.match(key.message, /snapshot: key 'xyz' is not a cache key \(accepted: 64 lowercase hex digits\)/);
    assert.equal(codeOf(await c.call({ type: "snapshot", tenant: "t", session: "nope", key: KEY })), "unknown_session");
  } finally {
    c.close();
    await host.stop();
  }
});

test("a snapshot over max_bytes is too_large and stores nothing; one the edge refuses is checkpoint_failed, the session untouched", {
  timeout: 60_000,
}, async () => {
  const host = await fakeHost();
  const c = await HostClient.connect(host.url);
  try {
    expectType(await c.call({ type: "open_session", tenant: "t", session: "s", budget: 16 }), "opened");
    expectType(await c.call({ type: "append", tenant: "t", session: "s", text: "hello" }), "appended");
    const big = errorOf(await c.call({ type: "snapshot", tenant: "t", session: "s", key: KEY, max_bytes: 10 }));
    assert.equal(big.code, "too_large", big.message);
    assert.match(big.message, /over max_bytes 10/);
    assert.equal(host.edge.cachedState("t", KEY), undefined, "nothing at the edge");
    assert.equal(
      codeOf(await c.call({ type: "open_session", tenant: "t", session: "c", from_cache: KEY })),
      "cache_miss",
      "nor in the host's memory",
    );
    assert.equal(host.metrics.snapshots.get({ result: "too_large" }), 1);

    host.edge.faults.cachePut = { code: "internal", message: "R2 is down" };
    const refused = errorOf(await c.call({ type: "snapshot", tenant: "t", session: "s", key: KEY }));
    assert.equal(refused.code, "checkpoint_failed", refused.message);
    assert.match(refused.message, /R2 is down/);
    host.edge.faults.cachePut = undefined;
    assert.equal(
      codeOf(await c.call({ type: "open_session", tenant: "t", session: "c", from_cache: KEY })),
      "cache_miss",
      "a refused snapshot is not kept in memory either",
    );
    assert.equal(await tokensSeen(c, "s"), 5, "the session untouched");
    expectType(await c.call({ type: "append", tenant: "t", session: "s", text: "world" }), "appended");
    assert.equal(await tokensSeen(c, "s"), 10);

    const ok = expectType(await c.call({ type: "snapshot", tenant: "t", session: "s", key: KEY }), "snapshotted");
    assert.equal(ok.tokens_seen, 10);
    assert.equal(host.metrics.snapshots.get({ result: "ok" }), 1);
    assert.equal(host.metrics.snapshots.get({ result: "checkpoint_failed" }), 1);
    const copy = expectType(
      await c.call({ type: "open_session", tenant: "t", session: "c", from_cache: KEY }),
      "opened",
    );
    assert.equal(copy.tokens_seen, 10);
    assert.equal(copy.budget, 16);
    // The copy's turn prefills its own tokens only; the original does not see it.
    const prefilled = host.metrics.promptTokens.get({ tenant: "t" });
    assert.equal(
      expectType(await c.call({ type: "append", tenant: "t", session: "c", text: "abc" }), "appended").tokens_seen,
      13,
    );
    assert.equal(host.metrics.promptTokens.get({ tenant: "t" }) - prefilled, 3);
    assert.equal(await tokensSeen(c, "s"), 10);
    assert.equal(
      codeOf(await c.call({ type: "open_session", tenant: "t", session: "c", from_cache: KEY })),
      "session_exists",
    );
  } finally {
    c.close();
    await host.stop();
  }
});

test("from_cache of a damaged or another model's cached state at the edge: cache_miss saying which; an offloaded session's snapshot comes from its stored copy", {
  timeout: 60_000,
}, async () => {
  const host = await fakeHost(["--cache-memory-bytes", "0", "--idle-seconds", "1"]);
  const c = await HostClient.connect(host.url);
  try {
    expectType(await c.call({ type: "open_session", tenant: "t", session: "s", budget: 16 }), "opened");
    expectType(await c.call({ type: "append", tenant: "t", session: "s", text: "hello" }), "appended");
    const good = expectType(await c.call({ type: "snapshot", tenant: "t", session: "s", key: KEY }), "snapshotted");
    const stored = host.edge.cachedState("t", KEY)!;
    const { meta, state } = decodeStateFile(stored.file, "t", KEY);
    // Another model's (its identity in the file's meta), and a damaged one (one byte flipped).
    host.edge.cached.set(`t\0${OTHER_KEY}`, {
      ...stored,
      file: encodeStateFile({ ...meta, session: OTHER_KEY }, state, {
        model: "other",
        n_layer: 2,
        bytes_per_entry: 128,
      }),
    });
    const flipped = new Uint8Array(stored.file);
    flipped[flipped.length - 1]! ^= 0xff;
    const damagedKey = "c".repeat(64);
    host.edge.cached.set(`t\0${damagedKey}`, { ...stored, file: flipped });
    const other = errorOf(await c.call({ type: "open_session", tenant: "t", session: "o", from_cache: OTHER_KEY }));
    assert.equal(other.code, "cache_miss");
    assert.match(other.message, /another model's: stored by a host of model 'other'/);
    assert.equal(other.reason, "incompatible");
    const damaged = errorOf(await c.call({ type: "open_session", tenant: "t", session: "d", from_cache: damagedKey }));
    assert.equal(damaged.code, "cache_miss");
    assert.match(damaged.message, /damaged/);
    assert.equal(damaged.reason, "damaged");
    assert.equal(host.metrics.cacheOpens.get({ source: "miss" }), 2);
    // Another tenant never reads this one's cached states.
    const u = await HostClient.connect(host.url, { tenant: "u" });
    assert.equal(
      codeOf(await u.call({ type: "open_session", tenant: "u", session: "x", from_cache: KEY })),
      "cache_miss",
    );
    u.close();

    // Memory 0: the copy comes from the edge's store each time.
    expectType(await c.call({ type: "open_session", tenant: "t", session: "c", from_cache: KEY }), "opened");
    assert.equal(host.metrics.cacheOpens.get({ source: "edge" }), 1);
    // Offloaded (idle 1 s): its snapshot is its stored copy, the same state file. (Watched in the
    // host's table: a stats request racing the offload may find the engine's copy just closed.)
    const resident = () => host.sessions.gauges().sessions.find((g) => g.state === "active")?.count ?? 0;
    await until(() => resident() === 0, "the offloads");
    const again = expectType(
      await c.call({ type: "snapshot", tenant: "t", session: "s", key: OTHER_KEY }),
      "snapshotted",
    );
    assert.deepEqual([again.tokens_seen, again.bytes], [good.tokens_seen, good.bytes]);
    const c2 = expectType(
      await c.call({ type: "open_session", tenant: "t", session: "c2", from_cache: OTHER_KEY }),
      "opened",
    );
    assert.equal(c2.tokens_seen, 5);
  } finally {
    c.close();
    await host.stop();
  }
});

test("snapshot memory: least recently used evicted past its bound, every tenant together; a file over the bound not kept; --cache-memory-bytes and PKV_CACHE_MEMORY_BYTES", () => {
  const m = new SnapshotMemory(10);
  const file = (n: number) => new Uint8Array(n);
  assert.equal(m.put("t", KEY, file(4)), true);
  assert.equal(m.put("u", KEY, file(4)), true, "another tenant's entry of the same key is its own");
  assert.ok(m.get("t", KEY), "t's is now the most recently used");
  assert.equal(m.put("t", OTHER_KEY, file(4)), true);
  assert.equal(m.get("u", KEY), undefined, "u's, the least recently used, evicted");
  assert.deepEqual([m.bytes, m.size], [8, 2]);
  assert.equal(m.put("t", FULL_KEY, file(11)), false, "larger than the bound: not kept");
  assert.deepEqual([m.bytes, m.size], [8, 2]);
  assert.equal(m.put("t", KEY, file(10)), true, "a key stored again replaces its file");
  assert.deepEqual([m.bytes, m.size, m.get("t", OTHER_KEY)], [10, 1, undefined]);
  const none = new SnapshotMemory(0);
  assert.equal(none.put("t", KEY, file(1)), false, "0: nothing is kept");

  assert.equal(testConfig().cacheMemoryBytes, 268435456);
  assert.equal(testConfig({}, ["--cache-memory-bytes", "0"]).cacheMemoryBytes, 0);
  assert.equal(parseHostConfig(connect, { PKV_CACHE_MEMORY_BYTES: "1048576" }).cacheMemoryBytes, 1 << 20);
  assert.throws(() => testConfig({}, ["--cache-memory-bytes=-1"]), /--cache-memory-bytes: '-1' is not an integer/);
});

test("cache_fingerprint in host_hello and every channel's hello: the same for hosts of the same settings, another for another --chunk-size or --kv-type", {
  timeout: 120_000,
}, async () => {
  const edge = await DirectEdge.start({ tokens: [] });
  const fingerprint = async (argv: string[]) => {
    const host = await fakeHost(argv, { edge });
    const c = await HostClient.connect(edge.url, { host: host.name });
    try {
      const sent = (await edge.waitHost(host.name)).hello?.cache_fingerprint;
      assert.match(sent ?? "", /^[0-9a-f]{16}$/, `host_hello's (${sent})`);
      await until(() => c.hello !== undefined, "the channel's hello");
      assert.equal(expectType(c.hello!, "hello").cache_fingerprint, sent, "the channel's hello carries it");
      assert.equal(host.sessions.helloFields().cache_fingerprint, sent);
      return sent;
    } finally {
      c.close();
      await host.stop();
    }
  };
  try {
    const base = await fingerprint(["--chunk-size", "512"]);
    assert.equal(await fingerprint(["--chunk-size", "512"]), base, "equal settings, equal fingerprints");
    assert.notEqual(await fingerprint(["--chunk-size", "1024"]), base, "another chunk size");
    assert.notEqual(await fingerprint(["--chunk-size", "512", "--kv-type", "q8_0"]), base, "another kv_type");
  } finally {
    await edge.close();
  }
});

test("an ephemeral copy is restored from the cached state's bytes: nothing in the local store (not counted in max_stored_bytes, nothing to adopt after a restart), yet back at the cached state after an engine restart; a copy that is not ephemeral is stored first", {
  timeout: 60_000,
}, async () => {
  const offload = testDir();
  const host = await fakeHost(["--offload-dir", offload]);
  const c = await HostClient.connect(host.url);
  const storedBytes = async () => expectType(await c.call({ type: "stats", tenant: "t" }), "stats_result").stored_bytes;
  const inStore = (session: string) => existsSync(join(offload, stateFileName("t", session)));
  const bound = async (bytes: number) =>
    expectType(await c.call({ type: "set_tenant", tenant: "t", max_stored_bytes: bytes }), "tenant_set");
  try {
    expectType(await c.call({ type: "open_session", tenant: "t", session: "s", budget: 16 }), "opened");
    expectType(await c.call({ type: "append", tenant: "t", session: "s", text: "hello" }), "appended");
    expectType(await c.call({ type: "snapshot", tenant: "t", session: "s", key: KEY }), "snapshotted");
    expectType(await c.call({ type: "close", tenant: "t", session: "s" }), "closed");
    assert.equal(await storedBytes(), 0);

    await bound(1);
    const eph = expectType(
      await c.call({ type: "open_session", tenant: "t", session: "e", from_cache: KEY, ephemeral: true }),
      "opened",
    );
    assert.equal(eph.tokens_seen, 5);
    assert.equal(await storedBytes(), 0, "the ephemeral copy is not in the local store");
    assert.equal(inStore("e"), false, "nor in the offload directory: a restarted host adopts nothing of it");
    const kept = errorOf(await c.call({ type: "open_session", tenant: "t", session: "k", from_cache: KEY }));
    assert.equal(kept.code, "stored_quota_exceeded", "a copy that is not ephemeral is stored, within the bound");
    assert.equal(codeOf(await c.call({ type: "stats", tenant: "t", session: "k" })), "unknown_session");
    await bound(1 << 30);
    expectType(await c.call({ type: "open_session", tenant: "t", session: "k", from_cache: KEY }), "opened");
    assert.equal(inStore("k"), true);

    // The engine dies before the ephemeral copy's first save: restored from the cached state.
    const pid = host.sessions.enginePid!;
    process.kill(pid, "SIGKILL");
    await until(() => host.sessions.healthy && host.sessions.enginePid !== pid, "the engine's restart");
    const appended = expectType(await c.call({ type: "append", tenant: "t", session: "e", text: "abc" }), "appended");
    assert.equal(appended.tokens_seen, 8, "the cached state's 5 tokens and the new 3");
    assert.equal(inStore("e"), true, "checkpointed by its append as any session");
  } finally {
    c.close();
    await host.stop();
  }
});
