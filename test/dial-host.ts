// A fake GPU host for the end-to-end tests that dials in to the edge like `pkv host --connect`
// (host protocol 3.0: GET /hosts/connect with its host token; 4-byte channel + msgpack map per
// message): host_hello, heartbeats, and, when asked to, answers to the session messages of the
// channels the edge opens (what a healthy host answers; types in `silent` never answered).
import {
  CONTROL_CHANNEL,
  type ControlFromHost,
  decodeControlMessage,
  decodeHostMessage,
  encodeChannelFrame,
  type FromHostMessage,
  HOST_PROTOCOL_SPEC,
  HOST_PROTOCOL_VERSION,
  splitChannelFrame,
  type ToHostMessage,
} from "@pyramidkv/shared";
import { WebSocket } from "ws";

export interface DialHostOptions {
  model?: string;
  poolBytes?: number;
  freeBytes?: number;
  heartbeatMs?: number;
  /** answer the session messages of channels (else channels stay silent) */
  serve?: boolean;
  /** session message types never answered */
  silent?: string[];
}

export class DialHost {
  /** session message types received */
  readonly seen: string[] = [];
  /** channels the edge opened and not yet closed */
  readonly channels = new Set<number>();
  /** channel_close frames the edge sent */
  readonly closedChannels: number[] = [];
  welcome?: { name: string; heartbeat_ms: number };
  /** the socket's close code, once it closed */
  closeCode?: number;
  readonly closed: Promise<number>;
  private beat?: ReturnType<typeof setInterval>;

  private constructor(
    readonly ws: WebSocket,
    readonly o: Required<Omit<DialHostOptions, "silent">> & { silent: string[] },
  ) {
    this.closed = new Promise((r) =>
      ws.once("close", (code) => {
        this.closeCode = code;
        this.stopHeartbeats();
        r(code);
      }),
    );
    ws.on("message", (data: Buffer) => this.onMessage(new Uint8Array(data.buffer, data.byteOffset, data.byteLength)));
  }

  /** Connects and says host_hello; resolves once the edge answered welcome (rejects on a refused upgrade). */
  static async connect(edgeUrl: string, token: string, opts: DialHostOptions = {}): Promise<DialHost> {
    const o = {
      model: opts.model ?? "fake.gguf",
      poolBytes: opts.poolBytes ?? 1 << 30,
      freeBytes: opts.freeBytes ?? opts.poolBytes ?? 1 << 30,
      heartbeatMs: opts.heartbeatMs ?? 5000,
      serve: opts.serve ?? false,
      silent: opts.silent ?? [],
    };
    const ws = new WebSocket(`${edgeUrl.replace(/^http/, "ws")}/hosts/connect`, {
      headers: { authorization: `Bearer ${token}` },
    });
    const h = new DialHost(ws, o);
    await new Promise<void>((res, rej) => {
      ws.once("open", () => res());
      ws.once("unexpected-response", (_req, resp) => rej(new Error(`upgrade refused: HTTP ${resp.statusCode}`)));
      ws.once("error", rej);
    });
    h.control({
      type: "host_hello",
      protocol: HOST_PROTOCOL_VERSION,
      protocol_minor: HOST_PROTOCOL_SPEC.minor,
      model: o.model,
      n_layer: 2,
      n_ctx: 4096,
      pool_bytes: o.poolBytes,
      bytes_per_entry: 64,
      heartbeat_ms: o.heartbeatMs,
      host_version: "fake",
    });
    const end = Date.now() + 60_000;
    while (!h.welcome) {
      if (h.closeCode !== undefined) throw new Error(`closed (${h.closeCode}) before welcome`);
      if (Date.now() > end) throw new Error("no welcome within 60 s");
      await new Promise((r) => setTimeout(r, 20));
    }
    h.heartbeat();
    h.beat = setInterval(() => h.heartbeat(), o.heartbeatMs);
    return h;
  }

  heartbeat(): void {
    this.control({
      type: "heartbeat",
      pool_bytes: this.o.poolBytes,
      kv_used_bytes: this.o.poolBytes - this.o.freeBytes,
      free_bytes: this.o.freeBytes,
      sessions: 0,
      resident: 0,
      active: this.channels.size,
      queued: 0,
      draining: false,
    });
  }

  /** A host whose process hangs: the socket stays open, no heartbeat comes any more. */
  stopHeartbeats(): void {
    clearInterval(this.beat);
  }

  control(m: ControlFromHost): void {
    if (this.ws.readyState === WebSocket.OPEN) this.ws.send(encodeChannelFrame(CONTROL_CHANNEL, m));
  }

  close(): Promise<number> {
    this.stopHeartbeats();
    if (this.ws.readyState === WebSocket.OPEN || this.ws.readyState === WebSocket.CONNECTING) this.ws.close(1000);
    return this.closed;
  }

  private onMessage(bytes: Uint8Array): void {
    const f = splitChannelFrame(bytes);
    if (!f) return;
    if (f.ch === CONTROL_CHANNEL) {
      const d = decodeControlMessage(f.payload, "to_host");
      if (!d.ok) return;
      const m = d.message;
      if (m.type === "welcome") this.welcome = { name: m.name, heartbeat_ms: m.heartbeat_ms };
      else if (m.type === "channel_open") this.channels.add(m.ch);
      else if (m.type === "channel_close") {
        this.channels.delete(m.ch);
        this.closedChannels.push(m.ch);
      }
      return;
    }
    const d = decodeHostMessage(f.payload, "to_host");
    if (!d.ok) return;
    this.seen.push(d.message.type);
    if (this.o.serve && !this.o.silent.includes(d.message.type))
      answer(d.message, (r) => {
        if (this.ws.readyState === WebSocket.OPEN) this.ws.send(encodeChannelFrame(f.ch, r));
      });
  }
}

/** What a healthy host answers. */
function answer(m: ToHostMessage, reply: (f: FromHostMessage) => void) {
  switch (m.type) {
    case "set_tenant":
      return reply({
        type: "tenant_set",
        id: m.id,
        tenant: m.tenant,
        kv_quota_bytes: 0,
        max_sessions: 1000,
        policy: "refuse",
      });
    case "open_session":
      return reply({
        type: "opened",
        id: m.id,
        session: m.session,
        method: m.method ?? "pyramidkv",
        budget: m.budget ?? 128,
        reserved_bytes: 0,
      });
    case "append":
      if (m.more) return reply({ type: "buffered", id: m.id, session: m.session, buffered_bytes: 0 });
      return reply({ type: "appended", id: m.id, session: m.session, tokens_seen: 10, kv_bytes: 640 });
    case "generate":
      reply({ type: "token", id: m.id, session: m.session, tokens: [1], text: "Hi" });
      return reply({ type: "done", id: m.id, session: m.session, reason: "end", new_tokens: 1, text: "Hi" });
    case "stats":
      return reply({
        type: "stats_result",
        id: m.id,
        tenant: m.tenant,
        ...(m.session
          ? { session: m.session, tokens_seen: 10, kv_bytes: 640, full_kv_bytes: 6400 }
          : { kv_used_bytes: 640, kv_quota_bytes: 0, sessions: 1, offloaded: 0 }),
      });
    case "close":
      return reply({ type: "closed", id: m.id, session: m.session });
    case "cancel":
      return reply({ type: "cancelled", id: m.id, session: m.session });
  }
}
