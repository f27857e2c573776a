// Append pieces without an engine: bytes counted in UTF-8, joined with the final append's text,
// bound to the request (turn) that sent them, dropped past 16 MiB; a session's turn (Turn) refuses
// another request with session_busy, lets a silent holder go after the grace.
import assert from "node:assert/strict";
import { test } from "node:test";

import { HostError } from "../src/host/errors.js";
import { MAX_PIECE_BUFFER_BYTES, PieceBuffer } from "../src/host/pieces.js";
import { type Sink, Turn } from "../src/host/session.js";

test("pieces are counted in UTF-8 bytes and prefilled before the final append's own text", () => {
  const conn = {};
  const p = new PieceBuffer();
  assert.equal(p.add(conn, "héllo "), 7);
  assert.equal(p.add(conn, "wörld "), 14);
  assert.equal(p.take("!"), "héllo wörld !");
  assert.equal(p.bufferedBytes, 0);
  assert.equal(p.take(undefined), undefined, "nothing buffered: the final append's text as it came");
  p.add(conn, "x");
  assert.equal(p.take(undefined), "x");
});

test("pieces belong to their owner: another owner's piece is refused (session_busy) and drops nothing; a cancel or the owner's end drops them", () => {
  const mine = {};
  const other = {};
  const p = new PieceBuffer();
  p.add(mine, "abc");
  p.dropFrom(other);
  assert.equal(p.bufferedBytes, 3, "another owner ending leaves them");
  assert.throws(
    () => p.add(other, "x"),
    (e: unknown) => e instanceof HostError && e.code === "session_busy",
  );
  assert.equal(p.bufferedBytes, 3, "a piece of another owner drops nothing");
  p.dropFrom(mine);
  p.add(other, "de");
  p.dropFrom(other);
  assert.equal(p.take("f"), "f");
  p.add(mine, "gh");
  p.drop();
  assert.equal(p.bufferedBytes, 0);
});

test("a turn is one request's: another gets session_busy until it ends, its connection closes, or it idles past the grace", () => {
  let now = 1000;
  const turn = new Turn(30_000, () => now);
  const a = { open: true } as unknown as Sink;
  const b = { open: true } as unknown as Sink;
  const busy = (e: unknown) => e instanceof HostError && e.code === "session_busy";
  const t1 = turn.claim("req-1", a, true, "s");
  assert.equal(turn.claim("req-1", a, false, "s"), t1, "the holder again");
  assert.equal(turn.claim(undefined, a, false, "s"), t1, "its connection without a request_id: the holder's");
  assert.throws(() => turn.claim("req-1", b, true, "s"), busy, "its request_id from another connection");
  assert.throws(() => turn.claim("req-2", a, true, "s"), busy, "another request on the same connection");
  assert.throws(() => turn.claim(undefined, b, true, "s"), busy, "another connection");
  now += 30_000;
  assert.throws(() => turn.claim("req-3", a, false, "s"), busy, "past the grace, but a request still runs");
  const t3 = turn.claim("req-3", a, true, "s");
  assert.notEqual(t3, t1, "past the grace and idle: the turn changes hands");
  turn.touch(t3);
  assert.equal(turn.releaseSink(b), undefined);
  assert.equal(turn.releaseSink(a), t3, "its connection closed");
  assert.equal(turn.current, undefined);
  const t4 = turn.claim(undefined, b, true, "s");
  assert.equal(turn.claim("req-5", b, true, "s"), t4, "a connection's turn takes the request_id it is given");
  turn.release(t1);
  assert.equal(turn.current, t4, "only the holder's release ends it");
  turn.release();
  assert.equal(turn.current, undefined);
});

test("past 16 MiB the pieces are dropped and the piece is too_large, naming the sizes", () => {
  const conn = {};
  const p = new PieceBuffer();
  assert.equal(p.add(conn, "a".repeat(MAX_PIECE_BUFFER_BYTES - 1)), MAX_PIECE_BUFFER_BYTES - 1);
  assert.equal(p.add(conn, "b"), MAX_PIECE_BUFFER_BYTES, "exactly the bound fits");
  assert.throws(
    () => p.add(conn, "c"),
    (e: unknown) =>
      e instanceof HostError &&
      e.code === "too_large" &&
      e.message.includes(`${MAX_PIECE_BUFFER_BYTES + 1} bytes`) &&
      e.message.includes(String(MAX_PIECE_BUFFER_BYTES)),
  );
  assert.equal(p.bufferedBytes, 0);
  assert.equal(p.add(conn, "z"), 1);
});
