// Calls to a host "straight", without the worker: one channel of a host connected to an in-process
// DirectEdge (host/direct-edge.ts), requests by id, every frame of a call to its callback. The
// benchmarks' other path (pkv bench ttft, pkv bench fairness).
import type { FromHostMessage, ToHostMessage } from "@pyramidkv/shared";

import type { DirectEdge, EdgeChannel } from "../host/direct-edge.js";

export class DirectClient {
  private next = 1;
  private readonly waiters = new Map<number, (f: FromHostMessage) => void>();
  private constructor(
    private readonly ch: EdgeChannel,
    readonly tenant: string,
  ) {
    ch.listen((m) => {
      if ("id" in m && m.id !== undefined) this.waiters.get(m.id)?.(m);
    });
  }

  /** A new channel of `tenant` on the host `name` of the edge (channel_open; the hello is the edge's). */
  static async open(edge: DirectEdge, tenant: string, name?: string): Promise<DirectClient> {
    return new DirectClient(await edge.channel(tenant, name), tenant);
  }

  /** Sends (tenant and id filled in); resolves with the call's final frame, rejects on an error
   * frame; onFrame sees every frame of it. */
  call(msg: Record<string, unknown>, onFrame?: (f: FromHostMessage) => void): Promise<FromHostMessage> {
    const id = this.next++;
    return new Promise((resolve, reject) => {
      this.waiters.set(id, (f) => {
        onFrame?.(f);
        if (f.type === "token" || f.type === "progress" || f.type === "queued") return;
        this.waiters.delete(id);
        if (f.type === "error") reject(new Error(`${String(msg.type)}: ${f.code}: ${f.message}`));
        else resolve(f);
      });
      this.ch.send({ ...msg, tenant: this.tenant, id } as unknown as ToHostMessage);
    });
  }

  close(): void {
    this.ch.close();
  }
}
