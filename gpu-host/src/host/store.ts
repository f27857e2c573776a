// Where offloaded session states live: host memory, or files in the offload directory with an
// index (index.json) so that they survive a host restart. File names are hashes of (tenant,
// session), never the raw ids: an id may hold any character, including '/' and '..'.
//
// On disk (docs/HOST.md, "Offload and persistence"): each state file describes itself — "PKVF",
// u32 LE format version, u32 LE meta length, the meta JSON (tenant, session, params, tokens_seen,
// kv_bytes, state_bytes, state_crc32), then the engine's state — so a lost or damaged index is
// rebuilt from the files, and a truncated or damaged file is told apart from a good one without
// asking the engine. Every file is written temp → fsync → rename → fsync(dir), mode 0600; a write
// that fails leaves the previous file. Files of the old format (the raw engine state, no header)
// still load through the index.
import { createHash } from "node:crypto";
import { mkdirSync } from "node:fs";
import * as fsp from "node:fs/promises";
import { join } from "node:path";
import { crc32 } from "node:zlib";

import { HostError } from "./errors.js";
import { hostLog } from "./log.js";

export interface StoredSessionMeta {
  tenant: string;
  session: string;
  params: Record<string, unknown>;
  tokens_seen: number;
  kv_bytes: number;
}

/** An index entry: the session's meta and the size of its stored state. */
interface Entry extends StoredSessionMeta {
  state_bytes: number;
}

/** The filesystem calls the store makes (node:fs/promises; tests inject disk full, read-only). */
export type StoreFs = Pick<typeof fsp, "open" | "readFile" | "readdir" | "rename" | "rm" | "stat">;

export interface StateStoreOptions {
  fs?: StoreFs;
  /** one line per quarantined or cleaned-up file (default: the host's log) */
  log?: (line: string) => void;
}

/** A stored state that cannot be used: truncated, damaged, not what its name says. */
export class DamagedStateError extends Error {}

const MAGIC = Buffer.from("PKVF"); // not the engine's "PKVS"/"PKVE": an old-format file never starts so
/** The state file's format version (its header; in the cache fingerprint, sessions.ts). */
export const FORMAT_VERSION = 1;
const FIXED_HEADER = 12;
const MAX_META_BYTES = 1 << 20;
const INDEX = "index.json";

export function stateFileName(tenant: string, session: string): string {
  return `${createHash("sha256").update(tenant).update("\0").update(session).digest("hex")}.kvstate`;
}

const STATE_FILE = /^[0-9a-f]{64}\.kvstate$/;

