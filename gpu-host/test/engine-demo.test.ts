// A small demo run through the real engine: both methods answer, PyramidKV holds fewer KV bytes.
import assert from "node:assert/strict";
import { test } from "node:test";

import { runDemo } from "../src/engine/demo.js";

test("pkv demo compares FullKV and PyramidKV on one needle prompt", async () => {
  const lines: string[] = [];
  const [full, pyr] = await runDemo({ chars: 3000, depth: 50, budget: 64, maxNewTokens: 8 }, (l) => lines.push(l));
  assert.equal(full.method, "full");
  assert.equal(pyr.method, "pyramidkv");
  assert.equal(full.prompt_tokens, pyr.prompt_tokens);
  assert.ok(full.prompt_tokens > 500, `prompt of ${full.prompt_tokens} tokens`);
  assert.equal(full.kv_bytes, full.full_kv_bytes);
  assert.ok(pyr.kv_bytes * 4 < full.kv_bytes, `${pyr.kv_bytes} vs ${full.kv_bytes}`);
  const out = lines.join("\n");
  assert.match(out, /KV ratio vs FullKV\s+1\.0x\s+\d+\.\dx smaller/);
  assert.match(out, /FullKV answer: /);
});
