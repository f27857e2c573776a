// One session of one tenant as the host keeps it: identity and open parameters, what it accounts
// (account.ts), whether the store has its state, its request queue, its buffered pieces.
import type { FromHostMessage, HostMessage } from "@pyramidkv/shared";

import { KvAccount } from "./account.js";
import type { EngineProcess } from "./engine.js";
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
export type OpenParams = Omit<HostMessage<"open_session">, "type" | "id" | "tenant" | "session" | "prompt_tokens"> & {
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
  cancelled: boolean;
  engine?: EngineProcess;
  engineId?: number;
  abortQueued?: (e: Error) => boolean;
}

export const keyOf = (tenant: string, session: string) => `${tenant}\0${session}`;

export class HostSession {
  /** its name in the engine; tenant names hold no '/', so names of different tenants never collide */
  readonly engineName: string;
  readonly kv: KvAccount;
  readonly pieces = new PieceBuffer();
  /** a state is in the store */
  saved: boolean;
  /** the engine holds changes the store lacks */
  dirty = false;
  tokensSeen: number;
  lastUsed = Date.now();
  /** the per-session queue: appends and generates run one at a time, in arrival order */
  chain: Promise<void> = Promise.resolve();
  /** requests queued or running on `chain`, an open in progress, an offload */
  pendingOps = 0;
  /** appends and generates queued or running, oldest first */
  ops: Op[] = [];
  /** why it was lost; reported once (session_lost), then it is unknown */
  lost?: string;
  /** empty and never saved when the engine died: restored by opening it again */
  reopen?: boolean;

  /** `stored`: a session an earlier run of the host offloaded (its state is in the store). */
  constructor(
    readonly tenant: string,
    readonly id: string,
    readonly params: OpenParams,
    stored?: { tokensSeen: number; kvBytes: number },
  ) {
    this.engineName = `${tenant}/${id}`;
    this.kv = new KvAccount(stored?.kvBytes ?? 0);
    this.saved = stored !== undefined;
    this.tokensSeen = stored?.tokensSeen ?? 0;
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
