// The npx entry point forwards arguments, output and exit codes of the C++ engine unchanged.
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { resolve } from "node:path";
import { test } from "node:test";

import { repoRoot } from "../src/engine/engine-path.js";

const cli = resolve(repoRoot(), "node_modules", ".bin", "pkv-engine");

test("npx pkv-engine budgets --json prints the contract's object", () => {
  const r = spawnSync(cli, ["budgets", "--layers", "30", "--budget", "128", "--prompt-len", "4000", "--json"], {
    encoding: "utf8",
  });
  assert.equal(r.status, 0, r.stderr);
  const parsed = JSON.parse(r.stdout) as { layer_budgets: number[] };
  assert.equal(parsed.layer_budgets.length, 30);
  assert.equal(parsed.layer_budgets[0], 242);
  assert.equal(parsed.layer_budgets[29], 39);
  const mean = parsed.layer_budgets.reduce((a, b) => a + b, 0) / 30;
  assert.equal(mean, 140.5);
});

test("npx pkv-engine passes the engine's exit code 2 and one-line error through", () => {
  const r = spawnSync(cli, ["generate", "--prompt", "hi", "--method", "nope"], { encoding: "utf8" });
  assert.equal(r.status, 2);
  assert.equal(r.stdout, "");
  assert.match(r.stderr, /^error: --method: unknown method 'nope'.*\n$/);
});

test("npx pkv-engine generate --json on the embedded model returns every contract key", () => {
  const r = spawnSync(
    cli,
    ["generate", "--prompt", "Say hello.", "--max-new-tokens", "4", "--method", "pyramidkv", "--json"],
    {
      encoding: "utf8",
    },
  );
  assert.equal(r.status, 0, r.stderr);
  const out = JSON.parse(r.stdout) as Record<string, unknown>;
  for (const key of [
    "text",
    "model",
    "method",
    "budget",
    "prompt_tokens",
    "new_tokens",
    "layer_kv_lengths",
    "kv_bytes",
    "full_kv_bytes",
    "prefill_seconds",
    "decode_tokens_per_second",
  ]) {
    assert.ok(key in out, `missing ${key}`);
  }
  assert.equal(out.method, "pyramidkv");
  assert.equal((out.layer_kv_lengths as number[]).length, 30);
});

test("npx pkv-engine tokenize --json gives token ids and the byte offset where each token's piece starts", () => {
  const text = "The best thing to do in San Francisco is: eat a sandwich. Ünïcode ✓ too.";
  const r = spawnSync(cli, ["tokenize", "--prompt", text, "--json"], { encoding: "utf8" });
  assert.equal(r.status, 0, r.stderr);
  const out = JSON.parse(r.stdout) as { tokens: number[]; offsets: number[] };
  assert.ok(out.tokens.length > 5 && out.tokens.length < Buffer.byteLength(text));
  assert.equal(out.offsets.length, out.tokens.length);
  assert.equal(out.offsets[0], 0);
  for (let i = 1; i < out.offsets.length; ++i)
    assert.ok(out.offsets[i]! > out.offsets[i - 1]!, `offset ${i} does not advance`);
  assert.ok(out.offsets.at(-1)! < Buffer.byteLength(text));
  // No chat template and no BOS text: the same text again gives the same ids.
  const again = JSON.parse(spawnSync(cli, ["tokenize", "--prompt", text, "--json"], { encoding: "utf8" }).stdout) as {
    tokens: number[];
  };
  assert.deepEqual(again.tokens, out.tokens);
  const bad = spawnSync(cli, ["tokenize", "--json"], { encoding: "utf8" });
  assert.equal(bad.status, 2);
  assert.match(bad.stderr, /prompt/);
});
