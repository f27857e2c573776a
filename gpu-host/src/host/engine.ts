// One engine child process (pkv-engine serve --stdio): framing, request ids, and routing of the
// engine's frames to the request they answer. Knows nothing of tenants or sessions' meaning.
//
// Deadlines: a request that gets no frame for `requestTimeoutMs` (progress and token frames count)
// fails with `timeout`; if the engine sent nothing at all for that long while it was pending, the
// engine is hung and is killed (supervisor.ts restarts it). An error frame without an id fails the
// requests of the session it names; one saying the engine reads no further input (a frame it could
// not skip) means the engine cannot serve anything any more: it is killed too.
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
  /** a request that gets no frame for this long fails with `timeout` (unset: no deadline) */
  requestTimeoutMs?: number;
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
export const ENGINE_TIMEOUT = "timeout";

/** The engine's words for an input error after which it reads nothing more (PROTOCOL.md). */
const NO_FURTHER_INPUT = "no further input is read";

type Pending = {
  onFrame: (m: FromEngineMessage) => boolean; // true: the request is answered completely
  onFail: (e: EngineRequestError) => void;
  /** the session the request names, to route an error frame without an id */
  session?: string;
  type: string;
  timer?: NodeJS.Timeout;
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
  /** killed for being hung or deaf: nothing more is sent to it, its exit is on the way */
  private condemned = false;
  private lastFrameAt = Date.now();
  private stderrTail = "";

  private constructor(
    private readonly child: ChildProcessWithoutNullStreams,
    readonly hello: EngineHello,
    private readonly timeoutMs?: number,
  ) {
    super();
  }

  get pid(): number | undefined {
    return this.child.pid;
  }

  get alive(): boolean {
    return !this.exited && !this.condemned;
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
            engine = new EngineProcess(child, f.message, o.requestTimeoutMs);
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
    if (!this.alive) {
      queueMicrotask(() => onFail(new EngineRequestError(ENGINE_DIED, "the engine is not running")));
      return id;
    }
    const session = "session" in msg && typeof msg.session === "string" ? msg.session : undefined;
    const p: Pending = { onFrame, onFail, session, type: msg.type };
    if (this.timeoutMs !== undefined) p.timer = setTimeout(() => this.expire(id), this.timeoutMs).unref();
    this.pending.set(id, p);
    this.child.stdin.write(encodeFrame({ ...msg, id } as ToEngineMessage));
    return id;
  }

  /** A request answered by one final frame (its type per FINAL); engine errors reject. */
  call<T extends FromEngineMessage["type"]>(msg: Request): Promise<Extract<FromEngineMessage, { type: T }>> {
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
    clearTimeout(p.timer);
    p.onFail(e);
  }

  kill(signal: NodeJS.Signals = "SIGKILL"): void {
    this.child.kill(signal);
  }

  /** The engine cannot serve any more (hung, or reads no input): kill it; its exit fails the rest. */
  private condemn(why: string): void {
    if (this.condemned || this.exited) return;
    this.condemned = true;
    process.stderr.write(`pkv host: killing the engine (pid ${this.child.pid}): ${why}\n`);
    this.child.kill("SIGKILL");
  }

  // A request's deadline passed with no frame for it.
  private expire(id: number): void {
    const p = this.pending.get(id);
    if (!p) return;
    const ms = this.timeoutMs!;
    const silentFor = Date.now() - this.lastFrameAt;
    if (silentFor >= ms) this.condemn(`no frame at all for ${silentFor} ms while requests were pending`);
    this.fail(id, new EngineRequestError(ENGINE_TIMEOUT, `the engine sent nothing for ${p.type} within ${ms} ms`));
  }

  get lastStderr(): string {
    return this.stderrTail;
  }

  private route(m: FromEngineMessage): void {
    this.lastFrameAt = Date.now();
    const id = "id" in m ? m.id : undefined;
    if (id === undefined) {
      if (m.type === "error") this.routeWithoutId(m);
      return;
    }
    const p = this.pending.get(id);
    if (!p) return;
    p.timer?.refresh();
    if (m.type === "error" && m.code !== "cancelled") {
      this.pending.delete(id);
      p.onFail(new EngineRequestError(m.code, m.message));
      return;
    }
    if (m.type === "error") {
      // 'cancelled' errors arrive with the id of the cancel request, which still gets 'cancelled'
      return;
    }
    if (p.onFrame(m)) {
      this.pending.delete(id);
      clearTimeout(p.timer);
    }
  }

  // An error the engine could not tie to a request id: it fails every request of the session it
  // names (their prefill slots with them); one after which the engine reads no more condemns it.
  private routeWithoutId(m: Extract<FromEngineMessage, { type: "error" }>): void {
    process.stderr.write(`pkv host: engine error without a request: ${m.code}: ${m.message}\n`);
    if (m.message.includes(NO_FURTHER_INPUT)) {
      this.condemn(`it reads no further input (${m.code})`);
      return;
    }
    if (m.session === undefined || m.session === "") return;
    for (const [id, p] of [...this.pending]) {
      if (p.session === m.session) this.fail(id, new EngineRequestError(m.code, m.message));
    }
  }

  private onExit(code: number | null, signal: NodeJS.Signals | null): void {
    this.exited = true;
    const failed = [...this.pending.values()];
    this.pending.clear();
    for (const p of failed) clearTimeout(p.timer);
    const why = new EngineRequestError(ENGINE_DIED, `the engine exited (${signal ?? `code ${code}`})`);
    for (const p of failed) p.onFail(why);
    this.emit("exit", code, signal);
  }
}
