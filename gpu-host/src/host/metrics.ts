// Prometheus metrics, text exposition format 0.0.4. Small on purpose: counters, gauges computed
// at scrape time, one histogram.
type Labels = Record<string, string>;

const key = (l: Labels) => JSON.stringify(Object.entries(l).sort());
const fmtLabels = (l: Labels) => {
  const e = Object.entries(l);
  return e.length === 0
    ? ""
    : `{${e.map(([k, v]) => `${k}="${v.replace(/\\/g, "\\\\").replace(/"/g, '\\"').replace(/\n/g, "\\n")}"`).join(",")}}`;
};

class Counter {
  private readonly values = new Map<string, { labels: Labels; value: number }>();
  constructor(
    readonly name: string,
    readonly help: string,
  ) {}
  inc(labels: Labels = {}, by = 1): void {
    const k = key(labels);
    const cur = this.values.get(k);
    if (cur) cur.value += by;
    else this.values.set(k, { labels, value: by });
  }
  get(labels: Labels = {}): number {
    return this.values.get(key(labels))?.value ?? 0;
  }
  render(): string {
    const rows = [...this.values.values()].map((v) => `${this.name}${fmtLabels(v.labels)} ${v.value}`);
    return `# HELP ${this.name} ${this.help}\n# TYPE ${this.name} counter\n${rows.join("\n")}${rows.length ? "\n" : ""}`;
  }
}

class Histogram {
  private readonly series = new Map<string, { labels: Labels; counts: number[]; sum: number; count: number }>();
  constructor(
    readonly name: string,
    readonly help: string,
    readonly buckets: number[],
  ) {}
  observe(labels: Labels, value: number): void {
    const k = key(labels);
    let s = this.series.get(k);
    if (!s) {
      s = { labels, counts: this.buckets.map(() => 0), sum: 0, count: 0 };
      this.series.set(k, s);
    }
    for (const [i, b] of this.buckets.entries()) if (value <= b) s.counts[i]!++;
    s.sum += value;
    s.count++;
  }
  render(): string {
    const rows: string[] = [];
    for (const s of this.series.values()) {
      for (const [i, b] of this.buckets.entries()) {
        rows.push(`${this.name}_bucket${fmtLabels({ ...s.labels, le: String(b) })} ${s.counts[i]}`);
      }
      rows.push(`${this.name}_bucket${fmtLabels({ ...s.labels, le: "+Inf" })} ${s.count}`);
      rows.push(`${this.name}_sum${fmtLabels(s.labels)} ${s.sum}`);
      rows.push(`${this.name}_count${fmtLabels(s.labels)} ${s.count}`);
    }
    return `# HELP ${this.name} ${this.help}\n# TYPE ${this.name} histogram\n${rows.join("\n")}${rows.length ? "\n" : ""}`;
  }
}

/** Values the host computes at scrape time. */
export interface HostGauges {
  sessions: { tenant: string; state: "active" | "offloaded"; count: number }[];
  tenantKvBytes: { tenant: string; used: number; quota: number }[];
  poolBytes: number;
  poolUsedBytes: number;
  queued: { kind: string; count: number }[];
  connections: number;
  /** 1 while the socket to the edge is welcomed and open */
  edgeConnected?: number;
  /** bytes of cached states in the host's snapshot memory */
  cacheMemoryBytes?: number;
}

