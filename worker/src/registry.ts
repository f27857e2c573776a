// The routing table (one Durable Object instance, "hosts"): every connected GPU host with its model,
// context, pool and load, as its host_hello and heartbeats report them through its HostConn
// (host-conn.ts). The table lives in memory: one storage read when the object wakes (counted as
// storage_reads), a write only when a host joins or leaves (never per heartbeat), and route() and
// peek() read no storage at all, whatever the number of hosts (docs/WORKER.md, "Routing").
//
// Live = connected, not draining, and its last heartbeat (or any other message, `seen`) at most
// 2 × its heartbeat_ms ago: a host silent for two heartbeats is out of routing at once (its
// HostConn's alarm then closes its socket).
import { DurableObject } from "cloudflare:workers";
import type { HostMessage } from "@pyramidkv/shared";

import type { Env } from "./env.js";

/** `model` meaning any host's */
export const ANY_MODEL = "default";

/** A model's id: its GGUF file name without the extension (what hosts report in host_hello). */
export const modelId = (file: string) => file.replace(/\.gguf$/i, "");

/** What a host's HostConn reports: its host_hello, and its last heartbeat (none yet right after the hello). */
export interface HostReport {
  hello: Omit<HostMessage<"host_hello">, "type">;
  heartbeat?: Omit<HostMessage<"heartbeat">, "type">;
  /** the host said `draining` (or a heartbeat said so) */
  draining: boolean;
  /** when this connection was accepted (Unix ms): tells a connection from the one that replaced it */
  connected_at: number;
}

/** One row of the table: the host, its last report, and the picks routed to it since. */
export interface HostRow {
  name: string;
  model: string;
  n_layer: number;
  n_ctx: number;
  bytes_per_entry: number;
  chat_template?: string;
  heartbeat_ms: number;
  host_version?: string;
  /** the host's protocol minor (hello): 1 and above copy and snapshot cached states */
  protocol_minor?: number;
  /** what makes its states besides model and compression (hello, 3.1): part of the prompt cache's keys */
  cache_fingerprint?: string;
  connected_at: number;
  pool_bytes: number;
  kv_used_bytes: number;
  free_bytes: number;
  sessions: number;
  resident: number;
  active: number;
  queued: number;
  draining: boolean;
  /** the last hello, heartbeat or other message (seen), by this object's clock (Unix ms) */
  last_heartbeat_ms: number;
  /** sessions routed here since that heartbeat (each lowers the host's free KV by an estimate) */
  picks: number;
}

export interface HostView extends Omit<HostRow, "picks"> {
  /** its HostConn reported it since this object woke (a row restored from storage is not, until it reports) */
  connected: boolean;
  live: boolean;
}

/** A row from before this object slept whose host has not reported for this long is dropped (its socket is long gone). */
const staleMs = (row: HostRow) => Math.max(60_000, 10 * row.heartbeat_ms);

export type Route = { name: string } | { name: null; live: number; models: string[] };

/** peek()'s answer: what the host route() would pick serves (its hello's). */
export interface Peeked {
  model: string;
  protocol_minor: number;
  cache_fingerprint?: string;
}

/** The KV a new session is expected to take on `row` until the next heartbeat says what it took. */
function pickEstimate(row: HostRow): number {
  return row.sessions > 0 ? row.kv_used_bytes / row.sessions : row.pool_bytes / 64;
}

/** The host's free KV less the picks routed to it since its last heartbeat. */
const freeAfterPicks = (row: HostRow) => row.free_bytes - row.picks * pickEstimate(row);

export function isLive(row: Omit<HostRow, "picks">, nowMs: number): boolean {
  return !row.draining && nowMs - row.last_heartbeat_ms <= 2 * row.heartbeat_ms;
}

export const serves = (row: { model: string }, model: string) =>
  model === ANY_MODEL || modelId(row.model) === model || row.model === model;

export class HostRegistry extends DurableObject<Env> {
  private table = new Map<string, HostRow>();
  /** hosts whose HostConn reported since this object woke */
  private readonly reported = new Set<string>();
  private routes = 0;
  private storageReads = 0;

  constructor(ctx: DurableObjectState, env: Env) {
    super(ctx, env);
    ctx.blockConcurrencyWhile(async () => {
      this.storageReads++;
      const stored = (await ctx.storage.get<Record<string, HostRow>>("hosts")) ?? {};
      // rows from before this object slept: live again at their next heartbeat
      for (const row of Object.values(stored)) this.table.set(row.name, { ...row, picks: 0 });
    });
  }

  private persist(): Promise<void> {
    return this.ctx.storage.put("hosts", Object.fromEntries(this.table));
  }

