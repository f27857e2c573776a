// A scripted GPU host for tests in the Workers runtime: global fetch is replaced so that the
// worker's /health probes and WebSocket upgrades to a fake host's URL reach this object, which
// speaks the real host protocol (shared codec) over a WebSocketPair and records every frame.
// By default it answers every request like a healthy host; `on` overrides the answer to a type.
import {
  decodeHostMessage,
  encodeHostMessage,
  type FromHostMessage,
  HOST_PROTOCOL_VERSION,
  type ToHostMessage,
} from "@pyramidkv/shared";
import { vi } from "vitest";

type Reply = (f: FromHostMessage) => void;
export type Handler = (m: ToHostMessage, reply: Reply, ws: WebSocket) => void;

export class FakeHost {
  /** frames received, per connection */
  readonly connections: ToHostMessage[][] = [];
  /** connections the edge closed */
  closedByEdge = 0;
  /** refuse connections (a host that cannot be reached): fetch rejects, naming the URL as a runtime would */
  refuse = false;
  readonly on: Partial<Record<ToHostMessage["type"], Handler>> = {};

  constructor(
    readonly url: string,
    readonly model = "fake.gguf",
    readonly hello: { n_ctx?: number; chat_template?: string } = {},
  ) {}

  get frames(): ToHostMessage[] {
    return this.connections.flat();
  }

  types(): string[] {
    return this.frames.map((f) => f.type);
  }

  fetch(req: Request): Response {
    if (new URL(req.url).pathname === "/health")
      // like the real host's: model, pool and use (n_ctx and chat_template are in its hello)
      return Response.json({ status: "ok", model: this.model, pool_bytes: 1 << 30, kv_used_bytes: 0 });
    const [client, server] = Object.values(new WebSocketPair()) as [WebSocket, WebSocket];
    server.accept();
    server.binaryType = "arraybuffer"; // Blobs otherwise, with this compatibility date
    const frames: ToHostMessage[] = [];
    this.connections.push(frames);
    const reply: Reply = (f) => server.send(encodeHostMessage(f));
    server.addEventListener("message", (ev) => {
      const d = decodeHostMessage(new Uint8Array(ev.data as ArrayBuffer), "to_host");
      if (!d.ok) throw new Error(`the worker sent an invalid frame: ${d.error}`);
      frames.push(d.message);
      (this.on[d.message.type] ?? answer)(d.message, reply, server);
    });
    server.addEventListener("close", () => {
      this.closedByEdge++;
    });
    reply({
      type: "hello",
      protocol: HOST_PROTOCOL_VERSION,
      model: this.model,
      n_layer: 2,
      n_ctx: this.hello.n_ctx ?? 4096,
      pool_bytes: 1 << 30,
      bytes_per_entry: 64,
      protocol_minor: 1,
      chat_template: this.hello.chat_template ?? "gguf",
    });
    return new Response(null, { status: 101, webSocket: client });
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

/** Routes the worker's fetches to `hosts` by origin (everything else as usual) until restored. */
export function serveFakeHosts(...hosts: FakeHost[]) {
  const real = globalThis.fetch;
  return vi.spyOn(globalThis, "fetch").mockImplementation(async (input, init) => {
    const req = new Request(input, init);
    const host = hosts.find((h) => h.url === new URL(req.url).origin);
    if (host?.refuse) throw new TypeError(`connect ECONNREFUSED ${host.url}`);
    return host ? host.fetch(req) : real(input, init);
  });
}
