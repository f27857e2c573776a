// One error shape at the HTTP edge: OpenAI's {"error": {message, type, param, code}}, with the
// headers the official clients act on: Retry-After on every 429, 503 and 504, x-should-retry: false
// on the 429s that waiting cannot clear (the SDKs would otherwise retry them) and true on the 503s
// a retry clears (checkpoint_failed). The table of codes is in docs/WORKER.md.
import type { Context } from "hono";

export type ErrorType =
  | "invalid_request_error"
  | "authentication_error"
  | "not_found_error"
  | "rate_limit_error"
  | "server_error";

export class ApiError extends Error {
  constructor(
    readonly status: 400 | 401 | 404 | 405 | 409 | 413 | 426 | 429 | 500 | 502 | 503 | 504,
    readonly type: ErrorType,
    message: string,
    readonly param: string | null = null,
    readonly code: string | null = null,
    readonly headers: Record<string, string> = {},
  ) {
    super(message);
  }

  /** the host's error.reason (3.1, why a cache_miss), when the error is a host's; never in the body */
  reason?: string;

  body(): { error: { message: string; type: ErrorType; param: string | null; code: string | null } } {
    return { error: { message: this.message, type: this.type, param: this.param, code: this.code } };
  }
}

/** Seconds a client should wait before retrying a 503 or 504 (a session whose host went away moves to another host at its next request). */
export const RETRY_AFTER_UNAVAILABLE_S = 5;
/** A 429 that only a change of the tenant's limits or its sessions can clear. */
const NO_RETRY = { "x-should-retry": "false", "retry-after": "60" };

export const invalid = (param: string, message: string, code = "invalid_value") =>
  new ApiError(400, "invalid_request_error", message, param, code);
export const notFound = (message: string, code = "not_found") =>
  new ApiError(404, "not_found_error", message, null, code);
export const noHost = (message: string) => new ApiError(503, "server_error", message, null, "host_unavailable");
export const sessionExpired = (id: string) =>
  new ApiError(
    404,
    "not_found_error",
    `session '${id.slice(0, 80)}' expired: it was idle longer than the tenant's session_ttl_s and was closed`,
    null,
    "session_expired",
  );
export const sessionLimit = (message: string) =>
  new ApiError(429, "rate_limit_error", message, null, "session_limit", NO_RETRY);
export const contextExceeded = (message: string, param: string | null) =>
  new ApiError(400, "invalid_request_error", message, param, "context_length_exceeded");

/** A host's error code → the HTTP status and type a client sees (`param`: the field a context error is about). */
export function fromHostError(code: string, message: string, param: string | null = null): ApiError {
  switch (code) {
    case "quota_exceeded":
    case "session_limit":
      return new ApiError(429, "rate_limit_error", message, null, code, NO_RETRY);
    case "context_full":
      return contextExceeded(message, param);
    case "too_large":
      return new ApiError(413, "invalid_request_error", message, null, code);
    case "invalid":
      return new ApiError(400, "invalid_request_error", message, null, code);
    case "unknown_session":
    case "session_lost":
    case "session_expired":
      return new ApiError(404, "not_found_error", message, null, code);
    case "session_busy":
      return new ApiError(
        409,
        "invalid_request_error",
        `another request is using this session; send one message at a time (the host: ${message})`,
        null,
        code,
        { "retry-after": "1" },
      );
    case "stored_quota_exceeded":
      return new ApiError(
        429,
        "rate_limit_error",
        `the tenant's offloaded session state would exceed its max_stored_bytes on this host; delete sessions first (the host: ${message})`,
        null,
        code,
        NO_RETRY,
      );
    case "timeout":
      return new ApiError(504, "server_error", message, null, code);
    case "checkpoint_failed":
      // the session was rolled back to its last checkpoint: the same request can be sent again
      return new ApiError(503, "server_error", message, null, code, { "x-should-retry": "true" });
    case "unauthorized":
      return new ApiError(
        500,
        "server_error",
        `the GPU host refused this edge's credential for the tenant (an edge bug): ${message}`,
        null,
        code,
      );
    case "pool_full":
    case "busy":
    case "engine_restarted":
    case "shutting_down":
      return new ApiError(503, "server_error", message, null, code);
    default:
      return new ApiError(502, "server_error", message, null, code);
  }
}

/** Any thrown value as an ApiError (anything else is a 500 internal). */
export const toApiError = (e: unknown): ApiError =>
  e instanceof ApiError
    ? e
    : new ApiError(500, "server_error", e instanceof Error ? e.message : String(e), null, "internal");

export function errorResponse(c: Context, e: unknown): Response {
  const err = toApiError(e);
  const headers = { ...err.headers };
  if ((err.status === 429 || err.status === 503 || err.status === 504) && headers["retry-after"] === undefined)
    headers["retry-after"] = String(RETRY_AFTER_UNAVAILABLE_S);
  return c.json(err.body(), err.status, headers);
}
