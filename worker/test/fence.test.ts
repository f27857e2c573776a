// Who may touch a session's checkpoint in R2, and what a connection leaves behind: only the host the
// edge records for the session reads or writes it (another host's put is state_conflict, its
// get/head find nothing); a session whose host went away moves once, to one host, however many
// requests race for it; uploads a connection left unfinished are aborted and uncounted (at its
// close, or at the next connection when no close ran); a host that never says host_hello is closed;
// any message of a host is a sign of life (a heartbeat queued behind big state parts); and a
// checkpoint that lands after its session was deleted is deleted again.
import { type ControlFromHost, type ControlToHost, HOST_STATE_PART_BYTES } from "@pyramidkv/shared";
import { runDurableObjectAlarm, runInDurableObject } from "cloudflare:test";
import { env } from "cloudflare:workers";
import { afterAll, beforeAll, describe, expect, it } from "vitest";

import { as, call, eventually, makeTenant } from "./client.js";
import { dialIn, eventuallyAsync, FakeHost, hostToken, routingTable } from "./fake-host.js";

const MODEL = "fence-model.gguf";
const a = new FakeHost("fence-a", MODEL);
const b = new FakeHost("fence-b", MODEL);
const started: FakeHost[] = [a, b];
const stubOf = (tenant: string) => env.TENANTS.get(env.TENANTS.idFromName(tenant));
const connOf = (name: string) => env.HOSTS.get(env.HOSTS.idFromName(name));
const keyOf = (tenant: string, session: string) => `sessions/${tenant}/${session}`;
let nextId = 1;

beforeAll(async () => {
  await a.connect();
  await b.connect();
});
afterAll(async () => {
  for (const h of started) if (h.connected) await h.disconnect();
});

/** A session of `tenant` the edge holds open on `host`. */
async function openAtEdge(tenant: string, session: string, host: string): Promise<void> {
  const stub = stubOf(tenant);
  expect(await stub.reserveSession(session, { method: "pyramidkv", budget: 128 })).not.toBeNull();
  await stub.updateSession(session, { host, state: "open", model: "fence-model" });
}

type Answer = Extract<ControlToHost, { id?: number }>;
const FINAL = new Set(["state_stored", "state_info", "state_deleted", "control_error"]);

/** Sends a control request from `h`; resolves with its answers up to the last one (a put's part: its ack; the last state_data part). */
function ask(h: FakeHost, m: ControlFromHost & { id: number }): Promise<Answer[]> {
  const midPut = m.type === "state_put" && m.part + 1 < m.parts;
  return new Promise((resolve) => {
    const got: Answer[] = [];
    h.onControl = (f) => {
      if (!("id" in f) || f.id !== m.id) return;
      got.push(f as Answer);
      if (f.type === "state_data") {
        if (f.part + 1 < f.parts) h.send({ type: "data_ack", id: f.id, part: f.part });
        else resolve(got);
      } else if (FINAL.has(f.type) || (midPut && f.type === "state_ack")) resolve(got);
    };
    h.send(m);
  });
}

const bytesOf = (n: number, seed: number) => {
  const b = new Uint8Array(n);
  for (let i = 0; i < n; i++) b[i] = (i * 31 + seed) & 0xff;
  return b;
};

/** One part of a put of `data` (id chosen by the caller), as the host sends it. */
function putPart(
  h: FakeHost,
  id: number,
  tenant: string,
  session: string,
  data: Uint8Array,
  part: number,
  ifEtag?: string,
) {
  const parts = Math.max(1, Math.ceil(data.length / HOST_STATE_PART_BYTES));
  return ask(h, {
    type: "state_put",
    id,
    tenant,
    session,
    part,
    parts,
    data: data.subarray(part * HOST_STATE_PART_BYTES, (part + 1) * HOST_STATE_PART_BYTES),
    bytes: data.length,
    ...(part === 0 ? { meta: { tokens_seen: 100, kv_bytes: data.length } } : {}),
    ...(ifEtag !== undefined ? { if_etag: ifEtag } : {}),
  });
}

/** A whole put, part after part, stopping at an error. */
async function put(h: FakeHost, tenant: string, session: string, data: Uint8Array, ifEtag?: string) {
  const id = nextId++;
  const parts = Math.max(1, Math.ceil(data.length / HOST_STATE_PART_BYTES));
  const all: Answer[] = [];
  for (let part = 0; part < parts; part++) {
    const answers = await putPart(h, id, tenant, session, data, part, ifEtag);
    all.push(...answers);
    if (answers.some((x) => x.type === "control_error")) break;
  }
  return all;
}

