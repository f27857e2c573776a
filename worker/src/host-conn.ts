// One Durable Object per GPU host name (binding HOSTS): the host's one WebSocket, which the host
// dials (GET /hosts/connect, its token checked by index.ts before the upgrade reaches this object),
// accepted with the WebSocket Hibernation API so that an idle object may leave memory while the
// socket stays up. Each message on that socket is a 4-byte channel and one msgpack map (host
// protocol 3, docs/HOST.md): channel 0 carries control messages, every other channel one request.
//
// A request (HostLink, host-link.ts) opens a WebSocket of its own to this object (`/channel`): the
// object answers it with a `hello` made from the host's host_hello (no round trip to the host),
// tells the host `channel_open`, and relays bytes both ways, adding or stripping the channel
// number — session messages are never decoded here. The request's socket closing is
// `channel_close` to the host (which cancels its work, as a closed connection did in 2.x); the
// host's `channel_drop`, or its socket going away, closes the request's socket.
//
// State that must survive hibernation lives in the sockets' attachments (the host's name, hello,
// last heartbeat; each channel's number and tenant) and, for multipart uploads, in storage.
//
// Sessions' checkpoints go to R2 (binding SESSIONS) through the host's control messages:
// state_put (parts acknowledged one by one, R2 multipart above one part, `if_etag` as R2's
// precondition), state_get (parts sent one at a time, each after the host's data_ack), state_head,
// state_delete. Key sessions/<tenant>/<session>. Only the host the tenant's object records for a
// session reads or writes its checkpoint (TenantState.storedCheck/storedPut): another host — a
// former one with a stale copy, or one that never held it — is told state_conflict on a put and
// finds nothing on a get or head. A checkpoint that lands after its session was deleted or expired
// is deleted again (storedCommit). Uploads a connection left unfinished are aborted and uncounted
// at its end, or at the next connection when its end never ran (a deploy).
//
// Cached states (protocol 3.1, `cache: true` on state_put/state_get/state_head; the prompt cache,
// cache-store.ts): key cache/<tenant>/<key>, the key 64 lowercase hex. Immutable snapshots any host
// of the tenant may read: no session fence, no max_stored_bytes (the tenant's cache_max_bytes is
// kept by its object when the entry is put), same parts and acks. A host reads or writes a
// tenant's cached states only while it serves a request of that tenant (an open channel of it:
// channels are tagged with their tenant), else control_error unauthorized — a host does not reach
// other tenants' states. A key names fixed content: a put of a key whose object exists already is
// not written again (the parts are acknowledged and dropped; state_stored names the object there).
//
// Liveness: any message from the host counts (a heartbeat can queue behind megabytes of state
// parts on a slow uplink); the alarm closes a socket silent for 2 × heartbeat_ms, or one that has
// not said host_hello within 2 × PKV_HEARTBEAT_MS (at least HELLO_WAIT_MS) of its upgrade.
import {
  CONTROL_CHANNEL,
  type ControlToHost,
  decodeControlMessage,
  encodeChannelFrame,
  encodeHostMessage,
  HOST_PROTOCOL_VERSION,
  HOST_STATE_PART_BYTES,
  type HostMessage,
  prefixChannel,
  splitChannelFrame,
} from "@pyramidkv/shared";
import { DurableObject } from "cloudflare:workers";

import { tenantStub } from "./auth.js";
import { type Env, intVar } from "./env.js";
import { registry } from "./routing.js";

/** The R2 key of a session's checkpoint. */
export const stateKey = (tenant: string, session: string) => `sessions/${tenant}/${session}`;

/** The R2 key of a tenant's cached state (the prompt cache). */
export const cacheObjectKey = (tenant: string, key: string) => `cache/${tenant}/${key}`;

/** A cache key (worker/src/prompt-cache.ts): a SHA-256 in lowercase hex. */
const CACHE_KEY_PART = /^[0-9a-f]{64}$/;

/** A tenant or session name as part of an R2 key: no separator, no dot segments. */
const KEY_PART = /^[A-Za-z0-9_.:-]{1,128}$/;

export const DEFAULT_HEARTBEAT_MS = 5000;
/** a host's heartbeat_ms is taken within these bounds */
const HEARTBEAT_RANGE = [100, 600_000] as const;
/** a socket that has not said host_hello this long after its upgrade (or 2 × PKV_HEARTBEAT_MS if longer) is closed */
const HELLO_WAIT_MS = 10_000;
/** state_get parts read from R2 at once, per host (8 MiB each in memory until sent) */
const READS_AT_ONCE = 4;
/** a state_get waits this long for the host's data_ack of a part */
const DATA_ACK_MS = 60_000;

