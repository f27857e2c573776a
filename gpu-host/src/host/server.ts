// The host's HTTP face: GET /health (what a load balancer or an operator needs, nothing per
// tenant) and GET /metrics (only with the scrape token). The edge is not served here: the host
// dials the edge (edge-link.ts) and no port needs to be reachable from outside; --port 0 binds any
// free port (printed).
import { createHash, timingSafeEqual } from "node:crypto";
import { createServer, type Server } from "node:http";
import type { AddressInfo } from "node:net";

import { HOST_PROTOCOL_SPEC, HOST_PROTOCOL_VERSION } from "@pyramidkv/shared";

import type { HostConfig } from "./config.js";
import type { EdgeLink } from "./edge-link.js";
import type { HostMetrics } from "./metrics.js";
import type { SessionHost } from "./sessions.js";

/** true when `header` is `Bearer <token>` (compared in constant time, whatever its length). */
export function bearerMatches(header: string | undefined, token: string): boolean {
  const got = /^Bearer (.+)$/.exec(header ?? "")?.[1];
  if (got === undefined) return false;
  const digest = (s: string) => createHash("sha256").update(s).digest();
  return timingSafeEqual(digest(got), digest(token));
}

export class HostServer {
  private readonly http: Server;

  constructor(
    private readonly host: SessionHost,
    private readonly config: HostConfig,
    private readonly metrics: HostMetrics,
    private readonly link?: EdgeLink,
  ) {
    this.http = createServer((req, res) => {
      const path = (req.url ?? "/").split("?")[0];
      if (req.method === "GET" && path === "/health") {
        const ok = this.host.healthy && !this.host.isClosing;
        const h = this.host.hello;
        res.writeHead(ok ? 200 : 503, { "content-type": "application/json" });
        res.end(
          JSON.stringify({
            status: ok ? "ok" : this.host.isClosing ? "shutting_down" : "engine_restarting",
            protocol: HOST_PROTOCOL_VERSION,
            protocol_minor: HOST_PROTOCOL_SPEC.minor,
            model: h.model,
            n_ctx: h.n_ctx,
            chat_template: h.chat_template ?? null,
            engine_pid: this.host.enginePid,
            pool_bytes: h.pool_bytes,
            kv_used_bytes: this.host.kvUsedBytes,
            edge: {
              connected: this.link?.connected ?? false,
              name: this.link?.name ?? null,
              epoch: this.link?.epoch ?? 0,
              draining: this.link?.draining ?? false,
              channels: this.link?.channelCount ?? 0,
            },
          }),
        );
        return;
      }
      if (req.method === "GET" && path === "/metrics") {
        const token = this.config.metricsToken;
        if (token === undefined) {
          res.writeHead(403, { "content-type": "text/plain" });
          res.end(
            "GET /metrics is off: start the host with --metrics-token T (or PKV_METRICS_TOKEN=T) and scrape it " +
              "with the header Authorization: Bearer T\n",
          );
          return;
        }
        if (!bearerMatches(req.headers.authorization, token)) {
          res.writeHead(401, { "content-type": "text/plain", "www-authenticate": 'Bearer realm="pkv-host-metrics"' });
          res.end("GET /metrics needs the header Authorization: Bearer <the host's --metrics-token>\n");
          return;
        }
        res.writeHead(200, { "content-type": "text/plain; version=0.0.4" });
        res.end(
          this.metrics.render({
            ...this.host.gauges(),
            connections: this.link?.channelCount ?? 0,
            edgeConnected: this.link?.connected ? 1 : 0,
          }),
        );
        return;
      }
      res.writeHead(404, { "content-type": "application/json" });
      res.end(JSON.stringify({ error: "not found" }));
    });
  }

  listen(): Promise<AddressInfo> {
    return new Promise((resolve, reject) => {
      this.http.once("error", reject);
      this.http.listen(this.config.port, this.config.listen, () => resolve(this.http.address() as AddressInfo));
    });
  }

  async close(): Promise<void> {
    const closed = new Promise<void>((r) => this.http.close(() => r()));
    this.http.closeAllConnections();
    await closed;
  }
}