const stored = (answers: Answer[]) =>
  answers.find((x) => x.type === "state_stored") as Extract<ControlToHost, { type: "state_stored" }> | undefined;
const failure = (answers: Answer[]) =>
  answers.find((x) => x.type === "control_error") as Extract<ControlToHost, { type: "control_error" }> | undefined;
const head = (h: FakeHost, tenant: string, session: string) =>
  ask(h, { type: "state_head", id: nextId++, tenant, session });
const get = (h: FakeHost, tenant: string, session: string) =>
  ask(h, { type: "state_get", id: nextId++, tenant, session });

interface Att {
  kind: string;
  name: string;
  connected_at: number;
  last_heartbeat_ms: number;
  reported_ms?: number;
  ended?: boolean;
}

/** The attachments of a HostConn's host sockets (changed by `edit` when given). */
function hostSockets(name: string, edit?: (att: Att) => Att): Promise<Att[]> {
  return runInDurableObject(connOf(name), (_o, state) =>
    state.getWebSockets("host").map((ws) => {
      let att = ws.deserializeAttachment() as Att;
      if (edit) {
        att = edit(att);
        ws.serializeAttachment(att);
      }
      return att;
    }),
  );
}

const pendingPuts = (name: string) =>
  runInDurableObject(connOf(name), async (_o, state) => [...(await state.storage.list({ prefix: "put:" })).keys()]);

describe("A: only the session's host reads and writes its checkpoint", () => {
  it("another host's put is state_conflict (with or without if_etag, one part or multipart), its head and get find nothing, its delete is refused", async () => {
    await makeTenant("fe-own", {});
    await openAtEdge("fe-own", "sess-own", a.name);
    const etag = stored(await put(a, "fe-own", "sess-own", bytesOf(1000, 1)))!.etag;
    for (const [data, ifEtag] of [
      [bytesOf(900, 2), undefined],
      [bytesOf(900, 3), etag],
      [bytesOf(HOST_STATE_PART_BYTES + 10, 4), etag],
    ] as const) {
      const e = failure(await put(b, "fe-own", "sess-own", data, ifEtag));
      expect(e).toMatchObject({ code: "state_conflict" });
      expect(e!.message).toMatch(/another host/);
    }
    expect(await head(b, "fe-own", "sess-own")).toMatchObject([{ type: "state_info", exists: false }]);
    expect(await get(b, "fe-own", "sess-own")).toMatchObject([{ type: "state_info", exists: false }]);
    expect(await ask(b, { type: "state_delete", id: nextId++, tenant: "fe-own", session: "sess-own" })).toMatchObject([
      { type: "control_error", code: "state_conflict" },
    ]);
    expect(await env.SESSIONS.head(keyOf("fe-own", "sess-own"))).toMatchObject({ etag, size: 1000 });
    expect(await stubOf("fe-own").storedBytes()).toBe(1000);
    expect(await pendingPuts(b.name)).toEqual([]);
    // its own host still reads it
    expect(await head(a, "fe-own", "sess-own")).toMatchObject([{ type: "state_info", exists: true, etag }]);
  }, 60_000);

  it("a former host (the session moved): its put without if_etag (a stale copy) is refused, the new host's goes through", async () => {
    await makeTenant("fe-moved", {});
    await openAtEdge("fe-moved", "sess-moved", a.name);
    const etag = stored(await put(a, "fe-moved", "sess-moved", bytesOf(500, 5)))!.etag;
    expect(await stubOf("fe-moved").moveSession("sess-moved", a.name, b.name)).toBe(b.name);
    expect(failure(await put(a, "fe-moved", "sess-moved", bytesOf(400, 6)))).toMatchObject({ code: "state_conflict" });
    expect(await env.SESSIONS.head(keyOf("fe-moved", "sess-moved"))).toMatchObject({ etag, size: 500 });
    expect(await head(a, "fe-moved", "sess-moved")).toMatchObject([{ exists: false }]);
    expect(stored(await put(b, "fe-moved", "sess-moved", bytesOf(300, 7), etag))).toMatchObject({ bytes: 300 });
    expect(await stubOf("fe-moved").storedBytes()).toBe(300);
  });

  it("a multipart put whose session moves between its parts: the last part is state_conflict, nothing overwritten, not counted", async () => {
    await makeTenant("fe-gap", {});
    await openAtEdge("fe-gap", "sess-gap", a.name);
    const etag = stored(await put(a, "fe-gap", "sess-gap", bytesOf(700, 8)))!.etag;
    const big = bytesOf(HOST_STATE_PART_BYTES + 100, 9);
    const id = nextId++;
    expect(await putPart(a, id, "fe-gap", "sess-gap", big, 0, etag)).toMatchObject([{ type: "state_ack", part: 0 }]);
    expect(await stubOf("fe-gap").moveSession("sess-gap", a.name, b.name)).toBe(b.name);
    expect(failure(await putPart(a, id, "fe-gap", "sess-gap", big, 1, etag))).toMatchObject({ code: "state_conflict" });
    expect(await env.SESSIONS.head(keyOf("fe-gap", "sess-gap"))).toMatchObject({ etag, size: 700 });
    expect(await stubOf("fe-gap").storedBytes()).toBe(700);
    expect(await pendingPuts(a.name)).toEqual([]);
  }, 60_000);
});

