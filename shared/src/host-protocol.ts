// The GPU host <-> edge protocol (shared/protocol/host.json), for the host and the worker alike.
//
// Same spec format, parser, validator and msgpack codec as the engine's stdio protocol
// (protocol.ts); only the transport differs: one msgpack map per binary WebSocket message, no
// length prefix, at most 32 MiB (Cloudflare's WebSocket message cap).
import hostJson from "../protocol/host.json" with { type: "json" };
import {
  decodeMessage,
  type DecodedMessage,
  encodeMessage,
  type HostDirection,
  type MessageOf,
  type MessageTable,
  parseProtocolSpec,
  type ProtocolSpec,
} from "./protocol.js";

export const HOST_PROTOCOL_SPEC: ProtocolSpec = parseProtocolSpec(hostJson, {
  file: "host.json",
  directions: ["to_host", "from_host"],
});
export const HOST_PROTOCOL_VERSION: number = HOST_PROTOCOL_SPEC.version;
export const HOST_MAX_FRAME_BYTES: number = HOST_PROTOCOL_SPEC.maxFrameBytes;

// The TypeScript types derive from this table; test/host-protocol.test.ts checks it equals host.json.
export const HOST_MESSAGES = {
  open_session: {
    direction: "to_host",
    fields: {
      id: "uint",
      tenant: "str",
      session: "str",
      method: "str?",
      budget: "uint?",
      window: "uint?",
      beta: "uint?",
      kernel_size: "uint?",
      pooling: "str?",
      head_aggregation: "str?",
      chunk_size: "uint?",
      prompt_tokens: "uint?",
      kv_type: "str?",
      request_id: "str?",
      ephemeral: "bool?",
      prompt_bytes: "uint?",
    },
  },
  append: {
    direction: "to_host",
    fields: {
      id: "uint",
      tenant: "str",
      session: "str",
      text: "str?",
      tokens: "uint[]?",
      chat: "bool?",
      more: "bool?",
      messages: "map[]?",
      add_generation_prompt: "bool?",
      max_tokens: "uint?",
      request_id: "str?",
    },
  },
  generate: {
    direction: "to_host",
    fields: {
      id: "uint",
      tenant: "str",
      session: "str",
      max_tokens: "uint?",
      temperature: "float?",
      top_k: "uint?",
      top_p: "float?",
      seed: "uint?",
      stop: "str[]?",
      min_p: "float?",
      presence_penalty: "float?",
      frequency_penalty: "float?",
      repetition_penalty: "float?",
      penalty_last_n: "uint?",
      logprobs: "bool?",
      top_logprobs: "uint?",
      grammar: "str?",
      json_schema: "str?",
      request_id: "str?",
    },
  },
  cancel: { direction: "to_host", fields: { id: "uint", tenant: "str", session: "str" } },
  close: { direction: "to_host", fields: { id: "uint", tenant: "str", session: "str" } },
  stats: { direction: "to_host", fields: { id: "uint", tenant: "str", session: "str?" } },
  set_tenant: {
    direction: "to_host",
    fields: {
      id: "uint",
      tenant: "str",
      kv_quota_bytes: "uint?",
      max_sessions: "uint?",
      policy: "str?",
      session_ttl_s: "uint?",
      max_stored_bytes: "uint?",
    },
  },
  hello: {
    direction: "from_host",
    fields: {
      protocol: "uint",
      model: "str",
      n_layer: "uint",
      n_ctx: "uint",
      pool_bytes: "uint",
      bytes_per_entry: "uint",
      protocol_minor: "uint?",
      chat_template: "str?",
    },
  },
  opened: {
    direction: "from_host",
    fields: { id: "uint", session: "str", method: "str", budget: "uint", reserved_bytes: "uint" },
  },
  progress: { direction: "from_host", fields: { id: "uint", session: "str", done: "uint", total: "uint" } },
  appended: { direction: "from_host", fields: { id: "uint", session: "str", tokens_seen: "uint", kv_bytes: "uint" } },
  token: {
    direction: "from_host",
    fields: { id: "uint", session: "str", tokens: "uint[]", text: "str", logprobs: "map[]?" },
  },
  done: {
    direction: "from_host",
    fields: { id: "uint", session: "str", reason: "str", new_tokens: "uint", text: "str", seed: "uint?" },
  },
  queued: { direction: "from_host", fields: { id: "uint", session: "str", lane: "str" } },
  buffered: { direction: "from_host", fields: { id: "uint", session: "str", buffered_bytes: "uint" } },
  cancelled: { direction: "from_host", fields: { id: "uint", session: "str" } },
  closed: { direction: "from_host", fields: { id: "uint", session: "str" } },
  stats_result: {
    direction: "from_host",
    fields: {
      id: "uint",
      tenant: "str",
      session: "str?",
      resident: "bool?",
      tokens_seen: "uint?",
      kv_bytes: "uint?",
      full_kv_bytes: "uint?",
      layer_kv_lengths: "uint[]?",
      kv_quota_bytes: "uint?",
      kv_used_bytes: "uint?",
      max_sessions: "uint?",
      sessions: "uint?",
      offloaded: "uint?",
      policy: "str?",
      stored_bytes: "uint?",
      max_stored_bytes: "uint?",
      session_ttl_s: "uint?",
      idle_s: "uint?",
    },
  },
  tenant_set: {
    direction: "from_host",
    fields: {
      id: "uint",
      tenant: "str",
      kv_quota_bytes: "uint",
      max_sessions: "uint",
      policy: "str",
      session_ttl_s: "uint?",
      max_stored_bytes: "uint?",
    },
  },
  error: { direction: "from_host", fields: { id: "uint?", session: "str?", code: "str", message: "str" } },
} as const satisfies MessageTable;

