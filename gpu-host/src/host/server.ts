// The host's network face: one HTTP server on one port for GET /health (what routing and load
// balancers need, nothing per tenant), GET /metrics (only with the scrape token) and the edge's
// WebSocket (upgrade authenticated before it is accepted, auth.ts). Each binary WebSocket message
// is one host-protocol frame; frames of many sessions share a connection, all of the tenant its
// token names: a frame naming another tenant gets 'unauthorized' and the connection stays up.
//
// Backpressure: tokens of a connection whose unsent bytes (ws.bufferedAmount) exceed highWater
// are coalesced per request (text concatenated, ids collected, logprobs one per id in order) and
// flushed when the socket drains, or once a coalesced frame reaches COALESCED_FLUSH_BYTES, so
// memory per slow connection stays bounded by what it has not read yet, never by a queue of
// frames, and no frame outgrows the protocol's limit; past maxBuffered the connection is dropped
// and its generations cancelled.
import { createServer, type IncomingMessage, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import type { Duplex } from "node:stream";

import {
  decodeHostMessage,
  encodeHostMessage,
  type FromHostMessage,
  HOST_MAX_FRAME_BYTES,
  HOST_PROTOCOL_SPEC,
  HOST_PROTOCOL_VERSION,
} from "@pyramidkv/shared";
import { WebSocket, WebSocketServer } from "ws";

import { bearerMatches, EdgeAuth } from "./auth.js";
import { type HostConfig, TENANT_NAME } from "./config.js";
import type { HostMetrics } from "./metrics.js";
import type { Sink, TokenLogprobs } from "./session.js";
import type { SessionHost } from "./sessions.js";

// Messages up to this size are read and answered with a too_large error frame; larger ones make
// ws close the connection (1009) without buffering them.
const MAX_READ_BYTES = 2 * HOST_MAX_FRAME_BYTES;

/** A coalesced token frame this large (estimated) is sent at once, drained or not: frames stay far
 * below HOST_MAX_FRAME_BYTES (20 alternatives per token make ~1 KiB a token). */
export const COALESCED_FLUSH_BYTES = 1 << 20;

type Coalesced = {
  session: string;
  tokens: number[];
  text: string;
  /** one per token when the generation asked for logprobs */
  logprobs?: TokenLogprobs[];
  bytes: number;
};

// An upper estimate of the msgpack bytes one token adds to a coalesced frame.
function tokenBytes(text: string, lp: TokenLogprobs | undefined): number {
  let n = 9 + Buffer.byteLength(text, "utf8");
  if (lp) {
    n += 40 + ((lp.bytes as Uint8Array | undefined)?.length ?? 0);
    for (const t of (lp.top_logprobs as { bytes?: Uint8Array }[] | undefined) ?? []) n += 40 + (t.bytes?.length ?? 0);
  }
  return n;
}

export class Connection implements Sink {
  private readonly coalesced = new Map<number, Coalesced>();
  private flushTimer?: NodeJS.Timeout;

  constructor(
    private readonly ws: WebSocket,
    private readonly config: HostConfig,
    private readonly onDrop: () => void,
    /** the tenant the connection's token names: the only one its frames may name (HostServer checks) */
    readonly tenant = "",
  ) {}

  get open(): boolean {
    return this.ws.readyState === WebSocket.OPEN;
  }

  send(msg: FromHostMessage): void {
    if (!this.open) return;
    if ((msg.type === "done" || msg.type === "error") && msg.id !== undefined) this.flush(msg.id);
    this.write(msg);
  }

  sendToken(id: number, session: string, token: number, text: string, logprobs?: TokenLogprobs): void {
    if (!this.open) return;
    const pending = this.coalesced.get(id);
    if (pending || this.ws.bufferedAmount > this.config.highWaterBytes) {
      if (pending) {
        pending.tokens.push(token);
        pending.text += text;
        // The engine sends logprobs on every token of a generation that asked, or on none.
        if (logprobs) pending.logprobs?.push(logprobs);
        pending.bytes += tokenBytes(text, logprobs);
        if (pending.bytes >= COALESCED_FLUSH_BYTES) this.flush(id);
      } else {
        this.coalesced.set(id, {
          session,
          tokens: [token],
          text,
          ...(logprobs ? { logprobs: [logprobs] } : {}),
          bytes: tokenBytes(text, logprobs),
        });
      }
      this.flushTimer ??= setInterval(() => this.flushIfDrained(), 5);
      return;
    }
    this.write({ type: "token", id, session, tokens: [token], text, ...(logprobs ? { logprobs: [logprobs] } : {}) });
  }

  private write(msg: FromHostMessage): void {
    if (this.ws.bufferedAmount > this.config.maxBufferedBytes) {
      this.ws.terminate();
      this.onDrop();
      return;
    }
    this.ws.send(encodeHostMessage(msg), { binary: true });
  }

  private flush(id: number): void {
    const p = this.coalesced.get(id);
    if (!p) return;
    this.coalesced.delete(id);
    this.write({
      type: "token",
      id,
      session: p.session,
      tokens: p.tokens,
      text: p.text,
      ...(p.logprobs ? { logprobs: p.logprobs } : {}),
    });
  }

  private flushIfDrained(): void {
    if (!this.open) {
      this.stopFlushing();
      return;
    }
    if (this.ws.bufferedAmount > this.config.highWaterBytes) return;
    for (const id of [...this.coalesced.keys()]) this.flush(id);
    this.stopFlushing();
  }

  stopFlushing(): void {
    clearInterval(this.flushTimer);
    this.flushTimer = undefined;
  }
}

export class HostServer {
  private readonly http: Server;
  private readonly wss: WebSocketServer;
  private readonly sockets = new Set<WebSocket>();
  private readonly auth: EdgeAuth;

  constructor(
    private readonly host: SessionHost,
    private readonly config: HostConfig,
    private readonly metrics: HostMetrics,
  ) {
    this.auth = new EdgeAuth(config.edgeSecret);
    this.wss = new WebSocketServer({ noServer: true, maxPayload: MAX_READ_BYTES, perMessageDeflate: false });
    this.http = createServer((req, res) => {
      const path = (req.url ?? "/").split("?")[0];
      if (req.method === "GET" && path === "/health") {
        const ok = this.host.healthy && !this.host.isClosing;
        const h = this.host.hello;
        res.writeHead(ok ? 200 : 503, { "content-type": "application/json" });
        res.end(
          JSON.stringify({
            status: ok ? "ok" : this.host.isClosing ? "shutting_down" : "engine_restarting",
            protocol: HOST_PROTOCOL_VERSION,
            protocol_minor: HOST_PROTOCOL_SPEC.minor,
            model: h.model,
            n_ctx: h.n_ctx,
            chat_template: h.chat_template ?? null,
            engine_pid: this.host.enginePid,
            pool_bytes: h.pool_bytes,
            kv_used_bytes: this.host.kvUsedBytes,
          }),
        );
        return;
      }
      if (req.method === "GET" && path === "/metrics") {
        const token = this.config.metricsToken;
        if (token === undefined) {
          res.writeHead(403, { "content-type": "text/plain" });
          res.end(
            "GET /metrics is off: start the host with --metrics-token T (or PKV_METRICS_TOKEN=T) and scrape it " +
              "with the header Authorization: Bearer T\n",
          );
          return;
        }
        if (!bearerMatches(req.headers.authorization, token)) {
          res.writeHead(401, { "content-type": "text/plain", "www-authenticate": 'Bearer realm="pkv-host-metrics"' });
          res.end("GET /metrics needs the header Authorization: Bearer <the host's --metrics-token>\n");
          return;
        }
        res.writeHead(200, { "content-type": "text/plain; version=0.0.4" });
        res.end(this.metrics.render({ ...this.host.gauges(), connections: this.sockets.size }));
        return;
      }
      res.writeHead(404, { "content-type": "application/json" });
      res.end(JSON.stringify({ error: "not found" }));
    });
    this.http.on("upgrade", (req, socket, head) => this.upgrade(req, socket, head));
  }

  private upgrade(req: IncomingMessage, socket: Duplex, head: Buffer): void {
    const refuse = (status: string, message: string) => {
      const body = `${message}\n`;
      socket.end(
        `HTTP/1.1 ${status}\r\nConnection: close\r\nContent-Type: text/plain\r\n` +
          `Content-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`,
      );
      socket.destroy();
    };
    const v = this.host.isClosing
      ? ({ ok: false, status: 503, message: "the host is shutting down" } as const)
      : this.auth.verify(req.headers.authorization, req.headers.host);
    if (!v.ok) refuse(v.status === 401 ? "401 Unauthorized" : "503 Service Unavailable", v.message);
    else this.wss.handleUpgrade(req, socket, head, (ws) => this.accept(ws, v.tenant));
  }

  private accept(ws: WebSocket, tenant: string): void {
    this.sockets.add(ws);
    const conn = new Connection(ws, this.config, () => this.host.connectionClosed(conn), tenant);
    const h = this.host.hello;
    conn.send({
      type: "hello",
      protocol: HOST_PROTOCOL_VERSION,
      model: h.model,
      n_layer: h.n_layer,
      n_ctx: h.n_ctx,
      pool_bytes: h.pool_bytes,
      bytes_per_entry: this.host.geometry.bytesPerEntry,
      protocol_minor: HOST_PROTOCOL_SPEC.minor,
      ...(h.chat_template !== undefined ? { chat_template: h.chat_template } : {}),
    });
    ws.on("message", (data, isBinary) => {
      const bytes = Array.isArray(data) ? Buffer.concat(data) : Buffer.isBuffer(data) ? data : Buffer.from(data);
      if (!isBinary)
        return conn.send({
          type: "error",
          code: "bad_frame",
          message: "text messages are not accepted: send one msgpack map per binary message",
        });
      const decoded = decodeHostMessage(bytes, "to_host");
      if (!decoded.ok) {
        this.metrics.errors.inc({ code: decoded.code });
        return conn.send({
          type: "error",
          ...(decoded.id !== undefined ? { id: decoded.id } : {}),
          ...(decoded.session !== undefined ? { session: decoded.session } : {}),
          code: decoded.code,
          message: decoded.error,
        });
      }
      const msg = decoded.message;
      // A name that is no tenant's at all is the session host's 'invalid'; another tenant's is refused.
      if (msg.tenant !== tenant && TENANT_NAME.test(msg.tenant)) {
        this.metrics.errors.inc({ code: "unauthorized" });
        return conn.send({
          type: "error",
          id: msg.id,
          ...("session" in msg && msg.session !== undefined ? { session: msg.session } : {}),
          code: "unauthorized",
          message: `${msg.type}: this connection's edge token is for tenant '${tenant}', not '${msg.tenant.slice(0, 64)}'`,
        });
      }
      this.host.handle(conn, msg);
    });
    ws.on("close", () => {
      this.sockets.delete(ws);
      conn.stopFlushing();
      this.host.connectionClosed(conn);
    });
    ws.on("error", () => ws.terminate());
  }

  listen(): Promise<AddressInfo> {
    return new Promise((resolve, reject) => {
      this.http.once("error", reject);
      this.http.listen(this.config.port, this.config.listen, () => resolve(this.http.address() as AddressInfo));
    });
  }

  /** Stops accepting connections; open ones are closed by close(). */
  stopAccepting(): void {
    this.http.close();
  }

  async close(): Promise<void> {
    for (const ws of this.sockets) ws.close(1001, "host shutting down");
    const closed = new Promise<void>((r) => this.http.close(() => r()));
    setTimeout(() => {
      for (const ws of this.sockets) ws.terminate();
      this.http.closeAllConnections();
    }, 1000).unref();
    await closed;
  }
}
