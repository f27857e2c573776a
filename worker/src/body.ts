// Request bodies read under a byte limit that is enforced while reading: a declared content-length
// over the limit is refused before anything is read, and a body without one (chunked) is refused
// as soon as the bytes read pass the limit — it is never read whole first. Bytes are counted, not
// characters (413 too_large).
import { type Env, intVar } from "./env.js";
import { ApiError } from "./errors.js";

export const DEFAULT_MAX_BODY_BYTES = 8 << 20;

/** PKV_MAX_BODY_BYTES, or 8 MiB. */
export const maxBodyBytes = (env: Env) => intVar(env.PKV_MAX_BODY_BYTES, DEFAULT_MAX_BODY_BYTES);

const tooLarge = (message: string) => new ApiError(413, "invalid_request_error", message, null, "too_large");

export async function readBody(req: Request, maxBytes: number): Promise<Uint8Array> {
  const declared = Number(req.headers.get("content-length") ?? "0");
  if (declared > maxBytes) throw tooLarge(`request body of ${declared} bytes exceeds the limit of ${maxBytes} bytes`);
  if (!req.body) return new Uint8Array(0);
  const reader = req.body.getReader();
  const chunks: Uint8Array[] = [];
  let size = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    size += value.byteLength;
    if (size > maxBytes) {
      // Stop the upload here: the rest is never pulled.
      reader.cancel().catch(() => {});
      throw tooLarge(`request body exceeds the limit of ${maxBytes} bytes`);
    }
    chunks.push(value);
  }
  if (chunks.length === 1) return chunks[0]!;
  const body = new Uint8Array(size);
  let at = 0;
  for (const c of chunks) {
    body.set(c, at);
    at += c.byteLength;
  }
  return body;
}
