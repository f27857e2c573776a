// Tenants never see GPU host names (they are the operator's, and would tell a tenant how the
// fleet is made): a host is named to a tenant by an opaque id, the first 64 bits of
// HMAC-SHA256(EDGE_SECRET, "pkv-host-id." + name) — stable, and not guessable from a list of
// candidate names while EDGE_SECRET is set (a fixed key when it is not). The admin's host list
// shows each host's id beside its name.
import type { Env } from "./env.js";
import { ApiError, toApiError } from "./errors.js";
import { registry } from "./routing.js";

const keys = new Map<string, Promise<CryptoKey>>();
const NO_SECRET = "pkv-no-edge-secret";

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

/** The id tenants see for the host `name` ("" for none: a session not yet on a host). */
export async function hostId(env: Env, name: string): Promise<string> {
  if (name === "") return "";
  const key = await keyOf(env.EDGE_SECRET || NO_SECRET);
  const mac = new Uint8Array(await crypto.subtle.sign("HMAC", key, new TextEncoder().encode(`pkv-host-id.${name}`)));
  return `host-${[...mac.slice(0, 8)].map((b) => b.toString(16).padStart(2, "0")).join("")}`;
}

/** `text` with every connected host's name (a whole word; names are [a-z0-9-], host-token.ts) replaced by the host's id. */
export async function withoutHostNames(env: Env, text: string, names?: string[]): Promise<string> {
  const known =
    names ??
    (await registry(env)
      .list()
      .then((hosts) => hosts.map((h) => h.name))
      .catch(() => [] as string[]));
  let out = text;
  for (const name of known) {
    const word = new RegExp(`(?<![A-Za-z0-9-])${name}(?![A-Za-z0-9-])`, "g");
    if (word.test(out)) out = out.replace(word, await hostId(env, name));
  }
  return out;
}

/** An error as a tenant may see it: its message names no host. */
export async function forTenant(env: Env, e: unknown): Promise<ApiError> {
  const err = toApiError(e);
  const message = await withoutHostNames(env, err.message);
  return message === err.message ? err : new ApiError(err.status, err.type, message, err.param, err.code, err.headers);
}
