// One error shape at the HTTP edge: OpenAI's {"error": {message, type, param, code}}.
import type { Context } from "hono";

export type ErrorType =
  | "invalid_request_error"
  | "authentication_error"
  | "not_found_error"
  | "rate_limit_error"
  | "server_error";

export class ApiError extends Error {
  constructor(
    readonly status: 400 | 401 | 404 | 405 | 413 | 429 | 500 | 502 | 503,
    readonly type: ErrorType,
    message: string,
    readonly param: string | null = null,
    readonly code: string | null = null,
    readonly headers: Record<string, string> = {},
  ) {
    super(message);
  }

  body(): { error: { message: string; type: ErrorType; param: string | null; code: string | null } } {
    return { error: { message: this.message, type: this.type, param: this.param, code: this.code } };
  }
}

export const invalid = (param: string, message: string, code = "invalid_value") =>
  new ApiError(400, "invalid_request_error", message, param, code);
export const notFound = (message: string, code = "not_found") =>
  new ApiError(404, "not_found_error", message, null, code);
export const noHost = (message: string) => new ApiError(503, "server_error", message, null, "host_unavailable");

/** A host's error code → the HTTP status and type a client sees. */
export function fromHostError(code: string, message: string): ApiError {
  switch (code) {
    case "quota_exceeded":
    case "session_limit":
      return new ApiError(429, "rate_limit_error", message, null, code);
    case "too_large":
    case "context_full":
      return new ApiError(413, "invalid_request_error", message, null, code);
    case "invalid":
      return new ApiError(400, "invalid_request_error", message, null, code);
    case "unknown_session":
    case "session_lost":
      return new ApiError(404, "not_found_error", message, null, code);
    case "pool_full":
    case "busy":
    case "engine_restarted":
    case "shutting_down":
      return new ApiError(503, "server_error", message, null, code);
    default:
      return new ApiError(502, "server_error", message, null, code);
  }
}

export function errorResponse(c: Context, e: unknown): Response {
  const err =
    e instanceof ApiError
      ? e
      : new ApiError(500, "server_error", e instanceof Error ? e.message : String(e), null, "internal");
  return c.json(err.body(), err.status, err.headers);
}
