// The host's error type and how an engine's failure becomes a host error frame.
import type { HostErrorCode } from "@pyramidkv/shared";

import { ENGINE_DIED, EngineRequestError } from "./engine.js";

/** Why a cache_miss (host.json error.reason): missing (the edge's store has no such state), damaged
 * (it cannot be decoded, or the engine refuses to restore it), incompatible (another model, shape
 * or state format), unavailable (not in this host's memory, and the edge's store cannot be read
 * now). The edge forgets its entry on missing and damaged only. */
export type CacheMissReason = "missing" | "damaged" | "incompatible" | "unavailable";

/** A request refused or failed by the host, answered as error{code, message, reason?}. */
export class HostError extends Error {
  constructor(
    readonly code: HostErrorCode,
    message: string,
    /** the error frame's `reason` (a cache_miss's CacheMissReason) */
    readonly reason?: string,
  ) {
    super(message);
  }
}

// Engine error codes that mean the same on the host protocol; any other one is 'internal'.
const PASSED_ON: readonly string[] = [
  "invalid",
  "unknown_session",
  "session_exists",
  "pool_full",
  "context_full",
  "busy",
  "cancelled",
  "too_large",
  "timeout", // the host's own deadline of an engine request (engine.ts)
];

/** The error frame's code, message and reason (absent: none) for anything a request threw. */
export function errorCode(e: unknown): { code: HostErrorCode; message: string; reason?: string } {
  if (e instanceof HostError)
    return { code: e.code, message: e.message, ...(e.reason !== undefined ? { reason: e.reason } : {}) };
  if (e instanceof EngineRequestError) {
    if (e.code === ENGINE_DIED)
      return { code: "engine_restarted", message: `${e.message}; the session is restored from its last saved state` };
    return { code: (PASSED_ON.includes(e.code) ? e.code : "internal") as HostErrorCode, message: e.message };
  }
  return { code: "internal", message: e instanceof Error ? e.message : String(e) };
}
