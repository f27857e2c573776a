// One WebSocket from this request to a GPU host (protocol: shared/protocol/host.json).
//
// Dialled per request with fetch(Upgrade: websocket) and a bearer token bound to the link's tenant
// and to the host (edgeToken); frames are msgpack maps validated by the shared codec (untrusted
// input: an invalid frame fails the request, never the worker). Closing the socket is how a
// request is cancelled on the host: it cancels whatever this connection had running (client
// disconnect → cancel, for free).
//
// Deadlines: the connect (upgrade and hello) has connectMs; a call has idleMs between frames of
// its own (progress and token frames keep a long prefill or generation alive). A host that misses
// one is gone (HostGone: 503 with Retry-After, and routing marks it down); the link is closed,
// which cancels its work on the host.
import {
  edgeTokenMessage,
  normaliseHost,
  type AnyHostMessage,
  decodeHostMessage,
  encodeHostMessage,
  type FromHostMessage,
  HOST_PROTOCOL_VERSION,
  type HostMessage,
} from "@pyramidkv/shared";

import { ApiError, fromHostError, noHost } from "./errors.js";

export { normaliseHost };

const FINAL = new Set([
  "opened",
  "appended",
  "buffered",
  "done",
  "cancelled",
  "closed",
  "stats_result",
  "tenant_set",
  "error",
]);
/** host 2.1: the requests that carry the edge's request id */
const WITH_REQUEST_ID = new Set(["open_session", "append", "generate"]);
/** The host accepts tokens at most 300 s ahead; 120 s leaves room for clocks that disagree. */
const TOKEN_TTL_S = 120;

export interface Deadlines {
  /** fetch upgrade + hello */
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
    readonly hostUrl: string,
    why: string,
    readonly byEdge = false,
  ) {
    super(503, "server_error", `the GPU host serving this request went away (${why})`, null, "host_unavailable");
  }
}

const hex = (b: Uint8Array) => [...b].map((x) => x.toString(16).padStart(2, "0")).join("");

/**
 * `pkv2.<expiry>.<nonce>.<hmac>.<tenant>` for `tenant`'s link to `host` (host[:port] as dialled),
 * hmac = hex HMAC-SHA256(secret, "pkv-edge-v2\n<expiry>\n<tenant>\n<host>\n<nonce>"), as
 * gpu-host/src/host/auth.ts checks it: good for one upgrade, on that host, for that tenant.
 */
