// The text of an append sent in pieces (`append.more: true`, host protocol v2), buffered per
// session until the final append prefills it as one engine append. Pieces belong to the request
// whose turn the session is in (session.ts's Turn: its request_id, else its connection): a piece
// of anyone else is refused with session_busy and never drops them; a cancel, the turn ending or
// its connection closing drops them (docs/HOST.md, "Pieces").
import { HostError } from "./errors.js";

/** Text buffered from `append` pieces per session before its final piece; beyond this the pieces
 * are dropped and the piece is refused with too_large. */
export const MAX_PIECE_BUFFER_BYTES = 16 << 20;

export class PieceBuffer {
  private pieces: string[] = [];
  private bytes = 0;
  /** whose the buffered pieces are (compared by identity only) */
  private owner?: unknown;

  /** UTF-8 bytes buffered so far. */
  get bufferedBytes(): number {
    return this.bytes;
  }

  /** Buffers a piece of `owner`; returns the bytes buffered. A piece of another owner while pieces
   * are buffered is refused (session_busy) and drops nothing; past the bound every piece is
   * dropped and too_large thrown. */
  add(owner: unknown, text: string): number {
    if (this.pieces.length > 0 && this.owner !== owner)
      throw new HostError("session_busy", "append: another request's pieces are buffered on this session");
    const bytes = Buffer.byteLength(text, "utf8");
    if (this.bytes + bytes > MAX_PIECE_BUFFER_BYTES) {
      const had = this.bytes;
      this.drop();
      throw new HostError(
        "too_large",
        `append: ${had + bytes} bytes of pieces exceed the host's buffer of ${MAX_PIECE_BUFFER_BYTES} bytes; the pieces were dropped`,
      );
    }
    this.pieces.push(text);
    this.bytes += bytes;
    this.owner = owner;
    return this.bytes;
  }

  /** The final append's text: the buffered pieces followed by its own (its own alone when nothing
   * is buffered); the buffer is emptied. */
  take(text: string | undefined): string | undefined {
    const whole = this.pieces.length > 0 ? this.pieces.join("") + (text ?? "") : text;
    this.drop();
    return whole;
  }

  drop(): void {
    this.pieces = [];
    this.bytes = 0;
    this.owner = undefined;
  }

  /** `owner`'s turn ended (or its connection closed): its pieces go. */
  dropFrom(owner: unknown): void {
    if (this.owner === owner) this.drop();
  }
}