type HostHello = Omit<HostMessage<"host_hello">, "type">;
type Heartbeat = Omit<HostMessage<"heartbeat">, "type">;

interface HostAttachment {
  kind: "host";
  name: string;
  connected_at: number;
  hello?: HostHello;
  heartbeat?: Heartbeat;
  /** the host's last message (any, after host_hello: a sign of life), or the upgrade before it (Unix ms) */
  last_heartbeat_ms: number;
  /** when the registry last heard that this host is alive (Unix ms) */
  reported_ms?: number;
  draining: boolean;
  /** this connection is over (replaced, revoked, heartbeats missed): its close reports nothing more */
  ended?: boolean;
}

interface ChannelAttachment {
  kind: "channel";
  ch: number;
  tenant: string;
}

type Attachment = HostAttachment | ChannelAttachment;

/** A multipart upload between its parts (in storage: the object may sleep between two parts). */
interface PendingPut {
  key: string;
  tenant: string;
  session: string;
  /** the session's stored bytes before this checkpoint (TenantState.storedPut) */
  prev?: number;
  upload_id: string;
  parts: R2UploadedPart[];
  received: number;
  total: number;
  count: number;
  if_etag?: string;
  connected_at: number;
  /** a cached state: nothing counted, no session fence */
  cache?: true;
  /** a cached state whose object exists already: the parts are dropped, this object is the answer (no upload) */
  existing?: { etag: string; size: number };
}

const json503 = (message: string) =>
  Response.json({ error: { message, type: "server_error", param: null, code: "host_unavailable" } }, { status: 503 });

const hostTag = "host";
const channelTag = (ch: number) => `ch:${ch}`;
/** every channel of a tenant (a name that KEY_PART accepts, short enough for a tag) */
const tenantTag = (tenant: string) => `tenant:${tenant}`;

export class HostConn extends DurableObject<Env> {
  /** state_get parts waiting for the host's data_ack, by `<id>:<part>` */
  private readonly acks = new Map<string, () => void>();
  /** parts being read from R2 for state_gets (each held in memory until sent), and those waiting their turn */
  private reading = 0;
  private readonly toRead: (() => void)[] = [];

  /** Runs `read` when fewer than READS_AT_ONCE parts are in memory (an object has 128 MB). */
  private async oneRead<T>(read: () => Promise<T>): Promise<T> {
    if (this.reading >= READS_AT_ONCE) await new Promise<void>((r) => this.toRead.push(r));
    this.reading++;
    try {
      return await read();
    } finally {
      this.reading--;
      this.toRead.shift()?.();
    }
  }

  private attachment<T extends Attachment>(ws: WebSocket): T {
    return ws.deserializeAttachment() as T;
  }

  /** The host's current socket (not one that was replaced or ended), with its attachment. */
  private host(): { ws: WebSocket; att: HostAttachment } | null {
    for (const ws of this.ctx.getWebSockets(hostTag)) {
      const att = this.attachment<HostAttachment>(ws);
      if (!att.ended && ws.readyState === WebSocket.OPEN) return { ws, att };
    }
    return null;
  }

  override async fetch(req: Request): Promise<Response> {
    if (req.headers.get("upgrade")?.toLowerCase() !== "websocket")
      return new Response("a WebSocket upgrade is expected", { status: 426 });
    const url = new URL(req.url);
    if (url.pathname === "/connect") return this.acceptHost(req.headers.get("x-pkv-host-name") ?? "");
    if (url.pathname === "/channel") return this.openChannel(url.searchParams.get("tenant") ?? "");
    return new Response("not found", { status: 404 });
  }

  // ---- the host's socket ----

  private async acceptHost(name: string): Promise<Response> {
    if (name === "") return new Response("no host name", { status: 400 });
    const prev = this.host();
    if (prev) await this.endHost(prev.ws, prev.att, 4001, "replaced", false);
    const [client, server] = Object.values(new WebSocketPair()) as [WebSocket, WebSocket];
    this.ctx.acceptWebSocket(server, [hostTag]);
    const att: HostAttachment = {
      kind: "host",
      name,
      connected_at: Date.now(),
      last_heartbeat_ms: Date.now(),
      draining: false,
    };
    server.serializeAttachment(att);
    // a host that never says host_hello is closed too
    await this.ctx.storage.setAlarm(att.connected_at + this.helloWaitMs() + 50);
    // uploads of connections whose end never ran (a deploy dropped them): nothing will complete them
    for (const [key, p] of await this.ctx.storage.list<PendingPut>({ prefix: "put:" }))
      if (p.connected_at < att.connected_at) await this.abandon(key, p);
    return new Response(null, { status: 101, webSocket: client });
  }

