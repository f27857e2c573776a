// One engine child process (pkv-engine serve --stdio): framing, request ids, and routing of the
// engine's frames to the request they answer. Knows nothing of tenants or sessions' meaning.
import { type ChildProcessWithoutNullStreams, spawn } from "node:child_process";
import { EventEmitter } from "node:events";

import {
  encodeFrame,
  FrameDecoder,
  type FromEngineMessage,
  type Message,
  type ToEngineMessage,
} from "@pyramidkv/shared";

import { engineBinary } from "../engine/engine-path.js";

export interface EngineOptions {
  bin?: string;
  model?: string;
  kvPoolBytes?: number;
  chunkSize?: number;
  threads?: number;
  ctxSize?: number;
  /** the default KV storage type (--kv-type) */
  kvType?: string;
  /** how long to wait for 'hello' */
  startTimeoutMs?: number;
}

export type EngineHello = Message<"hello">;

/** An 'error' frame answering a request, or the engine's death while the request was open. */
export class EngineRequestError extends Error {
  constructor(
    readonly code: string,
    message: string,
  ) {
    super(message);
  }
}

export const ENGINE_DIED = "engine_died";

type Pending = {
  onFrame: (m: FromEngineMessage) => boolean; // true: the request is answered completely
  onFail: (e: EngineRequestError) => void;
};

type Request = ToEngineMessage extends infer M ? (M extends { id: number } ? Omit<M, "id"> : never) : never;

// The frame that completes each request type (an 'error' frame completes any of them).
const FINAL: Record<string, string> = {
  open: "opened",
  append: "appended",
  generate: "done",
  cancel: "cancelled",
  close: "closed",
  stats: "stats_result",
  save: "saved",
  restore: "restored",
  fork: "forked",
  shutdown: "bye",
};

export class EngineProcess extends EventEmitter<{ exit: [code: number | null, signal: NodeJS.Signals | null] }> {
  private nextId = 1;
  private readonly pending = new Map<number, Pending>();
  private exited = false;
  private stderrTail = "";

  private constructor(
    private readonly child: ChildProcessWithoutNullStreams,
    readonly hello: EngineHello,
  ) {
    super();
  }

  get pid(): number | undefined {
    return this.child.pid;
  }

  get alive(): boolean {
    return !this.exited;
  }

  static start(o: EngineOptions = {}): Promise<EngineProcess> {
    const args = ["serve", "--stdio"];
    if (o.model !== undefined) args.push("--model", o.model);
    if (o.kvPoolBytes !== undefined) args.push("--kv-pool-bytes", String(o.kvPoolBytes));
    if (o.chunkSize !== undefined) args.push("--chunk-size", String(o.chunkSize));
    if (o.threads !== undefined) args.push("--threads", String(o.threads));
    if (o.ctxSize !== undefined) args.push("--ctx-size", String(o.ctxSize));
    if (o.kvType !== undefined) args.push("--kv-type", o.kvType);
    const child = spawn(o.bin ?? engineBinary(), args, { stdio: ["pipe", "pipe", "pipe"] });
    const decoder = new FrameDecoder("from_engine");
    return new Promise((resolve, reject) => {
      let engine: EngineProcess | undefined;
      let stderr = "";
      const timer = setTimeout(() => {
        child.kill("SIGKILL");
        reject(
          new Error(`pkv-engine sent no hello within ${o.startTimeoutMs ?? 60_000} ms: ${stderr.trim().slice(-500)}`),
        );
      }, o.startTimeoutMs ?? 60_000);
      child.stderr.setEncoding("utf8").on("data", (d: string) => {
        stderr = (stderr + d).slice(-4000);
        if (engine) engine.stderrTail = stderr;
      });
      child.stdin.on("error", () => {}); // EPIPE after a crash: reported through 'exit'
      child.on("error", (e) => {
        clearTimeout(timer);
        reject(e);
      });
      child.on("exit", (code, signal) => {
        clearTimeout(timer);
        if (!engine)
          return reject(new Error(`pkv-engine exited (${code ?? signal}) before hello: ${stderr.trim().slice(-500)}`));
        engine.onExit(code, signal);
      });
      child.stdout.on("data", (chunk: Buffer) => {
        for (const f of decoder.push(chunk)) {
          if (!f.ok) {
            process.stderr.write(`pkv host: bad frame from the engine: ${f.error}\n`);
            continue;
          }
          if (!engine) {
            if (f.message.type !== "hello") continue;
            clearTimeout(timer);
            engine = new EngineProcess(child, f.message);
            resolve(engine);
            continue;
          }
          engine.route(f.message as FromEngineMessage);
        }
      });
    });
  }

