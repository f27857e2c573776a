// Tenants never see GPU host URLs (they would learn the hosts' addresses, and with them a way
// around the edge): a host is named to a tenant by an opaque id, the first 64 bits of
// HMAC-SHA256(EDGE_SECRET, "pkv-host-id." + url) — stable, and not guessable from a list of
// candidate URLs without the secret. The admin's host list shows each host's id beside its URL.
import type { Env } from "./env.js";
import { ApiError, toApiError } from "./errors.js";
import { registry } from "./routing.js";

const keys = new Map<string, Promise<CryptoKey>>();

function keyOf(secret: string): Promise<CryptoKey> {
  let k = keys.get(secret);
  if (!k) {
    k = crypto.subtle.importKey("raw", new TextEncoder().encode(secret), { name: "HMAC", hash: "SHA-256" }, false, [
      "sign",
    ]);
    keys.set(secret, k);
  }
  return k;
}

/** The id tenants see for the host at `url` ("" for none: a session not yet on a host). */
export async function hostId(env: Env, url: string): Promise<string> {
  if (url === "") return "";
  const key = await keyOf(env.EDGE_SECRET || "pkv-no-edge-secret");
  const mac = new Uint8Array(await crypto.subtle.sign("HMAC", key, new TextEncoder().encode(`pkv-host-id.${url}`)));
  return `host-${[...mac.slice(0, 8)].map((b) => b.toString(16).padStart(2, "0")).join("")}`;
}

/** `text` with every registered host's URL (and its host:port, as connect errors name it) replaced by the host's id. */
export async function withoutHostUrls(env: Env, text: string): Promise<string> {
  const hosts = await registry(env)
    .list()
    .catch(() => []);
  let out = text;
  for (const h of hosts) {
    const id = await hostId(env, h.url);
    out = out.replaceAll(h.url, id);
    const bare = URL.canParse(h.url) ? new URL(h.url).host : "";
    if (bare !== "") out = out.replaceAll(bare, id);
  }
  return out;
}

/** An error as a tenant may see it: its message names no host URL. */
export async function forTenant(env: Env, e: unknown): Promise<ApiError> {
  const err = toApiError(e);
  const message = await withoutHostUrls(env, err.message);
  return message === err.message ? err : new ApiError(err.status, err.type, message, err.param, err.code, err.headers);
}
