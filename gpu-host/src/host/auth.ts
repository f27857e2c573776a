// Who may connect: the edge, proving it knows the shared secret without sending it.
//
// Scheme: `Authorization: Bearer <expiry>.<hmac>` where expiry is a Unix time in seconds and hmac
// is hex HMAC-SHA256(secret, "pkv-edge." + expiry). The host accepts a token whose expiry is in the
// future and at most MAX_TOKEN_TTL_S ahead (a leaked token is useless within minutes; the secret
// never crosses the wire), compared in constant time. Workers can mint it with crypto.subtle.
import { createHmac, timingSafeEqual } from "node:crypto";

export const MAX_TOKEN_TTL_S = 3600;

function mac(secret: string, expiry: number): string {
  return createHmac("sha256", secret).update(`pkv-edge.${expiry}`).digest("hex");
}

/** A bearer token for the edge, valid for ttlSeconds. */
export function makeEdgeToken(secret: string, ttlSeconds = 300, nowMs = Date.now()): string {
  const expiry = Math.floor(nowMs / 1000) + ttlSeconds;
  return `${expiry}.${mac(secret, expiry)}`;
}

/** true when the Authorization header carries a valid, unexpired token for `secret`. */
export function verifyEdgeAuthorization(header: string | undefined, secret: string, nowMs = Date.now()): boolean {
  const m = /^Bearer (\d{1,12})\.([0-9a-f]{64})$/.exec(header ?? "");
  if (!m) return false;
  const expiry = Number(m[1]);
  const now = Math.floor(nowMs / 1000);
  if (expiry < now || expiry > now + MAX_TOKEN_TTL_S) return false;
  const want = Buffer.from(mac(secret, expiry), "hex");
  const got = Buffer.from(m[2]!, "hex");
  return got.length === want.length && timingSafeEqual(got, want);
}
