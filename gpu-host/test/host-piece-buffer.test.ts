// Append pieces without an engine: bytes counted in UTF-8, joined with the final append's text,
// bound to the connection that sent them, dropped past 16 MiB.
import assert from "node:assert/strict";
import { test } from "node:test";

import { HostError } from "../src/host/errors.js";
import { MAX_PIECE_BUFFER_BYTES, PieceBuffer } from "../src/host/pieces.js";

test("pieces are counted in UTF-8 bytes and prefilled before the final append's own text", () => {
  const conn = {};
  const p = new PieceBuffer();
  p.from(conn);
  assert.equal(p.add(conn, "héllo "), 7);
  p.from(conn);
  assert.equal(p.add(conn, "wörld "), 14);
  assert.equal(p.take("!"), "héllo wörld !");
  assert.equal(p.bufferedBytes, 0);
  assert.equal(p.take(undefined), undefined, "nothing buffered: the final append's text as it came");
  p.add(conn, "x");
  assert.equal(p.take(undefined), "x");
});

test("pieces belong to their connection: another connection, a cancel or the connection closing drops them", () => {
  const mine = {};
  const other = {};
  const p = new PieceBuffer();
  p.add(mine, "abc");
  p.dropFrom(other);
  assert.equal(p.bufferedBytes, 3, "another connection closing leaves them");
  p.from(mine);
  assert.equal(p.bufferedBytes, 3);
  p.from(other);
  assert.equal(p.bufferedBytes, 0, "a piece from another connection starts afresh");
  p.add(other, "de");
  p.dropFrom(other);
  assert.equal(p.take("f"), "f");
  p.add(mine, "gh");
  p.drop();
  assert.equal(p.bufferedBytes, 0);
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
