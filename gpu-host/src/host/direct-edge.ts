// A minimal edge in this Node process, speaking host protocol 3.1 (docs/HOST.md) to real hosts:
// what the host tests use instead of the worker, and what "straight to the host" means in the
// TTFT benchmark (no worker, no Miniflare: one WebSocket server on 127.0.0.1 and the host's one
// socket to it). It is not the edge: no tenants' quotas, no routing beyond "the host named".
//
//   const edge = await DirectEdge.start({ tokens: [hostToken("h1")] });
//   // start a host: pkv host --connect edge.url --host-token hostToken("h1")
//   const host = await edge.waitHost("h1");        // welcomed, host_hello in host.hello
//   const ch = await edge.channel("tenant-a");      // channel_open on the host's socket
//   ch.onMessage = (m) => ...;                      // session frames from the host (hello first)
//   ch.send({ type: "open_session", id: 1, tenant: "tenant-a", session: "s" });
//   ch.close();                                     // channel_close: the host cancels its work
//
// Exports: DirectEdge (start, url, allow, waitHost, channel, kill, revoke, state, states, puts,
// controls, protocolErrors, faults, recordedOn, maxStoredBytes, holdPuts, answerPings, cached, cachePuts,
// cachedState, close), EdgeChannel (send, sendRaw, onMessage, closed, close,
// terminate), HostSocket (name, hello, heartbeats, draining, drained, closed), hostToken(name),
// and directEdgeAt(url) (the edge started at that URL in this process).
//
// The edge side of the contract as far as a host can see it: the upgrade at /hosts/connect needs
// `Authorization: Bearer <one of tokens>` (else HTTP 401 JSON invalid_host_token); host_hello is
// answered welcome {name, heartbeat_ms}; a second socket of the same name replaces the first
// (4001 "replaced"); every channel gets the hello synthesized from host_hello; states are kept in
// memory by tenant and session with etags ("e1", "e2", …) and the part/ack flow (state_put parts
// acked with state_ack, state_stored after the last; state_get answered by state_data parts of
// HOST_STATE_PART_BYTES, the next after the host's data_ack); if_etag that does not match is
// state_conflict; maxStoredBytes (per tenant) is stored_quota_exceeded; `faults` inject a
// control_error for puts, gets or heads; `recordedOn` is the edge's fence (a session the edge
// records on another host: that host's state_put is state_conflict, its state_get and state_head
// are state_info exists:false). State operations with `cache: true` (3.1) name a tenant's cached
// state (its key, 64 lowercase hex, else bad_frame) and are served from `cached`, apart from the
// sessions' states: no fence, no if_etag, no maxStoredBytes (`faults.cachePut`/`cacheGet` inject
// their refusals); every cached state is readable by every host.
import { createHash } from "node:crypto";
import { createServer, type IncomingMessage, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import type { Duplex } from "node:stream";

import {
  CONTROL_CHANNEL,
  type ControlFromHost,
  type ControlToHost,
  decodeControlMessage,
  decodeHostMessage,
  encodeChannelFrame,
  encodeHostMessage,
  type FromHostMessage,
  HOST_MAX_FRAME_BYTES,
  HOST_STATE_PART_BYTES,
  type HostMessage,
  prefixChannel,
  splitChannelFrame,
  type ToHostMessage,
} from "@pyramidkv/shared";
import { WebSocket, WebSocketServer } from "ws";

/** A host token of `name` (`pkvh.<name>.<64 hex>`), the same for the same name. */
export function hostToken(name: string): string {
  return `pkvh.${name}.${createHash("sha256").update(`direct-edge:${name}`).digest("hex")}`;
}

const NAME_OF_TOKEN = /^pkvh\.([a-z0-9][a-z0-9-]{0,62})\.[0-9a-f]{64}$/;

export interface StoredState {
  file: Uint8Array;
  etag: string;
  meta: Record<string, unknown>;
}

/** A control_error a test makes the edge answer, for one kind of request. */
export interface EdgeFault {
  code: string;
  message?: string;
}

export interface DirectEdgeOptions {
  /** host tokens accepted (default: hostToken("h1")) */
  tokens?: string[];
  /** the welcome's heartbeat_ms */
  heartbeatMs?: number;
}

/** One host's socket, as the edge sees it. */
export class HostSocket {
  hello?: HostMessage<"host_hello">;
  heartbeats: HostMessage<"heartbeat">[] = [];
  draining = false;
  drained = false;
  readonly channels = new Map<number, EdgeChannel>();
  /** resolves with the close code when the socket closed */
  readonly closed: Promise<number>;
  private closedResolve!: (code: number) => void;
  private nextCh = 1;

  constructor(
    readonly name: string,
    readonly token: string,
    readonly ws: WebSocket,
  ) {
    this.closed = new Promise((r) => (this.closedResolve = r));
  }

  /** @internal */
  onClosed(code: number): void {
    for (const c of [...this.channels.values()]) c.gone("host gone");
    this.closedResolve(code);
  }

  get open(): boolean {
    return this.ws.readyState === WebSocket.OPEN;
  }

  control(msg: ControlToHost): void {
    if (this.open) this.ws.send(encodeChannelFrame(CONTROL_CHANNEL, msg));
  }

  /** @internal */
  newChannel(tenant: string): EdgeChannel {
    const ch = new EdgeChannel(this, this.nextCh++, tenant);
    this.channels.set(ch.ch, ch);
    this.control({ type: "channel_open", ch: ch.ch, tenant });
    if (this.hello) {
      const h = this.hello;
      ch.deliver({
        type: "hello",
        protocol: h.protocol,
        protocol_minor: h.protocol_minor,
        model: h.model,
        n_layer: h.n_layer,
        n_ctx: h.n_ctx,
        pool_bytes: h.pool_bytes,
        bytes_per_entry: h.bytes_per_entry,
        ...(h.chat_template !== undefined ? { chat_template: h.chat_template } : {}),
        ...(h.cache_fingerprint !== undefined ? { cache_fingerprint: h.cache_fingerprint } : {}),
      });
    }
    return ch;
  }
}

/** One request's virtual connection to a host: a channel of its socket. */
export class EdgeChannel {
  /** frames from the host, in order (the synthesized hello first); set before sending */
  onMessage: (m: FromHostMessage) => void = () => {};
  /** frames delivered before onMessage was set */
  private readonly early: FromHostMessage[] = [];
  private hasListener = false;
  isClosed = false;
  /** resolves with why the channel closed (the host's channel_drop reason, "host gone", "closed") */
  readonly closed: Promise<string>;
  private closedResolve!: (why: string) => void;

  constructor(
    readonly host: HostSocket,
    readonly ch: number,
    readonly tenant: string,
  ) {
    this.closed = new Promise((r) => (this.closedResolve = r));
  }

  /** Sets the listener and hands it the frames that came before. */
  listen(f: (m: FromHostMessage) => void): void {
    this.onMessage = f;
    this.hasListener = true;
    for (const m of this.early.splice(0)) f(m);
  }

  /** @internal */
  deliver(m: FromHostMessage): void {
    if (!this.hasListener) this.early.push(m);
    else this.onMessage(m);
  }

  /** A session message to the host on this channel. */
  send(msg: ToHostMessage): void {
    this.sendRaw(encodeHostMessage(msg));
  }

  /** `payload` (any bytes: the host must answer what it cannot decode) on this channel. */
  sendRaw(payload: Uint8Array): void {
    if (this.isClosed || !this.host.open) return;
    this.host.ws.send(prefixChannel(this.ch, payload));
  }

  /** The request ended (or its client left): channel_close to the host. */
  close(reason = "closed"): void {
    if (this.isClosed) return;
    this.host.control({ type: "channel_close", ch: this.ch, reason });
    this.gone(reason);
  }

  /** The client vanished (no close of its own): the same channel_close to the host. */
  terminate(): void {
    this.close("client gone");
  }

  /** @internal */
  gone(why: string): void {
    if (this.isClosed) return;
    this.isClosed = true;
    this.host.channels.delete(this.ch);
    this.closedResolve(why);
  }
}

type Upload = {
  tenant: string;
  session: string;
  parts: number;
  bytes: number;
  meta: Record<string, unknown>;
  chunks: Uint8Array[];
  ifEtag?: string;
  /** a cached state's (cache: true) */
  cache?: boolean;
};

/** A cache key (host.json state_put.cache): 64 lowercase hex. */
const CACHE_KEY = /^[0-9a-f]{64}$/;

const registry = new Map<string, DirectEdge>();

/** The DirectEdge started at `url` in this process, if any. */
export function directEdgeAt(url: string): DirectEdge | undefined {
  return registry.get(url.replace(/\/+$/, ""));
}

export class DirectEdge {
  readonly hosts = new Map<string, HostSocket>();
  /** tenant + "\0" + session -> the stored state */
  readonly states = new Map<string, StoredState>();
  /** every finished state_put: its parts and bytes */
  readonly puts: { tenant: string; session: string; parts: number; bytes: number; etag: string }[] = [];
  /** every control message from hosts (data replaced by its length) */
  readonly controls: (Record<string, unknown> & { type: string; host: string })[] = [];
  /** control_error answers a test injects (absent: none); put/get/head: sessions' states,
   * cachePut/cacheGet: cached states' (cache: true) */
  faults: { put?: EdgeFault; get?: EdgeFault; head?: EdgeFault; cachePut?: EdgeFault; cacheGet?: EdgeFault } = {};
  /** tenant + "\0" + key -> a cached state (state ops with cache: true) */
  readonly cached = new Map<string, StoredState>();
  /** every finished state_put of a cached state */
  readonly cachePuts: { tenant: string; key: string; bytes: number; host: string }[] = [];
  /** tenant + "\0" + session -> the host name the edge records the session on (the fence: any
   * other host's state_put is state_conflict, its state_get/state_head exists:false) */
  readonly recordedOn = new Map<string, string>();
  /** per tenant: bytes of stored state past which a put is stored_quota_exceeded */
  maxStoredBytes = new Map<string, number>();
  /** false: the hosts' pings go unanswered (a flow a NAT dropped, as the host sees it) */
  answerPings = true;
  /** a put's parts are acknowledged only when this resolves (tests hold a checkpoint) */
  holdPuts?: Promise<void>;
  private readonly tokens: Set<string>;
  private readonly uploads = new Map<string, Upload>();
  private readonly waiters: { name?: string; resolve: (h: HostSocket) => void }[] = [];
  private etagSeq = 0;

  private constructor(
    private readonly http: Server,
    private readonly wss: WebSocketServer,
    readonly url: string,
    o: DirectEdgeOptions,
  ) {
    this.tokens = new Set(o.tokens ?? [hostToken("h1")]);
    this.heartbeatMs = o.heartbeatMs ?? 5000;
  }

  readonly heartbeatMs: number;

  static async start(o: DirectEdgeOptions = {}): Promise<DirectEdge> {
    const wss = new WebSocketServer({
      noServer: true,
      maxPayload: HOST_MAX_FRAME_BYTES + 4,
      perMessageDeflate: false,
      autoPong: false,
    });
    const http = createServer((_req, res) => {
      res.writeHead(404, { "content-type": "application/json" });
      res.end(JSON.stringify({ error: { code: "not_found", message: "the direct edge serves /hosts/connect only" } }));
    });
    await new Promise<void>((r) => http.listen(0, "127.0.0.1", () => r()));
    const url = `http://127.0.0.1:${(http.address() as AddressInfo).port}`;
    const edge = new DirectEdge(http, wss, url, o);
    http.on("upgrade", (req, socket, head) => edge.upgrade(req, socket, head));
    registry.set(url, edge);
    return edge;
  }

  /** Accepts `token` from now on. */
  allow(token: string): void {
    this.tokens.add(token);
  }

  private upgrade(req: IncomingMessage, socket: Duplex, head: Buffer) {
    const refuse = (status: number, code: string, message: string) => {
      const body = JSON.stringify({ error: { code, message } });
      socket.end(
        `HTTP/1.1 ${status} ${status === 401 ? "Unauthorized" : "Not Found"}\r\nConnection: close\r\n` +
          `Content-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`,
      );
      socket.destroy();
    };
    if ((req.url ?? "").split("?")[0] !== "/hosts/connect") return refuse(404, "not_found", "no such path");
    const token = /^Bearer (.+)$/.exec(req.headers.authorization ?? "")?.[1] ?? "";
    const name = NAME_OF_TOKEN.exec(token)?.[1];
    if (!name || !this.tokens.has(token)) return refuse(401, "invalid_host_token", "unknown or revoked host token");
    this.wss.handleUpgrade(req, socket, head, (ws) => this.accept(ws, name, token));
  }

  private accept(ws: WebSocket, name: string, token: string): void {
    const old = this.hosts.get(name);
    if (old) old.ws.close(4001, "replaced");
    const host = new HostSocket(name, token, ws);
    this.hosts.set(name, host);
    ws.on("ping", (data: Buffer) => {
      if (this.answerPings) ws.pong(data);
    });
    ws.on("message", (data: Buffer) =>
      this.receive(host, new Uint8Array(data.buffer, data.byteOffset, data.byteLength)),
    );
    ws.on("close", (code) => {
      if (this.hosts.get(name) === host) this.hosts.delete(name);
      host.onClosed(code);
    });
    ws.on("error", () => ws.terminate());
  }

  private receive(host: HostSocket, bytes: Uint8Array) {
    const split = splitChannelFrame(bytes);
    if (!split) return this.protocolError(host, `a message of ${bytes.length} bytes`);
    if (split.ch !== CONTROL_CHANNEL) {
      const channel = host.channels.get(split.ch);
      if (!channel) return; // closed meanwhile
      const d = decodeHostMessage(split.payload, "from_host");
      if (!d.ok) return this.protocolError(host, `a bad frame on channel ${split.ch}: ${d.error}`);
      return channel.deliver(d.message);
    }
    const d = decodeControlMessage(split.payload, "from_host");
    if (!d.ok) return this.protocolError(host, `a bad control frame: ${d.error}`);
    const m = d.message;
    this.controls.push({
      ...(m as Record<string, unknown>),
      ...("data" in m ? { data: m.data.length } : {}),
      type: m.type,
      host: host.name,
    });
    void this.onControl(host, m);
  }

  /** What a host sent that breaks the protocol: recorded (tests assert there is none), logged. */
  readonly protocolErrors: string[] = [];

  private protocolError(host: HostSocket, what: string): void {
    const line = `direct edge: host ${host.name}: ${what}`;
    this.protocolErrors.push(line);
    process.stderr.write(`${line}\n`);
  }

  private async onControl(host: HostSocket, m: ControlFromHost): Promise<void> {
    const key = (t: string, s: string) => `${t}\0${s}`;
    const error = (id: number, code: string, message: string) =>
      host.control({ type: "control_error", id, code, message });
    const fenced = (t: string, s: string) => {
      const on = this.recordedOn.get(key(t, s));
      return on !== undefined && on !== host.name;
    };
    switch (m.type) {
      case "host_hello":
        host.hello = m;
        host.control({ type: "welcome", name: host.name, heartbeat_ms: this.heartbeatMs });
        for (const w of this.waiters.splice(0)) {
          if (w.name === undefined || w.name === host.name) w.resolve(host);
          else this.waiters.push(w);
        }
        return;
      case "heartbeat":
        host.heartbeats.push(m);
        return;
      case "draining":
        host.draining = true;
        return;
      case "drained":
        host.drained = true;
        return;
      case "channel_drop":
        host.channels.get(m.ch)?.gone(m.reason ?? "dropped by the host");
        return;
      case "state_put": {
        const up = `${host.name}\0${m.id}`;
        if (m.part === 0 && m.cache === true) {
          if (!CACHE_KEY.test(m.session))
            return error(
              m.id,
              "bad_frame",
              `state_put ${m.id}: cache key '${m.session.slice(0, 64)}' is not 64 lowercase hex`,
            );
          if (this.faults.cachePut)
            return error(m.id, this.faults.cachePut.code, this.faults.cachePut.message ?? "fault");
          this.uploads.set(up, {
            tenant: m.tenant,
            session: m.session,
            parts: m.parts,
            bytes: m.bytes,
            meta: (m.meta as Record<string, unknown> | undefined) ?? {},
            chunks: [],
            cache: true,
          });
        } else if (m.part === 0) {
          if (this.faults.put) return error(m.id, this.faults.put.code, this.faults.put.message ?? "fault");
          if (fenced(m.tenant, m.session))
            return error(m.id, "state_conflict", `session '${m.session}' is recorded on another host`);
          const k = key(m.tenant, m.session);
          const have = this.states.get(k);
          if (m.if_etag !== undefined && have !== undefined && have.etag !== m.if_etag)
            return error(m.id, "state_conflict", `stored etag ${have.etag}, not ${m.if_etag}`);
          const max = this.maxStoredBytes.get(m.tenant);
          if (max !== undefined) {
            let used = 0;
            for (const [sk, st] of this.states) if (sk.startsWith(`${m.tenant}\0`) && sk !== k) used += st.file.length;
            if (used + m.bytes > max)
              return error(
                m.id,
                "stored_quota_exceeded",
                `tenant '${m.tenant}' would store ${used + m.bytes} bytes, its max is ${max}`,
              );
          }
          this.uploads.set(up, {
            tenant: m.tenant,
            session: m.session,
            parts: m.parts,
            bytes: m.bytes,
            meta: (m.meta as Record<string, unknown> | undefined) ?? {},
            chunks: [],
            ...(m.if_etag !== undefined ? { ifEtag: m.if_etag } : {}),
          });
        }
        const u = this.uploads.get(up);
        if (!u) return error(m.id, "bad_frame", `state_put ${m.id}: part ${m.part} without part 0`);
        if (m.part !== u.chunks.length)
          return error(m.id, "bad_frame", `state_put ${m.id}: part ${m.part} out of order`);
        if (m.data.length > HOST_STATE_PART_BYTES)
          return error(m.id, "bad_frame", `state_put ${m.id}: a part of ${m.data.length} bytes`);
        u.chunks.push(new Uint8Array(m.data));
        if (this.holdPuts) await this.holdPuts;
        host.control({ type: "state_ack", id: m.id, part: m.part });
        if (u.chunks.length < u.parts) return;
        this.uploads.delete(up);
        const file = Buffer.concat(u.chunks);
        if (file.length !== u.bytes)
          return error(m.id, "bad_frame", `state_put ${m.id}: ${file.length} bytes, not ${u.bytes}`);
        if (u.cache) {
          const etag = `e${++this.etagSeq}`;
          this.cached.set(key(u.tenant, u.session), { file: new Uint8Array(file), etag, meta: u.meta });
          this.cachePuts.push({ tenant: u.tenant, key: u.session, bytes: file.length, host: host.name });
          host.control({ type: "state_stored", id: m.id, etag, bytes: file.length });
          return;
        }
        const k = key(u.tenant, u.session);
        const have = this.states.get(k);
        if (u.ifEtag !== undefined && have !== undefined && have.etag !== u.ifEtag)
          return error(m.id, "state_conflict", `stored etag ${have.etag}, not ${u.ifEtag}`);
        const etag = `e${++this.etagSeq}`;
        this.states.set(k, { file: new Uint8Array(file), etag, meta: u.meta });
        this.puts.push({ tenant: u.tenant, session: u.session, parts: u.parts, bytes: file.length, etag });
        host.control({ type: "state_stored", id: m.id, etag, bytes: file.length });
        return;
      }
      case "state_get": {
        if (m.cache === true && !CACHE_KEY.test(m.session))
          return error(
            m.id,
            "bad_frame",
            `state_get ${m.id}: cache key '${m.session.slice(0, 64)}' is not 64 lowercase hex`,
          );
        const fault = m.cache === true ? this.faults.cacheGet : this.faults.get;
        if (fault) return error(m.id, fault.code, fault.message ?? "fault");
        const st =
          m.cache === true
            ? this.cached.get(key(m.tenant, m.session))
            : fenced(m.tenant, m.session)
              ? undefined
              : this.states.get(key(m.tenant, m.session));
        if (!st) return host.control({ type: "state_info", id: m.id, exists: false });
        const parts = Math.max(1, Math.ceil(st.file.length / HOST_STATE_PART_BYTES));
        const acked = this.ackWaiter(host, m.id);
        for (let part = 0; part < parts; part++) {
          host.control({
            type: "state_data",
            id: m.id,
            part,
            parts,
            data: st.file.subarray(part * HOST_STATE_PART_BYTES, (part + 1) * HOST_STATE_PART_BYTES),
            bytes: st.file.length,
            etag: st.etag,
            ...(part === 0 ? { meta: st.meta } : {}),
          });
          if (!(await acked(part))) return;
        }
        return;
      }
      case "state_head": {
        if (m.cache === true && !CACHE_KEY.test(m.session))
          return error(
            m.id,
            "bad_frame",
            `state_head ${m.id}: cache key '${m.session.slice(0, 64)}' is not 64 lowercase hex`,
          );
        if (m.cache !== true && this.faults.head)
          return error(m.id, this.faults.head.code, this.faults.head.message ?? "fault");
        const st =
          m.cache === true
            ? this.cached.get(key(m.tenant, m.session))
            : fenced(m.tenant, m.session)
              ? undefined
              : this.states.get(key(m.tenant, m.session));
        return host.control(
          st
            ? { type: "state_info", id: m.id, exists: true, etag: st.etag, bytes: st.file.length, meta: st.meta }
            : { type: "state_info", id: m.id, exists: false },
        );
      }
      case "state_delete":
        this.states.delete(key(m.tenant, m.session));
        return host.control({ type: "state_deleted", id: m.id });
      case "data_ack":
        this.acks.get(`${host.name}\0${m.id}`)?.(m.part);
        return;
    }
  }

  private readonly acks = new Map<string, (part: number) => void>();

  // Resolves true when the host acked `part` of state_data `id`, false when its socket closed.
  private ackWaiter(host: HostSocket, id: number): (part: number) => Promise<boolean> {
    const k = `${host.name}\0${id}`;
    const got = new Set<number>();
    let wake: (() => void) | undefined;
    this.acks.set(k, (part) => {
      got.add(part);
      wake?.();
    });
    void host.closed.then(() => wake?.());
    return async (part) => {
      while (!got.has(part)) {
        if (!host.open) {
          this.acks.delete(k);
          return false;
        }
        await new Promise<void>((r) => (wake = r));
      }
      return true;
    };
  }

  /** The host named `name` (any when absent) once it is welcomed; at once when it is. */
  waitHost(name?: string): Promise<HostSocket> {
    for (const h of this.hosts.values())
      if ((name === undefined || h.name === name) && h.hello && h.open) return Promise.resolve(h);
    return new Promise((resolve) => this.waiters.push({ name, resolve }));
  }

  /** A new channel for `tenant` on the host `name` (the first welcomed host when absent). */
  async channel(tenant: string, name?: string): Promise<EdgeChannel> {
    const host = await this.waitHost(name);
    return host.newChannel(tenant);
  }

  /** The host's socket vanishes (terminated: no close frame), as when the edge is redeployed. */
  kill(name?: string): void {
    for (const h of this.hosts.values()) if (name === undefined || h.name === name) h.ws.terminate();
  }

  /** The token is no longer accepted; its host's socket is closed 4003 "revoked". */
  revoke(token: string): void {
    this.tokens.delete(token);
    for (const h of this.hosts.values()) if (h.token === token) h.ws.close(4003, "revoked");
  }

  /** The tenant's cached state `key` (stored with cache: true), if any. */
  cachedState(tenant: string, key: string): StoredState | undefined {
    return this.cached.get(`${tenant}\0${key}`);
  }

  /** The state stored for the session, if any. */
  state(tenant: string, session: string): StoredState | undefined {
    return this.states.get(`${tenant}\0${session}`);
  }

  async close(): Promise<void> {
    registry.delete(this.url);
    for (const h of this.hosts.values()) h.ws.terminate();
    await new Promise<void>((r) => this.http.close(() => r()));
    this.http.closeAllConnections();
  }
}
