// The offload store: state files and index.json written temp → write → fsync → rename → fsync(dir),
// private (0600 files, 0700 directory); stale .tmp files removed at start; one failed write does not
// poison the next; an empty, `{}`, truncated or corrupt index is quarantined and rebuilt from the
// state files' own headers; truncated or damaged state files are detected (the header carries the
// state's length and CRC) and quarantined; disk full / read-only leaves the previous state readable
// and the store working again once there is room; stored bytes per tenant, bounded.
import assert from "node:assert/strict";
import {
  chmodSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  truncateSync,
  writeFileSync,
} from "node:fs";
import * as fsp from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";

import { HostError } from "../src/host/errors.js";
import {
  DamagedStateError,
  StateStore,
  type StoreFs,
  type StoredSessionMeta,
  stateFileName,
} from "../src/host/store.js";

const bytes = (n: number, seed = 0) => Uint8Array.from({ length: n }, (_, i) => (i + seed) % 251);
const meta = (session: string, tokens = 10, tenant = "t"): StoredSessionMeta => ({
  tenant,
  session,
  params: { method: "pyramidkv", budget: 64 },
  tokens_seen: tokens,
  kv_bytes: 4096,
});

function tempDir(): string {
  return mkdtempSync(join(tmpdir(), "pkv-store-"));
}

/** A quiet store: log lines collected instead of written to stderr. */
function quietStore(dir: string | undefined, fs?: StoreFs) {
  const log: string[] = [];
  const store = new StateStore(dir, { log: (l) => log.push(l), ...(fs ? { fs } : {}) });
  return { store, log };
}

function errno(code: string, syscall: string): NodeJS.ErrnoException {
  const e = new Error(`${code}: injected, ${syscall}`) as NodeJS.ErrnoException;
  e.code = code;
  return e;
}

/** node:fs/promises whose file writes fail with `code` while `failing(path)` says so. */
function failingWrites(code: string, failing: (path: string) => boolean): StoreFs {
  return {
    ...fsp,
    open: (async (path: string, flags?: string, mode?: number) => {
      if (flags !== "r" && failing(String(path))) throw errno(code, `open '${path}'`);
      const fh = await fsp.open(path, flags, mode);
      return fh;
    }) as StoreFs["open"],
  };
}

test("state files and index.json are private (0600), a directory the store creates is 0700", async () => {
  const parent = tempDir();
  try {
    const dir = join(parent, "offload");
    const { store } = quietStore(dir);
    await store.load();
    await store.put(meta("a"), bytes(100));
    assert.equal(statSync(dir).mode & 0o777, 0o700);
    for (const f of readdirSync(dir)) assert.equal(statSync(join(dir, f)).mode & 0o777, 0o600, f);
    assert.deepEqual(readdirSync(dir).sort(), ["index.json", stateFileName("t", "a")].sort());
  } finally {
    rmSync(parent, { recursive: true, force: true });
  }
});

