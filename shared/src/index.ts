// Protocol and types shared by the worker and the GPU host: the engine's stdio protocol
// (msgpack frames, versioned, defined in protocol/engine.json) and the compression settings
// that every side validates the same way (methods.ts: the engine's methods and defaults).

export {
  ENGINE_DEFAULTS,
  ENGINE_METHODS,
  EXACT_METHOD,
  isKvMethod,
  KV_METHODS,
  methodInfo,
  minBudget,
  parseEngineCatalog,
} from "./methods.js";
export type { EngineCatalog, EngineDefaults, EngineMethod, KvMethod } from "./methods.js";

export {
  decodeMsgpack,
  encodeFrame,
  encodeMsgpack,
  ERROR_CODES,
  FrameDecoder,
  MAX_FRAME_BYTES,
  MESSAGES,
  parseProtocolSpec,
  PROTOCOL_MINOR,
  PROTOCOL_SPEC,
  PROTOCOL_VERSION,
  validateFrame,
} from "./protocol.js";
export type {
  DecodedFrame,
  Direction,
  EngineMessage,
  ErrorCode,
  FieldSpec,
  FieldType,
  FromEngineMessage,
  Message,
  MessageSpec,
  MessageType,
  ProtocolSpec,
  ToEngineMessage,
} from "./protocol.js";
export { decodeMessage, encodeMessage, ENGINE_SPEC_FORMAT } from "./protocol.js";
export type { AnyDirection, DecodedMessage, HostDirection, MessageOf, MessageTable, SpecFormat } from "./protocol.js";
export {
  CONTROL_CHANNEL,
  CONTROL_TYPES,
  decodeControlMessage,
  decodeHostMessage,
  encodeChannelFrame,
  encodeHostMessage,
  HOST_STATE_PART_BYTES,
  MAX_CHANNEL,
  prefixChannel,
  splitChannelFrame,
  HOST_ERROR_CODES,
  HOST_MAX_FRAME_BYTES,
  HOST_MESSAGES,
  HOST_PROTOCOL_SPEC,
  HOST_PROTOCOL_VERSION,
} from "./host-protocol.js";
export type {
  AnyHostFrame,
  AnyHostMessage,
  ControlFromHost,
  ControlToHost,
  FromHostMessage,
  HostErrorCode,
  HostMessage,
  HostMessageType,
  ToHostMessage,
} from "./host-protocol.js";
