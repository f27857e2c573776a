/// <reference types="node" />
// The host<->edge protocol: host.json loads with the same parser as engine.json, the TypeScript
// table equals it, messages round-trip, and bad input becomes typed errors, never exceptions.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { test } from "node:test";

import {
  CONTROL_TYPES,
  decodeControlMessage,
  decodeHostMessage,
  encodeChannelFrame,
  encodeHostMessage,
  encodeMsgpack,
  HOST_ERROR_CODES,
  HOST_MAX_FRAME_BYTES,
  HOST_MESSAGES,
  HOST_PROTOCOL_SPEC,
  HOST_PROTOCOL_VERSION,
  parseProtocolSpec,
  prefixChannel,
  splitChannelFrame,
} from "../src/index.js";

const hostJsonPath = fileURLToPath(new URL("../../protocol/host.json", import.meta.url)); // from dist/test/

test("host.json loads: version 3, 32 MiB messages, to_host/from_host directions", () => {
  assert.equal(HOST_PROTOCOL_VERSION, 3);
  assert.equal(HOST_MAX_FRAME_BYTES, 32 * 1024 * 1024);
  assert.equal(HOST_PROTOCOL_SPEC.messages.get("open_session")?.direction, "to_host");
  assert.equal(HOST_PROTOCOL_SPEC.messages.get("token")?.direction, "from_host");
  assert.throws(
    () => parseProtocolSpec(JSON.parse(readFileSync(hostJsonPath, "utf8"))),
    /direction must be to_engine or from_engine/,
  );
});

test("the TypeScript host message table equals host.json field for field", () => {
  const json = JSON.parse(readFileSync(hostJsonPath, "utf8")) as {
    messages: Record<
      string,
      { direction: string; fields: Record<string, { type: string; required?: boolean; doc?: string }> }
    >;
  };
  assert.deepEqual(json.messages.error?.fields.code?.doc?.split(", "), [...HOST_ERROR_CODES]);
  const fromJson = Object.fromEntries(
    Object.entries(json.messages).map(([name, m]) => [
      name,
      {
        direction: m.direction,
        fields: Object.fromEntries(Object.entries(m.fields).map(([f, s]) => [f, s.type + (s.required ? "" : "?")])),
      },
    ]),
  );
  assert.deepEqual(JSON.parse(JSON.stringify(HOST_MESSAGES)), fromJson);
});

test("host messages round-trip; invalid and malformed ones are typed errors", () => {
  const open = { type: "open_session", id: 1, tenant: "a", session: "s", budget: 64 } as const;
  const got = decodeHostMessage(encodeHostMessage(open), "to_host");
  assert.deepEqual(got, { ok: true, message: open });
  assert.deepEqual(decodeHostMessage(encodeMsgpack({ type: "append", id: 2, session: "s" }), "to_host"), {
    ok: false,
    code: "invalid",
    error: "append: missing required field 'tenant'",
    fatal: false,
    id: 2,
    session: "s",
  });
  assert.equal(decodeHostMessage(encodeMsgpack({ type: "nope", id: 2 })).ok, false);
  const bad = decodeHostMessage(new Uint8Array([0xc1]));
  assert.ok(!bad.ok && bad.code === "bad_frame");
  const wrongWay = decodeHostMessage(encodeHostMessage({ type: "closed", id: 1, session: "s" }), "to_host");
  assert.ok(!wrongWay.ok && wrongWay.error === "closed: message goes from_host, expected to_host");
  const big = decodeHostMessage(new Uint8Array(HOST_MAX_FRAME_BYTES + 1));
  assert.ok(!big.ok && big.code === "too_large");
  assert.throws(() => encodeHostMessage({ type: "append", id: 1 } as never), /missing required field 'tenant'/);
});

test("3.0 channel frames: 4-byte big-endian channel + the map; control and session types kept apart", () => {
  const hb = {
    type: "heartbeat",
    pool_bytes: 10,
    kv_used_bytes: 4,
    free_bytes: 6,
    sessions: 2,
    resident: 1,
    active: 0,
    queued: 0,
    draining: false,
  } as const;
  const frame = encodeChannelFrame(0, hb);
  assert.deepEqual([...frame.subarray(0, 4)], [0, 0, 0, 0]);
  const split = splitChannelFrame(frame);
  assert.ok(split);
  assert.equal(split.ch, 0);
  assert.deepEqual(decodeControlMessage(split.payload, "from_host"), { ok: true, message: hb });
  // a control message is not a session message, and the reverse
  const asSession = decodeHostMessage(split.payload, "from_host");
  assert.equal(asSession.ok, false);
  assert.equal(!asSession.ok && asSession.code, "unknown_type");
  const open = { type: "open_session", id: 1, tenant: "a", session: "s" } as const;
  const onCh = splitChannelFrame(encodeChannelFrame(0x01020304, open));
  assert.equal(onCh?.ch, 0x01020304);
  assert.deepEqual(decodeHostMessage(onCh!.payload, "to_host"), { ok: true, message: open });
  const asControl = decodeControlMessage(onCh!.payload, "to_host");
  assert.equal(!asControl.ok && asControl.code, "unknown_type");
  // prefixChannel is what the edge does to a channel's payload; too short a message is null
  assert.deepEqual(prefixChannel(7, new Uint8Array([9])), new Uint8Array([0, 0, 0, 7, 9]));
  assert.equal(splitChannelFrame(new Uint8Array(3)), null);
  assert.throws(() => prefixChannel(-1, new Uint8Array()), /not a uint32/);
  assert.throws(() => prefixChannel(2 ** 32, new Uint8Array()), /not a uint32/);
  // the control types are exactly host.json's messages documented as channel 0's
  const json = JSON.parse(readFileSync(hostJsonPath, "utf8")) as { messages: Record<string, { doc?: string }> };
  const channel0 = Object.entries(json.messages)
    .filter(([, m]) => m.doc?.startsWith("3.0, channel 0") === true)
    .map(([n]) => n)
    .sort();
  assert.deepEqual([...CONTROL_TYPES].sort(), channel0);
});