  private welcomeHeartbeatMs(): number {
    return intVar(this.env.PKV_HEARTBEAT_MS, DEFAULT_HEARTBEAT_MS);
  }

  private helloWaitMs(): number {
    return Math.max(HELLO_WAIT_MS, 2 * this.welcomeHeartbeatMs());
  }

  /** An unfinished multipart upload nothing will complete: aborted, its record gone, its bytes uncounted. */
  private async abandon(key: string, p: PendingPut): Promise<void> {
    await this.ctx.storage.delete(key);
    if (!p.existing)
      await this.env.SESSIONS.resumeMultipartUpload(p.key, p.upload_id)
        .abort()
        .catch(() => {});
    if (p.cache) return;
    await tenantStub(this.env, p.tenant)
      .storedUndo(p.session, p.total, p.prev)
      .catch(() => {});
  }

  /**
   * Ends a host connection: every request on it closed (1011 "host gone"), the socket closed with
   * `code`, and (unless a newer connection replaced it) the host out of the routing table.
   */
  private async endHost(
    ws: WebSocket,
    att: HostAttachment,
    code: number,
    reason: string,
    report = true,
  ): Promise<void> {
    ws.serializeAttachment({ ...att, ended: true });
    for (const ch of this.ctx.getWebSockets()) {
      if (this.attachment<Attachment>(ch).kind === "channel") closeQuietly(ch, 1011, "host gone");
    }
    closeQuietly(ws, code, reason);
    if (report)
      await registry(this.env)
        .gone(att.name, att.connected_at)
        .catch(() => {});
    // uploads the connection left unfinished: nothing will complete them
    for (const [key, p] of await this.ctx.storage.list<PendingPut>({ prefix: "put:" }))
      if (p.connected_at <= att.connected_at) await this.abandon(key, p);
  }

  private sendControl(ws: WebSocket, msg: ControlToHost): void {
    try {
      ws.send(encodeChannelFrame(CONTROL_CHANNEL, msg));
    } catch {
      // the socket is closing: its close handler cleans up
    }
  }

  private controlError(ws: WebSocket, id: number | undefined, code: string, message: string): void {
    this.sendControl(ws, { type: "control_error", ...(id !== undefined ? { id } : {}), code, message });
  }

  private report(att: HostAttachment): Promise<void> {
    if (!att.hello) return Promise.resolve();
    return registry(this.env)
      .report(att.name, {
        hello: att.hello,
        ...(att.heartbeat ? { heartbeat: att.heartbeat } : {}),
        draining: att.draining,
        connected_at: att.connected_at,
      })
      .catch(() => {});
  }

  /**
   * A message from the host (after its host_hello): it is alive, whatever the message — its
   * heartbeat may be queued behind megabytes of state parts. The registry hears of it at most
   * once per half heartbeat_ms, never awaited (the message's relay does not wait for it).
   */
  private alive(ws: WebSocket, att: HostAttachment): HostAttachment {
    const now = Date.now();
    const due = now - (att.reported_ms ?? 0) >= att.hello!.heartbeat_ms / 2;
    const next: HostAttachment = { ...att, last_heartbeat_ms: now, ...(due ? { reported_ms: now } : {}) };
    ws.serializeAttachment(next);
    if (due)
      registry(this.env)
        .seen(att.name, att.connected_at)
        .catch(() => {});
    return next;
  }

  override async webSocketMessage(ws: WebSocket, message: string | ArrayBuffer): Promise<void> {
    const att = this.attachment<Attachment>(ws);
    if (att.kind === "channel") return this.fromChannel(ws, att, message);
    if (att.ended) return;
    if (typeof message === "string") {
      this.controlError(ws, undefined, "bad_frame", "text messages are not part of the host protocol: binary only");
      return;
    }
    const frame = splitChannelFrame(new Uint8Array(message));
    if (!frame) {
      this.controlError(ws, undefined, "bad_frame", `a message of ${message.byteLength} bytes has no 4-byte channel`);
      return;
    }
    if (frame.ch === CONTROL_CHANNEL) return this.onControl(ws, att, frame.payload);
    if (!att.hello) {
      this.controlError(ws, undefined, "bad_frame", "the first message must be host_hello (channel 0)");
      return;
    }
    this.alive(ws, att);
    const [inner] = this.ctx.getWebSockets(channelTag(frame.ch));
    if (!inner) return; // a channel the edge closed already (its channel_close is on its way to the host)
    try {
      inner.send(frame.payload);
    } catch {
      // the request's socket is closing: its close handler tells the host
    }
  }