describe("B: a session moves once", () => {
  it("moveSession is compare-and-set: only a move from the recorded host wins; the loser learns the winner", async () => {
    await makeTenant("fe-cas", {});
    await openAtEdge("fe-cas", "sess-cas", "gone-host");
    const stub = stubOf("fe-cas");
    expect(await stub.moveSession("sess-cas", "gone-host", "host-x")).toBe("host-x");
    expect(await stub.moveSession("sess-cas", "gone-host", "host-y")).toBe("host-x");
    expect((await stub.session("sess-cas"))!.host).toBe("host-x");
    expect(await stub.moveSession("sess-none", "gone-host", "host-y")).toBeNull();
    await stub.closeLater("sess-cas");
    expect(await stub.moveSession("sess-cas", "host-x", "host-y")).toBeNull();
  });

  it("two requests racing on a session whose host went away both land on the one host it moved to", async () => {
    const k = await makeTenant("fe-race", { requests_per_minute: 10_000 });
    const gone = new FakeHost("race-gone", "race-model.gguf");
    const x = new FakeHost("race-x", "race-model.gguf");
    const y = new FakeHost("race-y", "race-model.gguf");
    started.push(gone, x, y);
    for (const h of [gone, x, y]) await h.connect();
    // the session on `gone`; then x and y nearly equal, so that two picks in a row go one to each
    gone.heartbeat({ free_bytes: 900 << 20 });
    x.heartbeat({ free_bytes: 500 << 20 });
    y.heartbeat({ free_bytes: 499 << 20 });
    await eventuallyAsync(async () => {
      const rows = (await routingTable().list()).filter((r) => r.name.startsWith("race-"));
      return rows.length === 3 && rows.every((r) => r.free_bytes < 1 << 30);
    }, "the race hosts' heartbeats");
    const made = await call("/v1/sessions", as(k, { model: "race-model", document: "A short document." }));
    expect(made.status).toBe(201);
    const { id } = (await made.json()) as { id: string };
    expect((await stubOf("fe-race").session(id))!.host).toBe(gone.name);
    await gone.disconnect();
    const [r1, r2] = await Promise.all([
      call(`/v1/sessions/${id}/messages`, as(k, { content: "One?", stream: false })),
      call(`/v1/sessions/${id}/messages`, as(k, { content: "Two?", stream: false })),
    ]);
    expect([r1.status, r2.status]).toEqual([200, 200]);
    const on = (h: FakeHost) => h.frames.filter((f) => f.type === "generate" && f.session === id).length;
    const owner = (await stubOf("fe-race").session(id))!.host;
    expect([owner, on(x) + on(y)]).toEqual([owner, 2]);
    expect(on(owner === x.name ? x : y)).toBe(2);
  });
});

