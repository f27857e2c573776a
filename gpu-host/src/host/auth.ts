// Who may connect: the edge, proving it knows the shared secret without sending it, for one tenant
// and one host, once.
//
// Scheme (0.8.0): `Authorization: Bearer pkv2.<expiry>.<nonce>.<hmac>.<tenant>` where expiry is a
// Unix time in seconds, nonce 32 random hex digits, and hmac is hex HMAC-SHA256(secret, the lines
// "pkv-edge-v2", expiry, tenant, host, nonce joined by "\n"). host is the upgrade request's Host
// header as the edge dialled it (normaliseHost), so a token for one host is refused by another;
// "\n" occurs in none of the fields (tenant names match TENANT_NAME, the host is checked). The host
// accepts a token whose expiry is in the future and at most MAX_TOKEN_TTL_S ahead, compares the
// MAC in constant time, refuses a nonce it has seen before its expiry (a replayed upgrade), and
// serves the connection only frames of the token's tenant (server.ts). The tenant is last in the
// token because tenant names may contain '.'. Workers mint it with crypto.subtle
// (worker/src/host-link.ts).
import { createHash, createHmac, randomBytes, timingSafeEqual } from "node:crypto";

import { edgeTokenMessage, normaliseHost } from "@pyramidkv/shared";

import { TENANT_NAME } from "./config.js";

export { normaliseHost };

export const MAX_TOKEN_TTL_S = 300;
/** Nonces remembered until their token expires; past this many live ones, upgrades get 503. */
export const MAX_NONCES = 1 << 20;
const TOKEN = /^Bearer pkv2\.(\d{1,12})\.([0-9a-f]{32})\.([0-9a-f]{64})\.([A-Za-z0-9_.-]{1,64})$/;
const OLD_TOKEN = /^Bearer \d{1,12}\.[0-9a-f]{64}$/;
const HOST = /^[a-z0-9._-]+(:\d{1,5})?$|^\[[0-9a-f:.]+\](:\d{1,5})?$/;

function mac(secret: string, expiry: number, tenant: string, host: string, nonce: string): string {
  return createHmac("sha256", secret)
    .update(edgeTokenMessage(expiry, tenant, host, nonce))
    .digest("hex");
}

export interface TokenFor {
  tenant: string;
  /** the host as the edge dials it: host[:port] of its URL */
  host: string;
  ttlSeconds?: number;
  nowMs?: number;
  nonce?: string;
}

/** A bearer token for the edge's link of `tenant` to `host` (the edge mints 120 s ones). */
export function makeEdgeToken(secret: string, t: TokenFor): string {
  const expiry = Math.floor((t.nowMs ?? Date.now()) / 1000) + (t.ttlSeconds ?? 120);
  const nonce = t.nonce ?? randomBytes(16).toString("hex");
  return `pkv2.${expiry}.${nonce}.${mac(secret, expiry, t.tenant, normaliseHost(t.host), nonce)}.${t.tenant}`;
}

export type Verdict = { ok: true; tenant: string } | { ok: false; status: 401 | 503; message: string };

/** The edge tokens of one host's upgrades: checks them and remembers their nonces until expiry. */
export class EdgeAuth {
  private readonly seen = new Map<string, number>(); // nonce -> expiry (s), in arrival order

  constructor(
    private readonly secret: string,
    private readonly maxNonces = MAX_NONCES,
  ) {}

  get remembered(): number {
    return this.seen.size;
  }

  verify(header: string | undefined, hostHeader: string | undefined, nowMs = Date.now()): Verdict {
    const refuse = (message: string): Verdict => ({ ok: false, status: 401, message });
    if (!header) return refuse("the edge token is missing: send Authorization: Bearer <edge token>");
    if (OLD_TOKEN.test(header))
      return refuse(
        "this edge token has the format of pyramidkv before 0.8.0 (<expiry>.<hmac>, valid for every tenant); " +
          "this host needs pkv2 tokens bound to a tenant and to this host: upgrade the edge worker",
      );
    const m = TOKEN.exec(header);
    if (!m) return refuse("malformed edge token: expected Bearer pkv2.<expiry>.<nonce>.<hmac>.<tenant>");
    const [, exp, nonce, hmac, tenant] = m as unknown as [string, string, string, string, string];
    if (!TENANT_NAME.test(tenant)) return refuse(`the edge token's tenant must match ${TENANT_NAME.source}`);
    const host = normaliseHost(hostHeader ?? "");
    if (!HOST.test(host)) return refuse(`the Host header '${(hostHeader ?? "").slice(0, 100)}' is not host[:port]`);
    const expiry = Number(exp);
    const now = Math.floor(nowMs / 1000);
    if (expiry < now) return refuse(`the edge token expired at ${expiry} (this host's clock: ${now})`);
    if (expiry > now + MAX_TOKEN_TTL_S)
      return refuse(
        `the edge token expires ${expiry - now} s ahead, more than ${MAX_TOKEN_TTL_S} s (this host's clock: ${now})`,
      );
    const want = Buffer.from(mac(this.secret, expiry, tenant, host, nonce), "hex");
    if (!timingSafeEqual(Buffer.from(hmac, "hex"), want))
      return refuse(
        `the edge token's signature does not match: another edge secret, or a token for a host other than '${host}'`,
      );
    this.forget(now);
    if (this.seen.has(nonce)) return refuse("the edge token was already used (each upgrade needs a new nonce)");
    if (this.seen.size >= this.maxNonces) {
      this.forget(now, true);
      if (this.seen.size >= this.maxNonces)
        return { ok: false, status: 503, message: "too many edge connections in the last minutes: retry later" };
    }
    this.seen.set(nonce, expiry);
    return { ok: true, tenant };
  }

  /** Drops the nonces of expired tokens: from the front (oldest first), or all of them when `all`. */
  private forget(now: number, all = false): void {
    for (const [nonce, expiry] of this.seen) {
      if (expiry < now) this.seen.delete(nonce);
      else if (!all) return;
    }
  }
}

/** true when `header` is `Bearer <token>` (compared in constant time, whatever its length). */
export function bearerMatches(header: string | undefined, token: string): boolean {
  const got = /^Bearer (.+)$/.exec(header ?? "")?.[1];
  if (got === undefined) return false;
  const digest = (s: string) => createHash("sha256").update(s).digest();
  return timingSafeEqual(digest(got), digest(token));
}
