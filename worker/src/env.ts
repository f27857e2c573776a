// Bindings (wrangler.jsonc) and per-request variables, typed once. The bindings' types are
// generated from wrangler.jsonc by `wrangler types` into worker-configuration.d.ts (with the
// runtime's own types for this compatibility date and flags): run `npm run types` in worker/
// after changing wrangler.jsonc; test/worker-types.test.ts fails until then. Secrets are not in
// wrangler.jsonc (`wrangler secret put`) and may be unset, so they are declared here, optional.
import type { TenantConfig } from "./tenant.js";

declare global {
  namespace Cloudflare {
    interface Env {
      /** the key of the host ids tenants see (host-id.ts); optional: a fixed key when unset */
      EDGE_SECRET?: string;
      /** bearer token of /admin/* */
      ADMIN_TOKEN?: string;
    }
  }
}

export type Env = Cloudflare.Env;

export interface Vars {
  tenant: string;
  /** the tenant's limits and defaults, read with the rate check (null: a tenant without a config) */
  tenantConfig: TenantConfig | null;
  /** x-request-id of this request (the client's, or a new one), passed to the host as request_id */
  requestId: string;
  /** the rate check's numbers, for the x-ratelimit-* headers */
  rate?: { limit: number; remaining: number; reset_s: number };
  /** the compression serving this request, for the x-pkv-kv-* headers */
  kv?: { method: string; budget: number };
}

export type AppEnv = { Bindings: Env; Variables: Vars };

export function intVar(value: string | undefined, fallback: number): number {
  const n = Number(value);
  return value !== undefined && value !== "" && Number.isSafeInteger(n) && n > 0 ? n : fallback;
}
