// A scripted GPU host for tests in the Workers runtime: it dials in like a real host (GET
// /hosts/connect with Upgrade and its token, made through the admin API), says host_hello, and
// speaks host protocol 3 on its one socket (shared codec): channel 0 control, every other channel
// one request of the edge, recorded frame by frame (`connections`, one list per channel). By
// default it answers every session message like a healthy host; `on` overrides the answer to a
// type, `onControl` adds answers to control messages (R2 replies, welcome...). A host of protocol
// minor 1 (`hello.protocol_minor`) also keeps each session's token count and answers the prompt
// cache's messages (snapshot, open_session.from_cache) from a StateCache that the fake hosts of a
// test share (as hosts share the edge's store): a copy snapshotted on one opens on another.
import {
  CONTROL_CHANNEL,
  type ControlFromHost,
  type ControlToHost,
  decodeControlMessage,
  decodeHostMessage,
  encodeChannelFrame,
  type FromHostMessage,
  HOST_PROTOCOL_VERSION,
  type HostMessage,
  splitChannelFrame,
  type ToHostMessage,
} from "@pyramidkv/shared";
import { env, exports } from "cloudflare:workers";

import { ADMIN, eventually } from "./client.js";

type Reply = (f: FromHostMessage) => void;
/** `ws.close` closes the host's one socket: the host goes away. */
export type Handler = (m: ToHostMessage, reply: Reply, ws: { close(code?: number, reason?: string): void }) => void;

const tokens = new Map<string, string>();

/** A host token for `name` (made once per test file; an older one of the same name revoked first). */
export async function hostToken(name: string): Promise<string> {
  const known = tokens.get(name);
  if (known) return known;
  let r = await exports.default.fetch(
    new Request("http://edge/admin/hosts", { method: "POST", headers: ADMIN, body: JSON.stringify({ name }) }),
  );
  if (r.status === 409) {
    await exports.default.fetch(new Request(`http://edge/admin/hosts/${name}`, { method: "DELETE", headers: ADMIN }));
    r = await exports.default.fetch(
      new Request("http://edge/admin/hosts", { method: "POST", headers: ADMIN, body: JSON.stringify({ name }) }),
    );
  }
  if (r.status !== 201) throw new Error(`POST /admin/hosts ${name}: ${r.status} ${await r.text()}`);
  const token = ((await r.json()) as { token: string }).token;
  tokens.set(name, token);
  return token;
}

export const routingTable = () => env.ROUTER.get(env.ROUTER.idFromName("hosts"));

/** Opens a host socket with `authorization`; the response (101 with its socket, or the refusal). */
export function dialIn(authorization?: string): Promise<Response> {
  return exports.default.fetch(
    new Request("http://edge/hosts/connect", {
      headers: { Upgrade: "websocket", ...(authorization !== undefined ? { Authorization: authorization } : {}) },
    }),
  );
}

export type Load = Omit<HostMessage<"heartbeat">, "type">;

/** A cached state as the fake hosts keep it (by `<tenant>/<key>`, as the edge's store does). */
export interface CachedState {
  tokens: number;
  bytes: number;
  model: string;
  method: string;
  budget: number;
}
export type StateCache = Map<string, CachedState>;

/** The bytes of every fake snapshot. */
export const FAKE_SNAPSHOT_BYTES = 4096;

export class FakeHost {
  /** session frames received, one list per channel */
  readonly connections: ToHostMessage[][] = [];
  /** control frames received */
  readonly control: ControlToHost[] = [];
  /** channels the edge closed (channel_close) */
  closedByEdge = 0;
  readonly on: Partial<Record<ToHostMessage["type"], Handler>> = {};
  /** control answers: state_data parts are acked by default (data_ack) */
  onControl?: (m: ControlToHost) => void;
  /** what the next heartbeat reports */
  load: Load = {
    pool_bytes: 1 << 30,
    kv_used_bytes: 0,
    free_bytes: 1 << 30,
    sessions: 0,
    resident: 0,
    active: 0,
    queued: 0,
    draining: false,
  };
  /** the host socket's close code, once closed */
  closeCode?: number;
  ws?: WebSocket;
  private readonly channels = new Map<number, ToHostMessage[]>();
  private uncounted = new Set<number>();

  constructor(
    readonly name: string,
    readonly model = "fake.gguf",
    readonly hello: {
      n_ctx?: number;
      chat_template?: string;
      heartbeat_ms?: number;
      pool_bytes?: number;
      /** heartbeat every this many ms (default: only when told, `heartbeat()`) */
      beat_every_ms?: number;
      /** 1: the prompt cache's messages (host protocol 3.1); default 0 */
      protocol_minor?: number;
      /** host_hello.cache_fingerprint (3.1) */
      cache_fingerprint?: string;
    } = {},
    /** the cached states this host reads and snapshots into (share one map between the hosts of a test) */
    readonly states: StateCache = new Map(),
  ) {}

