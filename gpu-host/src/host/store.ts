// Where offloaded session states live: host memory, or files in the offload directory with an
// index (index.json) so that they survive a host restart. File names are hashes of (tenant,
// session), never the raw ids: an id may hold any character, including '/' and '..'.
import { createHash } from "node:crypto";
import { mkdirSync } from "node:fs";
import { readFile, rename, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";

export interface StoredSessionMeta {
  tenant: string;
  session: string;
  params: Record<string, unknown>;
  tokens_seen: number;
  kv_bytes: number;
}

export function stateFileName(tenant: string, session: string): string {
  return `${createHash("sha256").update(tenant).update("\0").update(session).digest("hex")}.kvstate`;
}

export class StateStore {
  private readonly memory = new Map<string, Uint8Array>();
  private readonly index = new Map<string, StoredSessionMeta>();
  private indexWrite: Promise<void> = Promise.resolve();

  constructor(readonly dir?: string) {
    if (dir) mkdirSync(dir, { recursive: true });
  }

  get persistent(): boolean {
    return this.dir !== undefined;
  }

  /** Sessions offloaded to disk by an earlier run of the host. */
  async load(): Promise<StoredSessionMeta[]> {
    if (!this.dir) return [];
    let text: string;
    try {
      text = await readFile(join(this.dir, "index.json"), "utf8");
    } catch {
      return [];
    }
    // issue 12: an empty or corrupt index stops the host here; quarantine it and rebuild from the state files.
    const entries = JSON.parse(text) as StoredSessionMeta[];
    for (const e of entries) this.index.set(stateFileName(e.tenant, e.session), e);
    return entries;
  }

  async put(meta: StoredSessionMeta, state: Uint8Array): Promise<void> {
    const name = stateFileName(meta.tenant, meta.session);
    if (this.dir) {
      const path = join(this.dir, name);
      // issue 12: no fsync of the file or the directory, and the file is world-readable (make it 0600).
      await writeFile(`${path}.tmp`, state);
      await rename(`${path}.tmp`, path);
    } else {
      this.memory.set(name, state);
    }
    this.index.set(name, meta);
    await this.persistIndex();
  }

  async get(tenant: string, session: string): Promise<Uint8Array | undefined> {
    const name = stateFileName(tenant, session);
    if (!this.dir) return this.memory.get(name);
    try {
      return new Uint8Array(await readFile(join(this.dir, name)));
    } catch {
      return undefined;
    }
  }

  async delete(tenant: string, session: string): Promise<void> {
    const name = stateFileName(tenant, session);
    this.memory.delete(name);
    if (!this.index.delete(name)) return;
    if (this.dir) await rm(join(this.dir, name), { force: true });
    await this.persistIndex();
  }

  // Writes are serialised and atomic (tmp + rename): a crash leaves the old or the new index.
  private persistIndex(): Promise<void> {
    if (!this.dir) return Promise.resolve();
    const dir = this.dir;
    // issue 12: one failed write rejects this chain, and with it every later index write.
    this.indexWrite = this.indexWrite.then(async () => {
      const path = join(dir, "index.json");
      await writeFile(`${path}.tmp`, JSON.stringify([...this.index.values()]));
      await rename(`${path}.tmp`, path);
    });
    return this.indexWrite;
  }
}
