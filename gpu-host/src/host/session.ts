// One session of one tenant as the host keeps it: identity and open parameters, what it accounts
// (account.ts), whether the store has its state (its checkpoint), its request queue, its turn,
// its buffered pieces.
import type { FromHostMessage, HostMessage } from "@pyramidkv/shared";

import { KvAccount } from "./account.js";
import type { EngineProcess } from "./engine.js";
import { HostError } from "./errors.js";
import { PieceBuffer } from "./pieces.js";

/** One token's logprobs as the edge gets them (host.json `token.logprobs`): {logprob, bytes,
 * top_logprobs?: [{token, bytes, logprob}]}. */
export type TokenLogprobs = Record<string, unknown>;

/** A connection as the sessions see it. */
export interface Sink {
  send(msg: FromHostMessage): void;
  /** a generated token; the connection may coalesce tokens when the client reads slowly */
  sendToken(id: number, session: string, token: number, text: string, logprobs?: TokenLogprobs): void;
  readonly open: boolean;
}

/** The engine's `open` parameters of a session, as given at open_session (method and budget
 * resolved); saved with its state. */
export type OpenParams = Omit<
  HostMessage<"open_session">,
  "type" | "id" | "tenant" | "session" | "prompt_tokens" | "prompt_bytes" | "ephemeral" | "request_id" | "from_cache"
> & {
  method: string;
  budget: number;
};

/** An append or generate queued or running on a session. */
export interface Op {
  kind: "append" | "generate";
  id: number;
  sink: Sink;
  /** the edge's x-request-id, for the host's log lines about this request */
  requestId?: string;
  /** the identity of the turn it belongs to (Turn) */
  turn: object;
  cancelled: boolean;
  engine?: EngineProcess;
  engineId?: number;
  abortQueued?: (e: Error) => boolean;
}

export const keyOf = (tenant: string, session: string) => `${tenant}\0${session}`;

/** How long a turn's holder may stay silent (no request running, none sent) before another
 * request may take the session's turn: a dead client cannot hold a session for ever. */
export const TURN_GRACE_MS = 30_000;

/** Whose turn a session is in: one request from its first piece or append until its generate
 * ends, its connection closes, a cancel, or it has been idle past the grace. A request is its
 * request_id (issue 13 multiplexes requests on one connection), else its connection: frames of the
 * holder's connection of which one lacks a request_id are the holder's; its request_id from another
 * connection is not (a closed connection ends its turn: a retry on a new one finds it free). A piece, append or generate of anyone else meanwhile is refused
 * with session_busy, at once: never queued behind the turn, never mixed into it (docs/HOST.md,
 * "Turns"). */
export class Turn {
  private holder?: { id: object; requestId?: string; sink: Sink; at: number };

  constructor(
    private readonly graceMs = TURN_GRACE_MS,
    private readonly now: () => number = Date.now,
  ) {}

  /** The holder's identity (compared by identity only), if any. */
  get current(): object | undefined {
    return this.holder?.id;
  }

  /** A request (`requestId`, sending on `sink`) takes or keeps the turn; `idle`: no request of the
   * session is queued or running. Returns the turn's identity (a new one when it changed hands). */
  claim(requestId: string | undefined, sink: Sink, idle: boolean, session: string): object {
    const h = this.holder;
    const now = this.now();
    if (h && this.holds(h, requestId, sink)) {
      h.requestId ??= requestId;
      h.at = now;
      return h.id;
    }
    if (h && !(idle && now - h.at >= this.graceMs))
      throw new HostError(
        "session_busy",
        `session '${session.slice(0, 64)}' is in the turn of another request; retry after it ends`,
      );
    this.holder = { id: {}, requestId, sink, at: now };
    return this.holder.id;
  }

  private holds(h: { requestId?: string; sink: Sink }, requestId: string | undefined, sink: Sink): boolean {
    return h.sink === sink && (requestId === undefined || h.requestId === undefined || h.requestId === requestId);
  }

  /** The holder was active now (a request of its ended): its grace starts again. */
  touch(id: object): void {
    const h = this.holder;
    if (h && h.id === id) h.at = this.now();
  }

  /** Ends the turn (`id`'s only, when given). */
  release(id?: object): void {
    if (id === undefined || this.holder?.id === id) this.holder = undefined;
  }

  /** `sink` closed: a turn held from it ends. Returns its identity when it did. */
  releaseSink(sink: Sink): object | undefined {
    const h = this.holder;
    if (h?.sink !== sink) return undefined;
    this.holder = undefined;
    return h.id;
  }
}