  /** Sends a request; onFrame sees every frame answering it until it returns true or an error. */
  request(msg: Request, onFrame: (m: FromEngineMessage) => boolean, onFail: (e: EngineRequestError) => void): number {
    const id = this.nextId++;
    if (this.exited) {
      queueMicrotask(() => onFail(new EngineRequestError(ENGINE_DIED, "the engine is not running")));
      return id;
    }
    this.pending.set(id, { onFrame, onFail });
    this.child.stdin.write(encodeFrame({ ...msg, id } as ToEngineMessage));
    return id;
  }

  /** A request answered by one final frame (its type per FINAL); engine errors reject. */
  call<T extends FromEngineMessage["type"]>(msg: Request): Promise<Extract<FromEngineMessage, { type: T }>> {
    // issue 12: no deadline; an engine that never answers holds the request for ever.
    const final = FINAL[msg.type]!;
    return new Promise((resolve, reject) => {
      this.request(
        msg,
        (m) => {
          if (m.type !== final) return false;
          resolve(m as never);
          return true;
        },
        reject,
      );
    });
  }

  /** Asks the engine to exit (finishing its work), waits up to timeoutMs, then kills it. */
  async shutdown(timeoutMs = 5000): Promise<void> {
    if (this.exited) return;
    const exited = new Promise<void>((r) => this.once("exit", () => r()));
    this.request(
      { type: "shutdown" },
      () => true,
      () => {},
    );
    const timer = setTimeout(() => this.child.kill("SIGKILL"), timeoutMs);
    await exited;
    clearTimeout(timer);
  }

  /** Ends an open request with an error (one the engine will never answer). */
  fail(id: number, e: EngineRequestError): void {
    const p = this.pending.get(id);
    if (!p) return;
    this.pending.delete(id);
    p.onFail(e);
  }

  kill(signal: NodeJS.Signals = "SIGKILL"): void {
    this.child.kill(signal);
  }

  get lastStderr(): string {
    return this.stderrTail;
  }

  private route(m: FromEngineMessage): void {
    const id = "id" in m ? m.id : undefined;
    if (id === undefined) {
      // issue 12: an error without an id leaves the request it meant hanging (and its prefill slot held).
      if (m.type === "error")
        process.stderr.write(`pkv host: engine error without a request: ${m.code}: ${m.message}\n`);
      return;
    }
    const p = this.pending.get(id);
    if (!p) return;
    if (m.type === "error" && m.code !== "cancelled") {
      this.pending.delete(id);
      p.onFail(new EngineRequestError(m.code, m.message));
      return;
    }
    if (m.type === "error") {
      // 'cancelled' errors arrive with the id of the cancel request, which still gets 'cancelled'
      return;
    }
    if (p.onFrame(m)) this.pending.delete(id);
  }

  private onExit(code: number | null, signal: NodeJS.Signals | null): void {
    this.exited = true;
    const failed = [...this.pending.values()];
    this.pending.clear();
    const why = new EngineRequestError(ENGINE_DIED, `the engine exited (${signal ?? `code ${code}`})`);
    for (const p of failed) p.onFail(why);
    this.emit("exit", code, signal);
  }
}