export async function edgeToken(
  secret: string,
  tenant: string,
  host: string,
  nowMs = Date.now(),
  nonce = hex(crypto.getRandomValues(new Uint8Array(16))),
): Promise<string> {
  const expiry = Math.floor(nowMs / 1000) + TOKEN_TTL_S;
  const key = await crypto.subtle.importKey(
    "raw",
    new TextEncoder().encode(secret),
    { name: "HMAC", hash: "SHA-256" },
    false,
    ["sign"],
  );
  const signed = edgeTokenMessage(expiry, tenant, host, nonce);
  const mac = new Uint8Array(await crypto.subtle.sign("HMAC", key, new TextEncoder().encode(signed)));
  return `pkv2.${expiry}.${nonce}.${hex(mac)}.${tenant}`;
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
    readonly url: string,
    readonly tenant: string,
    private readonly idleMs: number,
  ) {}

  static async connect(
    url: string,
    secret: string,
    tenant: string,
    deadlines: Deadlines = DEFAULT_DEADLINES,
  ): Promise<HostLink> {
    const { connectMs } = deadlines;
    const abort = new AbortController();
    let timer: Timer | undefined;
    const late = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        const e = new HostGone(url, `no connection and hello within ${connectMs} ms`);
        abort.abort(e);
        reject(e);
      }, connectMs);
    });
    let link: HostLink | undefined;
    try {
      return await Promise.race([HostLink.dial(url, secret, tenant, deadlines, abort.signal, (l) => (link = l)), late]);
    } catch (e) {
      link?.close();
      throw e;
    } finally {
      stop(timer);
    }
  }

  private static async dial(
    url: string,
    secret: string,
    tenant: string,
    deadlines: Deadlines,
    signal: AbortSignal,
    made: (l: HostLink) => void,
  ): Promise<HostLink> {
    let resp: Response;
    try {
      resp = await fetch(url, {
        headers: {
          Upgrade: "websocket",
          Authorization: `Bearer ${await edgeToken(secret, tenant, new URL(url).host)}`,
        },
        signal,
      });
    } catch (e) {
      if (signal.aborted) throw signal.reason;
      throw new HostGone(url, `connect failed: ${e instanceof Error ? e.message : String(e)}`);
    }
    const ws = resp.webSocket;
    if (signal.aborted) {
      // the deadline passed while the upgrade was answered: nobody waits for this socket
      try {
        ws?.accept();
        ws?.close(1000, "deadline");
      } catch {
        // already closed
      }
      throw signal.reason;
    }
    if (!ws) {
      const body = (await resp.text().catch(() => "")).trim().slice(0, 300);
      const why =
        resp.status === 401
          ? `the host refused the edge token (401${body ? `: ${body}` : ""})`
          : `upgrade answered HTTP ${resp.status}${body ? `: ${body}` : ""}`;
      throw new HostGone(url, why);
    }
    ws.accept();
    ws.binaryType = "arraybuffer";
    const link = new HostLink(ws, url, tenant, deadlines.idleMs);
    made(link);
    const hello = new Promise<HostMessage<"hello">>((resolve, reject) => {
      link.waiters.set(0, {
        resolve: (f) =>
          f.type === "hello" ? resolve(f) : reject(new HostGone(url, `first frame was ${f.type}, not hello`)),
        reject,
      });
    });
    ws.addEventListener("message", (ev) => {
      link.queue = link.queue.then(async () =>
        link.onMessage(ev.data instanceof Blob ? await ev.data.arrayBuffer() : ev.data),
      );
    });
    ws.addEventListener("close", (ev) => link.fail(new HostGone(url, `connection closed, code ${ev.code}`)));
    ws.addEventListener("error", () => link.fail(new HostGone(url, "connection error")));
    const onAbort = () =>
      link.fail(signal.reason instanceof HostGone ? signal.reason : new HostGone(url, "connect aborted"));
    signal.addEventListener("abort", onAbort);
    try {
      link.hello = await hello;
    } finally {
      signal.removeEventListener("abort", onAbort);
    }
    if (link.hello.protocol !== HOST_PROTOCOL_VERSION) {
      link.close();
      throw noHost(`host ${url} speaks protocol ${link.hello.protocol}, this worker ${HOST_PROTOCOL_VERSION}`);
    }
    return link;
  }

  private onMessage(data: unknown): void {
    if (typeof data === "string") {
      this.fail(new HostGone(this.url, "the host sent a text message"));
      return;
    }
    const bytes =
      data instanceof ArrayBuffer
        ? new Uint8Array(data)
        : ArrayBuffer.isView(data)
          ? new Uint8Array(data.buffer, data.byteOffset, data.byteLength)
          : null;
    if (!bytes) {
      this.fail(new HostGone(this.url, "unreadable message"));
      return;
    }
    const d = decodeHostMessage(bytes, "from_host");
    if (!d.ok) {
      this.fail(new HostGone(this.url, `invalid frame: ${d.error}`));
      return;
    }
    const m = d.message;
    const id = m.type === "hello" ? 0 : "id" in m ? m.id : undefined;
    if (id === undefined) {
      if (m.type === "error") this.fail(new HostGone(this.url, `${m.code}: ${m.message}`));
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
      const e = new HostGone(this.url, `no answer from the host for ${this.idleMs} ms`);
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
    if (f.type === "error") throw fromHostError(f.code, f.message);
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
    this.fail(new HostGone(this.url, "closed by the edge", true));
    try {
      this.ws.close(1000, "done");
    } catch {
      // already closed
    }
  }
}
