// The host's one socket to the edge (host protocol 3.0, docs/HOST.md): the host dials
// `<edge>/hosts/connect` with its host token and keeps that socket for ever, reconnecting with
// jittered exponential backoff (delay = random(0, min(30 s, 0.5 s × 2^attempt)), attempts counted
// again from 0 once a connection got `welcome` and lived 30 s). An HTTP 401/403 on the upgrade
// (token unknown or revoked) is fatal: one line naming --host-token, never retried.
//
// Every WebSocket message is a 4-byte big-endian channel and one msgpack map. Channel 0 carries
// control messages: host_hello (first), heartbeat (every --heartbeat-seconds), the state
// transfers of the store's remote tier (RemoteStore below: state_put in parts of
// HOST_STATE_PART_BYTES, the next part only after the edge's state_ack; state_get answered by
// state_data parts the host acks with data_ack; state_head), draining/drained. Every other
// channel is one virtual connection the edge opened for one request (channel_open names its
// tenant), with exactly the per-connection semantics of 2.x: a frame naming another tenant gets
// 'unauthorized'; the channel's close cancels its work, ends its turns and closes the ephemeral
// sessions it opened (SessionHost.connectionClosed).
//
// Backpressure: one socket carries every channel, so its unsent bytes (ws.bufferedAmount) decide.
// Past highWater, a channel's tokens are coalesced per request (text concatenated, ids collected,
// logprobs one per id in order) and flushed when the socket drains, or once a coalesced frame
// reaches COALESCED_FLUSH_BYTES, so memory stays bounded by what the edge has not read yet and no
// frame outgrows the protocol's limit; a channel that writes past maxBuffered is dropped
// (channel_drop to the edge, its work cancelled), the socket and the other channels go on.
// State parts of every put together stay under STATE_BYTES_IN_FLIGHT unacknowledged, so that many
// sessions checkpointing at once never push the socket past a channel's bound.
//
// Connection epochs: each welcome starts a new epoch (`epoch`, 1 for the first); the sessions
// check their stored copy against the edge's once per epoch (sessions.ts).
import {
  CONTROL_CHANNEL,
  type ControlFromHost,
  type ControlToHost,
  decodeControlMessage,
  decodeHostMessage,
  encodeChannelFrame,
  type FromHostMessage,
  HOST_MAX_FRAME_BYTES,
  HOST_PROTOCOL_SPEC,
  HOST_PROTOCOL_VERSION,
  HOST_STATE_PART_BYTES,
  splitChannelFrame,
} from "@pyramidkv/shared";
import { WebSocket } from "ws";

import { TENANT_NAME } from "./config.js";
import { hostLog } from "./log.js";
import type { Sink, TokenLogprobs } from "./session.js";

/** A coalesced token frame this large (estimated) is sent at once, drained or not: frames stay far
 * below HOST_MAX_FRAME_BYTES (20 alternatives per token make ~1 KiB a token). */
export const COALESCED_FLUSH_BYTES = 1 << 20;

/** The backoff's first ceiling and its cap (FLEET: random(0, min(30 s, 0.5 s × 2^attempt))). */
export const BACKOFF_BASE_MS = 500;
export const BACKOFF_MAX_MS = 30_000;
/** A connection that got welcome and lived this long resets the backoff's attempts. */
export const BACKOFF_RESET_MS = 30_000;
/** An opened socket without welcome within this is given up (and dialled again). */
const WELCOME_TIMEOUT_MS = 30_000;

/** State bytes sent and not yet acknowledged, every put together (one part alone may be larger). */
export const STATE_BYTES_IN_FLIGHT = 2 * HOST_STATE_PART_BYTES;

// Messages up to this size are read (too large ones answered too_large on their channel); larger
// ones make ws close the socket (1009) without buffering them.
const MAX_READ_BYTES = 2 * HOST_MAX_FRAME_BYTES + 4;

/** What a remote (edge) state operation failed with: a control_error code, or `disconnected`
 * (no socket, or it closed meanwhile), or `timeout` (the edge did not answer in time). */
export class RemoteStateError extends Error {
  constructor(
    readonly code: string,
    message: string,
  ) {
    super(message);
  }
}

