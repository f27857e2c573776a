// Bindings (wrangler.jsonc) and per-request variables, typed once.
import type { HostRegistry } from "./registry.js";
import type { TenantState } from "./tenant.js";

export interface Env {
  KEYS: KVNamespace;
  TENANTS: DurableObjectNamespace<TenantState>;
  ROUTER: DurableObjectNamespace<HostRegistry>;
  /** shared secret of the GPU hosts (pkv host --edge-secret) */
  EDGE_SECRET?: string;
  /** bearer token of /admin/* */
  ADMIN_TOKEN?: string;
  PKV_HOSTS?: string;
  PKV_PIECE_BYTES?: string;
  PKV_MAX_BODY_BYTES?: string;
}

export interface Vars {
  tenant: string;
}

export type AppEnv = { Bindings: Env; Variables: Vars };

export function intVar(value: string | undefined, fallback: number): number {
  const n = Number(value);
  return value !== undefined && value !== "" && Number.isSafeInteger(n) && n > 0 ? n : fallback;
}