describe("C: what a connection leaves behind", () => {
  it("a host that goes away in the middle of a multipart put: the upload is aborted and its bytes uncounted", async () => {
    const h = new FakeHost("fence-c-close", MODEL);
    started.push(h);
    await h.connect();
    await makeTenant("fe-left", {});
    await openAtEdge("fe-left", "sess-left", h.name);
    const big = bytesOf(HOST_STATE_PART_BYTES + 50, 10);
    expect(await putPart(h, nextId++, "fe-left", "sess-left", big, 0)).toMatchObject([{ type: "state_ack" }]);
    expect(await stubOf("fe-left").storedBytes()).toBe(big.length);
    await h.disconnect();
    await eventuallyAsync(async () => (await pendingPuts(h.name)).length === 0, "the pending put forgotten");
    await eventuallyAsync(async () => (await stubOf("fe-left").storedBytes()) === 0, "its bytes uncounted");
  }, 60_000);

  it("uploads left by a connection whose close never ran (a deploy) are aborted and uncounted when the host connects again", async () => {
    const h = new FakeHost("fence-c-deploy", MODEL);
    started.push(h);
    await h.connect();
    await makeTenant("fe-deploy", {});
    await openAtEdge("fe-deploy", "sess-deploy", h.name);
    const big = bytesOf(HOST_STATE_PART_BYTES + 60, 11);
    expect(await putPart(h, nextId++, "fe-deploy", "sess-deploy", big, 0)).toMatchObject([{ type: "state_ack" }]);
    // the connection ends without its close handler doing anything (as when a deploy dropped it)
    await hostSockets(h.name, (att) => ({ ...att, ended: true }));
    h.close();
    await eventually(() => h.closeCode !== undefined, "the old socket closed");
    expect(await pendingPuts(h.name)).toHaveLength(1);
    expect(await stubOf("fe-deploy").storedBytes()).toBe(big.length);
    await h.connect();
    expect(await pendingPuts(h.name)).toEqual([]);
    expect(await stubOf("fe-deploy").storedBytes()).toBe(0);
  }, 60_000);

  it("a host that never says host_hello: the alarm is set when its socket is accepted, and closes it 4002", async () => {
    const r = await dialIn(`Bearer ${await hostToken("fence-mute")}`);
    const ws = r.webSocket!;
    ws.accept();
    let code: number | undefined;
    ws.addEventListener("close", (ev) => {
      code = ev.code;
    });
    const alarm = await runInDurableObject(connOf("fence-mute"), (_o, state) => state.storage.getAlarm());
    expect(alarm).not.toBeNull();
    await hostSockets("fence-mute", (att) => ({
      ...att,
      connected_at: att.connected_at - 3_600_000,
      last_heartbeat_ms: att.last_heartbeat_ms - 3_600_000,
    }));
    expect(await runDurableObjectAlarm(connOf("fence-mute"))).toBe(true);
    await eventually(() => code === 4002, "the silent socket closed 4002", 10_000);
  });
});

describe("D: any message of a host is a sign of life", () => {
  it("a host whose heartbeat is late behind other messages stays live and connected; the registry hears of it at most once per half heartbeat", async () => {
    const h = new FakeHost("fence-d", MODEL, { heartbeat_ms: 60_000 });
    started.push(h);
    await h.connect();
    await makeTenant("fe-live", {});
    // its last heartbeat (and report) long past, as both the HostConn and the table see it
    await hostSockets(h.name, (att) => ({
      ...att,
      last_heartbeat_ms: att.last_heartbeat_ms - 3_600_000,
      ...(att.reported_ms !== undefined ? { reported_ms: att.reported_ms - 3_600_000 } : {}),
    }));
    await runInDurableObject(routingTable(), (registry) => {
      const row = (registry as unknown as { table: Map<string, { last_heartbeat_ms: number }> }).table.get(h.name)!;
      row.last_heartbeat_ms -= 3_600_000;
    });
    expect(await routingTable().live(h.name)).toBe(false);
    // the registry's calls about this host, counted (RPC finds methods on the class, not the instance)
    const calls: string[] = [];
    const restore = await runInDurableObject(routingTable(), (registry) => {
      const proto = Object.getPrototypeOf(registry) as Record<string, (...args: unknown[]) => unknown>;
      const saved = ["report", "seen"].map((m) => [m, proto[m]] as const);
      for (const [m, orig] of saved)
        proto[m] = function (this: unknown, ...args: unknown[]) {
          if (args[0] === h.name) calls.push(m);
          return orig?.apply(this, args);
        };
      return () => {
        for (const [m, orig] of saved) proto[m] = orig!;
      };
    });
    // a stream of state messages (as parts of a big checkpoint would be), no heartbeat
    try {
      for (let i = 0; i < 20; i++) expect(await head(h, "fe-live", `sess-${i}`)).toMatchObject([{ exists: false }]);
      await eventuallyAsync(() => routingTable().live(h.name), "the host live again");
    } finally {
      await runInDurableObject(routingTable(), () => restore());
    }
    expect(calls).toEqual(["seen"]);
    await runDurableObjectAlarm(connOf(h.name));
    expect((await hostSockets(h.name)).filter((att) => !att.ended)).toHaveLength(1);
    expect(h.connected).toBe(true);
  }, 30_000);
});