  private fromChannel(ws: WebSocket, att: ChannelAttachment, message: string | ArrayBuffer): void {
    const host = this.host();
    if (!host) {
      closeQuietly(ws, 1011, "host gone");
      return;
    }
    if (typeof message === "string") {
      closeQuietly(ws, 1003, "binary messages only");
      return;
    }
    try {
      host.ws.send(prefixChannel(att.ch, new Uint8Array(message)));
    } catch {
      closeQuietly(ws, 1011, "host gone");
    }
  }

  private async onControl(ws: WebSocket, prev: HostAttachment, payload: Uint8Array): Promise<void> {
    const d = decodeControlMessage(payload, "from_host");
    if (!d.ok) {
      this.controlError(ws, undefined, "bad_frame", d.error);
      return;
    }
    const m = d.message;
    if (!prev.hello && m.type !== "host_hello") {
      this.controlError(ws, undefined, "bad_frame", `the first message must be host_hello, not ${m.type}`);
      return;
    }
    // a heartbeat reports itself; any other message after the hello is a sign of life
    const att = prev.hello && m.type !== "heartbeat" && m.type !== "host_hello" ? this.alive(ws, prev) : prev;
    switch (m.type) {
      case "host_hello":
        return this.onHello(ws, att, m);
      case "heartbeat": {
        const { type: _, ...hb } = m;
        const now = Date.now();
        const next = {
          ...att,
          heartbeat: hb,
          last_heartbeat_ms: now,
          reported_ms: now,
          draining: att.draining || m.draining,
        };
        ws.serializeAttachment(next);
        return this.report(next);
      }
      case "draining":
      case "drained": {
        const next = { ...att, draining: true };
        ws.serializeAttachment(next);
        return this.report(next);
      }
      case "channel_drop": {
        const [inner] = this.ctx.getWebSockets(channelTag(m.ch));
        if (inner) closeQuietly(inner, 1011, `dropped by the host${m.reason ? `: ${m.reason}` : ""}`.slice(0, 120));
        return;
      }
      case "data_ack":
        this.acks.get(`${m.id}:${m.part}`)?.();
        return;
      case "state_put":
      case "state_get":
      case "state_head":
      case "state_delete":
        return this.onState(ws, att, m);
    }
  }

  private async onHello(ws: WebSocket, att: HostAttachment, m: HostMessage<"host_hello">): Promise<void> {
    if (m.protocol !== HOST_PROTOCOL_VERSION) {
      this.controlError(
        ws,
        undefined,
        "bad_frame",
        `this host speaks host protocol ${m.protocol}; this edge speaks ${HOST_PROTOCOL_VERSION}: upgrade the host`,
      );
      await this.endHost(ws, att, 1002, "protocol version");
      return;
    }
    const { type: _, ...hello } = m;
    hello.heartbeat_ms = Math.min(HEARTBEAT_RANGE[1], Math.max(HEARTBEAT_RANGE[0], hello.heartbeat_ms));
    const next: HostAttachment = { ...att, hello, last_heartbeat_ms: Date.now(), reported_ms: Date.now() };
    ws.serializeAttachment(next);
    this.sendControl(ws, { type: "welcome", name: att.name, heartbeat_ms: this.welcomeHeartbeatMs() });
    await this.ctx.storage.setAlarm(Date.now() + 2 * hello.heartbeat_ms + 50);
    await this.report(next);
  }

  override async webSocketClose(ws: WebSocket, code: number, reason: string): Promise<void> {
    closeQuietly(ws, code === 1005 || code === 1006 ? 1000 : code, reason);
    await this.closed(ws);
  }

  override async webSocketError(ws: WebSocket): Promise<void> {
    closeQuietly(ws, 1011, "error");
    await this.closed(ws);
  }

  private async closed(ws: WebSocket): Promise<void> {
    const att = this.attachment<Attachment>(ws);
    if (att.kind === "channel") {
      const host = this.host();
      if (host) this.sendControl(host.ws, { type: "channel_close", ch: att.ch, reason: "closed by the edge" });
      return;
    }
    if (!att.ended) await this.endHost(ws, att, 1000, "closed");
  }

  /**
   * Nothing from the host for two heartbeats: it is gone (routing already skips it, registry.ts).
   * Before its host_hello: nothing for helloWaitMs() since the upgrade.
   */
  override async alarm(): Promise<void> {
    const host = this.host();
    if (!host) return;
    const hello = host.att.hello;
    const due = host.att.last_heartbeat_ms + (hello ? 2 * hello.heartbeat_ms : this.helloWaitMs());
    if (Date.now() >= due) await this.endHost(host.ws, host.att, 4002, hello ? "heartbeat missed" : "no host_hello");
    else await this.ctx.storage.setAlarm(due + 50);
  }

