// The worker as a client calls it in tests: requests to the app's default export, tenants and
// keys made through the admin API, error bodies unpacked.
import { ENGINE_DEFAULTS } from "@pyramidkv/shared";
import { exports } from "cloudflare:workers";
import { expect } from "vitest";

export const ADMIN = { authorization: "Bearer test-admin-token", "content-type": "application/json" };

export const call = (path: string, init: RequestInit = {}) =>
  exports.default.fetch(new Request(`http://edge${path}`, init));

export async function makeTenant(name: string, limits: Record<string, unknown>): Promise<string> {
  expect(
    (await call(`/admin/tenants/${name}`, { method: "PUT", headers: ADMIN, body: JSON.stringify(limits) })).status,
  ).toBe(200);
  const r = await call(`/admin/tenants/${name}/keys`, { method: "POST", headers: ADMIN });
  expect(r.status).toBe(201);
  return ((await r.json()) as { key: string }).key;
}

/** Headers of a tenant's request, with a JSON body (POST) when one is given. */
export const as = (key: string, body?: unknown) => ({
  headers: { authorization: `Bearer ${key}`, "content-type": "application/json" },
  ...(body === undefined ? {} : { method: "POST", body: typeof body === "string" ? body : JSON.stringify(body) }),
});

export async function error(r: Response) {
  const j = (await r.json()) as { error: { type: string; code: string; param: string | null; message: string } };
  return { status: r.status, ...j.error };
}

/** A host's row of GET /admin/hosts (undefined: no such host). */
export async function hostRow(name: string): Promise<Record<string, unknown> & { live: boolean; connected: boolean }> {
  const r = (await (await call("/admin/hosts", { headers: ADMIN })).json()) as {
    hosts: (Record<string, unknown> & { name: string; live: boolean; connected: boolean })[];
  };
  return r.hosts.find((h) => h.name === name)!;
}

/** Waits until `check` holds (for effects that finish after the response, e.g. closes sent in the background). */
export async function eventually(check: () => boolean, what: string, ms = 2000): Promise<void> {
  const until = Date.now() + ms;
  while (!check()) {
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** The `data:` payloads of an SSE response, in order (comments and event names dropped). */
export async function* readSse(r: Response): AsyncGenerator<{ data: string }> {
  const text = await r.text();
  for (const block of text.split("\n\n")) {
    const data = block
      .split("\n")
      .filter((l) => l.startsWith("data: "))
      .map((l) => l.slice(6));
    if (data.length > 0) yield { data: data.join("\n") };
  }
}

// ---- prompt-cache keys, written from the contract (docs/WORKER.md), not from prompt-cache.ts ----
const utf8 = new TextEncoder();
async function sha(...parts: Uint8Array[]): Promise<Uint8Array> {
  const all = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    all.set(p, at);
    at += p.length;
  }
  return new Uint8Array(await crypto.subtle.digest("SHA-256", all));
}
export type Msg = { role: string; content: string };
/** A key as docs/WORKER.md defines it: chain_0 seeded by the model, the engine's default compression and the host's cache_fingerprint (null: the host says none). */
export async function contractKey(
  kind: "doc" | "reply",
  messages: Msg[],
  model: string,
  fingerprint: string | null = null,
): Promise<string> {
  const seed = [model, ENGINE_DEFAULTS.method, ENGINE_DEFAULTS.budget, ...(fingerprint !== null ? [fingerprint] : [])];
  let chain = await sha(utf8.encode(`pkv-cache-v1\n${JSON.stringify(seed)}`));
  for (const m of messages) chain = await sha(chain, utf8.encode(JSON.stringify([m.role, m.content])));
  return [...(await sha(chain, utf8.encode(kind)))].map((b) => b.toString(16).padStart(2, "0")).join("");
}