  /** A host's hello or heartbeat. A new host (or a new connection of one) is written to storage; a heartbeat is not. */
  async report(name: string, r: HostReport): Promise<void> {
    const prev = this.table.get(name);
    const joined = prev === undefined || prev.connected_at !== r.connected_at;
    if (prev !== undefined && r.connected_at < prev.connected_at) return; // a late report of a replaced connection
    this.reported.add(name);
    const hb = r.heartbeat;
    const h = r.hello;
    this.table.set(name, {
      name,
      model: h.model,
      n_layer: h.n_layer,
      n_ctx: h.n_ctx,
      bytes_per_entry: h.bytes_per_entry,
      ...(h.chat_template !== undefined ? { chat_template: h.chat_template } : {}),
      ...(h.host_version !== undefined ? { host_version: h.host_version } : {}),
      ...(h.protocol_minor !== undefined ? { protocol_minor: h.protocol_minor } : {}),
      ...(h.cache_fingerprint !== undefined ? { cache_fingerprint: h.cache_fingerprint } : {}),
      heartbeat_ms: h.heartbeat_ms,
      connected_at: r.connected_at,
      pool_bytes: hb?.pool_bytes ?? h.pool_bytes,
      kv_used_bytes: hb?.kv_used_bytes ?? 0,
      free_bytes: hb?.free_bytes ?? h.pool_bytes,
      sessions: hb?.sessions ?? 0,
      resident: hb?.resident ?? 0,
      active: hb?.active ?? 0,
      queued: hb?.queued ?? 0,
      draining: r.draining || hb?.draining === true,
      last_heartbeat_ms: Date.now(),
      picks: 0,
    });
    if (joined || prev.draining !== this.table.get(name)!.draining) await this.persist();
  }

  /**
   * A message of the host's connection `connectedAt` other than a heartbeat: it is alive (its
   * heartbeat may be queued behind big state parts). Its load and picks stay as they were.
   */
  seen(name: string, connectedAt: number): void {
    const row = this.table.get(name);
    if (!row || row.connected_at !== connectedAt) return;
    row.last_heartbeat_ms = Date.now();
    this.reported.add(name);
  }

  /** The host's socket closed (or it was revoked): out of the table. `connectedAt` spares a newer connection. */
  async gone(name: string, connectedAt?: number): Promise<void> {
    const row = this.table.get(name);
    if (!row || (connectedAt !== undefined && row.connected_at > connectedAt)) return;
    this.table.delete(name);
    this.reported.delete(name);
    await this.persist();
  }

  /**
   * The live host serving `model` with the most free KV, each pick since its last heartbeat counted
   * against it (so a burst of new sessions spreads); no storage read. `prefer` (the host holding
   * the request's cached prefix, prompt-cache.ts) is picked instead when it is live, serves
   * `model`, is not excluded and has room for one more pick.
   */
  route(model: string, exclude: string[] = [], prefer?: string): Route {
    this.routes++;
    const r = this.best(model, exclude, prefer);
    if (!r.row) return { name: null, live: r.live, models: r.models };
    r.row.picks++;
    return { name: r.row.name };
  }

  /**
   * What route(model) would pick now, without counting a pick (nor a route): the host's model
   * (hello.model), protocol minor and cache fingerprint, or null when no live host serves `model`.
   * A request that may use the prompt cache computes its keys with these before it is routed.
   */
  peek(model: string): Peeked | null {
    const { row } = this.best(model, []);
    if (!row) return null;
    return {
      model: row.model,
      protocol_minor: row.protocol_minor ?? 0,
      ...(row.cache_fingerprint !== undefined ? { cache_fingerprint: row.cache_fingerprint } : {}),
    };
  }

  private best(model: string, exclude: string[], prefer?: string): { row?: HostRow; live: number; models: string[] } {
    const now = Date.now();
    const preferred = prefer === undefined ? undefined : this.table.get(prefer);
    if (
      preferred !== undefined &&
      isLive(preferred, now) &&
      serves(preferred, model) &&
      !exclude.includes(preferred.name) &&
      freeAfterPicks(preferred) >= pickEstimate(preferred)
    )
      return { row: preferred, live: 0, models: [] };
    let best: HostRow | undefined;
    let bestFree = 0;
    let live = 0;
    const models = new Set<string>();
    for (const row of this.table.values()) {
      if (!isLive(row, now)) continue;
      live++;
      models.add(modelId(row.model));
      if (!serves(row, model) || exclude.includes(row.name)) continue;
      const free = freeAfterPicks(row);
      if (best === undefined || free > bestFree) {
        best = row;
        bestFree = free;
      }
    }
    return { row: best, live, models: [...models].sort() };
  }

  live(name: string): boolean {
    const row = this.table.get(name);
    return row !== undefined && isLive(row, Date.now());
  }

  /** Every host in the table (rows of hosts gone while this object slept, never heard of since, are dropped). */
  async list(): Promise<HostView[]> {
    const now = Date.now();
    let pruned = false;
    for (const row of this.table.values())
      if (!this.reported.has(row.name) && now - row.last_heartbeat_ms > staleMs(row)) {
        this.table.delete(row.name);
        pruned = true;
      }
    if (pruned) await this.persist();
    return [...this.table.values()].map(({ picks: _, ...row }) => ({
      ...row,
      // a row restored from storage says nothing about the socket (a deploy closed them all) until its host reports
      connected: this.reported.has(row.name),
      live: this.reported.has(row.name) && isLive(row, now),
    }));
  }

  counters(): { routes: number; storage_reads: number } {
    return { routes: this.routes, storage_reads: this.storageReads };
  }
}
