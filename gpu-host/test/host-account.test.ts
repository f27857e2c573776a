// A session's KV account without an engine: resident sessions account max(steady, reservation) +
// in-flight, sessions outside the engine nothing unless busy being opened or restored, and each
// step of a session's life (open, append, generate, offload, restore, engine death) moves the
// bytes as docs/HOST.md ("Admission") says.
import assert from "node:assert/strict";
import { test } from "node:test";

import { KvAccount } from "../src/host/account.js";

const IDLE = false;
const BUSY = true;

test("open: the reservation counts while the session is being opened, and after it is", () => {
  const kv = new KvAccount();
  assert.equal(kv.accounted(BUSY), 0);
  kv.grant(5000); // admitted outside the engine: a reservation
  assert.deepEqual([kv.reserved, kv.inFlight, kv.resident], [5000, 0, false]);
  assert.equal(kv.accounted(BUSY), 5000);
  assert.equal(kv.accounted(IDLE), 0, "outside the engine and idle: nothing");
  kv.opened();
  assert.equal(kv.accounted(IDLE), 5000);
});

test("append: the peak is in flight on top of what the session holds; the engine's size then replaces both", () => {
  const kv = new KvAccount();
  kv.grant(5000);
  kv.opened();
  kv.grant(kv.held + 700); // admitted for an append of one chunk
  assert.deepEqual([kv.held, kv.inFlight], [5000, 700]);
  assert.equal(kv.accounted(BUSY), 5700);
  kv.settle(1200);
  assert.deepEqual([kv.steady, kv.reserved, kv.inFlight], [1200, 0, 0]);
  assert.equal(kv.accounted(IDLE), 1200);
  kv.measure(1300);
  kv.end();
  assert.equal(kv.accounted(IDLE), 1300);
  kv.grant(100); // below what it holds: nothing in flight
  assert.equal(kv.inFlight, 0);
});

test("generate: its peak ends with it; a reservation stands until an append settles it", () => {
  const kv = new KvAccount();
  kv.grant(5000);
  kv.opened();
  kv.grant(kv.held + 3000);
  assert.equal(kv.accounted(BUSY), 8000);
  kv.measure(400); // stats after a generate on an empty session
  kv.end();
  assert.deepEqual([kv.steady, kv.reserved, kv.held], [400, 5000, 5000]);
  assert.equal(kv.accounted(IDLE), 5000);
});

test("offload and restore: nothing while offloaded, steady + peak reserved while restoring, then steady + peak", () => {
  const kv = new KvAccount(2000); // adopted from the store
  assert.equal(kv.resident, false);
  assert.equal(kv.accounted(IDLE), 0);
  kv.grant(kv.steady + 300);
  assert.equal(kv.reserved, 2300);
  assert.equal(kv.accounted(BUSY), 2300);
  kv.restored(300);
  assert.deepEqual([kv.resident, kv.reserved, kv.inFlight], [true, 0, 300]);
  assert.equal(kv.accounted(BUSY), 2300);
  kv.end();
  assert.equal(kv.accounted(IDLE), 2000);
  kv.offloaded();
  assert.equal(kv.accounted(IDLE), 0);
  assert.equal(kv.steady, 2000, "its size is kept for the next restore");
});

test("a failed restore releases its reservation; an engine death drops the peak and the residency", () => {
  const kv = new KvAccount(2000);
  kv.grant(2500);
  kv.unreserve();
  assert.equal(kv.accounted(BUSY), 0);
  kv.grant(2500);
  kv.restored(500);
  kv.evicted();
  assert.deepEqual([kv.resident, kv.inFlight, kv.steady], [false, 0, 2000]);
  assert.equal(kv.accounted(IDLE), 0);
});
