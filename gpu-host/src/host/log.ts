// The host's log lines (stderr, one line each). A line about one request carries the edge's
// x-request-id (the frame's request_id) so an operator can follow a client's request from the
// edge's logs into the host's.

/** Longest request id kept in a log line (the edge's ids are UUIDs or shorter). */
const MAX_REQUEST_ID = 128;

/** `[request_id] ` for a line about that request, "" without one. Control characters become '?',
 * so an id can neither break the line nor forge another. */
export function requestTag(requestId: string | undefined): string {
  if (requestId === undefined || requestId === "") return "";
  const safe = Array.from(requestId.slice(0, MAX_REQUEST_ID * 2))
    .slice(0, MAX_REQUEST_ID)
    .map((c) => (c < " " || c === "\x7f" ? "?" : c))
    .join("");
  return `[${safe}] `;
}

export type LogWriter = (line: string) => void;

let writer: LogWriter = (line) => process.stderr.write(line);

/** Tests capture the lines; returns the previous writer. */
export function setLogWriter(w: LogWriter): LogWriter {
  const before = writer;
  writer = w;
  return before;
}

/** One line `pkv host: [request_id] text`; control characters in the text (a session id, an
 * engine message) become '?' as well. */
export function hostLog(text: string, requestId?: string): void {
  // biome-ignore lint/suspicious/noControlCharactersInRegex: matching them is the point
  writer(`pkv host: ${requestTag(requestId)}${text.replace(/[\x00-\x1f\x7f]/g, "?")}\n`);
}
