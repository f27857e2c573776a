// The GPU host <-> edge protocol (shared/protocol/host.json), for the host and the worker alike.
//
// Same spec format, parser, validator and msgpack codec as the engine's stdio protocol
// (protocol.ts); only the transport differs. 3.0: the host dials the edge and keeps one socket;
// each binary WebSocket message is a 4-byte big-endian channel number and one msgpack map, at
// most 32 MiB (Cloudflare's WebSocket message cap). Channel 0 carries the control messages
// (CONTROL_TYPES), every other channel one request's session messages.
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
      from_cache: "str?",
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
  snapshot: {
    direction: "to_host",
    fields: { id: "uint", tenant: "str", session: "str", key: "str", max_bytes: "uint?" },
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
      cache_fingerprint: "str?",
    },
  },
  opened: {
    direction: "from_host",
    fields: {
      id: "uint",
      session: "str",
      method: "str",
      budget: "uint",
      reserved_bytes: "uint",
      tokens_seen: "uint?",
      cached_bytes: "uint?",
    },
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
  snapshotted: {
    direction: "from_host",
    fields: { id: "uint", session: "str", key: "str", bytes: "uint", tokens_seen: "uint", kv_bytes: "uint" },
  },
  error: {
    direction: "from_host",
    fields: { id: "uint?", session: "str?", code: "str", message: "str", reason: "str?" },
  },
  // 3.0: control messages, channel 0 only (CONTROL_TYPES)
  host_hello: {
    direction: "from_host",
    fields: {
      protocol: "uint",
      protocol_minor: "uint",
      model: "str",
      n_layer: "uint",
      n_ctx: "uint",
      pool_bytes: "uint",
      bytes_per_entry: "uint",
      chat_template: "str?",
      heartbeat_ms: "uint",
      host_version: "str?",
      cache_fingerprint: "str?",
    },
  },
  heartbeat: {
    direction: "from_host",
    fields: {
      pool_bytes: "uint",
      kv_used_bytes: "uint",
      free_bytes: "uint",
      sessions: "uint",
      resident: "uint",
      active: "uint",
      queued: "uint",
      draining: "bool",
    },
  },
  state_put: {
    direction: "from_host",
    fields: {
      id: "uint",
      tenant: "str",
      session: "str",
      part: "uint",
      parts: "uint",
      data: "bin",
      bytes: "uint",
      meta: "map?",
      if_etag: "str?",
      cache: "bool?",
    },
  },
  state_get: { direction: "from_host", fields: { id: "uint", tenant: "str", session: "str", cache: "bool?" } },
  state_head: { direction: "from_host", fields: { id: "uint", tenant: "str", session: "str", cache: "bool?" } },
  state_delete: { direction: "from_host", fields: { id: "uint", tenant: "str", session: "str" } },
  draining: { direction: "from_host", fields: {} },
  drained: { direction: "from_host", fields: {} },
  data_ack: { direction: "from_host", fields: { id: "uint", part: "uint" } },
  channel_drop: { direction: "from_host", fields: { ch: "uint", reason: "str?" } },
  state_ack: { direction: "to_host", fields: { id: "uint", part: "uint" } },
  welcome: { direction: "to_host", fields: { name: "str", heartbeat_ms: "uint" } },
  channel_open: { direction: "to_host", fields: { ch: "uint", tenant: "str" } },
  channel_close: { direction: "to_host", fields: { ch: "uint", reason: "str?" } },
  state_stored: { direction: "to_host", fields: { id: "uint", etag: "str", bytes: "uint" } },
  state_data: {
    direction: "to_host",
    fields: { id: "uint", part: "uint", parts: "uint", data: "bin", bytes: "uint", etag: "str", meta: "map?" },
  },
  state_info: {
    direction: "to_host",
    fields: { id: "uint", exists: "bool", etag: "str?", bytes: "uint?", meta: "map?" },
  },
  state_deleted: { direction: "to_host", fields: { id: "uint" } },
  control_error: { direction: "to_host", fields: { id: "uint?", code: "str", message: "str" } },
} as const satisfies MessageTable;

type HostMessages = typeof HOST_MESSAGES;
export type HostMessageType = keyof HostMessages;
export type HostMessage<T extends HostMessageType> = MessageOf<HostMessages, T>;

/** 3.0: the control messages, carried on channel 0 only; every other type is a session message. */
export const CONTROL_TYPES: ReadonlySet<string> = new Set([
  "host_hello",
  "heartbeat",
  "state_put",
  "state_get",
  "state_head",
  "state_delete",
  "draining",
  "drained",
  "data_ack",
  "channel_drop",
  "state_ack",
  "welcome",
  "channel_open",
  "channel_close",
  "state_stored",
  "state_data",
  "state_info",
  "state_deleted",
  "control_error",
]);
type ControlType =
  | "host_hello"
  | "heartbeat"
  | "state_put"
  | "state_get"
  | "state_head"
  | "state_delete"
  | "draining"
  | "drained"
  | "data_ack"
  | "channel_drop"
  | "state_ack"
  | "welcome"
  | "channel_open"
  | "channel_close"
  | "state_stored"
  | "state_data"
  | "state_info"
  | "state_deleted"
  | "control_error";