/** A state as the edge's store holds it: the PKVF state file (store.ts), its etag, its meta. */
export interface RemoteState {
  file: Uint8Array;
  etag: string;
  meta: Record<string, unknown>;
}

/** Which of the edge's objects a state operation names: `cache` (3.1), the tenant's cached state
 * whose key is the `session` argument (cache/<tenant>/<key>: immutable, no session fence); else
 * the session's own state (sessions/<tenant>/<session>). */
export interface RemoteStateOptions {
  cache?: boolean;
}

/** The store's remote tier: the edge's R2, through the host's socket. */
export interface RemoteStore {
  /** the connection epoch: 0 before the first welcome, then one more per welcome */
  readonly epoch: number;
  /** welcomed and open: state operations can reach the edge */
  readonly connected: boolean;
  /** Stores `file` (parts, each acknowledged); resolves with the new etag. `ifEtag`: stored only
   * if the edge's copy still has this etag (RemoteStateError state_conflict otherwise). */
  put(
    tenant: string,
    session: string,
    file: Uint8Array,
    meta: Record<string, string>,
    ifEtag?: string,
    o?: RemoteStateOptions,
  ): Promise<string>;
  /** The stored state, or undefined when the edge has none. */
  get(tenant: string, session: string, o?: RemoteStateOptions): Promise<RemoteState | undefined>;
  /** The stored state's etag, or undefined when the edge has none. */
  head(tenant: string, session: string, o?: RemoteStateOptions): Promise<{ etag: string; bytes?: number } | undefined>;
}

// A state operation's object in messages: the session's, or the cached state's.
const named = (session: string, o: RemoteStateOptions) =>
  `${o.cache ? "cached state" : "session"} '${session.slice(0, 64)}'`;

/** What the link needs of the sessions (SessionHost). */
export interface LinkedHost {
  handle(sink: Sink, msg: import("@pyramidkv/shared").ToHostMessage): void;
  connectionClosed(sink: Sink): void;
  /** host_hello's fields but heartbeat_ms and the protocol */
  helloFields(): {
    model: string;
    n_layer: number;
    n_ctx: number;
    pool_bytes: number;
    bytes_per_entry: number;
    chat_template?: string;
    /** 3.1: sessions.ts cacheFingerprint */
    cache_fingerprint?: string;
  };
  /** the heartbeat's fields but draining */
  load(): {
    pool_bytes: number;
    kv_used_bytes: number;
    free_bytes: number;
    sessions: number;
    resident: number;
    active: number;
    queued: number;
  };
}

export interface EdgeLinkOptions {
  /** the edge's base URL (http, https, ws or wss) */
  url: string;
  token: string;
  heartbeatMs: number;
  /** a channel's tokens are coalesced past this many unsent bytes on the socket */
  highWaterBytes: number;
  /** a channel that writes past this many unsent bytes is dropped */
  maxBufferedBytes: number;
  /** a control request unanswered this long fails with RemoteStateError timeout */
  timeoutMs: number;
  hostVersion?: string;
  /** the token was refused (HTTP 401/403): `line` says so; the link has stopped */
  fatal(line: string): void;
  /** each welcome (tests, the CLI's line) */
  welcomed?(name: string, epoch: number): void;
  /** backoff's first ceiling (tests may shorten it) */
  backoffBaseMs?: number;
}

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

/** What a channel needs of its socket (Connection; tests give a fake). */
export interface ChannelSocket {
  readonly ws: { readonly bufferedAmount: number; readonly readyState: number };
  readonly options: Pick<EdgeLinkOptions, "highWaterBytes" | "maxBufferedBytes">;
  sendRaw(bytes: Uint8Array): boolean;
  /** the channel wrote past maxBufferedBytes: channel_drop to the edge, its work cancelled */
  drop(channel: Channel, reason: string): void;
}

/** One virtual connection: a channel of the socket, for one tenant. */
export class Channel implements Sink {
  private readonly coalesced = new Map<number, Coalesced>();
  private flushTimer?: NodeJS.Timeout;
  closed = false;

  constructor(
    private readonly conn: ChannelSocket,
    readonly ch: number,
    /** the tenant channel_open named: the only one its frames may name */
    readonly tenant: string,
  ) {}

