// One request's channel to a GPU host (protocol: shared/protocol/host.json).
//
// Hosts dial in and keep one socket, held by their Durable Object (host-conn.ts); a request opens
// a WebSocket of its own to that object (`stub.fetch` with Upgrade: no URL, no token: the object
// is reached through its binding), which relays it as one channel of the host's socket. Frames
// are msgpack maps validated by the shared codec (untrusted input: an invalid frame fails the
// request, never the worker). Closing the socket is how a request is cancelled on the host: the
// object tells the host channel_close, which cancels whatever the channel had running (client
// disconnect → cancel, for free).
//
// Deadlines: the connect (upgrade and hello) has connectMs; a call has idleMs between frames of
// its own (progress and token frames keep a long prefill or generation alive). A host that misses
// one, or whose socket closes (its object closes every channel 1011 "host gone"), is gone
// (HostGone: 503 with Retry-After); the link is closed, which cancels its work on the host.
import {
  type AnyHostMessage,
  decodeHostMessage,
  encodeHostMessage,
  type FromHostMessage,
  HOST_PROTOCOL_VERSION,
  type HostMessage,
} from "@pyramidkv/shared";

import type { Env } from "./env.js";
import { ApiError, fromHostError, noHost } from "./errors.js";

const FINAL = new Set([
  "opened",
  "appended",
  "buffered",
  "done",
  "cancelled",
  "closed",
  "stats_result",
  "tenant_set",
  "snapshotted",
  "error",
]);
/** host 2.1: the requests that carry the edge's request id */
const WITH_REQUEST_ID = new Set(["open_session", "append", "generate"]);

export interface Deadlines {
  /** upgrade + hello */
  connectMs: number;
  /** a call with no frame of its own from the host for this long fails */
  idleMs: number;
}
export const DEFAULT_DEADLINES: Deadlines = { connectMs: 10_000, idleMs: 60_000 };

type Timer = ReturnType<typeof setTimeout>;
const stop = (t: Timer | undefined) => {
  if (t !== undefined) clearTimeout(t);
};

export class HostGone extends ApiError {
  constructor(
    /** the host's name */
    readonly host: string,
    why: string,
    readonly byEdge = false,
  ) {
    super(503, "server_error", `the GPU host serving this request went away (${why})`, null, "host_unavailable");
  }
}

type Waiter = {
  resolve: (f: FromHostMessage) => void;
  reject: (e: Error) => void;
  onFrame?: (f: FromHostMessage) => void;
  /** the call's idle deadline, reset by each of its frames */
  timer?: Timer;
};
type DistributiveOmit<T, K extends PropertyKey> = T extends unknown ? Omit<T, K> : never;
/** A request as a route writes it: the link adds id and tenant (and request_id). */
export type HostRequest = DistributiveOmit<Exclude<AnyHostMessage, FromHostMessage>, "id" | "tenant">;

export class HostLink {
  private nextId = 1;
  private readonly waiters = new Map<number, Waiter>();
  private gone?: HostGone;
  private queue: Promise<void> = Promise.resolve(); // frames handled in arrival order (Blob reads are async)
  hello!: HostMessage<"hello">;
  /** the edge's x-request-id, sent as request_id on the frames that carry one (the host logs it) */
  requestId?: string;

  private constructor(
    private readonly ws: WebSocket,
    /** the host's name (host-conn.ts) */
    readonly host: string,
    readonly tenant: string,
    private readonly idleMs: number,
  ) {}

