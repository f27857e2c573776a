// The worker's Env is generated from wrangler.jsonc by `wrangler types` (worker/worker-configuration.d.ts,
// runtime types included): the committed file must be what the configuration generates today, so a
// binding added to wrangler.jsonc without `npm run types` (in worker/) fails here. Offline, like the
// dry-run build.
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { test } from "node:test";

import { wranglerJs } from "@pyramidkv/gpu-host/stack";

const root = resolve(import.meta.dirname, "..", "..");
const workerDir = resolve(root, "worker");

function wrangler(cwd: string, ...args: string[]) {
  return spawnSync(process.execPath, [wranglerJs(), ...args], {
    cwd,
    encoding: "utf8",
    env: { ...process.env, WRANGLER_SEND_METRICS: "false", NO_UPDATE_NOTIFIER: "1" },
  });
}

test("worker-configuration.d.ts is what wrangler types generates from wrangler.jsonc", { timeout: 120_000 }, () => {
  const r = wrangler(workerDir, "types", "--check");
  assert.equal(r.status, 0, `run \`npm run types\` in worker/ to regenerate:\n${r.stdout}\n${r.stderr}`);
  assert.match(r.stdout, /up to date/);
  const head = readFileSync(join(workerDir, "worker-configuration.d.ts"), "utf8").slice(0, 2000);
  // Variables typed as strings: tests and `wrangler dev --var` give them other values than wrangler.jsonc.
  assert.match(head, /PKV_MAX_BODY_BYTES: string;/);
  assert.match(head, /TENANTS: DurableObjectNamespace<import\("\.\/src\/index"\)\.TenantState>;/);
  assert.match(head, /HOSTS: DurableObjectNamespace<import\("\.\/src\/index"\)\.HostConn>;/);
  assert.match(head, /SESSIONS: R2Bucket;/);
});

test("the check fails when a binding is added without regenerating", { timeout: 120_000 }, () => {
  // On a copy of the configuration (entry point made absolute), so the worker's own files stay as they are.
  const dir = mkdtempSync(join(tmpdir(), "pkv-types-"));
  try {
    const config = readFileSync(join(workerDir, "wrangler.jsonc"), "utf8")
      .replace(/"\$schema": "[^"]*",/, "")
      .replace('"main": "src/index.ts"', `"main": ${JSON.stringify(join(workerDir, "src", "index.ts"))}`);
    assert.match(config, /"vars": \{/);
    writeFileSync(join(dir, "wrangler.jsonc"), config);
    const generate = wrangler(dir, "types", "--include-runtime=false", "--strict-vars=false");
    assert.equal(generate.status, 0, `${generate.stdout}\n${generate.stderr}`);
    assert.equal(wrangler(dir, "types", "--check").status, 0, "fresh types pass the check");
    writeFileSync(join(dir, "wrangler.jsonc"), config.replace('"vars": {', '"vars": { "PKV_ADDED": "1",'));
    const stale = wrangler(dir, "types", "--check");
    assert.notEqual(stale.status, 0, "a binding added without regenerating fails the check");
    assert.match(`${stale.stdout}${stale.stderr}`, /out of date/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