/** Runs `hook` (once) inside `name`'s HostConn just before its next R2 put or multipart completion. */
async function beforeR2Write(name: string, hook: () => Promise<unknown>): Promise<void> {
  await runInDurableObject(connOf(name), (o) => {
    const inst = o as unknown as { env: Record<string, unknown> };
    const real = inst.env.SESSIONS as R2Bucket;
    let armed = true;
    const fire = async () => {
      if (!armed) return;
      armed = false;
      await hook();
      inst.env = { ...inst.env, SESSIONS: real };
    };
    const wrapUpload = (u: R2MultipartUpload) =>
      new Proxy(u, {
        get(t, p) {
          if (p === "complete")
            return async (parts: R2UploadedPart[]) => {
              await fire();
              return t.complete(parts);
            };
          const v = Reflect.get(t, p);
          return typeof v === "function" ? v.bind(t) : v;
        },
      });
    const bucket = new Proxy(real, {
      get(t, p) {
        if (p === "put")
          return async (...args: Parameters<R2Bucket["put"]>) => {
            await fire();
            return t.put(...args);
          };
        if (p === "resumeMultipartUpload")
          return (key: string, id: string) => wrapUpload(t.resumeMultipartUpload(key, id));
        const v = Reflect.get(t, p);
        return typeof v === "function" ? v.bind(t) : v;
      },
    });
    inst.env = { ...inst.env, SESSIONS: bucket };
  });
}

describe("E: a checkpoint that lands after its session was deleted", () => {
  it("deleted while its one part was being written: the object is deleted again, the put answered not_found", async () => {
    await makeTenant("fe-race-del", {});
    await openAtEdge("fe-race-del", "sess-rd", a.name);
    await beforeR2Write(a.name, () => stubOf("fe-race-del").dropSession("sess-rd"));
    expect(failure(await put(a, "fe-race-del", "sess-rd", bytesOf(800, 13)))).toMatchObject({ code: "not_found" });
    expect(await env.SESSIONS.head(keyOf("fe-race-del", "sess-rd"))).toBeNull();
    expect(await stubOf("fe-race-del").storedBytes()).toBe(0);
  });

  it("expired (a tombstone) while a multipart upload completed: deleted again, not_found", async () => {
    await makeTenant("fe-race-ttl", {});
    await openAtEdge("fe-race-ttl", "sess-rt", a.name);
    await beforeR2Write(a.name, () => stubOf("fe-race-ttl").closeLater("sess-rt"));
    const big = bytesOf(HOST_STATE_PART_BYTES + 80, 14);
    expect(failure(await put(a, "fe-race-ttl", "sess-rt", big))).toMatchObject({ code: "not_found" });
    expect(await env.SESSIONS.head(keyOf("fe-race-ttl", "sess-rt"))).toBeNull();
    expect(await stubOf("fe-race-ttl").storedBytes()).toBe(0);
  }, 60_000);

  it("moved while its put was being written (the writer was its host when it began): kept, the etag chain tells the new host", async () => {
    await makeTenant("fe-race-mv", {});
    await openAtEdge("fe-race-mv", "sess-rm", a.name);
    await beforeR2Write(a.name, () => stubOf("fe-race-mv").moveSession("sess-rm", a.name, b.name));
    const s = stored(await put(a, "fe-race-mv", "sess-rm", bytesOf(600, 15)));
    expect(s).toMatchObject({ bytes: 600 });
    expect(await env.SESSIONS.head(keyOf("fe-race-mv", "sess-rm"))).toMatchObject({ etag: s!.etag });
    // the new host, holding an older etag, is told the session changed
    expect(failure(await put(b, "fe-race-mv", "sess-rm", bytesOf(500, 16), "an-older-etag"))).toMatchObject({
      code: "state_conflict",
    });
  });

  for (const how of ["deleted", "tombstoned"] as const)
    it(`is deleted again and answered not_found (session ${how} between part 0 and the last part)`, async () => {
      const tenant = `fe-late-${how}`;
      await makeTenant(tenant, {});
      await openAtEdge(tenant, "sess-late", a.name);
      const big = bytesOf(HOST_STATE_PART_BYTES + 70, 12);
      const id = nextId++;
      expect(await putPart(a, id, tenant, "sess-late", big, 0)).toMatchObject([{ type: "state_ack" }]);
      if (how === "deleted") await stubOf(tenant).dropSession("sess-late");
      else await stubOf(tenant).closeLater("sess-late");
      expect(failure(await putPart(a, id, tenant, "sess-late", big, 1))).toMatchObject({ code: "not_found" });
      expect(await env.SESSIONS.head(keyOf(tenant, "sess-late"))).toBeNull();
      expect(await stubOf(tenant).storedBytes()).toBe(0);
    }, 60_000);
});
