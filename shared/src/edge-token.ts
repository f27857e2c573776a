// The edge → host credential's signed text, defined once for the host (gpu-host/src/host/auth.ts,
// node's HMAC) and the worker (worker/src/host-link.ts, WebCrypto's): docs/HOST.md "Auth".

/** A Host header as both sides compare it: lower case, no trailing dot, no default port. */
export function normaliseHost(host: string): string {
  let h = host
    .trim()
    .toLowerCase()
    .replace(/:(80|443)$/, "");
  if (h.endsWith(".")) h = h.slice(0, -1);
  return h.replace(/\.:(\d+)$/, ":$1");
}

/** What a `pkv2` token's HMAC signs: lines that cannot occur in a tenant name or a Host header. */
export function edgeTokenMessage(expiry: number, tenant: string, host: string, nonce: string): string {
  return ["pkv-edge-v2", String(expiry), tenant, normaliseHost(host), nonce].join("\n");
}