  get open(): boolean {
    return !this.closed && this.conn.ws.readyState === WebSocket.OPEN;
  }

  send(msg: FromHostMessage): void {
    if (!this.open) return;
    if ((msg.type === "done" || msg.type === "error") && msg.id !== undefined) this.flush(msg.id);
    this.write(msg);
  }

  sendToken(id: number, session: string, token: number, text: string, logprobs?: TokenLogprobs): void {
    if (!this.open) return;
    const pending = this.coalesced.get(id);
    if (pending || this.conn.ws.bufferedAmount > this.conn.options.highWaterBytes) {
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
    if (this.conn.ws.bufferedAmount > this.conn.options.maxBufferedBytes) {
      this.conn.drop(
        this,
        `the edge reads slower than the host writes: over ${this.conn.options.maxBufferedBytes} bytes unsent`,
      );
      return;
    }
    this.conn.sendRaw(encodeChannelFrame(this.ch, msg));
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
    if (this.conn.ws.bufferedAmount > this.conn.options.highWaterBytes) return;
    for (const id of [...this.coalesced.keys()]) this.flush(id);
    this.stopFlushing();
  }

  stopFlushing(): void {
    clearInterval(this.flushTimer);
    this.flushTimer = undefined;
  }
}

/** The control messages answering one request of the host (by id), in order. */
class Exchange {
  private readonly queue: ControlToHost[] = [];
  private waiter?: { resolve: (m: ControlToHost) => void; reject: (e: Error) => void; timer: NodeJS.Timeout };
  private failed?: Error;

  push(m: ControlToHost): void {
    const w = this.waiter;
    if (w) {
      this.waiter = undefined;
      clearTimeout(w.timer);
      w.resolve(m);
    } else this.queue.push(m);
  }

  fail(e: Error): void {
    this.failed ??= e;
    const w = this.waiter;
    if (w) {
      this.waiter = undefined;
      clearTimeout(w.timer);
      w.reject(e);
    }
  }

  next(timeoutMs: number, what: string): Promise<ControlToHost> {
    const m = this.queue.shift();
    if (m) return Promise.resolve(m);
    if (this.failed) return Promise.reject(this.failed);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiter = undefined;
        reject(new RemoteStateError("timeout", `${what}: the edge did not answer within ${timeoutMs} ms`));
      }, timeoutMs);
      this.waiter = { resolve, reject, timer };
    });
  }
}

/** One socket to the edge, from its dial to its close. */
class Connection implements ChannelSocket {
  readonly channels = new Map<number, Channel>();
  readonly exchanges = new Map<number, Exchange>();
  welcomedAt?: number;
  name?: string;
  private heartbeat?: NodeJS.Timeout;
  private pongSeen = false;
  /** when the unanswered ping was sent (nothing queued before it) */
  private pingSince?: number;

  constructor(
    readonly ws: WebSocket,
    private readonly link: EdgeLink,
    readonly options: EdgeLinkOptions,
  ) {}

  get open(): boolean {
    return this.ws.readyState === WebSocket.OPEN;
  }

  sendRaw(bytes: Uint8Array): boolean {
    if (this.ws.readyState !== WebSocket.OPEN) return false;
    this.ws.send(bytes, { binary: true });
    return true;
  }

  control(msg: ControlFromHost): boolean {
    return this.sendRaw(encodeChannelFrame(CONTROL_CHANNEL, msg));
  }

  startHeartbeats(): void {
    const beat = () => {
      this.control({ type: "heartbeat", ...this.link.host.load(), draining: this.link.draining });
      // A peer that has answered a ping once and stops answering is gone (a NAT dropped the flow).
      // Pings are timed from when nothing was queued before them (a state part on a slow uplink
      // delays the ping, not the peer).
      const now = Date.now();
      const waited = this.pingSince === undefined ? 0 : now - this.pingSince;
      if (this.pongSeen && waited > 3 * this.options.heartbeatMs + 10_000) {
        hostLog(`the edge answered no ping for ${waited} ms: dialling again`);
        this.ws.terminate();
        return;
      }
      if (this.pingSince === undefined && this.ws.bufferedAmount === 0) {
        this.pingSince = now;
        this.ws.ping();
      }
    };
    this.ws.on("pong", () => {
      this.pongSeen = true;
      this.pingSince = undefined;
    });
    beat();
    this.heartbeat = setInterval(beat, this.options.heartbeatMs);
  }