test("a write is temp → write → fsync(file) → close → rename → fsync(dir), for the state and the index", async () => {
  const dir = tempDir();
  try {
    const ops: string[] = [];
    const name = (p: string) =>
      p === dir ? "<dir>" : p.slice(dir.length + 1).replace(/\.[0-9]+-[0-9]+\.tmp$/, ".tmp");
    const fs: StoreFs = {
      ...fsp,
      open: (async (path: string, flags?: string, mode?: number) => {
        const fh = await fsp.open(path, flags, mode);
        const label = name(String(path));
        ops.push(`open ${label}`);
        const write = fh.write.bind(fh) as (...a: unknown[]) => Promise<unknown>;
        return Object.assign(Object.create(fh), {
          write: (...a: unknown[]) => {
            if (ops.at(-1) !== `write ${label}`) ops.push(`write ${label}`);
            return write(...a);
          },
          sync: () => {
            ops.push(`fsync ${label}`);
            return fh.sync();
          },
          close: () => {
            ops.push(`close ${label}`);
            return fh.close();
          },
        });
      }) as StoreFs["open"],
      rename: async (from, to) => {
        ops.push(`rename ${name(String(from))} → ${name(String(to))}`);
        return fsp.rename(from, to);
      },
    };
    const { store } = quietStore(dir, fs);
    await store.load();
    ops.length = 0;
    await store.put(meta("a"), bytes(100));
    const state = stateFileName("t", "a");
    const durable = (f: string) => [`open ${f}.tmp`, `write ${f}.tmp`, `fsync ${f}.tmp`, `close ${f}.tmp`];
    const stateAt = ops.indexOf(`open ${state}.tmp`);
    const indexAt = ops.indexOf("open index.json.tmp");
    assert.deepEqual(ops.slice(stateAt, stateAt + 4), durable(state), ops.join("\n"));
    assert.deepEqual(ops.slice(indexAt, indexAt + 4), durable("index.json"), ops.join("\n"));
    const renamedState = ops.indexOf(`rename ${state}.tmp → ${state}`);
    const renamedIndex = ops.indexOf("rename index.json.tmp → index.json");
    assert.ok(renamedState > stateAt + 3 && renamedIndex > indexAt + 3, ops.join("\n"));
    assert.deepEqual(ops.slice(-3), ["open <dir>", "fsync <dir>", "close <dir>"], ops.join("\n"));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test(".tmp files a crash left behind are removed at start", async () => {
  const dir = tempDir();
  try {
    writeFileSync(join(dir, `${stateFileName("t", "a")}.tmp`), bytes(10));
    writeFileSync(join(dir, "index.json.tmp"), "[");
    writeFileSync(join(dir, `${stateFileName("t", "b")}.123-4.tmp`), bytes(10));
    const { store, log } = quietStore(dir);
    assert.deepEqual(await store.load(), []);
    assert.deepEqual(readdirSync(dir), []);
    assert.match(log.join("\n"), /removed 3 unfinished/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

for (const [what, content] of [
  ["empty", ""],
  ["{}", "{}"],
  ["truncated", '[{"tenant":"t","session":"a","params":{"method":"pyram'],
  ["not a list of entries", '[{"tenant":1}]'],
  ["binary garbage", "\u0000\u00ff\u0001"],
] as const) {
  test(`an index.json that is ${what} is quarantined and the index rebuilt from the state files`, async () => {
    const dir = tempDir();
    try {
      const first = quietStore(dir).store;
      await first.load();
      await first.put(meta("a", 11), bytes(100));
      await first.put(meta("b", 22), bytes(50, 7));
      writeFileSync(join(dir, "index.json"), content);

      const { store, log } = quietStore(dir);
      const loaded = await store.load();
      assert.deepEqual(loaded.map((m) => [m.session, m.tokens_seen]).sort(), [
        ["a", 11],
        ["b", 22],
      ]);
      assert.deepEqual(loaded.find((m) => m.session === "a")?.params, { method: "pyramidkv", budget: 64 });
      const quarantined = readdirSync(dir).filter((f) => f.startsWith("index.json.corrupt-"));
      assert.equal(quarantined.length, 1, readdirSync(dir).join(", "));
      assert.equal(readFileSync(join(dir, quarantined[0]!), "latin1"), Buffer.from(content).toString("latin1"));
      assert.match(log.join("\n"), /index\.json .*quarantined.*rebuilt/s);
      assert.deepEqual(await store.get("t", "b"), bytes(50, 7));
      // The rebuilt index is written back: a third start reads it without quarantining again.
      const third = quietStore(dir);
      assert.equal((await third.store.load()).length, 2);
      assert.equal(readdirSync(dir).filter((f) => f.startsWith("index.json.corrupt-")).length, 1);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
}

test("rebuilding: unreadable or truncated state files are quarantined, not fatal; old-format files without an index too", async () => {
  const dir = tempDir();
  try {
    const first = quietStore(dir).store;
    await first.load();
    await first.put(meta("good"), bytes(100));
    await first.put(meta("cut"), bytes(100));
    truncateSync(join(dir, stateFileName("t", "cut")), 60);
    writeFileSync(join(dir, stateFileName("t", "old")), bytes(30)); // raw engine state, no header
    rmSync(join(dir, "index.json"));

    const { store, log } = quietStore(dir);
    assert.deepEqual(
      (await store.load()).map((m) => m.session),
      ["good"],
    );
    const files = readdirSync(dir);
    assert.ok(
      files.some((f) => f.startsWith(`${stateFileName("t", "cut")}.corrupt-`)),
      files.join(", "),
    );
    assert.ok(
      files.some((f) => f.startsWith(`${stateFileName("t", "old")}.corrupt-`)),
      files.join(", "),
    );
    assert.match(log.join("\n"), /truncated/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("state files of the old format (raw engine state, no header) still load through a valid index", async () => {
  const dir = tempDir();
  try {
    const old = { ...meta("legacy", 33) };
    writeFileSync(join(dir, stateFileName("t", "legacy")), bytes(40));
    writeFileSync(join(dir, "index.json"), JSON.stringify([old]));
    const { store } = quietStore(dir);
    assert.deepEqual(await store.load(), [old]);
    assert.deepEqual(await store.get("t", "legacy"), bytes(40));
    assert.equal(store.storedBytes("t"), 40);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("a truncated or damaged state file is detected at get (length and CRC in the header) and can be quarantined", async () => {
  const dir = tempDir();
  try {
    const { store } = quietStore(dir);
    await store.load();
    await store.put(meta("cut"), bytes(1000));
    await store.put(meta("flip"), bytes(1000));
    truncateSync(join(dir, stateFileName("t", "cut")), 700);
    const flipped = readFileSync(join(dir, stateFileName("t", "flip")));
    flipped[flipped.length - 10]! ^= 0xff;
    writeFileSync(join(dir, stateFileName("t", "flip")), flipped);

    await assert.rejects(
      store.get("t", "cut"),
      (e: unknown) => e instanceof DamagedStateError && /truncated/.test(e.message),
    );
    await assert.rejects(
      store.get("t", "flip"),
      (e: unknown) => e instanceof DamagedStateError && /CRC/.test(e.message),
    );
    await store.quarantine("t", "cut", "truncated");
    assert.equal(await store.get("t", "cut"), undefined);
    assert.ok(readdirSync(dir).some((f) => f.startsWith(`${stateFileName("t", "cut")}.corrupt-`)));
    assert.equal(store.storedBytes("t"), 1000, "the quarantined state no longer counts");
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("one failed index write fails its put only: later puts and deletes work, and the index is right", async () => {
  const dir = tempDir();
  try {
    let failIndex = true;
    const { store } = quietStore(
      dir,
      failingWrites("EIO", (p) => failIndex && p.includes("index.json")),
    );
    await store.load();
    await assert.rejects(
      store.put(meta("a"), bytes(10)),
      (e: unknown) => e instanceof HostError && /EIO/.test(e.message),
    );
    assert.equal(await store.get("t", "a"), undefined, "the failed put left nothing behind");
    assert.deepEqual(readdirSync(dir), []);
    failIndex = false;
    await store.put(meta("b"), bytes(10));
    await store.put(meta("c"), bytes(10));
    await store.delete("t", "c");
    const index = JSON.parse(readFileSync(join(dir, "index.json"), "utf8")) as StoredSessionMeta[];
    assert.deepEqual(
      index.map((e) => e.session),
      ["b"],
    );
    failIndex = true;
    await assert.rejects(store.delete("t", "b"), HostError);
    assert.deepEqual(await store.get("t", "b"), bytes(10), "a failed delete keeps the state");
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

async function fullDiskBehaviour(store: StateStore, dir: string, breakDisk: () => void, fixDisk: () => void) {
  await store.load();
  await store.put(meta("a", 10), bytes(100));
  breakDisk();
  await assert.rejects(
    store.put(meta("a", 20), bytes(200, 3)),
    (e: unknown) => e instanceof HostError && e.code === "internal" && /cannot save session 'a'/.test(e.message),
  );
  await assert.rejects(store.put(meta("new", 5), bytes(10)), HostError);
  fixDisk();
  assert.deepEqual(await store.get("t", "a"), bytes(100), "the previous state stays readable");
  assert.equal(await store.get("t", "new"), undefined);
  assert.deepEqual(
    readdirSync(dir)
      .filter((f) => f.endsWith(".tmp"))
      .sort(),
    [],
    "nothing half-written remains",
  );
  assert.equal(store.storedBytes("t"), 100);
  await store.put(meta("a", 30), bytes(300, 5));
  await store.put(meta("new", 5), bytes(10));
  assert.deepEqual(await store.get("t", "a"), bytes(300, 5), "writes work again once there is room");
  const again = quietStore(dir).store;
  assert.deepEqual((await again.load()).map((m) => [m.session, m.tokens_seen]).sort(), [
    ["a", 30],
    ["new", 5],
  ]);
}

test("disk full (ENOSPC while writing): the put fails clearly, nothing half-written, the old state readable, writes resume", async () => {
  const dir = tempDir();
  try {
    let full = false;
    const fs: StoreFs = {
      ...fsp,
      open: (async (path: string, flags?: string, mode?: number) => {
        const fh = await fsp.open(path, flags, mode);
        if (flags === "r" || !full) return fh;
        // the file is created, then the disk fills after some bytes: a half-written temp file
        return Object.assign(Object.create(fh), {
          write: async (buf: Uint8Array, ...rest: unknown[]) => {
            await (fh.write as (...a: unknown[]) => Promise<unknown>)(buf.subarray(0, 7), ...rest);
            throw errno("ENOSPC", "write");
          },
          close: () => fh.close(),
        });
      }) as StoreFs["open"],
    };
    const { store } = quietStore(dir, fs);
    await fullDiskBehaviour(
      store,
      dir,
      () => (full = true),
      () => (full = false),
    );
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("a read-only offload directory: the put fails clearly, the old state readable, writes resume when writable", async (t) => {
  const dir = tempDir();
  try {
    // root ignores permissions: a chmod 0500 directory stays writable, so inject EROFS instead.
    const root = process.getuid?.() === 0;
    let readOnly = false;
    const { store } = quietStore(dir, root ? failingWrites("EROFS", () => readOnly) : undefined);
    t.diagnostic(root ? "running as root: EROFS injected" : "a real chmod 0500 directory");
    await fullDiskBehaviour(
      store,
      dir,
      () => {
        readOnly = true;
        if (!root) chmodSync(dir, 0o500);
      },
      () => {
        readOnly = false;
        if (!root) chmodSync(dir, 0o700);
      },
    );
  } finally {
    chmodSync(dir, 0o700);
    rmSync(dir, { recursive: true, force: true });
  }
});

test("stored bytes per tenant, memory or disk; a put past the bound is stored_quota_exceeded (the replaced state counts as freed)", async () => {
  const dir = tempDir();
  try {
    for (const store of [quietStore(undefined).store, quietStore(dir).store]) {
      await store.load();
      await store.put(meta("a"), bytes(600), 1000);
      await store.put(meta("x", 1, "other"), bytes(900), 1000);
      assert.deepEqual(
        [store.storedBytes("t"), store.storedBytes("other"), store.storedBytes("nobody")],
        [600, 900, 0],
      );
      await store.put(meta("a", 12), bytes(1000), 1000); // replaces a's 600
      await store.put(meta("b"), bytes(1)); // no bound given: unbounded
      await store.delete("t", "b");
      await assert.rejects(
        store.put(meta("c"), bytes(1), 1000),
        (e: unknown) =>
          e instanceof HostError &&
          e.code === "stored_quota_exceeded" &&
          /tenant 't'/.test(e.message) &&
          /1001/.test(e.message) &&
          /1000/.test(e.message),
      );
      assert.equal(await store.get("t", "c"), undefined);
      assert.deepEqual(await store.get("t", "a"), bytes(1000));
      await store.delete("t", "a");
      assert.equal(store.storedBytes("t"), 0);
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("concurrent puts of one tenant cannot pass the bound together", async () => {
  const dir = tempDir();
  try {
    for (const store of [quietStore(undefined).store, quietStore(dir).store]) {
      await store.load();
      const results = await Promise.allSettled([
        store.put(meta("a"), bytes(600), 1000),
        store.put(meta("b"), bytes(600), 1000),
      ]);
      assert.deepEqual(
        results.map((r) => r.status),
        ["fulfilled", "rejected"],
      );
      assert.equal(store.storedBytes("t"), 600);
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("a crash between the state's rename and the index's: the state file's header (the newer) wins at start", async () => {
  const dir = tempDir();
  try {
    const { store } = quietStore(dir);
    await store.load();
    await store.put(meta("a", 10), bytes(100));
    const olderIndex = readFileSync(join(dir, "index.json"));
    await store.put(meta("a", 20), bytes(120));
    writeFileSync(join(dir, "index.json"), olderIndex);
    const again = quietStore(dir).store;
    assert.deepEqual(
      (await again.load()).map((m) => [m.session, m.tokens_seen]),
      [["a", 20]],
    );
    assert.equal(again.storedBytes("t"), 120);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