  /** tokens of each open session (protocol minor 1) */
  private readonly tokens = new Map<string, { tokens: number; method: string; budget: number }>();

  /** The default answers (an `on` handler may call it): a healthy host's (`answer`), with the prompt cache's at protocol minor 1. */
  readonly answer: Handler = (m, reply, ws) => {
    if ((this.hello.protocol_minor ?? 0) < 1) return answer(m, reply, ws);
    const at = (session: string) => `${m.tenant}/${session}`;
    switch (m.type) {
      case "open_session": {
        if (m.from_cache !== undefined) {
          const st = this.states.get(at(m.from_cache));
          if (!st || st.model !== this.model)
            return reply({
              type: "error",
              id: m.id,
              session: m.session,
              code: "cache_miss",
              message: `no cached state ${m.from_cache} of ${this.model}`,
              reason: st ? "incompatible" : "missing",
            });
          this.tokens.set(at(m.session), { tokens: st.tokens, method: st.method, budget: st.budget });
          return reply({
            type: "opened",
            id: m.id,
            session: m.session,
            method: st.method,
            budget: st.budget,
            reserved_bytes: 0,
            tokens_seen: st.tokens,
            cached_bytes: st.bytes,
          });
        }
        this.tokens.set(at(m.session), { tokens: 0, method: m.method ?? "pyramidkv", budget: m.budget ?? 128 });
        return answer(m, reply, ws);
      }
      case "append": {
        const s = this.tokens.get(at(m.session));
        if (m.more || !s) return answer(m, reply, ws);
        s.tokens += 10;
        return reply({ type: "appended", id: m.id, session: m.session, tokens_seen: s.tokens, kv_bytes: 640 });
      }
      case "generate": {
        const s = this.tokens.get(at(m.session));
        if (s) s.tokens += 1;
        return answer(m, reply, ws);
      }
      case "snapshot": {
        const s = this.tokens.get(at(m.session));
        if (!s)
          return reply({ type: "error", id: m.id, session: m.session, code: "unknown_session", message: "no session" });
        if (m.max_bytes !== undefined && FAKE_SNAPSHOT_BYTES > m.max_bytes)
          return reply({ type: "error", id: m.id, session: m.session, code: "too_large", message: "over max_bytes" });
        this.states.set(at(m.key), { ...s, bytes: FAKE_SNAPSHOT_BYTES, model: this.model });
        return reply({
          type: "snapshotted",
          id: m.id,
          session: m.session,
          key: m.key,
          bytes: FAKE_SNAPSHOT_BYTES,
          tokens_seen: s.tokens,
          kv_bytes: 640,
        });
      }
      case "close":
        this.tokens.delete(at(m.session));
        return answer(m, reply, ws);
      default:
        return answer(m, reply, ws);
    }
  };

  private beating?: ReturnType<typeof setInterval>;

  /** Stops the automatic heartbeats (a host that hangs). */
  stopBeating(): void {
    if (this.beating !== undefined) clearInterval(this.beating);
    this.beating = undefined;
  }

  get frames(): ToHostMessage[] {
    return this.connections.flat();
  }

  types(): string[] {
    return this.frames.map((f) => f.type);
  }

  /** Waits until every channel the edge opened is closed (closes travel after responses). */
  async settle(): Promise<void> {
    await eventually(() => this.channels.size === 0, `${this.name}: the edge to close its channels`, 10_000);
  }

  /** Forgets what was received (the socket stays); channels still open are not counted when they close. */
  reset(): void {
    this.uncounted = new Set(this.channels.keys());
    this.connections.length = 0;
    this.control.length = 0;
    this.closedByEdge = 0;
    for (const k of Object.keys(this.on)) delete this.on[k as keyof typeof this.on];
    this.onControl = undefined;
  }

  get connected(): boolean {
    return this.ws !== undefined && this.closeCode === undefined;
  }

