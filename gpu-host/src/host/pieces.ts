// The text of an append sent in pieces (`append.more: true`, host protocol v2), buffered per
// session until the final append prefills it as one engine append. Pieces are bound to the
// connection that sent them: a piece or final append from another connection, a cancel, or the
// connection closing drops them (docs/HOST.md, "Pieces").
import { HostError } from "./errors.js";

/** Text buffered from `append` pieces per session before its final piece; beyond this the pieces
 * are dropped and the piece is refused with too_large. */
export const MAX_PIECE_BUFFER_BYTES = 16 << 20;

export class PieceBuffer {
  private pieces: string[] = [];
  private bytes = 0;
  /** the connection the buffered pieces came from (compared by identity only) */
  private owner?: object;

  /** UTF-8 bytes buffered so far. */
  get bufferedBytes(): number {
    return this.bytes;
  }

  /** A piece or final append arrives from `connection`: pieces of another connection are dropped,
   * the new one starts afresh. */
  from(connection: object): void {
    // issue 12: this drops another connection's pieces silently; serialise them or answer session_busy.
    if (this.owner !== undefined && this.owner !== connection) this.drop();
  }

  /** Buffers a piece of `connection`; returns the bytes buffered. Past the bound every piece is
   * dropped and too_large thrown. */
  add(connection: object, text: string): number {
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
    this.owner = connection;
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

  /** `connection` closed: its pieces go. */
  dropFrom(connection: object): void {
    if (this.owner === connection) this.drop();
  }
}
