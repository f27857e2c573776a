// Sessions' checkpoints in R2 (Miniflare's local R2), through the host's control messages on its
// one socket: state_put (one part; multipart above HOST_STATE_PART_BYTES; if_etag as R2's
// precondition → state_conflict), state_get (parts, each after the host's data_ack), state_head,
// state_delete; the tenant's fleet-wide max_stored_bytes; and the edge deleting the object when
// the session is deleted or expires.
import { type ControlFromHost, type ControlToHost, HOST_STATE_PART_BYTES } from "@pyramidkv/shared";
import { runDurableObjectAlarm, runInDurableObject } from "cloudflare:test";
import { env } from "cloudflare:workers";
import { afterAll, beforeAll, describe, expect, it } from "vitest";

import { as, call, makeTenant } from "./client.js";
import { FakeHost } from "./fake-host.js";

const host = new FakeHost("state-host", "state-model.gguf");
const stubOf = (tenant: string) => env.TENANTS.get(env.TENANTS.idFromName(tenant));
const keyOf = (tenant: string, session: string) => `sessions/${tenant}/${session}`;
let nextId = 1;

beforeAll(() => host.connect());
afterAll(() => host.disconnect());

/** A session of `tenant` the edge holds open (as POST /v1/sessions records it). */
async function openAtEdge(tenant: string, session: string): Promise<void> {
  const stub = stubOf(tenant);
  expect(await stub.reserveSession(session, { method: "pyramidkv", budget: 128 })).not.toBeNull();
  await stub.updateSession(session, { host: host.name, state: "open", model: "state-model" });
}

type Answer = Extract<ControlToHost, { id?: number }>;
const FINAL = new Set(["state_stored", "state_info", "state_deleted", "control_error"]);

/** Sends a control request; resolves with every frame answering its id, up to the final one (the last state_data part acked). */
function ask(m: ControlFromHost & { id: number }): Promise<Answer[]> {
  return new Promise((resolve) => {
    const got: Answer[] = [];
    host.onControl = (f) => {
      if (!("id" in f) || f.id !== m.id) return;
      got.push(f as Answer);
      if (f.type === "state_data") {
        if (f.part + 1 < f.parts) host.send({ type: "data_ack", id: f.id, part: f.part });
        else resolve(got);
      } else if (FINAL.has(f.type)) resolve(got);
    };
    host.send(m);
  });
}

/** A digest to compare large byte arrays by (a failed toEqual of megabytes would print them all). */
const digest = async (b: Uint8Array) =>
  `${b.length}:${[...new Uint8Array(await crypto.subtle.digest("SHA-256", b))].map((x) => x.toString(16).padStart(2, "0")).join("")}`;

const bytesOf = (n: number, seed: number) => {
  const b = new Uint8Array(n);
  for (let i = 0; i < n; i++) b[i] = (i * 31 + seed) & 0xff;
  return b;
};

/** Puts `data` as the host does: parts of HOST_STATE_PART_BYTES, each after the edge's state_ack of the previous. */
async function put(tenant: string, session: string, data: Uint8Array, ifEtag?: string): Promise<Answer[]> {
  const id = nextId++;
  const parts = Math.max(1, Math.ceil(data.length / HOST_STATE_PART_BYTES));
  const all: Answer[] = [];
  for (let part = 0; part < parts; part++) {
    const chunk = data.subarray(part * HOST_STATE_PART_BYTES, (part + 1) * HOST_STATE_PART_BYTES);
    const answers = await new Promise<Answer[]>((resolve) => {
      const got: Answer[] = [];
      host.onControl = (f) => {
        if (!("id" in f) || f.id !== id) return;
        got.push(f as Answer);
        if (f.type === "control_error" || f.type === "state_stored" || (f.type === "state_ack" && part + 1 < parts))
          resolve(got);
      };
      host.send({
        type: "state_put",
        id,
        tenant,
        session,
        part,
        parts,
        data: chunk,
        bytes: data.length,
        ...(part === 0 ? { meta: { tokens_seen: 8000, kv_bytes: data.length } } : {}),
        ...(ifEtag !== undefined ? { if_etag: ifEtag } : {}),
      });
    });
    all.push(...answers);
    if (answers.some((a) => a.type === "control_error")) break;
  }
  return all;
}

const stored = (answers: Answer[]) =>
  answers.find((a) => a.type === "state_stored") as Extract<ControlToHost, { type: "state_stored" }> | undefined;