  drop(channel: Channel, reason: string): void {
    if (channel.closed) return;
    hostLog(`channel ${channel.ch} (tenant '${channel.tenant}') dropped: ${reason}`);
    this.control({ type: "channel_drop", ch: channel.ch, reason: reason.slice(0, 200) });
    this.closeChannel(channel);
  }

  closeChannel(channel: Channel): void {
    if (channel.closed) return;
    channel.closed = true;
    channel.stopFlushing();
    if (this.channels.get(channel.ch) === channel) this.channels.delete(channel.ch);
    this.link.host.connectionClosed(channel);
  }

  /** The socket closed: every channel with it, every pending control request fails. */
  closed(): void {
    clearInterval(this.heartbeat);
    for (const c of [...this.channels.values()]) this.closeChannel(c);
    const gone = new RemoteStateError("disconnected", "the socket to the edge closed");
    for (const x of this.exchanges.values()) x.fail(gone);
    this.exchanges.clear();
  }
}

export class EdgeLink implements RemoteStore {
  private conn?: Connection;
  private attempt = 0;
  // Control ids differ from an earlier run's (an edge may still hold that run's unfinished put).
  private nextId = 1 + Math.floor(Math.random() * 2 ** 30);
  private stopped = false;
  private retryTimer?: NodeJS.Timeout;
  private stoppedWaiters: (() => void)[] = [];
  private welcomeWaiters: (() => void)[] = [];
  private stateBytesInFlight = 0;
  private slotWaiters: (() => void)[] = [];
  epoch = 0;
  draining = false;
  /** the name the edge knows this host by (its welcome's) */
  name?: string;
  /** sockets opened since start (tests) */
  dials = 0;
  host!: LinkedHost;

  constructor(readonly options: EdgeLinkOptions) {}

  get connected(): boolean {
    return this.conn?.welcomedAt !== undefined && this.conn.ws.readyState === WebSocket.OPEN;
  }

  /** Open channels of the current socket. */
  get channelCount(): number {
    return this.conn?.channels.size ?? 0;
  }

  /** Starts dialling (and redialling) the edge for `host`. */
  start(host: LinkedHost): void {
    this.host = host;
    this.dial();
  }

  /** Resolves at the next welcome (at once when connected). */
  waitConnected(): Promise<void> {
    if (this.connected) return Promise.resolve();
    return new Promise((r) => this.welcomeWaiters.push(r));
  }

  private wsUrl(): string {
    const u = new URL(this.options.url);
    u.protocol = u.protocol === "https:" || u.protocol === "wss:" ? "wss:" : "ws:";
    u.pathname = `${u.pathname.replace(/\/+$/, "")}/hosts/connect`;
    return u.toString();
  }