type HostMessages = typeof HOST_MESSAGES;
export type HostMessageType = keyof HostMessages;
export type HostMessage<T extends HostMessageType> = MessageOf<HostMessages, T>;
export type AnyHostMessage = { [T in HostMessageType]: HostMessage<T> }[HostMessageType];
export type ToHostMessage = {
  [T in HostMessageType]: HostMessages[T]["direction"] extends "to_host" ? HostMessage<T> : never;
}[HostMessageType];
export type FromHostMessage = {
  [T in HostMessageType]: HostMessages[T]["direction"] extends "from_host" ? HostMessage<T> : never;
}[HostMessageType];

/** Codes of host 'error' frames, as listed in host.json's doc of error.code (a test compares them). */
export const HOST_ERROR_CODES = [
  "bad_frame",
  "too_large",
  "unknown_type",
  "invalid",
  "unknown_session",
  "session_exists",
  "quota_exceeded",
  "session_limit",
  "pool_full",
  "context_full",
  "busy",
  "cancelled",
  "engine_restarted",
  "session_lost",
  "shutting_down",
  "internal",
  "session_busy",
  "timeout",
  "checkpoint_failed",
  "session_expired",
  "stored_quota_exceeded",
  "unauthorized",
] as const;
export type HostErrorCode = (typeof HOST_ERROR_CODES)[number];

/** One WebSocket message: the msgpack map, validated. Throws on an invalid message or one over
 * HOST_MAX_FRAME_BYTES (a bug on the sender's side: anything larger must be chunked). */
export function encodeHostMessage(msg: AnyHostMessage): Uint8Array {
  const bytes = encodeMessage(msg as Record<string, unknown>, HOST_PROTOCOL_SPEC, "encodeHostMessage");
  if (bytes.length > HOST_MAX_FRAME_BYTES) {
    throw new Error(
      `encodeHostMessage: message of ${bytes.length} bytes exceeds max_frame_bytes ${HOST_MAX_FRAME_BYTES}`,
    );
  }
  return bytes;
}

/** Decodes and validates one WebSocket message; never throws (untrusted input). */
export function decodeHostMessage<D extends HostDirection>(
  bytes: Uint8Array,
  direction?: D,
): DecodedMessage<D extends "to_host" ? ToHostMessage : D extends "from_host" ? FromHostMessage : AnyHostMessage> {
  if (bytes.length > HOST_MAX_FRAME_BYTES) {
    return {
      ok: false,
      code: "too_large",
      error: `message of ${bytes.length} bytes exceeds max_frame_bytes ${HOST_MAX_FRAME_BYTES}`,
      fatal: false,
    };
  }
  return decodeMessage(bytes, HOST_PROTOCOL_SPEC, direction) as never;
}