  /** The host's token was revoked: its socket closes with 4003 (it does not reconnect). */
  async revoke(): Promise<boolean> {
    const host = this.host();
    if (!host) return false;
    this.sendControl(host.ws, { type: "control_error", code: "revoked", message: "this host's token was revoked" });
    await this.endHost(host.ws, host.att, 4003, "revoked");
    return true;
  }

  // ---- requests' channels ----

  private openChannel(tenant: string): Response {
    const host = this.host();
    if (!host?.att.hello) return json503("the GPU host is not connected");
    if (tenant === "") return new Response("no tenant", { status: 400 });
    let ch = 0;
    while (ch === 0 || this.ctx.getWebSockets(channelTag(ch)).length > 0)
      ch = crypto.getRandomValues(new Uint32Array(1))[0]!;
    const [client, server] = Object.values(new WebSocketPair()) as [WebSocket, WebSocket];
    // a tenant name no state op accepts (KEY_PART) needs no tenant tag
    this.ctx.acceptWebSocket(server, KEY_PART.test(tenant) ? [channelTag(ch), tenantTag(tenant)] : [channelTag(ch)]);
    server.serializeAttachment({ kind: "channel", ch, tenant } satisfies ChannelAttachment);
    const h = host.att.hello;
    server.send(
      encodeHostMessage({
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
      }),
    );
    this.sendControl(host.ws, { type: "channel_open", ch, tenant });
    return new Response(null, { status: 101, webSocket: client });
  }

  // ---- sessions' state in R2 ----

  private async onState(
    ws: WebSocket,
    att: HostAttachment,
    m: HostMessage<"state_put" | "state_get" | "state_head" | "state_delete">,
  ): Promise<void> {
    if (!KEY_PART.test(m.tenant) || !KEY_PART.test(m.session)) {
      this.controlError(ws, m.id, "bad_frame", `tenant and session must match ${KEY_PART.source}`);
      return;
    }
    const cached = m.type !== "state_delete" && (m as { cache?: boolean }).cache === true;
    if (cached && !CACHE_KEY_PART.test(m.session)) {
      this.controlError(
        ws,
        m.id,
        "bad_frame",
        `${m.type} cache: session '${m.session}' is not a cache key (64 lowercase hex characters)`,
      );
      return;
    }
    // a new put's later parts were allowed at its part 0
    if (
      cached &&
      !(m.type === "state_put" && (m as HostMessage<"state_put">).part > 0) &&
      !this.servesTenant(m.tenant)
    ) {
      this.controlError(
        ws,
        m.id,
        "unauthorized",
        `${m.type} cache: this host serves no request of tenant '${m.tenant}' now: its cached states are not this host's to read or write`,
      );
      return;
    }
    const key = cached ? cacheObjectKey(m.tenant, m.session) : stateKey(m.tenant, m.session);
    try {
      if (m.type === "state_put") return await this.statePut(ws, att, key, m as HostMessage<"state_put">, cached);
      // a cached state is immutable and the tenant's: every host reads it
      if (cached && m.type === "state_get") return await this.stateGet(ws, key, m.id);
      if (cached && m.type === "state_head") {
        const head = await this.env.SESSIONS.head(key);
        this.sendControl(ws, head ? { type: "state_info", id: m.id, ...described(head) } : notThere(m.id));
        return;
      }
      // only the session's host reads or deletes its checkpoint: to another, a session it does not hold
      const tenant = tenantStub(this.env, m.tenant);
      const owner = await tenant.storedCheck(m.session, att.name);
      switch (m.type) {
        case "state_get":
          if (owner !== "ok") this.sendControl(ws, notThere(m.id));
          else await this.stateGet(ws, key, m.id);
          return;
        case "state_head": {
          const head = owner === "ok" ? await this.env.SESSIONS.head(key) : null;
          this.sendControl(ws, head ? { type: "state_info", id: m.id, ...described(head) } : notThere(m.id));
          return;
        }
        case "state_delete":
          if (owner === "moved") {
            this.controlError(ws, m.id, "state_conflict", onAnotherHost(m.session, att.name));
            return;
          }
          await this.env.SESSIONS.delete(key);
          await tenant.storedDrop(m.session);
          this.sendControl(ws, { type: "state_deleted", id: m.id });
          return;
      }
    } catch (e) {
      this.controlError(ws, m.id, "internal", `R2: ${e instanceof Error ? e.message : String(e)}`);
    }
  }

  /** Whether the host has an open channel of `tenant` (a request of the tenant on this host now). */
  private servesTenant(tenant: string): boolean {
    return this.ctx.getWebSockets(tenantTag(tenant)).some((ch) => ch.readyState === WebSocket.OPEN);
  }

