// The `pkv` command table: every command's --help, the usage on an unknown command, flag errors
// that name the flag and its range (all refused before any work starts), and the real program's
// exit codes and streams.
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { resolve } from "node:path";
import { test } from "node:test";

import { COMMANDS, type Io, pkv } from "../src/cli.js";
import { repoRoot } from "../src/engine/engine-path.js";
import { runAdmin } from "../src/stack/admin.js";

async function run(...argv: string[]): Promise<{ code: number; out: string; err: string }> {
  const out: string[] = [];
  const err: string[] = [];
  const io: Io = { out: (s) => out.push(s), err: (s) => err.push(s) };
  const code = await pkv(argv, io);
  return { code, out: out.join(""), err: err.join("") };
}

test("the table holds every documented command, each loading a module with flags and run", async () => {
  const names = COMMANDS.map((c) => c.name);
  for (const name of [
    "demo",
    "demo engine",
    "dev",
    "admin",
    "bench ttft",
    "bench move",
    "bench cache",
    "bench chunking",
    "host",
    "eval needle",
    "eval ruler",
    "eval longbench",
  ])
    assert.ok(names.includes(name), name);
  assert.equal(new Set(names).size, names.length, "no command twice");
  for (const c of COMMANDS) {
    const command = await c.load();
    assert.equal(typeof command.run, "function", c.name);
    assert.ok(Object.keys(command.flags).length > 0, c.name);
  }
});

test("--help of every command prints its usage on stdout and exits 0", async () => {
  for (const c of COMMANDS) {
    for (const flag of ["--help", "-h"]) {
      const r = await run(...c.name.split(" "), flag);
      assert.equal(r.code, 0, `${c.name} ${flag}: ${r.err}`);
      assert.match(r.out, /^usage: pkv /, c.name);
      assert.ok(r.out.includes(`pkv ${c.name.split(" ")[0]}`), `${c.name}: ${r.out}`);
      assert.equal(r.err, "");
    }
  }
  const evalHelp = await run("eval", "--help");
  assert.equal(evalHelp.code, 0);
  assert.match(evalHelp.out, /needle .*\n.*\n {2}ruler .*niah_single_1.*\n {2}longbench --data-dir DIR/);
});

test("no command or --help: the usage listing every command, exit 0; an unknown one: the usage, exit 2", async () => {
  for (const argv of [[], ["--help"]]) {
    const r = await run(...argv);
    assert.equal(r.code, 0);
    for (const c of COMMANDS) assert.ok(r.err.includes(`  ${c.name} ${c.usage}\n`), c.name);
  }
  for (const argv of [["bogus"], ["bench"], ["bench", "nope"]]) {
    const r = await run(...argv);
    assert.equal(r.code, 2, argv.join(" "));
    assert.match(r.err, /^usage: pkv <command> \[options\]\n {2}demo /);
    assert.equal(r.out, "");
  }
  const group = await run("eval");
  assert.equal(group.code, 2);
  assert.match(group.out, /^usage: pkv eval <needle\|ruler\|longbench>/);
  const sub = await run("eval", "bogus");
  assert.equal(sub.code, 2);
  assert.equal(sub.err, "error: eval: unknown subcommand 'bogus' (valid: needle, ruler, longbench)\n");
});

test("a bad integer names the flag, the value and the range, before the command starts any work", async () => {
  const cases: [string[], string][] = [
    [["dev", "--port", "70000"], "--port: '70000' is not an integer in [0, 65535]"],
    [["dev", "--kv-pool-bytes", "1"], "--kv-pool-bytes: '1' is not an integer in [1048576, 9007199254740991]"],
    [["demo", "--chars", "100"], "--chars: '100' is not an integer in [200, 30000]"],
    [["demo", "engine", "--depth", "101"], "--depth: '101' is not an integer in [0, 100]"],
    [["dev", "--hosts", "9"], "--hosts: '9' is not an integer in [0, 8]"],
    [["bench", "ttft", "--requests", "0"], "--requests: '0' is not an integer in [1, 10000]"],
    [["bench", "move", "--runs", "0"], "--runs: '0' is not an integer in [1, 100]"],
    [["bench", "cache", "--turns", "1"], "--turns: '1' is not an integer in [2, 100]"],
    [["bench", "chunking", "--chunk-sizes", "0,1.5"], "--chunk-sizes: '1.5' is not an integer in [0, 16777216]"],
    [["host", "--max-prefills", "0"], "--max-prefills: '0' is not an integer in [1, 1024]"],
    [["admin", "tenant", "set", "acme", "--rpm=-1"], "--rpm: '-1' is not an integer >= 0"],
    [
      ["admin", "tenant", "set", "acme", "--session-ttl-seconds", "0"],
      "--session-ttl-seconds: '0' is not an integer in [1, 2592000]",
    ],
    [["eval", "needle", "--budgets", "64,4"], "--budgets: '4' is not an integer in [9, 1000000]"],
    [["eval", "ruler", "--limit", "0"], "--limit: '0' is not an integer in [1, 100000]"],
    [["eval", "longbench", "--max-length", "100"], "--max-length: '100' is not an integer in [256, 1048576]"],
  ];
  for (const [argv, message] of cases) {
    const r = await run(...argv);
    assert.equal(r.code, 2, argv.join(" "));
    assert.equal(r.err, `error: ${message}\n`, argv.join(" "));
  }
  // the package export for callers holding raw arguments rejects its promise (it never throws)
  const pending = runAdmin(["tenant", "set", "acme", "--rpm", "1.5"], () => {});
  await assert.rejects(pending, { message: "--rpm: '1.5' is not an integer >= 0" });
  // hosts dial in (0.9.0): adding a host by URL is refused with what to do instead, before any
  // worker is reached; a host name outside the token's alphabet is refused the same way
  const add = await run("admin", "host", "add", "http://127.0.0.1:8790");
  assert.equal(add.code, 2);
  assert.match(add.err, /^error: pkv admin host add: hosts dial in now .*'pkv admin host create NAME'.*--connect/);
  const remove = await run("admin", "host", "remove", "http://127.0.0.1:8790");
  assert.equal(remove.code, 2);
  assert.match(remove.err, /host revoke NAME/);
  const badName = await run("admin", "host", "create", "GPU_1");
  assert.equal(badName.code, 2);
  assert.equal(badName.err, "error: pkv admin host create: NAME 'GPU_1' does not match ^[a-z0-9][a-z0-9-]{0,62}$\n");
  const unknown = await run("dev", "--nope");
  assert.equal(unknown.code, 2);
  assert.match(unknown.err, /^error: Unknown option '--nope'/);
});

test("the program (node cli.js, and the pkv bin) exits with the table's codes on the right streams", () => {
  const root = repoRoot();
  const programs = [
    [process.execPath, resolve(root, "gpu-host", "dist", "src", "cli.js")],
    [resolve(root, "node_modules", ".bin", "pkv")],
  ];
  for (const [bin, ...pre] of programs) {
    const exec = (...args: string[]) => spawnSync(bin!, [...pre, ...args], { encoding: "utf8" });
    const unknown = exec("bogus");
    assert.equal(unknown.status, 2, `${bin}: ${unknown.stderr}`);
    assert.match(unknown.stderr, /^usage: pkv <command>/);
    const help = exec("dev", "--help");
    assert.equal(help.status, 0, help.stderr);
    assert.match(help.stdout, /^usage: pkv dev \[--port 8787\]/);
    const bad = exec("host", "--port", "x");
    assert.equal(bad.status, 2);
    assert.equal(bad.stderr, "error: --port: 'x' is not an integer in [0, 65535]\n");
  }
});
