// Long texts travel to the host in pieces (host protocol v2, append.more): each piece at most
// maxBytes of UTF-8, cut just before a space or newline when one is near (never inside a
// surrogate pair). The host joins the pieces before tokenising, so the cuts cannot change tokens.

const utf8Len = (cp: number) => (cp < 0x80 ? 1 : cp < 0x800 ? 2 : cp < 0x10000 ? 3 : 4);

export function utf8Bytes(text: string): number {
  let n = 0;
  for (let i = 0; i < text.length; i++) {
    const cp = text.codePointAt(i)!;
    n += utf8Len(cp);
    if (cp > 0xffff) i++;
  }
  return n;
}

export function splitText(text: string, maxBytes: number): string[] {
  if (maxBytes < 4) throw new RangeError(`splitText: maxBytes ${maxBytes} must be >= 4`);
  const pieces: string[] = [];
  let start = 0;
  while (start < text.length) {
    let bytes = 0;
    let i = start;
    let lastSpace = -1;
    while (i < text.length) {
      const cp = text.codePointAt(i)!;
      const w = utf8Len(cp);
      if (bytes + w > maxBytes) break;
      if (i > start && (cp === 0x20 || cp === 0x0a)) lastSpace = i;
      bytes += w;
      i += cp > 0xffff ? 2 : 1;
    }
    // Prefer a cut before whitespace in the last quarter of the piece.
    const end = i < text.length && lastSpace > start && lastSpace - start >= ((i - start) * 3) / 4 ? lastSpace : i;
    pieces.push(text.slice(start, end));
    start = end;
  }
  return pieces;
}
