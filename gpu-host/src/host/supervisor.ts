// Engine supervision: the one engine process the sessions use, restarted with backoff when it
// exits unexpectedly. Requests open in the dead engine have already failed (engine_restarted,
// through EngineProcess); sessions fall back to their last checkpoint, outside the engine, and
// are restored on their next request (docs/HOST.md, "Supervision").
import type { EngineProcess } from "./engine.js";
import type { HostSession } from "./session.js";

/** What supervision needs of an engine (EngineProcess; tests use fakes). */
export interface SupervisedEngine {
  readonly alive: boolean;
  on(event: "exit", listener: (code: number | null, signal: NodeJS.Signals | null) => void): unknown;
}

/** Milliseconds before restart attempt `attempt` (0, 1, …): 200 ms doubling up to 5 s. */
export function restartDelayMs(attempt: number): number {
  return Math.min(5000, 200 * 2 ** attempt);
}

/** The engine died: a resident session is back to its last checkpoint (tokens_seen too). One
 * never saved is reopened empty if the edge was told of nothing in it, else lost (reported once
 * with session_lost). */
export function backToCheckpoint(s: HostSession): void {
  if (s.resident) s.backToCheckpoint("the engine died before it was ever saved");
}

export interface SupervisorOptions<E> {
  /** starts an engine and resolves once it said hello */
  spawn(): Promise<E>;
  /** the sessions, put back to their checkpoint when the engine dies */
  sessions(): Iterable<HostSession>;
  /** the engine died unexpectedly (the restart metric) */
  died?(): void;
  sleep?(ms: number): Promise<void>;
}

export class EngineSupervisor<E extends SupervisedEngine = EngineProcess> {
  private current!: E;
  private readyEngine!: Promise<E>;
  private isStopped = false;
  private readonly sleep: (ms: number) => Promise<void>;

  constructor(private readonly o: SupervisorOptions<E>) {
    this.sleep = o.sleep ?? ((ms) => new Promise((r) => setTimeout(r, ms)));
  }

  /** Starts the first engine; a failure here is the host's failure to start (no retry). */
  async start(): Promise<E> {
    this.current = await this.spawn();
    this.readyEngine = Promise.resolve(this.current);
    return this.current;
  }

  /** The engine now: alive, or dead while its successor starts. */
  get engine(): E {
    return this.current;
  }

  /** The engine to send requests to: the running one, or the one being restarted. */
  get ready(): Promise<E> {
    return this.readyEngine;
  }

  get stopped(): boolean {
    return this.isStopped;
  }

  /** The host is shutting the engine down: its exit is expected, nothing restarts. */
  stop(): void {
    this.isStopped = true;
  }

  private async spawn(): Promise<E> {
    const engine = await this.o.spawn();
    engine.on("exit", (code, signal) => this.onExit(engine, code, signal));
    return engine;
  }

  private onExit(engine: E, code: number | null, signal: NodeJS.Signals | null): void {
    if (this.isStopped || engine !== this.current) return;
    this.o.died?.();
    process.stderr.write(`pkv host: the engine exited (${signal ?? `code ${code}`}); restarting it\n`);
    for (const s of this.o.sessions()) backToCheckpoint(s);
    this.readyEngine = (async () => {
      for (let attempt = 0; ; attempt++) {
        try {
          this.current = await this.spawn();
          return this.current;
        } catch (e) {
          process.stderr.write(`pkv host: engine restart failed: ${e instanceof Error ? e.message : String(e)}\n`);
          await this.sleep(restartDelayMs(attempt));
        }
      }
    })();
  }
}
