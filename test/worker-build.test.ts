// The worker deploys as it is: `wrangler deploy --dry-run` bundles it offline (bindings: the
// tenants', the routing table's and the hosts' Durable Objects, KV, the sessions' R2 bucket;
// Durable Object migrations, compatibility date accepted), and the bundle uses Web-standard APIs
// only (no node: imports, no nodejs_compat flag needed).
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { test } from "node:test";

import { wranglerJs } from "@pyramidkv/gpu-host/stack";

const root = resolve(import.meta.dirname, "..", "..");

test("wrangler deploy --dry-run builds the worker offline", { timeout: 120_000 }, () => {
  const out = mkdtempSync(join(tmpdir(), "pkv-dry-run-"));
  try {
    const r = spawnSync(process.execPath, [wranglerJs(), "deploy", "--dry-run", "--outdir", out], {
      cwd: resolve(root, "worker"),
      encoding: "utf8",
      env: { ...process.env, WRANGLER_SEND_METRICS: "false" },
    });
    assert.equal(r.status, 0, `${r.stdout}\n${r.stderr}`);
    assert.match(r.stdout, /env\.TENANTS \(TenantState\)\s+Durable Object/);
    assert.match(r.stdout, /env\.ROUTER \(HostRegistry\)\s+Durable Object/);
    assert.match(r.stdout, /env\.HOSTS \(HostConn\)\s+Durable Object/);
    assert.match(r.stdout, /env\.KEYS .*KV Namespace/);
    assert.match(r.stdout, /env\.SESSIONS \(pyramidkv-sessions\)\s+R2 Bucket/);
    assert.doesNotMatch(r.stdout, /PKV_HOSTS/, "hosts dial in: no host list in the configuration");
    const bundle = join(out, "index.js");
    assert.ok(existsSync(bundle));
    const js = readFileSync(bundle, "utf8");
    assert.doesNotMatch(js, /from\s+["']node:|require\(["']node:/, "no Node built-ins in the worker");
    assert.match(js, /TenantState = class|class TenantState/);
    assert.match(js, /HostRegistry = class|class HostRegistry/);
    assert.match(js, /HostConn = class|class HostConn/);
  } finally {
    rmSync(out, { recursive: true, force: true });
  }
});