export class HostSession {
  /** its name in the engine; tenant names hold no '/', so names of different tenants never collide */
  readonly engineName: string;
  readonly kv: KvAccount;
  readonly pieces = new PieceBuffer();
  readonly turn = new Turn();
  private isSaved = false;
  /** what the store's state holds: tokens_seen and kv_bytes at its last save */
  checkpoint = { tokensSeen: 0, kvBytes: 0 };
  /** open_session.ephemeral: the connection whose close closes the session */
  openedBy?: Sink;
  /** the engine holds changes the store lacks */
  dirty = false;
  /** the etag of the edge's copy this host last stored or read (absent: none known) */
  etag?: string;
  /** the connection epoch in which the etag was last checked against the edge's (edge-link.ts) */
  epoch = 0;
  /** the edge's store holds the checkpoint (the last save reached it) */
  remoteSynced = false;
  tokensSeen: number;
  /** tokens_seen the edge was last told (appended, done; a stored session's) */
  ackedTokens: number;
  /** an append opened the assistant's turn (messages with add_generation_prompt): only its
   * generate may follow, and the turn is checkpointed, or rolled back, whole with it */
  openTurn = false;
  /** the open turn was rolled back before its generate came: that generate fails with this */
  turnLost?: { code: "engine_restarted" | "checkpoint_failed"; message: string };
  lastUsed = Date.now();
  /** the per-session queue: appends and generates run one at a time, in arrival order */
  chain: Promise<void> = Promise.resolve();
  /** requests queued or running on `chain`, an open in progress, an offload */
  pendingOps = 0;
  /** an offload's close in the engine, until the host counts the session offloaded (or the close
   * failed): stats wait for it (the engine would answer unknown_session) */
  offloading?: Promise<void>;
  /** appends and generates queued or running, oldest first */
  ops: Op[] = [];
  /** why it was lost; reported once (session_lost), then it is unknown */
  lost?: string;
  /** empty and never saved when the engine died: restored by opening it again */
  reopen?: boolean;
  /** an ephemeral copy's cached state (open_session.from_cache, residency.ts openCopy): its
   * checkpoint until its first save to the store (a restore reads it when the store has none) */
  origin?: Uint8Array;

  /** `stored`: a session an earlier run of the host offloaded (its state is in the store). */
  constructor(
    readonly tenant: string,
    readonly id: string,
    readonly params: OpenParams,
    stored?: { tokensSeen: number; kvBytes: number },
  ) {
    this.engineName = `${tenant}/${id}`;
    this.kv = new KvAccount(stored?.kvBytes ?? 0);
    this.tokensSeen = stored?.tokensSeen ?? 0;
    this.ackedTokens = this.tokensSeen;
    this.saved = stored !== undefined;
  }

  /** A state is in the store. Set true once a save of the session as it is now is stored: that
   * state becomes its checkpoint (what a failed request or an engine death rolls it back to). */
  get saved(): boolean {
    return this.isSaved;
  }

  set saved(v: boolean) {
    this.isSaved = v;
    if (v) this.checkpoint = { tokensSeen: this.tokensSeen, kvBytes: this.kv.steady };
  }

  /** Back to its checkpoint, outside the engine (the engine's copy is gone or discarded): restored
   * on its next request. One never saved is reopened empty if the edge was never told of any
   * content (nothing acknowledged is lost), else lost (reported once with session_lost). */
  backToCheckpoint(why: string, code: "engine_restarted" | "checkpoint_failed" = "engine_restarted"): void {
    this.kv.evicted();
    if (this.openTurn) {
      this.openTurn = false;
      this.turnLost = {
        code,
        message: `the turn's append was rolled back before its generate (${why}); send the turn again`,
      };
    }
    if (this.saved) {
      this.tokensSeen = this.checkpoint.tokensSeen;
      this.kv.measure(this.checkpoint.kvBytes);
      this.dirty = false;
    } else if (this.ackedTokens === 0) {
      this.tokensSeen = 0;
      this.kv.measure(0);
      this.dirty = false;
      this.reopen = true; // nothing to lose: open it again
    } else {
      this.lost = why;
    }
  }

  /** The engine holds its KV cache. */
  get resident(): boolean {
    return this.kv.resident;
  }

  /** Requests are queued or running on it (or it is being opened or offloaded): never a victim. */
  get busy(): boolean {
    return this.pendingOps > 0;
  }
}