function errText(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

function isEntry(e: unknown): e is StoredSessionMeta {
  const m = e as Partial<Entry> | null;
  return (
    typeof m === "object" &&
    m !== null &&
    typeof m.tenant === "string" &&
    typeof m.session === "string" &&
    typeof m.params === "object" &&
    m.params !== null &&
    Number.isSafeInteger(m.tokens_seen) &&
    Number.isSafeInteger(m.kv_bytes) &&
    (m.state_bytes === undefined || Number.isSafeInteger(m.state_bytes))
  );
}

function metaOf(e: StoredSessionMeta): StoredSessionMeta {
  return { tenant: e.tenant, session: e.session, params: e.params, tokens_seen: e.tokens_seen, kv_bytes: e.kv_bytes };
}

function header(meta: StoredSessionMeta, state: Uint8Array): Buffer {
  const json = Buffer.from(JSON.stringify({ ...metaOf(meta), state_bytes: state.length, state_crc32: crc32(state) }));
  const fixed = Buffer.alloc(FIXED_HEADER);
  MAGIC.copy(fixed, 0);
  fixed.writeUInt32LE(FORMAT_VERSION, 4);
  fixed.writeUInt32LE(json.length, 8);
  return Buffer.concat([fixed, json]);
}

type Header = Entry & { state_crc32: number; metaBytes: number };

/** The header of a state file from its first bytes; undefined for an old-format file. `size` is
 * the file's length, to tell a truncated file. */
function parseHeader(head: Uint8Array, size: number): Header | undefined {
  const b = Buffer.from(head.buffer, head.byteOffset, head.byteLength);
  if (b.length < MAGIC.length || !b.subarray(0, MAGIC.length).equals(MAGIC)) return undefined;
  if (b.length < FIXED_HEADER) throw new DamagedStateError(`truncated: ${size} bytes, less than a header`);
  const version = b.readUInt32LE(4);
  if (version !== FORMAT_VERSION) throw new DamagedStateError(`unknown state file version ${version}`);
  const metaBytes = b.readUInt32LE(8);
  if (metaBytes > MAX_META_BYTES) throw new DamagedStateError(`meta length ${metaBytes} over ${MAX_META_BYTES}`);
  if (b.length < FIXED_HEADER + metaBytes)
    throw new DamagedStateError(`truncated: ${size} bytes, its header alone is ${FIXED_HEADER + metaBytes}`);
  let m: unknown;
  try {
    m = JSON.parse(b.subarray(FIXED_HEADER, FIXED_HEADER + metaBytes).toString("utf8"));
  } catch (e) {
    throw new DamagedStateError(`unreadable meta: ${errText(e)}`);
  }
  const h = m as Header;
  if (!isEntry(m) || !Number.isSafeInteger(h.state_bytes) || !Number.isSafeInteger(h.state_crc32))
    throw new DamagedStateError(
      "meta without tenant, session, params, tokens_seen, kv_bytes, state_bytes, state_crc32",
    );
  const want = FIXED_HEADER + metaBytes + h.state_bytes;
  if (size !== want) throw new DamagedStateError(`truncated or overlong: ${size} bytes, its header says ${want}`);
  return { ...metaOf(h), state_bytes: h.state_bytes, state_crc32: h.state_crc32, metaBytes };
}

/** What a state file says about the engine that wrote it (in its meta JSON; a state restores only
 * into an engine of the same model and shape). */
export interface StateIdentity {
  model: string;
  n_layer: number;
  bytes_per_entry: number;
}

/** A whole state file (the bytes the offload directory holds, and the edge's store): header, meta
 * JSON (with `identity` when given), the engine's state. */
export function encodeStateFile(meta: StoredSessionMeta, state: Uint8Array, identity?: StateIdentity): Buffer {
  const json = Buffer.from(
    JSON.stringify({ ...metaOf(meta), ...identity, state_bytes: state.length, state_crc32: crc32(state) }),
  );
  const fixed = Buffer.alloc(FIXED_HEADER);
  MAGIC.copy(fixed, 0);
  fixed.writeUInt32LE(FORMAT_VERSION, 4);
  fixed.writeUInt32LE(json.length, 8);
  return Buffer.concat([fixed, json, state]);
}

/** A state file's meta, identity (when it names one) and state, checked: its header, its length,
 * its CRC, the session it names. Throws DamagedStateError. */
export function decodeStateFile(
  file: Uint8Array,
  tenant: string,
  session: string,
): { meta: StoredSessionMeta; identity?: Partial<StateIdentity>; state: Uint8Array } {
  const h = parseHeader(file, file.length);
  if (!h) throw new DamagedStateError("not a PKVF state file");
  if (h.tenant !== tenant || h.session !== session) throw new DamagedStateError("its header names another session");
  const b = Buffer.from(file.buffer, file.byteOffset, file.byteLength);
  const raw = JSON.parse(
    b.subarray(FIXED_HEADER, FIXED_HEADER + h.metaBytes).toString("utf8"),
  ) as Partial<StateIdentity>;
  const state = b.subarray(FIXED_HEADER + h.metaBytes);
  if (crc32(state) !== h.state_crc32) throw new DamagedStateError("damaged: CRC32 of the state does not match");
  return {
    meta: metaOf(h),
    identity: { model: raw.model, n_layer: raw.n_layer, bytes_per_entry: raw.bytes_per_entry },
    state: new Uint8Array(state.buffer, state.byteOffset, state.byteLength),
  };
}

export class StateStore {
  private readonly memory = new Map<string, Uint8Array>();
  private readonly index = new Map<string, Entry>();
  private readonly fs: StoreFs;
  private readonly log: (line: string) => void;
  /** bytes of puts under way per tenant, so that concurrent puts cannot pass the bound together */
  private readonly pending = new Map<string, number>();
  // Index commits one at a time; a failed one fails its own put/delete only.
  private commits: Promise<unknown> = Promise.resolve();
  private tmpSeq = 0;

  constructor(
    readonly dir?: string,
    options: StateStoreOptions = {},
  ) {
    this.fs = options.fs ?? fsp;
    this.log = options.log ?? ((line) => hostLog(line));
    if (dir) mkdirSync(dir, { recursive: true, mode: 0o700 });
  }

  get persistent(): boolean {
    return this.dir !== undefined;
  }

  /** Bytes of the tenant's stored states (memory or disk). */
  storedBytes(tenant: string): number {
    let n = 0;
    for (const e of this.index.values()) if (e.tenant === tenant) n += e.state_bytes;
    return n;
  }

  /** Sessions offloaded to disk by an earlier run of the host. Unfinished temp files go; an
   * unreadable index is quarantined and rebuilt from the state files' headers. */
  async load(): Promise<StoredSessionMeta[]> {
    if (!this.dir) return [];
    const dir = this.dir;
    const files = await this.fs.readdir(dir);
    const tmps = files.filter((f) => f.endsWith(".tmp"));
    for (const f of tmps) await this.fs.rm(join(dir, f), { force: true });
    if (tmps.length > 0)
      this.log(`offload dir ${dir}: removed ${tmps.length} unfinished .tmp file(s) of an earlier run`);

    let listed: StoredSessionMeta[] | undefined;
    let text: string | undefined;
    try {
      text = await this.fs.readFile(join(dir, INDEX), "utf8");
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== "ENOENT") throw e;
    }
    if (text !== undefined) {
      let why: string | undefined;
      try {
        const parsed: unknown = JSON.parse(text);
        if (!Array.isArray(parsed)) why = "not a list of entries";
        else if (!parsed.every(isEntry)) why = "an entry without tenant, session, params, tokens_seen, kv_bytes";
        else listed = parsed;
      } catch (e) {
        why = errText(e);
      }
      if (why !== undefined) {
        const aside = await this.quarantineFile(INDEX);
        this.log(
          `offload dir ${dir}: ${INDEX} is unreadable (${why}): quarantined as ${aside}, rebuilt from the state files`,
        );
      }
    }

    const byName = new Map((listed ?? []).map((e) => [stateFileName(e.tenant, e.session), e] as const));
    for (const f of files.filter((f) => STATE_FILE.test(f))) {
      const listedEntry = byName.get(f);
      let entry: Entry | undefined;
      let why: string | undefined;
      try {
        const h = await this.readHeader(f);
        if (h && stateFileName(h.tenant, h.session) !== f) why = "its header names another session";
        else if (h) entry = h;
        else if (listedEntry) entry = { ...listedEntry, state_bytes: (await this.fs.stat(join(dir, f))).size };
        else why = "an old-format state file that no index describes";
      } catch (e) {
        why = errText(e);
      }
      if (entry) this.index.set(f, { ...metaOf(entry), state_bytes: entry.state_bytes });
      else if (listedEntry) {
        // Listed but damaged: kept, so that its next request hears session_lost (the restore quarantines it).
        this.index.set(f, { ...metaOf(listedEntry), state_bytes: 0 });
      } else {
        const aside = await this.quarantineFile(f);
        this.log(`offload dir ${dir}: state file ${f} (${why}) quarantined as ${aside}`);
      }
    }
    for (const [name, e] of byName) {
      if (!this.index.has(name)) {
        this.index.set(name, { ...metaOf(e), state_bytes: 0 });
        this.log(
          `offload dir ${dir}: the state file of session '${e.session.slice(0, 64)}' (tenant '${e.tenant.slice(0, 64)}') is missing`,
        );
      }
    }
    if (listed === undefined && this.index.size > 0) {
      await this.commit(() => {}).catch((e) =>
        this.log(`offload dir ${dir}: writing the rebuilt index: ${errText(e)}`),
      );
    }
    return [...this.index.values()].map(metaOf);
  }

  /** Stores the session's state, replacing its older one. `maxBytes`: the tenant's bound on
   * stored bytes (the replaced state counts as freed); past it, stored_quota_exceeded. A put that
   * fails changes nothing: the older state stays readable. */
  async put(meta: StoredSessionMeta, state: Uint8Array, maxBytes?: number): Promise<void> {
    const name = stateFileName(meta.tenant, meta.session);
    const entry: Entry = { ...metaOf(meta), state_bytes: state.length };
    if (maxBytes !== undefined) {
      const after =
        this.storedBytes(meta.tenant) -
        (this.index.get(name)?.state_bytes ?? 0) +
        (this.pending.get(meta.tenant) ?? 0) +
        state.length;
      if (after > maxBytes)
        throw new HostError(
          "stored_quota_exceeded",
          `tenant '${meta.tenant}' would store ${after} bytes of offloaded state (session '${meta.session.slice(0, 64)}': ${state.length}), its max_stored_bytes is ${maxBytes}`,
        );
    }
    if (!this.dir) {
      this.memory.set(name, state);
      this.index.set(name, entry);
      return;
    }
    const dir = this.dir;
    this.pending.set(meta.tenant, (this.pending.get(meta.tenant) ?? 0) + state.length);
    const tmp = this.tmpName(name);
    try {
      await this.writeDurably(tmp, [header(meta, state), state]);
      await this.commit(async () => {
        await this.fs.rename(join(dir, tmp), join(dir, name));
        this.index.set(name, entry);
      }, entry);
    } catch (e) {
      await this.fs.rm(join(dir, tmp), { force: true }).catch(() => {});
      throw e instanceof HostError
        ? e
        : new HostError("internal", `cannot save session '${meta.session.slice(0, 64)}' to ${dir}: ${errText(e)}`);
    } finally {
      const left = (this.pending.get(meta.tenant) ?? 0) - state.length;
      if (left > 0) this.pending.set(meta.tenant, left);
      else this.pending.delete(meta.tenant);
    }
  }

  /** The stored state; undefined when there is none. Throws DamagedStateError for a truncated or
   * damaged one (quarantine() puts it aside). */
  async get(tenant: string, session: string): Promise<Uint8Array | undefined> {
    const name = stateFileName(tenant, session);
    if (!this.dir) return this.memory.get(name);
    let file: Buffer;
    try {
      file = await this.fs.readFile(join(this.dir, name));
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === "ENOENT") return undefined;
      throw new HostError("internal", `cannot read the state of session '${session.slice(0, 64)}': ${errText(e)}`);
    }
    const h = parseHeader(file, file.length);
    if (!h) {
      const listed = this.index.get(name)?.state_bytes;
      if (listed !== undefined && listed > 0 && listed !== file.length)
        throw new DamagedStateError(`truncated: ${file.length} bytes, ${listed} when stored`);
      return new Uint8Array(file.buffer, file.byteOffset, file.byteLength);
    }
    if (h.tenant !== tenant || h.session !== session) throw new DamagedStateError("its header names another session");
    const state = file.subarray(FIXED_HEADER + h.metaBytes);
    if (crc32(state) !== h.state_crc32) throw new DamagedStateError("damaged: CRC32 of the state does not match");
    return new Uint8Array(state.buffer, state.byteOffset, state.byteLength);
  }

  /** Puts a damaged state aside (renamed `<name>.corrupt-<time>`) and forgets it. */
  async quarantine(tenant: string, session: string, why: string): Promise<void> {
    const name = stateFileName(tenant, session);
    this.memory.delete(name);
    if (!this.dir) {
      this.index.delete(name);
      return;
    }
    const dir = this.dir;
    try {
      const aside = await this.quarantineFile(name);
      this.log(
        `offload dir ${dir}: state of session '${session.slice(0, 64)}' (tenant '${tenant.slice(0, 64)}', ${why}) quarantined as ${aside}`,
      );
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== "ENOENT")
        this.log(`offload dir ${dir}: quarantining ${name}: ${errText(e)}`);
    }
    await this.commit(
      () => {
        this.index.delete(name);
      },
      undefined,
      name,
    ).catch((e) => this.log(`offload dir ${dir}: index after quarantine: ${errText(e)}`));
  }

  /** Forgets the session's state. A delete that fails (the index cannot be written) keeps it. */
  async delete(tenant: string, session: string): Promise<void> {
    const name = stateFileName(tenant, session);
    this.memory.delete(name);
    if (!this.dir) {
      this.index.delete(name);
      return;
    }
    if (!this.index.has(name)) return;
    const dir = this.dir;
    try {
      await this.commit(
        async () => {
          this.index.delete(name);
          await this.fs.rm(join(dir, name), { force: true });
        },
        undefined,
        name,
      );
    } catch (e) {
      throw e instanceof HostError
        ? e
        : new HostError(
            "internal",
            `cannot delete the state of session '${session.slice(0, 64)}' in ${dir}: ${errText(e)}`,
          );
    }
  }

  // The index with `upsert` added or `remove` removed is written to a temp file first (the step
  // that fails when the disk is full), then `apply` (the state file's rename or removal), then the
  // index's rename and the directory's fsync. A failure before `apply` changes nothing.
  private commit(apply: () => void | Promise<void>, upsert?: Entry, remove?: string): Promise<void> {
    const dir = this.dir!;
    const run = this.commits.then(async () => {
      const next = new Map(this.index);
      if (upsert) next.set(stateFileName(upsert.tenant, upsert.session), upsert);
      if (remove) next.delete(remove);
      const tmp = this.tmpName(INDEX);
      try {
        await this.writeDurably(tmp, [Buffer.from(JSON.stringify([...next.values()]))]);
        await apply();
        await this.fs.rename(join(dir, tmp), join(dir, INDEX));
      } catch (e) {
        await this.fs.rm(join(dir, tmp), { force: true }).catch(() => {});
        throw e;
      }
      await this.syncDir();
    });
    this.commits = run.catch(() => {});
    return run;
  }

  private tmpName(name: string): string {
    return `${name}.${process.pid}-${++this.tmpSeq}.tmp`;
  }

  private async writeDurably(tmp: string, parts: Uint8Array[]): Promise<void> {
    const fh = await this.fs.open(join(this.dir!, tmp), "wx", 0o600);
    try {
      for (const part of parts) {
        for (let at = 0; at < part.length; ) {
          const { bytesWritten } = await fh.write(part, at, part.length - at);
          at += bytesWritten;
        }
      }
      await fh.sync();
    } finally {
      await fh.close();
    }
  }

  private async syncDir(): Promise<void> {
    const fh = await this.fs.open(this.dir!, "r");
    try {
      await fh.sync();
    } finally {
      await fh.close();
    }
  }

  private async quarantineFile(name: string): Promise<string> {
    const aside = `${name}.corrupt-${new Date().toISOString().replace(/[:.]/g, "-")}`;
    await this.fs.rename(join(this.dir!, name), join(this.dir!, aside));
    return aside;
  }

  private async readHeader(name: string): Promise<Header | undefined> {
    const fh = await this.fs.open(join(this.dir!, name), "r");
    try {
      const { size } = await fh.stat();
      const readAt = async (position: number, length: number) => {
        const b = Buffer.alloc(Math.max(0, Math.min(length, size - position)));
        let got = 0;
        while (got < b.length) {
          const { bytesRead } = await fh.read(b, got, b.length - got, position + got);
          if (bytesRead === 0) break;
          got += bytesRead;
        }
        return b.subarray(0, got);
      };
      const fixed = await readAt(0, FIXED_HEADER);
      const metaBytes = fixed.length === FIXED_HEADER ? fixed.readUInt32LE(8) : 0;
      const meta = metaBytes <= MAX_META_BYTES ? await readAt(FIXED_HEADER, metaBytes) : Buffer.alloc(0);
      return parseHeader(Buffer.concat([fixed, meta]), size);
    } finally {
      await fh.close();
    }
  }
}