  private dial(): void {
    if (this.stopped) return;
    this.dials++;
    const ws = new WebSocket(this.wsUrl(), {
      headers: { authorization: `Bearer ${this.options.token}` },
      maxPayload: MAX_READ_BYTES,
      perMessageDeflate: false,
      handshakeTimeout: WELCOME_TIMEOUT_MS,
    });
    const conn = new Connection(ws, this, this.options);
    this.conn = conn;
    let fatal: string | undefined;
    let why = "";
    const welcomeTimer = setTimeout(() => {
      if (conn.welcomedAt === undefined) {
        why = `no welcome within ${WELCOME_TIMEOUT_MS} ms`;
        ws.terminate();
      }
    }, WELCOME_TIMEOUT_MS);
    ws.on("unexpected-response", (req, res) => {
      const status = res.statusCode ?? 0;
      let body = "";
      res.setEncoding("utf8");
      res.on("data", (d: string) => {
        if (body.length < 500) body += d;
      });
      res.on("end", () => {
        if (status === 401 || status === 403)
          fatal =
            `pkv host: the edge at ${this.options.url} refused this host's token (HTTP ${status}${body ? `: ${body.trim().slice(0, 300)}` : ""}): ` +
            "check --host-token (or PKV_HOST_TOKEN); a revoked token needs a new one (pkv admin host create NAME)";
        else why = `HTTP ${status} on the upgrade${body ? `: ${body.trim().slice(0, 200)}` : ""}`;
        req.destroy();
        ws.terminate();
      });
    });
    ws.on("open", () => {
      const h = this.host.helloFields();
      conn.control({
        type: "host_hello",
        protocol: HOST_PROTOCOL_VERSION,
        protocol_minor: HOST_PROTOCOL_SPEC.minor,
        ...h,
        heartbeat_ms: this.options.heartbeatMs,
        ...(this.options.hostVersion !== undefined ? { host_version: this.options.hostVersion } : {}),
      });
    });
    ws.on("message", (data, isBinary) => {
      const bytes = Array.isArray(data) ? Buffer.concat(data) : Buffer.isBuffer(data) ? data : Buffer.from(data);
      this.receive(conn, new Uint8Array(bytes.buffer, bytes.byteOffset, bytes.byteLength), isBinary);
    });
    ws.on("error", (e) => {
      why ||= e.message;
    });
    ws.on("close", (code, reason) => {
      clearTimeout(welcomeTimer);
      const lived = conn.welcomedAt === undefined ? 0 : Date.now() - conn.welcomedAt;
      conn.closed();
      if (this.conn === conn) this.conn = undefined;
      if (fatal !== undefined) {
        this.stop();
        this.options.fatal(fatal);
        return;
      }
      if (this.stopped) return this.finishStop();
      if (lived >= BACKOFF_RESET_MS) this.attempt = 0;
      const ceiling = Math.min(BACKOFF_MAX_MS, (this.options.backoffBaseMs ?? BACKOFF_BASE_MS) * 2 ** this.attempt);
      this.attempt = Math.min(this.attempt + 1, 30);
      const delay = Math.random() * ceiling;
      const r = reason.toString().slice(0, 200);
      hostLog(
        `the socket to the edge ${conn.welcomedAt === undefined ? "could not be opened" : "closed"} (${why || `code ${code}${r ? ` ${r}` : ""}`}); dialling again in ${Math.round(delay)} ms (backoff up to ${ceiling} ms)`,
      );
      this.retryTimer = setTimeout(() => this.dial(), delay);
    });
  }

  private receive(conn: Connection, bytes: Uint8Array, isBinary: boolean) {
    if (!isBinary) return hostLog("a text message from the edge ignored (every message is binary: channel + msgpack)");
    const split = splitChannelFrame(bytes);
    if (!split) return hostLog(`a message of ${bytes.length} bytes from the edge ignored: shorter than its channel`);
    if (split.ch === CONTROL_CHANNEL) {
      const d = decodeControlMessage(split.payload, "to_host");
      if (!d.ok) return hostLog(`a control message from the edge ignored: ${d.code}: ${d.error}`);
      return this.onControl(conn, d.message);
    }
    const channel = conn.channels.get(split.ch);
    if (!channel) return; // closed meanwhile (or never opened): nobody to answer
    const decoded = decodeHostMessage(split.payload, "to_host");
    if (!decoded.ok) {
      return channel.send({
        type: "error",
        ...(decoded.id !== undefined ? { id: decoded.id } : {}),
        ...(decoded.session !== undefined ? { session: decoded.session } : {}),
        code: decoded.code,
        message: decoded.error,
      });
    }
    const msg = decoded.message;
    // A name that is no tenant's at all is the session host's 'invalid'; another tenant's is refused.
    if (msg.tenant !== channel.tenant && TENANT_NAME.test(msg.tenant)) {
      return channel.send({
        type: "error",
        id: msg.id,
        ...("session" in msg && msg.session !== undefined ? { session: msg.session } : {}),
        code: "unauthorized",
        message: `${msg.type}: this channel is for tenant '${channel.tenant}', not '${msg.tenant.slice(0, 64)}'`,
      });
    }
    this.host.handle(channel, msg);
  }