const failure = (answers: Answer[]) =>
  answers.find((a) => a.type === "control_error") as Extract<ControlToHost, { type: "control_error" }> | undefined;

async function get(tenant: string, session: string): Promise<{ data: Uint8Array; answers: Answer[] }> {
  const answers = await ask({ type: "state_get", id: nextId++, tenant, session });
  const parts = answers.filter((a) => a.type === "state_data") as Extract<ControlToHost, { type: "state_data" }>[];
  const data = new Uint8Array(parts.reduce((n, p) => n + p.data.length, 0));
  let at = 0;
  for (const p of parts) {
    data.set(p.data, at);
    at += p.data.length;
  }
  return { data, answers };
}

describe("state in R2", () => {
  it("one part: put (acked, stored with its etag), head, get, delete — the object keyed by tenant and session, with the model and shape", async () => {
    await makeTenant("st-one", {});
    await openAtEdge("st-one", "sess-one");
    const data = bytesOf(1000, 1);
    const answers = await put("st-one", "sess-one", data);
    expect(answers.map((a) => a.type)).toEqual(["state_ack", "state_stored"]);
    const etag = stored(answers)!.etag;
    expect(stored(answers)!.bytes).toBe(1000);
    const obj = await env.SESSIONS.get(keyOf("st-one", "sess-one"));
    expect(new Uint8Array(await obj!.arrayBuffer())).toEqual(data);
    expect(obj!.customMetadata).toEqual({
      model: "state-model.gguf",
      n_layer: "2",
      bytes_per_entry: "64",
      tokens_seen: "8000",
      kv_bytes: "1000",
      format: "pkvf1",
    });
    const [info] = await ask({ type: "state_head", id: nextId++, tenant: "st-one", session: "sess-one" });
    expect(info).toMatchObject({ type: "state_info", exists: true, etag, bytes: 1000, meta: { format: "pkvf1" } });
    const got = await get("st-one", "sess-one");
    expect(got.data).toEqual(data);
    expect(got.answers[0]).toMatchObject({
      type: "state_data",
      part: 0,
      parts: 1,
      bytes: 1000,
      etag,
      meta: { n_layer: "2" },
    });
    expect(await ask({ type: "state_delete", id: nextId++, tenant: "st-one", session: "sess-one" })).toMatchObject([
      { type: "state_deleted" },
    ]);
    expect(await env.SESSIONS.head(keyOf("st-one", "sess-one"))).toBeNull();
    expect(await ask({ type: "state_head", id: nextId++, tenant: "st-one", session: "sess-one" })).toMatchObject([
      { type: "state_info", exists: false },
    ]);
    expect((await get("st-one", "sess-one")).answers).toMatchObject([{ type: "state_info", exists: false }]);
  });

  it("above 8 MiB: an R2 multipart upload, part by part; read back in parts, each after the host's data_ack", async () => {
    await makeTenant("st-multi", {});
    await openAtEdge("st-multi", "sess-multi");
    const data = bytesOf(HOST_STATE_PART_BYTES + (1 << 20) + 7, 2);
    const answers = await put("st-multi", "sess-multi", data);
    expect(answers.map((a) => a.type)).toEqual(["state_ack", "state_ack", "state_stored"]);
    expect(stored(answers)!.bytes).toBe(data.length);
    const head = await env.SESSIONS.head(keyOf("st-multi", "sess-multi"));
    expect(head!.size).toBe(data.length);
    expect(head!.etag).toBe(stored(answers)!.etag);
    expect(head!.customMetadata).toMatchObject({ model: "state-model.gguf", format: "pkvf1" });
    const got = await get("st-multi", "sess-multi");
    expect(got.answers.map((a) => [a.type, (a as { part?: number }).part])).toEqual([
      ["state_data", 0],
      ["state_data", 1],
    ]);
    expect(await digest(got.data)).toBe(await digest(data));
  }, 60_000);

  it("if_etag: a put over a version another host wrote since is state_conflict (one part and multipart), not counted; the current etag passes", async () => {
    await makeTenant("st-etag", {});
    await openAtEdge("st-etag", "sess-etag");
    const first = stored(await put("st-etag", "sess-etag", bytesOf(500, 3)))!.etag;
    const second = stored(await put("st-etag", "sess-etag", bytesOf(600, 4), first))!.etag;
    expect(second).not.toBe(first);
    // a host that still holds `first`: the session moved since
    const stale = failure(await put("st-etag", "sess-etag", bytesOf(700, 5), first));
    expect(stale).toMatchObject({ code: "state_conflict" });
    const staleBig = failure(await put("st-etag", "sess-etag", bytesOf(HOST_STATE_PART_BYTES + 10, 6), first));
    expect(staleBig).toMatchObject({ code: "state_conflict" });
    const head = await env.SESSIONS.head(keyOf("st-etag", "sess-etag"));
    expect(head).toMatchObject({ etag: second, size: 600 }); // nothing overwritten
    expect(await stubOf("st-etag").storedBytes()).toBe(600); // a refused checkpoint is not counted
  }, 60_000);

  it("the tenant's max_stored_bytes counts every session's checkpoint, fleet-wide: over it is stored_quota_exceeded", async () => {
    await makeTenant("st-quota", { max_stored_bytes: 1500 });
    await openAtEdge("st-quota", "sess-q1");
    await openAtEdge("st-quota", "sess-q2");
    expect(stored(await put("st-quota", "sess-q1", bytesOf(1000, 7)))).toBeDefined();
    const over = failure(await put("st-quota", "sess-q2", bytesOf(1000, 8)));
    expect(over).toMatchObject({ code: "stored_quota_exceeded" });
    expect(over!.message).toMatch(/max_stored_bytes 1500/);
    expect(await env.SESSIONS.head(keyOf("st-quota", "sess-q2"))).toBeNull();
    // a session's new checkpoint replaces its old one in the count
    expect(stored(await put("st-quota", "sess-q1", bytesOf(1400, 9)))).toBeDefined();
    expect(stored(await put("st-quota", "sess-q2", bytesOf(100, 10)))).toBeDefined();
    expect(await stubOf("st-quota").storedBytes()).toBe(1500);
  });

  it("a session the edge does not hold open stores nothing (not_found); bad names are bad_frame", async () => {
    await makeTenant("st-none", {});
    expect(failure(await put("st-none", "sess-unknown", bytesOf(10, 11)))).toMatchObject({ code: "not_found" });
    expect(await env.SESSIONS.head(keyOf("st-none", "sess-unknown"))).toBeNull();
    expect(failure(await put("st-none", "../escape", bytesOf(10, 12)))).toMatchObject({ code: "bad_frame" });
  });
});

