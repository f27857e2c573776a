// Server-sent events as a ReadableStream: `data: <json>\n\n` frames, a `: ping` comment every
// PING_MS so idle streams survive proxies, and onCancel when the client goes away (the caller
// closes its host connection, which cancels the generation on the host).
import { ApiError } from "./errors.js";

export const PING_MS = 15_000;

export interface SseSink {
  data(value: unknown): void;
  event(name: string, value: unknown): void;
  done(): void;
  readonly cancelled: boolean;
}

export function sseResponse(
  run: (sink: SseSink) => Promise<void>,
  onCancel: () => void,
  signal?: AbortSignal,
  headers: Record<string, string> = {},
): Response {
  const enc = new TextEncoder();
  let ping: ReturnType<typeof setInterval> | null = null;
  let cancelled = false;
  let closed = false;
  // Either way of learning that the client left: the stream is cancelled, or the request's signal
  // aborts (compatibility flag enable_request_signal).
  const cancel = () => {
    if (cancelled || closed) return;
    cancelled = true;
    if (ping !== null) clearInterval(ping);
    onCancel();
  };
  signal?.addEventListener("abort", cancel);
  const stream = new ReadableStream<Uint8Array>({
    start(controller) {
      const write = (s: string) => {
        if (closed || cancelled) return;
        try {
          controller.enqueue(enc.encode(s));
        } catch {
          cancelled = true;
        }
      };
      const sink: SseSink = {
        data: (v) => write(`data: ${JSON.stringify(v)}\n\n`),
        event: (name, v) => write(`event: ${name}\ndata: ${JSON.stringify(v)}\n\n`),
        done: () => write("data: [DONE]\n\n"),
        get cancelled() {
          return cancelled;
        },
      };
      ping = setInterval(() => write(": ping\n\n"), PING_MS);
      write(": stream open\n\n");
      void run(sink)
        .catch((e: unknown) => {
          const err =
            e instanceof ApiError
              ? e
              : new ApiError(500, "server_error", e instanceof Error ? e.message : String(e), null, "internal");
          sink.data(err.body());
        })
        .finally(() => {
          clearInterval(ping);
          if (!closed && !cancelled) controller.close();
          closed = true;
        });
    },
    cancel() {
      cancel();
    },
  });
  return new Response(stream, {
    headers: {
      "content-type": "text/event-stream; charset=utf-8",
      "cache-control": "no-cache",
      connection: "keep-alive",
      ...headers,
    },
  });
}