  private async statePut(
    ws: WebSocket,
    att: HostAttachment,
    key: string,
    m: HostMessage<"state_put">,
    cached: boolean,
  ): Promise<void> {
    const pendingKey = `put:${m.id}`;
    const notLast = m.part + 1 < m.parts;
    if (notLast && m.data.length !== HOST_STATE_PART_BYTES) {
      this.controlError(
        ws,
        m.id,
        "bad_frame",
        `state_put: part ${m.part} of ${m.parts} has ${m.data.length} bytes; every part but the last has ${HOST_STATE_PART_BYTES}`,
      );
      return;
    }
    if (m.part === 0) {
      if (m.parts < 1 || m.bytes < m.data.length || (m.parts === 1 && m.bytes !== m.data.length)) {
        this.controlError(
          ws,
          m.id,
          "bad_frame",
          `state_put: part 0 of ${m.parts} with ${m.data.length} of ${m.bytes} bytes`,
        );
        return;
      }
      const tenant = tenantStub(this.env, m.tenant);
      // a cached state is not a session's checkpoint: not fenced, not counted (its entry is, by cachePut)
      const quota: Awaited<ReturnType<typeof tenant.storedPut>> = cached
        ? { ok: true, used: 0 }
        : await tenant.storedPut(m.session, m.bytes, att.name);
      if (!quota.ok) {
        this.controlError(ws, m.id, quota.code, quota.message);
        return;
      }
      // what part 0 counted, given back when the checkpoint is not stored after all
      const undo = async () => {
        if (!cached) await tenant.storedUndo(m.session, m.bytes, quota.prev).catch(() => {});
      };
      const customMetadata = objectMetadata(att.hello!, m.meta);
      // a cached state's key names its content: one that exists is kept as it is
      const existing = cached ? await this.env.SESSIONS.head(key) : null;
      if (existing) {
        await this.cacheWritten(m.tenant, m.session);
        this.sendControl(ws, { type: "state_ack", id: m.id, part: 0 });
        if (m.parts === 1)
          this.sendControl(ws, { type: "state_stored", id: m.id, etag: existing.etag, bytes: existing.size });
        else
          await this.ctx.storage.put(pendingKey, {
            key,
            tenant: m.tenant,
            session: m.session,
            upload_id: "",
            parts: [],
            received: m.data.length,
            total: m.bytes,
            count: m.parts,
            connected_at: att.connected_at,
            cache: true,
            existing: { etag: existing.etag, size: existing.size },
          } satisfies PendingPut);
        return;
      }
      try {
        if (m.parts === 1) {
          const obj = await this.env.SESSIONS.put(key, m.data, {
            customMetadata,
            ...(m.if_etag !== undefined ? { onlyIf: { etagMatches: m.if_etag } } : {}),
          });
          if (obj === null) {
            await undo();
            this.controlError(ws, m.id, "state_conflict", conflict(m.session, m.if_etag));
            return;
          }
          if (cached) await this.cacheWritten(m.tenant, m.session);
          else if (!(await this.committed(ws, m.id, key, m.tenant, m.session, att.name))) return;
          this.sendControl(ws, { type: "state_ack", id: m.id, part: 0 });
          this.sendControl(ws, { type: "state_stored", id: m.id, etag: obj.etag, bytes: obj.size });
          return;
        }
        const upload = await this.env.SESSIONS.createMultipartUpload(key, { customMetadata });
        const part = await upload.uploadPart(1, m.data);
        const pending: PendingPut = {
          key,
          tenant: m.tenant,
          session: m.session,
          upload_id: upload.uploadId,
          parts: [{ partNumber: part.partNumber, etag: part.etag }],
          received: m.data.length,
          total: m.bytes,
          count: m.parts,
          ...(m.if_etag !== undefined ? { if_etag: m.if_etag } : {}),
          ...(quota.prev !== undefined ? { prev: quota.prev } : {}),
          connected_at: att.connected_at,
          ...(cached ? { cache: true as const } : {}),
        };
        await this.ctx.storage.put(pendingKey, pending);
        this.sendControl(ws, { type: "state_ack", id: m.id, part: 0 });
      } catch (e) {
        await undo();
        throw e;
      }
      return;
    }
    const pending = await this.ctx.storage.get<PendingPut>(pendingKey);
    // parts received so far (a dropped put of an existing cached state uploads none)
    const seen = pending?.existing ? Math.ceil(pending.received / HOST_STATE_PART_BYTES) : pending?.parts.length;
    if (!pending || pending.key !== key || m.part !== seen || m.parts !== pending.count) {
      this.controlError(
        ws,
        m.id,
        "bad_frame",
        `state_put: part ${m.part} of id ${m.id} without its earlier parts (expected ${seen ?? 0})`,
      );
      return;
    }
    if (pending.existing) return this.dropPart(ws, pendingKey, pending, m, notLast);
    const upload = this.env.SESSIONS.resumeMultipartUpload(key, pending.upload_id);
    const fail = async (code: string, message: string) => {
      await this.ctx.storage.delete(pendingKey);
      await upload.abort().catch(() => {});
      if (!pending.cache)
        await tenantStub(this.env, pending.tenant)
          .storedUndo(pending.session, pending.total, pending.prev)
          .catch(() => {});
      this.controlError(ws, m.id, code, message);
    };
    try {
      const part = await upload.uploadPart(m.part + 1, m.data);
      pending.parts.push({ partNumber: part.partNumber, etag: part.etag });
      pending.received += m.data.length;
      if (notLast) {
        if (pending.received >= pending.total)
          return fail("bad_frame", `state_put: more than ${pending.total} bytes before the last part`);
        await this.ctx.storage.put(pendingKey, pending);
        this.sendControl(ws, { type: "state_ack", id: m.id, part: m.part });
        return;
      }
      if (pending.received !== pending.total)
        return fail("bad_frame", `state_put: ${pending.received} bytes received, part 0 announced ${pending.total}`);
      // still this host's session (it may have moved, or gone, since part 0)
      if (!pending.cache) {
        const owner = await tenantStub(this.env, pending.tenant).storedCheck(pending.session, att.name);
        if (owner === "moved") return fail("state_conflict", onAnotherHost(pending.session, att.name));
        if (owner === "gone") return fail("not_found", notOpen(pending.session));
      }
      if (pending.if_etag !== undefined) {
        const head = await this.env.SESSIONS.head(key);
        if (head?.etag !== pending.if_etag) return fail("state_conflict", conflict(pending.session, pending.if_etag));
      }
      // another host stored the same cached state meanwhile: that one is kept
      const there = pending.cache ? await this.env.SESSIONS.head(key) : null;
      if (there) {
        await this.ctx.storage.delete(pendingKey);
        await upload.abort().catch(() => {});
        await this.cacheWritten(pending.tenant, pending.session);
        this.sendControl(ws, { type: "state_ack", id: m.id, part: m.part });
        this.sendControl(ws, { type: "state_stored", id: m.id, etag: there.etag, bytes: there.size });
        return;
      }
      const obj = await upload.complete(pending.parts);
      await this.ctx.storage.delete(pendingKey);
      if (pending.cache) await this.cacheWritten(pending.tenant, pending.session);
      else if (!(await this.committed(ws, m.id, key, pending.tenant, pending.session, att.name))) return;
      this.sendControl(ws, { type: "state_ack", id: m.id, part: m.part });
      this.sendControl(ws, { type: "state_stored", id: m.id, etag: obj.etag, bytes: obj.size });
    } catch (e) {
      return fail("internal", `R2: ${e instanceof Error ? e.message : String(e)}`);
    }
  }