  /** Opens a channel to the host `name` for `tenant` through its Durable Object. */
  static async connect(
    env: Env,
    name: string,
    tenant: string,
    deadlines: Deadlines = DEFAULT_DEADLINES,
  ): Promise<HostLink> {
    const { connectMs } = deadlines;
    let timer: Timer | undefined;
    let late = false;
    const deadline = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        late = true;
        reject(new HostGone(name, `no channel and hello within ${connectMs} ms`));
      }, connectMs);
    });
    let link: HostLink | undefined;
    try {
      return await Promise.race([
        HostLink.dial(env, name, tenant, deadlines, (l) => {
          link = l;
          if (late) l.close(); // nobody waits for it any more
        }),
        deadline,
      ]);
    } catch (e) {
      link?.close();
      throw e;
    } finally {
      stop(timer);
    }
  }

  private static async dial(
    env: Env,
    name: string,
    tenant: string,
    deadlines: Deadlines,
    made: (l: HostLink) => void,
  ): Promise<HostLink> {
    let resp: Response;
    try {
      const stub = env.HOSTS.get(env.HOSTS.idFromName(name));
      resp = await stub.fetch(`https://host/channel?tenant=${encodeURIComponent(tenant)}`, {
        headers: { Upgrade: "websocket" },
      });
    } catch (e) {
      throw new HostGone(name, `its object failed: ${e instanceof Error ? e.message : String(e)}`);
    }
    const ws = resp.webSocket;
    if (!ws) {
      const body = (await resp.text().catch(() => "")).trim();
      let why = `channel answered HTTP ${resp.status}`;
      try {
        why = (JSON.parse(body) as { error: { message: string } }).error.message;
      } catch {
        if (body !== "") why += `: ${body.slice(0, 300)}`;
      }
      throw new HostGone(name, why);
    }
    ws.accept();
    ws.binaryType = "arraybuffer";
    const link = new HostLink(ws, name, tenant, deadlines.idleMs);
    const hello = new Promise<HostMessage<"hello">>((resolve, reject) => {
      link.waiters.set(0, {
        resolve: (f) =>
          f.type === "hello" ? resolve(f) : reject(new HostGone(name, `first frame was ${f.type}, not hello`)),
        reject,
      });
    });
    ws.addEventListener("message", (ev) => {
      link.queue = link.queue.then(async () =>
        link.onMessage(ev.data instanceof Blob ? await ev.data.arrayBuffer() : ev.data),
      );
    });
    ws.addEventListener("close", (ev) =>
      link.fail(new HostGone(name, `connection closed, code ${ev.code}${ev.reason ? ` ${ev.reason}` : ""}`)),
    );
    ws.addEventListener("error", () => link.fail(new HostGone(name, "connection error")));
    made(link);
    link.hello = await hello;
    if (link.hello.protocol !== HOST_PROTOCOL_VERSION) {
      link.close();
      throw noHost(`a GPU host speaks protocol ${link.hello.protocol}, this worker ${HOST_PROTOCOL_VERSION}`);
    }
    return link;
  }

  private onMessage(data: unknown): void {
    if (typeof data === "string") {
      this.fail(new HostGone(this.host, "the host sent a text message"));
      return;
    }
    const bytes =
      data instanceof ArrayBuffer
        ? new Uint8Array(data)
        : ArrayBuffer.isView(data)
          ? new Uint8Array(data.buffer, data.byteOffset, data.byteLength)
          : null;
    if (!bytes) {
      this.fail(new HostGone(this.host, "unreadable message"));
      return;
    }
    const d = decodeHostMessage(bytes, "from_host");
    if (!d.ok) {
      this.fail(new HostGone(this.host, `invalid frame: ${d.error}`));
      return;
    }
    const m = d.message;
    const id = m.type === "hello" ? 0 : "id" in m ? m.id : undefined;
    if (id === undefined) {
      if (m.type === "error") this.fail(new HostGone(this.host, `${m.code}: ${m.message}`));
      return;
    }
    const w = this.waiters.get(id);
    if (!w) return;
    stop(w.timer);
    if (m.type === "hello" || FINAL.has(m.type)) {
      this.waiters.delete(id);
      w.resolve(m);
    } else {
      this.arm(id, w);
      w.onFrame?.(m);
    }
  }

  /** (Re)starts call `id`'s idle deadline: missing it, the host is gone and the link closed. */
  private arm(id: number, w: Waiter): void {
    w.timer = setTimeout(() => {
      if (this.waiters.get(id) !== w) return;
      const e = new HostGone(this.host, `no answer from the host for ${this.idleMs} ms`);
      this.fail(e);
      try {
        this.ws.close(1000, "deadline");
      } catch {
        // already closed
      }
    }, this.idleMs);
  }

  private fail(e: HostGone): void {
    this.gone ??= e;
    for (const w of this.waiters.values()) {
      stop(w.timer);
      w.reject(e);
    }
    this.waiters.clear();
  }

  get alive(): boolean {
    return this.gone === undefined;
  }

  /** Sends a request; resolves with its final frame, progress/token frames go to onFrame. */
  send(msg: HostRequest, onFrame?: (f: FromHostMessage) => void): Promise<FromHostMessage> {
    if (this.gone) return Promise.reject(this.gone);
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const w: Waiter = { resolve, reject, onFrame };
      this.waiters.set(id, w);
      this.arm(id, w);
      try {
        const rid = this.requestId !== undefined && WITH_REQUEST_ID.has(msg.type) ? { request_id: this.requestId } : {};
        this.ws.send(encodeHostMessage({ ...msg, ...rid, id, tenant: this.tenant } as AnyHostMessage));
      } catch (e) {
        stop(w.timer);
        this.waiters.delete(id);
        reject(e instanceof Error ? e : new Error(String(e)));
      }
    });
  }

  /** send(), expecting a final frame of `type`; a host error frame becomes the matching ApiError. */
  async call<T extends FromHostMessage["type"]>(
    msg: HostRequest,
    type: T,
    onFrame?: (f: FromHostMessage) => void,
  ): Promise<Extract<FromHostMessage, { type: T }>> {
    const f = await this.send(msg, onFrame);
    if (f.type === "error") {
      const e = fromHostError(f.code, f.message);
      if (f.reason !== undefined) e.reason = f.reason;
      throw e;
    }
    if (f.type !== type)
      throw new ApiError(
        502,
        "server_error",
        `the host answered ${msg.type} with ${f.type}, expected ${type}`,
        null,
        "bad_host_answer",
      );
    return f as Extract<FromHostMessage, { type: T }>;
  }

  close(): void {
    this.fail(new HostGone(this.host, "closed by the edge", true));
    try {
      this.ws.close(1000, "done");
    } catch {
      // already closed
    }
  }
}
