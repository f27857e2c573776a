// GPU hosts' tokens: `pkvh.<name>.<64 hex>`, made by the admin API (POST /admin/hosts) and shown
// once; KV keeps host:<name> → {name, token_sha256, created}. GET /hosts/connect (the host's
// WebSocket, `pkv host --connect … --host-token …`) is checked here before the upgrade reaches
// the host's Durable Object: an unknown, malformed or revoked token is 401 invalid_host_token.
import { sha256Hex } from "./auth.js";
import type { Env } from "./env.js";
import { ApiError } from "./errors.js";

/** A host's name: the DNS-label alphabet, at most 63 characters. */
export const HOST_NAME = /^[a-z0-9][a-z0-9-]{0,62}$/;
const TOKEN = /^pkvh\.([a-z0-9][a-z0-9-]{0,62})\.([0-9a-f]{64})$/;

export interface HostTokenRecord {
  name: string;
  token_sha256: string;
  created: number; // Unix seconds
}

export const hostStub = (env: Env, name: string) => env.HOSTS.get(env.HOSTS.idFromName(name));

export function newHostToken(name: string): string {
  const secret = crypto.getRandomValues(new Uint8Array(32));
  return `pkvh.${name}.${[...secret].map((b) => b.toString(16).padStart(2, "0")).join("")}`;
}

const badToken = (why: string) =>
  new ApiError(401, "authentication_error", `invalid host token: ${why}`, null, "invalid_host_token");

/** The host a bearer token belongs to; 401 invalid_host_token otherwise. The hashes are compared in constant time. */
export async function hostOfToken(env: Env, authorization: string | undefined): Promise<string> {
  const bearer = /^Bearer\s+(\S+)$/.exec(authorization ?? "")?.[1];
  if (bearer === undefined) throw badToken("send 'Authorization: Bearer pkvh.<name>.<64 hex>' (pkv host --host-token)");
  const m = TOKEN.exec(bearer);
  if (!m) throw badToken("it does not have the form pkvh.<name>.<64 hex>");
  const name = m[1]!;
  const rec = await env.KEYS.get<HostTokenRecord>(`host:${name}`, "json");
  const enc = new TextEncoder();
  const got = enc.encode(await sha256Hex(bearer));
  // compared even for an unknown host, so that the time taken says nothing about which names exist
  const want = enc.encode(rec?.token_sha256 ?? "0".repeat(64));
  if (!rec || got.length !== want.length || !crypto.subtle.timingSafeEqual(got, want))
    throw badToken(`unknown or revoked (host '${name}'): make one with \`npx pkv admin host create ${name}\``);
  return name;
}