describe("the edge deletes what it no longer holds", () => {
  it("DELETE /v1/sessions/{id}: the object and its stored bytes go", async () => {
    const k = await makeTenant("st-del", { requests_per_minute: 1000 });
    const made = await call("/v1/sessions", as(k, { document: "A short document." }));
    expect(made.status).toBe(201);
    const { id } = (await made.json()) as { id: string };
    expect(stored(await put("st-del", id, bytesOf(2000, 13)))).toBeDefined();
    expect(await stubOf("st-del").storedBytes()).toBe(2000);
    const r = await call(`/v1/sessions/${id}`, { ...as(k), method: "DELETE" });
    expect(await r.json()).toMatchObject({ deleted: true, host_closed: true });
    expect(await env.SESSIONS.head(keyOf("st-del", id))).toBeNull();
    expect(await stubOf("st-del").storedBytes()).toBe(0);
    // a late checkpoint of the deleted session is not kept
    expect(failure(await put("st-del", id, bytesOf(10, 14)))).toMatchObject({ code: "not_found" });
  });

  it("TTL expiry (the tenant's alarm): the object and its stored bytes go", async () => {
    await makeTenant("st-ttl", { session_ttl_s: 60 });
    await openAtEdge("st-ttl", "sess-ttl");
    expect(stored(await put("st-ttl", "sess-ttl", bytesOf(3000, 15)))).toBeDefined();
    await runInDurableObject(stubOf("st-ttl"), async (_o, state) => {
      const rec = (await state.storage.get<Record<string, number>>("session:sess-ttl"))!;
      rec.used_ms! -= 61_000;
      await state.storage.put("session:sess-ttl", rec);
    });
    await runDurableObjectAlarm(stubOf("st-ttl"));
    expect(await env.SESSIONS.head(keyOf("st-ttl", "sess-ttl"))).toBeNull();
    expect(await stubOf("st-ttl").storedBytes()).toBe(0);
  });
});