  /** Dials in, says host_hello, waits for welcome and for the routing table to hold it live. */
  async connect(): Promise<void> {
    const r = await dialIn(`Bearer ${await hostToken(this.name)}`);
    const ws = r.webSocket;
    if (!ws) throw new Error(`${this.name}: /hosts/connect answered ${r.status} ${await r.text()}`);
    ws.accept();
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    this.closeCode = undefined;
    let welcomed = false;
    ws.addEventListener("message", (ev) => {
      const frame = splitChannelFrame(new Uint8Array(ev.data as ArrayBuffer));
      if (!frame) throw new Error("the edge sent a message without a channel");
      if (frame.ch === CONTROL_CHANNEL) {
        const d = decodeControlMessage(frame.payload, "to_host");
        if (!d.ok) throw new Error(`the edge sent an invalid control frame: ${d.error}`);
        const m = d.message;
        this.control.push(m);
        if (m.type === "welcome") welcomed = true;
        if (m.type === "channel_open") {
          const frames: ToHostMessage[] = [];
          this.channels.set(m.ch, frames);
          this.connections.push(frames);
        }
        if (m.type === "channel_close") {
          this.channels.delete(m.ch);
          if (!this.uncounted.delete(m.ch)) this.closedByEdge++;
        }
        if (m.type === "state_data" && m.part + 1 < m.parts && !this.onControl)
          this.send({ type: "data_ack", id: m.id, part: m.part });
        this.onControl?.(m);
        return;
      }
      const d = decodeHostMessage(frame.payload, "to_host");
      if (!d.ok) throw new Error(`the edge sent an invalid frame: ${d.error}`);
      const frames = this.channels.get(frame.ch);
      if (!frames) throw new Error(`a frame on channel ${frame.ch}, never opened or closed`);
      frames.push(d.message);
      const reply: Reply = (f) => {
        try {
          ws.send(encodeChannelFrame(frame.ch, f));
        } catch {
          // the socket closed under the reply
        }
      };
      const ctl = { close: (code?: number, reason?: string) => this.close(code, reason) };
      const on = this.on[d.message.type];
      if (on) on(d.message, reply, ctl);
      else this.answer(d.message, reply, ctl);
    });
    ws.addEventListener("close", (ev) => {
      this.closeCode = ev.code;
      this.channels.clear();
    });
    this.send({
      type: "host_hello",
      protocol: HOST_PROTOCOL_VERSION,
      protocol_minor: this.hello.protocol_minor ?? 0,
      model: this.model,
      n_layer: 2,
      n_ctx: this.hello.n_ctx ?? 4096,
      pool_bytes: this.hello.pool_bytes ?? 1 << 30,
      bytes_per_entry: 64,
      chat_template: this.hello.chat_template ?? "gguf",
      heartbeat_ms: this.hello.heartbeat_ms ?? 60_000,
      ...(this.hello.cache_fingerprint !== undefined ? { cache_fingerprint: this.hello.cache_fingerprint } : {}),
    });
    await eventually(() => welcomed, `${this.name}: welcome`, 10_000);
    this.heartbeat();
    if (this.hello.beat_every_ms !== undefined) {
      this.stopBeating();
      this.beating = setInterval(() => {
        if (this.connected) this.heartbeat();
      }, this.hello.beat_every_ms);
    }
    await eventuallyAsync(() => routingTable().live(this.name), `${this.name} live in the routing table`);
  }

  /** Sends a control frame. */
  send(m: ControlFromHost): void {
    this.ws!.send(encodeChannelFrame(CONTROL_CHANNEL, m));
  }

  heartbeat(load: Partial<Load> = {}): void {
    this.load = { ...this.load, ...load };
    this.send({ type: "heartbeat", ...this.load });
  }

  /** Closes the host's socket (the host goes away). */
  close(code = 1000, reason = "bye"): void {
    this.stopBeating();
    try {
      this.ws?.close(code, reason);
    } catch {
      // closed already
    }
  }

  /** Goes away and waits until the routing table knows. */
  async disconnect(): Promise<void> {
    this.close();
    await eventuallyAsync(async () => !(await routingTable().live(this.name)), `${this.name} out of routing`);
  }
}

/** Waits until the async `check` holds. */
export async function eventuallyAsync(check: () => Promise<boolean>, what: string, ms = 10_000): Promise<void> {
  const until = Date.now() + ms;
  while (!(await check())) {
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** What a healthy host answers. */
export const answer: Handler = (m, reply) => {
  switch (m.type) {
    case "set_tenant":
      return reply({
        type: "tenant_set",
        id: m.id,
        tenant: m.tenant,
        kv_quota_bytes: m.kv_quota_bytes ?? 0,
        max_sessions: m.max_sessions ?? 0,
        policy: m.policy ?? "refuse",
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
      reply({ type: "token", id: m.id, session: m.session, tokens: [1], text: "Hello" });
      return reply({ type: "done", id: m.id, session: m.session, reason: "end", new_tokens: 1, text: "Hello" });
    case "stats":
      return reply({
        type: "stats_result",
        id: m.id,
        tenant: m.tenant,
        ...(m.session
          ? { session: m.session, tokens_seen: 10, kv_bytes: 640, full_kv_bytes: 6400 }
          : { kv_used_bytes: 640, kv_quota_bytes: 1 << 20, sessions: 1, offloaded: 0 }),
      });
    case "close":
      return reply({ type: "closed", id: m.id, session: m.session });
    case "cancel":
      return reply({ type: "cancelled", id: m.id, session: m.session });
  }
};