  private onControl(conn: Connection, m: ControlToHost): void {
    switch (m.type) {
      case "welcome": {
        if (conn.welcomedAt !== undefined) return;
        conn.welcomedAt = Date.now();
        conn.name = m.name;
        this.name = m.name;
        this.epoch++;
        conn.startHeartbeats();
        if (this.draining) conn.control({ type: "draining" });
        this.options.welcomed?.(m.name, this.epoch);
        for (const w of this.welcomeWaiters.splice(0)) w();
        return;
      }
      case "channel_open": {
        const old = conn.channels.get(m.ch);
        if (old) conn.closeChannel(old);
        if (this.draining || this.stopped) {
          conn.control({ type: "channel_drop", ch: m.ch, reason: "draining" });
          return;
        }
        if (!TENANT_NAME.test(m.tenant)) {
          conn.control({ type: "channel_drop", ch: m.ch, reason: `tenant must match ${TENANT_NAME.source}` });
          return;
        }
        conn.channels.set(m.ch, new Channel(conn, m.ch, m.tenant));
        return;
      }
      case "channel_close": {
        const c = conn.channels.get(m.ch);
        if (c) conn.closeChannel(c);
        return;
      }
      case "state_ack":
      case "state_stored":
      case "state_data":
      case "state_info":
      case "state_deleted":
      case "control_error": {
        const id = m.id;
        const x = id === undefined ? undefined : conn.exchanges.get(id);
        if (x) x.push(m);
        else if (m.type === "control_error") hostLog(`the edge: ${m.code}: ${m.message.slice(0, 300)}`);
        return;
      }
    }
  }

  /** Waits until `bytes` more state bytes may be on their way to the edge (at most
   * STATE_BYTES_IN_FLIGHT unacknowledged, or one part alone), so that checkpoints of many
   * sessions at once never fill the socket past a channel's maxBufferedBytes. */
  private async sendSlot(bytes: number): Promise<() => void> {
    while (this.stateBytesInFlight > 0 && this.stateBytesInFlight + bytes > STATE_BYTES_IN_FLIGHT)
      await new Promise<void>((r) => this.slotWaiters.push(r));
    this.stateBytesInFlight += bytes;
    let done = false;
    return () => {
      if (done) return;
      done = true;
      this.stateBytesInFlight -= bytes;
      for (const w of this.slotWaiters.splice(0)) w();
    };
  }

  /** A control request: its id, and the exchange its answers arrive in. */
  private begin(what: string): { conn: Connection; id: number; x: Exchange; end: () => void } {
    const conn = this.conn;
    if (!conn || !this.connected)
      throw new RemoteStateError(
        "disconnected",
        `${what}: this host is not connected to the edge (${this.options.url}) at the moment`,
      );
    const id = this.nextId++;
    const x = new Exchange();
    conn.exchanges.set(id, x);
    return { conn, id, x, end: () => conn.exchanges.delete(id) };
  }

  private async answer(x: Exchange, what: string): Promise<ControlToHost> {
    const m = await x.next(this.options.timeoutMs, what);
    if (m.type === "control_error") throw new RemoteStateError(m.code, `${what}: the edge: ${m.code}: ${m.message}`);
    return m;
  }

  async put(
    tenant: string,
    session: string,
    file: Uint8Array,
    meta: Record<string, string>,
    ifEtag?: string,
    o: RemoteStateOptions = {},
  ): Promise<string> {
    const what = `state_put of ${named(session, o)} (tenant '${tenant}', ${file.length} bytes)`;
    const { conn, id, x, end } = this.begin(what);
    try {
      const parts = Math.max(1, Math.ceil(file.length / HOST_STATE_PART_BYTES));
      for (let part = 0; part < parts; part++) {
        const data = file.subarray(part * HOST_STATE_PART_BYTES, (part + 1) * HOST_STATE_PART_BYTES);
        const release = await this.sendSlot(data.length);
        try {
          if (!conn.open) throw new RemoteStateError("disconnected", `${what}: the socket to the edge closed`);
          conn.control({
            type: "state_put",
            id,
            tenant,
            session,
            part,
            parts,
            data,
            bytes: file.length,
            ...(part === 0 ? { meta } : {}),
            ...(ifEtag !== undefined ? { if_etag: ifEtag } : {}),
            ...(o.cache ? { cache: true } : {}),
          });
          for (;;) {
            const m = await this.answer(x, what);
            if (m.type === "state_stored") {
              if (part !== parts - 1)
                throw new RemoteStateError(
                  "internal",
                  `${what}: the edge answered state_stored after part ${part} of ${parts}`,
                );
              return m.etag;
            }
            if (m.type === "state_ack" && m.part === part) {
              if (part < parts - 1) break; // the next part
              continue; // the last part: state_stored follows
            }
            throw new RemoteStateError("internal", `${what}: unexpected ${m.type} from the edge`);
          }
        } finally {
          release();
        }
      }
      throw new RemoteStateError("internal", `${what}: no state_stored`);
    } finally {
      end();
    }
  }

