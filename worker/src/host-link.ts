// One WebSocket from this request to a GPU host (protocol: shared/protocol/host.json).
//
// Dialled per request with fetch(Upgrade: websocket) and the HMAC bearer token; frames are msgpack
// maps validated by the shared codec (untrusted input: an invalid frame fails the request, never
// the worker). Closing the socket is how a request is cancelled on the host: it cancels whatever
// this connection had running (client disconnect → cancel, for free).
import {
  type AnyHostMessage,
  decodeHostMessage,
  encodeHostMessage,
  type FromHostMessage,
  HOST_PROTOCOL_VERSION,
  type HostMessage,
} from "@pyramidkv/shared";

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
  "error",
]);
/** host 2.1: the requests that carry the edge's request id */
const WITH_REQUEST_ID = new Set(["open_session", "append", "generate"]);
const TOKEN_TTL_S = 300;
const HELLO_TIMEOUT_MS = 10_000;

export class HostGone extends ApiError {
  constructor(
    readonly hostUrl: string,
    why: string,
    readonly byEdge = false,
  ) {
    super(503, "server_error", `the GPU host serving this request went away (${why})`, null, "host_unavailable");
  }
}

/** `<expiry>.<hex HMAC-SHA256(secret, "pkv-edge." + expiry)>`, as gpu-host/src/host/auth.ts checks it. */
export async function edgeToken(secret: string, nowMs = Date.now()): Promise<string> {
  const expiry = Math.floor(nowMs / 1000) + TOKEN_TTL_S;
  const key = await crypto.subtle.importKey(
    "raw",
    new TextEncoder().encode(secret),
    { name: "HMAC", hash: "SHA-256" },
    false,
    ["sign"],
  );
  const mac = new Uint8Array(await crypto.subtle.sign("HMAC", key, new TextEncoder().encode(`pkv-edge.${expiry}`)));
  return `${expiry}.${[...mac].map((b) => b.toString(16).padStart(2, "0")).join("")}`;
}

type Waiter = {
  resolve: (f: FromHostMessage) => void;
  reject: (e: Error) => void;
  onFrame?: (f: FromHostMessage) => void;
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
  ) {}

  static async connect(url: string, secret: string, tenant: string): Promise<HostLink> {
    let resp: Response;
    try {
      resp = await fetch(url, {
        headers: { Upgrade: "websocket", Authorization: `Bearer ${await edgeToken(secret)}` },
      });
    } catch (e) {
      throw new HostGone(url, `connect failed: ${e instanceof Error ? e.message : String(e)}`);
    }
    const ws = resp.webSocket;
    if (!ws) {
      const why =
        resp.status === 401 ? "the host refused the edge secret (401)" : `upgrade answered HTTP ${resp.status}`;
      throw new HostGone(url, why);
    }
    ws.accept();
    ws.binaryType = "arraybuffer";
    const link = new HostLink(ws, url, tenant);
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
    const timeout = setTimeout(
      () => link.fail(new HostGone(url, `no hello within ${HELLO_TIMEOUT_MS} ms`)),
      HELLO_TIMEOUT_MS,
    );
    try {
      link.hello = await hello;
    } catch (e) {
      link.close();
      throw e;
    } finally {
      clearTimeout(timeout);
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
    if (m.type === "hello" || FINAL.has(m.type)) {
      this.waiters.delete(id);
      w.resolve(m);
    } else {
      w.onFrame?.(m);
    }
  }

  private fail(e: HostGone): void {
    this.gone ??= e;
    for (const w of this.waiters.values()) w.reject(e);
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
      this.waiters.set(id, { resolve, reject, onFrame });
      try {
        const rid = this.requestId !== undefined && WITH_REQUEST_ID.has(msg.type) ? { request_id: this.requestId } : {};
        this.ws.send(encodeHostMessage({ ...msg, ...rid, id, tenant: this.tenant } as AnyHostMessage));
      } catch (e) {
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