/** Cached states (snapshot, open_session.from_cache) in host memory: their state files by tenant
 * and key, every tenant together within `maxBytes`, the least recently used evicted first; a file
 * larger than the bound is not kept (0: none is). */
export class SnapshotMemory {
  private readonly files = new Map<string, Uint8Array>();
  private used = 0;

  constructor(readonly maxBytes: number) {}

  /** Bytes of the files kept. */
  get bytes(): number {
    return this.used;
  }

  get size(): number {
    return this.files.size;
  }

  /** The tenant's cached state file `key` (now the most recently used), if kept. */
  get(tenant: string, key: string): Uint8Array | undefined {
    const k = `${tenant}\0${key}`;
    const file = this.files.get(k);
    if (file) {
      this.files.delete(k);
      this.files.set(k, file);
    }
    return file;
  }

  /** Keeps `file` as the tenant's cached state `key`, evicting the least recently used past the
   * bound; false when it is larger than the bound (not kept). */
  put(tenant: string, key: string, file: Uint8Array): boolean {
    this.delete(tenant, key);
    if (file.length > this.maxBytes) return false;
    this.files.set(`${tenant}\0${key}`, file);
    this.used += file.length;
    for (const [k, f] of this.files) {
      if (this.used <= this.maxBytes) break;
      this.files.delete(k);
      this.used -= f.length;
    }
    return true;
  }

  delete(tenant: string, key: string): void {
    const k = `${tenant}\0${key}`;
    const file = this.files.get(k);
    if (!file) return;
    this.files.delete(k);
    this.used -= file.length;
  }
}