  async get(tenant: string, session: string, o: RemoteStateOptions = {}): Promise<RemoteState | undefined> {
    const what = `state_get of ${named(session, o)} (tenant '${tenant}')`;
    const { conn, id, x, end } = this.begin(what);
    try {
      conn.control({ type: "state_get", id, tenant, session, ...(o.cache ? { cache: true } : {}) });
      const pieces: Uint8Array[] = [];
      let etag = "";
      let meta: Record<string, unknown> = {};
      let total = 0;
      for (let part = 0; ; part++) {
        const m = await this.answer(x, what);
        if (m.type === "state_info" && part === 0) {
          if (!m.exists) return undefined;
          throw new RemoteStateError("internal", `${what}: state_info exists=true instead of state_data`);
        }
        if (m.type !== "state_data") throw new RemoteStateError("internal", `${what}: unexpected ${m.type}`);
        if (m.part !== part) throw new RemoteStateError("internal", `${what}: part ${m.part} where ${part} was due`);
        if (part === 0) {
          etag = m.etag;
          meta = (m.meta as Record<string, unknown> | undefined) ?? {};
          total = m.bytes;
        }
        pieces.push(m.data);
        conn.control({ type: "data_ack", id, part });
        if (part >= m.parts - 1) break;
      }
      const file = pieces.length === 1 ? pieces[0]! : Buffer.concat(pieces);
      if (file.length !== total)
        throw new RemoteStateError("internal", `${what}: ${file.length} bytes received, the edge announced ${total}`);
      return { file, etag, meta };
    } finally {
      end();
    }
  }

  async head(
    tenant: string,
    session: string,
    o: RemoteStateOptions = {},
  ): Promise<{ etag: string; bytes?: number } | undefined> {
    const what = `state_head of ${named(session, o)} (tenant '${tenant}')`;
    const { conn, id, x, end } = this.begin(what);
    try {
      conn.control({ type: "state_head", id, tenant, session, ...(o.cache ? { cache: true } : {}) });
      const m = await this.answer(x, what);
      if (m.type !== "state_info") throw new RemoteStateError("internal", `${what}: unexpected ${m.type}`);
      if (!m.exists) return undefined;
      if (m.etag === undefined) throw new RemoteStateError("internal", `${what}: state_info without an etag`);
      return { etag: m.etag, ...(m.bytes !== undefined ? { bytes: m.bytes } : {}) };
    } finally {
      end();
    }
  }

  /** Out of routing at once (the edge hears `draining`); channel_open is answered channel_drop. */
  drain(): void {
    if (this.draining) return;
    this.draining = true;
    this.conn?.control({ type: "draining" });
  }

  /** `drained`, then the socket closes with 1000 and the link stops. */
  async finish(): Promise<void> {
    const conn = this.conn;
    if (conn && this.connected) conn.control({ type: "drained" });
    await this.close(1000, "drained");
  }

  /** Stops redialling and closes the socket (`code`, `reason`); resolves once closed. */
  close(code = 1000, reason = "host stopped"): Promise<void> {
    this.stop();
    const conn = this.conn;
    if (!conn) return Promise.resolve();
    const done = new Promise<void>((r) => this.stoppedWaiters.push(r));
    if (conn.ws.readyState === WebSocket.OPEN) conn.ws.close(code, reason);
    else conn.ws.terminate();
    setTimeout(() => conn.ws.terminate(), 2000).unref();
    return done;
  }

  private stop(): void {
    this.stopped = true;
    clearTimeout(this.retryTimer);
  }

  private finishStop(): void {
    for (const w of this.stoppedWaiters.splice(0)) w();
  }
}