  /**
   * A later part of a put of a cached state that exists already: counted and acknowledged, not
   * written; after the last, state_stored names the object there.
   */
  private async dropPart(
    ws: WebSocket,
    pendingKey: string,
    pending: PendingPut,
    m: HostMessage<"state_put">,
    notLast: boolean,
  ): Promise<void> {
    pending.received += m.data.length;
    const fail = async (message: string) => {
      await this.ctx.storage.delete(pendingKey);
      this.controlError(ws, m.id, "bad_frame", message);
    };
    if (notLast) {
      if (pending.received >= pending.total)
        return fail(`state_put: more than ${pending.total} bytes before the last part`);
      await this.ctx.storage.put(pendingKey, pending);
      this.sendControl(ws, { type: "state_ack", id: m.id, part: m.part });
      return;
    }
    if (pending.received !== pending.total)
      return fail(`state_put: ${pending.received} bytes received, part 0 announced ${pending.total}`);
    await this.ctx.storage.delete(pendingKey);
    this.sendControl(ws, { type: "state_ack", id: m.id, part: m.part });
    this.sendControl(ws, {
      type: "state_stored",
      id: m.id,
      etag: pending.existing!.etag,
      bytes: pending.existing!.size,
    });
  }

  /**
   * A cached state is in R2: its tenant's object deletes it later unless its entry is put
   * (cache-store.ts). Not fatal to the put when the object cannot be told (the state is stored;
   * it may then outlive its entry's absence): logged.
   */
  private async cacheWritten(tenant: string, key: string): Promise<void> {
    await tenantStub(this.env, tenant)
      .cacheWritten(tenant, key)
      .catch((e: unknown) =>
        console.error(
          `cacheWritten(${tenant}, ${key.slice(0, 16)}…): ${e instanceof Error ? e.message : String(e)} — the state stays in R2 with no sweep of it`,
        ),
      );
  }