type SessionType = Exclude<HostMessageType, ControlType>;
type Dir<T extends HostMessageType> = HostMessages[T]["direction"];

/** Every host message, control and session. */
export type AnyHostFrame = { [T in HostMessageType]: HostMessage<T> }[HostMessageType];
/** A session message (channels ≥ 1), either direction. */
export type AnyHostMessage = { [T in SessionType]: HostMessage<T> }[SessionType];
/** A session message to the host. */
export type ToHostMessage = { [T in SessionType]: Dir<T> extends "to_host" ? HostMessage<T> : never }[SessionType];
/** A session message from the host. */
export type FromHostMessage = {
  [T in SessionType]: Dir<T> extends "from_host" ? HostMessage<T> : never;
}[SessionType];
/** A control message (channel 0) from the edge to the host. */
export type ControlToHost = { [T in ControlType]: Dir<T> extends "to_host" ? HostMessage<T> : never }[ControlType];
/** A control message (channel 0) from the host to the edge. */
export type ControlFromHost = {
  [T in ControlType]: Dir<T> extends "from_host" ? HostMessage<T> : never;
}[ControlType];

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
  "cache_miss",
] as const;
export type HostErrorCode = (typeof HOST_ERROR_CODES)[number];

/** One WebSocket message: the msgpack map, validated. Throws on an invalid message or one over
 * HOST_MAX_FRAME_BYTES (a bug on the sender's side: anything larger must be chunked). */
export function encodeHostMessage(msg: AnyHostFrame): Uint8Array {
  const bytes = encodeMessage(msg as Record<string, unknown>, HOST_PROTOCOL_SPEC, "encodeHostMessage");
  if (bytes.length > HOST_MAX_FRAME_BYTES) {
    throw new Error(
      `encodeHostMessage: message of ${bytes.length} bytes exceeds max_frame_bytes ${HOST_MAX_FRAME_BYTES}`,
    );
  }
  return bytes;
}

/** Decodes and validates one session message (a channel's payload); never throws (untrusted input).
 * A control type here is `unknown_type`: control messages travel on channel 0 only. */
export function decodeHostMessage<D extends HostDirection>(
  bytes: Uint8Array,
  direction?: D,
): DecodedMessage<D extends "to_host" ? ToHostMessage : D extends "from_host" ? FromHostMessage : AnyHostMessage> {
  const d = decodeAny(bytes, direction);
  if (d.ok && CONTROL_TYPES.has(d.message.type))
    return {
      ok: false,
      code: "unknown_type",
      error: `'${d.message.type}' is a control message: it travels on channel 0 only`,
      fatal: false,
    } as never;
  return d as never;
}

/** Decodes and validates one control message (channel 0's payload); never throws. A session type
 * here is `unknown_type`. */
export function decodeControlMessage<D extends HostDirection>(
  bytes: Uint8Array,
  direction: D,
): DecodedMessage<D extends "to_host" ? ControlToHost : ControlFromHost> {
  const d = decodeAny(bytes, direction);
  if (d.ok && !CONTROL_TYPES.has(d.message.type))
    return {
      ok: false,
      code: "unknown_type",
      error: `'${d.message.type}' is a session message: it travels on a channel ≥ 1, not on channel 0`,
      fatal: false,
    } as never;
  return d as never;
}

function decodeAny(bytes: Uint8Array, direction?: HostDirection): DecodedMessage<AnyHostFrame> {
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

/** 3.0: the largest part of a state transfer (state_put / state_data); R2 multipart parts are
 * equal in size but the last, and at least 5 MiB. */
export const HOST_STATE_PART_BYTES = 8 * 1024 * 1024;
/** The channel of control messages. */
export const CONTROL_CHANNEL = 0;
/** The largest channel number. */
export const MAX_CHANNEL = 0xffffffff;

/** One WebSocket message of the host socket: the 4-byte big-endian channel, then the msgpack map. */
export function encodeChannelFrame(ch: number, msg: AnyHostFrame): Uint8Array {
  return prefixChannel(ch, encodeHostMessage(msg));
}

/** `payload` (an encoded msgpack map, as a channel's socket at the edge carries it) behind its channel number. */
export function prefixChannel(ch: number, payload: Uint8Array): Uint8Array {
  if (!Number.isInteger(ch) || ch < 0 || ch > MAX_CHANNEL) throw new Error(`channel ${ch} is not a uint32`);
  const out = new Uint8Array(4 + payload.length);
  new DataView(out.buffer).setUint32(0, ch, false);
  out.set(payload, 4);
  return out;
}

/** Splits a host-socket message into its channel and its payload (not decoded; a view, no copy);
 * null when it is shorter than the 4-byte channel. */
export function splitChannelFrame(bytes: Uint8Array): { ch: number; payload: Uint8Array } | null {
  if (bytes.length < 4) return null;
  const ch = new DataView(bytes.buffer, bytes.byteOffset, 4).getUint32(0, false);
  return { ch, payload: bytes.subarray(4) };
}