export class HostMetrics {
  readonly quotaRefusals = new Counter(
    "pkv_host_quota_refusals_total",
    "Requests refused because the tenant's KV quota or session limit was reached.",
  );
  readonly generatedTokens = new Counter(
    "pkv_host_generated_tokens_total",
    "Tokens generated (rate() gives tokens/s).",
  );
  readonly promptTokens = new Counter(
    "pkv_host_prefilled_tokens_total",
    "Tokens appended (prefilled); a copy's cached tokens are not prefilled.",
  );
  readonly cacheOpens = new Counter(
    "pkv_host_cache_opens_total",
    "open_session.from_cache, by source of the cached state (memory: this host's snapshot memory, edge: the edge's store, miss: cache_miss).",
  );
  readonly snapshots = new Counter(
    "pkv_host_snapshots_total",
    "snapshot requests, by result (ok, or the error code: too_large, checkpoint_failed, ...).",
  );
  readonly engineRestarts = new Counter(
    "pkv_host_engine_restarts_total",
    "Times the engine process died and was restarted.",
  );
  readonly offloads = new Counter(
    "pkv_host_offloads_total",
    "Sessions saved out of the engine (idle, quota or pool pressure, shutdown).",
  );
  readonly restores = new Counter("pkv_host_restores_total", "Offloaded sessions restored into the engine.");
  readonly sessionsExpired = new Counter(
    "pkv_host_sessions_expired_total",
    "Sessions closed after their tenant's idle TTL (session_ttl_s), by tenant.",
  );
  readonly errors = new Counter("pkv_host_errors_total", "Error frames sent, by code.");
  readonly edgeConnects = new Counter(
    "pkv_host_edge_connections_total",
    "Sockets to the edge that got welcome (the first, then every reconnect).",
  );
  readonly statePuts = new Counter(
    "pkv_host_edge_state_puts_total",
    "Checkpoints sent to the edge's store, by result (ok, or the edge's refusal code).",
  );
  readonly latency = new Histogram(
    "pkv_host_request_seconds",
    "Request latency from receipt to the final frame, by type.",
    [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60],
  );
  readonly firstToken = new Histogram(
    "pkv_host_time_to_first_token_seconds",
    "generate: receipt to first token.",
    [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
  );

  render(g: HostGauges): string {
    const gauge = (name: string, help: string, rows: [Labels, number][]) =>
      `# HELP ${name} ${help}\n# TYPE ${name} gauge\n${rows.map(([l, v]) => `${name}${fmtLabels(l)} ${v}\n`).join("")}`;
    return [
      gauge(
        "pkv_host_sessions",
        "Sessions by tenant and state (active = in the engine).",
        g.sessions.map((s) => [{ tenant: s.tenant, state: s.state }, s.count]),
      ),
      gauge(
        "pkv_host_tenant_kv_bytes",
        "KV bytes accounted to the tenant's resident sessions.",
        g.tenantKvBytes.map((t) => [{ tenant: t.tenant }, t.used]),
      ),
      gauge(
        "pkv_host_tenant_kv_quota_bytes",
        "The tenant's KV quota.",
        g.tenantKvBytes.map((t) => [{ tenant: t.tenant }, t.quota]),
      ),
      gauge("pkv_host_kv_pool_bytes", "Engine KV pool capacity.", [[{}, g.poolBytes]]),
      gauge("pkv_host_kv_pool_used_bytes", "Engine KV pool bytes in use (last engine stats).", [[{}, g.poolUsedBytes]]),
      gauge(
        "pkv_host_queue_length",
        "Requests waiting for their tenant's turn.",
        g.queued.map((q) => [{ kind: q.kind }, q.count]),
      ),
      gauge("pkv_host_connections", "Open channels on the socket to the edge (one per request).", [
        [{}, g.connections],
      ]),
      gauge("pkv_host_edge_connected", "1 while the socket to the edge is up.", [[{}, g.edgeConnected ?? 0]]),
      gauge(
        "pkv_host_cache_memory_bytes",
        "Bytes of cached prompt states in this host's snapshot memory (--cache-memory-bytes).",
        [[{}, g.cacheMemoryBytes ?? 0]],
      ),
      this.edgeConnects.render(),
      this.statePuts.render(),
      this.quotaRefusals.render(),
      this.generatedTokens.render(),
      this.promptTokens.render(),
      this.engineRestarts.render(),
      this.offloads.render(),
      this.restores.render(),
      this.cacheOpens.render(),
      this.snapshots.render(),
      this.sessionsExpired.render(),
      this.errors.render(),
      this.latency.render(),
      this.firstToken.render(),
    ].join("");
  }
}