  /**
   * A checkpoint is in R2: kept, unless its session was deleted or expired while it was written
   * (the edge's delete may have run before the object existed): then it is deleted again and the
   * put answered not_found. False when so.
   */
  private async committed(
    ws: WebSocket,
    id: number,
    key: string,
    tenant: string,
    session: string,
    writer: string,
  ): Promise<boolean> {
    if ((await tenantStub(this.env, tenant).storedCommit(session, writer)) === "ok") return true;
    await this.env.SESSIONS.delete(key);
    this.controlError(ws, id, "not_found", notOpen(session));
    return false;
  }

  /** Sends the object in parts of HOST_STATE_PART_BYTES (ranged reads of one version), each after the host's data_ack of the previous. */
  private async stateGet(ws: WebSocket, key: string, id: number): Promise<void> {
    const head = await this.env.SESSIONS.head(key);
    if (!head) {
      this.sendControl(ws, notThere(id));
      return;
    }
    const parts = Math.max(1, Math.ceil(head.size / HOST_STATE_PART_BYTES));
    for (let part = 0; part < parts; part++) {
      const offset = part * HOST_STATE_PART_BYTES;
      const length = Math.min(HOST_STATE_PART_BYTES, head.size - offset);
      const acked = part + 1 < parts ? this.waitAck(id, part) : null;
      const sent = await this.oneRead(async () => {
        const obj = await this.env.SESSIONS.get(key, {
          onlyIf: { etagMatches: head.etag },
          ...(head.size > 0 ? { range: { offset, length } } : {}),
        });
        if (!obj || !("body" in obj)) return false;
        this.sendControl(ws, {
          type: "state_data",
          id,
          part,
          parts,
          data: new Uint8Array(await obj.arrayBuffer()),
          bytes: head.size,
          etag: head.etag,
          ...(part === 0 ? { meta: head.customMetadata ?? {} } : {}),
        });
        return true;
      });
      if (!sent) {
        this.forgetAck(id, part);
        this.controlError(
          ws,
          id,
          "state_conflict",
          `the checkpoint of ${key} changed while it was read: read it again`,
        );
        return;
      }
      if (acked && !(await acked)) {
        this.controlError(
          ws,
          id,
          "internal",
          `no data_ack of part ${part} within ${DATA_ACK_MS} ms: state_get ${id} given up`,
        );
        return;
      }
    }
  }

  private forgetAck(id: number, part: number): void {
    this.acks.get(`${id}:${part}`)?.();
  }

  private waitAck(id: number, part: number): Promise<boolean> {
    const key = `${id}:${part}`;
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.acks.delete(key);
        resolve(false);
      }, DATA_ACK_MS);
      this.acks.set(key, () => {
        clearTimeout(timer);
        this.acks.delete(key);
        resolve(true);
      });
    });
  }
}

function closeQuietly(ws: WebSocket, code: number, reason: string): void {
  try {
    ws.close(code, reason);
  } catch {
    // closed already
  }
}

const notThere = (id: number): ControlToHost => ({ type: "state_info", id, exists: false });

const described = (o: R2Object) => ({ exists: true, etag: o.etag, bytes: o.size, meta: o.customMetadata ?? {} });

const onAnotherHost = (session: string, writer: string) =>
  `session '${session}' is on another host: host '${writer}' no longer holds it (a stale copy; drop it)`;

const notOpen = (session: string) =>
  `session '${session}' is not open at the edge (deleted or expired while its checkpoint was written): its checkpoint is not kept`;

const conflict = (what: string, etag: string | undefined) =>
  `the checkpoint of ${what} is no longer the one with etag ${etag}: another host wrote or removed it since (the session moved)`;

/** The object's customMetadata (strings, docs/HOST.md): the model and shape it belongs to, from the host's hello, and its size from the host's meta. */
function objectMetadata(hello: HostHello, meta: Record<string, unknown> | undefined): Record<string, string> {
  const num = (v: unknown) =>
    typeof v === "number" || typeof v === "bigint" ? String(v) : typeof v === "string" ? v : "0";
  return {
    model: hello.model,
    n_layer: String(hello.n_layer),
    bytes_per_entry: String(hello.bytes_per_entry),
    tokens_seen: num(meta?.tokens_seen),
    kv_bytes: num(meta?.kv_bytes),
    format: "pkvf1",
  };
}
