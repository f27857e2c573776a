// Supervision: kill -9 of the engine mid-generation fails that request with engine_restarted, the
// host stays healthy, restarts the engine and restores the session from its checkpoint; SIGTERM
// drains, saves every session to the offload directory and exits 0, and a new host serves them.
import assert from "node:assert/strict";
import { mkdtempSync, readdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";

import { expectType, type HostClient as Client, HostClient, startTestHost } from "./host-client.js";
import { scrape, spawnHostProcess } from "./host-client.js";

const PROMPT = "Write a long story about a lighthouse keeper and the sea.";

async function waitHealthy(
  port: number,
  pidBefore: number | undefined,
): Promise<{ status: string; engine_pid: number }> {
  for (let i = 0; i < 200; i++) {
    const r = await fetch(`http://127.0.0.1:${port}/health`).catch(() => undefined);
    const body = r && ((await r.json()) as { status: string; engine_pid: number });
    if (body?.status === "ok" && body.engine_pid !== pidBefore) return body;
    await new Promise((res) => setTimeout(res, 50));
  }
  throw new Error("the host did not become healthy again");
}

async function turn(c: Client, tenant: string, session: string, text: string, maxTokens: number): Promise<string> {
  expectType(await c.call({ type: "append", tenant, session, text, chat: true }), "appended");
  return expectType(await c.call({ type: "generate", tenant, session, max_tokens: maxTokens }), "done").text;
}

test("kill -9 of the engine mid-generation: error to that request, host healthy, session restored", {
  timeout: 90_000,
}, async () => {
  const host = await startTestHost({}, ["--kv-pool-bytes", String(32 << 20)]);
  const c = await HostClient.connect(host.url);
  try {
    expectType(await c.call({ type: "open_session", tenant: "t", session: "k", budget: 64 }), "opened");
    await turn(c, "t", "k", PROMPT, 4);
    const pid = host.sessions.enginePid!;
    let killed = false;
    const frames = await c.request({ type: "generate", tenant: "t", session: "k", max_tokens: 400 }, (f) => {
      if (f.type === "token" && !killed) {
        killed = true;
        process.kill(pid, "SIGKILL");
      }
    });
    const last = expectType(frames[frames.length - 1]!, "error");
    assert.equal(last.code, "engine_restarted");
    const firstText = frames
      .filter((f) => f.type === "token")
      .map((f) => (f as { text: string }).text)
      .join("");
    const health = await waitHealthy(host.address.port, pid);
    assert.notEqual(health.engine_pid, pid);
    // The session continues from its last checkpoint: the same greedy tokens as the killed request.
    const again = expectType(await c.call({ type: "generate", tenant: "t", session: "k", max_tokens: 4 }), "done");
    assert.ok(
      again.text.startsWith(firstText),
      `${JSON.stringify(again.text)} should start with ${JSON.stringify(firstText)}`,
    );
    const metrics = await scrape(host.address.port);
    assert.match(metrics, /pkv_host_engine_restarts_total 1/);
  } finally {
    c.close();
    await host.stop();
  }
});

test("SIGTERM saves sessions to the offload directory and exits 0; a new host restores them", {
  timeout: 90_000,
}, async () => {
  const dir = mkdtempSync(join(tmpdir(), "pkv-offload-"));
  try {
    const args = ["--kv-pool-bytes", String(32 << 20), "--offload-dir", dir, "--checkpoint", "off"];
    const first = await spawnHostProcess(args);
    let c = await HostClient.connect(first.url);
    for (const s of ["p", "ref"]) {
      expectType(await c.call({ type: "open_session", tenant: "t", session: s, budget: 64 }), "opened");
      await turn(c, "t", s, PROMPT, 4);
    }
    const refNext = await turn(c, "t", "ref", "Go on.", 6);
    c.close();
    first.child.kill("SIGTERM");
    assert.equal(await first.exit, 0);
    assert.ok(readdirSync(dir).includes("index.json"));
    assert.ok(
      readdirSync(dir).every((f) => /^(index\.json|[0-9a-f]{64}\.kvstate)$/.test(f)),
      readdirSync(dir).join(","),
    );

    const second = await spawnHostProcess(args, { edge: first.edge });
    c = await HostClient.connect(second.url);
    const st = expectType(await c.call({ type: "stats", tenant: "t", session: "p" }), "stats_result");
    assert.equal(st.resident, false);
    assert.equal(await turn(c, "t", "p", "Go on.", 6), refNext);
    c.close();
    second.child.kill("SIGTERM");
    assert.equal(await second.exit, 0);
    await first.edge.close();
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("a FullKV session whose state exceeds one frame (> 64 MiB) is offloaded and restored in pieces", {
  timeout: 180_000,
}, async () => {
  const host = await startTestHost({}, ["--kv-pool-bytes", String(256 << 20), "--idle-seconds", "1"]);
  const c = await HostClient.connect(host.url);
  try {
    const pid = host.sessions.enginePid;
    const words = "The quick brown fox jumps over the lazy dog near the river bank today. ";
    expectType(await c.call({ type: "open_session", tenant: "t", session: "huge", method: "full" }), "opened");
    const appended = expectType(
      await c.call({ type: "append", tenant: "t", session: "huge", text: words.repeat(200) }),
      "appended",
    );
    assert.ok(appended.kv_bytes > 64 * 1024 * 1024, String(appended.kv_bytes));
    expectType(await c.call({ type: "generate", tenant: "t", session: "huge", max_tokens: 2 }), "done");
    let resident = true;
    for (let i = 0; i < 40 && resident; i++) {
      // idle: offloaded (saved in pieces, pool pages freed)
      await new Promise((r) => setTimeout(r, 500));
      resident =
        expectType(await c.call({ type: "stats", tenant: "t", session: "huge" }), "stats_result").resident ?? true;
    }
    assert.equal(resident, false, "the idle session was offloaded");
    const done = expectType(await c.call({ type: "generate", tenant: "t", session: "huge", max_tokens: 3 }), "done");
    assert.equal(done.new_tokens > 0 || done.reason === "end", true);
    assert.equal(
      expectType(await c.call({ type: "stats", tenant: "t", session: "huge" }), "stats_result").resident,
      true,
    );
    assert.equal(host.sessions.enginePid, pid, "the engine never restarted");
    assert.equal(host.sessions.healthy, true);
  } finally {
    c.close();
    await host.stop();
  }
});
