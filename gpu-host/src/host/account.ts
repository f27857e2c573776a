// What one session counts against its tenant's quota and the engine's pool, in KV bytes. Every
// change of a session's bytes or residency goes through this object, so the rule lives in one
// place:
//   resident:      max(steady, reservation) + in-flight
//   not resident:  nothing — except while it is being opened or restored (busy), when its
//                  reservation counts: max(steady, reservation) + in-flight as well
// steady = the engine's kv_bytes after the last append/generate (exact); reservation = what
// admission granted a session that is not in the engine yet (the first append's peak at open,
// steady + the request's peak while restoring), dropped by the first append (open) or once
// restored; in-flight = the running request's peak (an append's uncompressed chunk, a generate's
// max_tokens entries), dropped when it ends. tenants.ts computes the sizes, admission.ts grants
// them; docs/HOST.md ("Admission") states the rule for operators.
export class KvAccount {
  private steadyBytes: number;
  private reservedBytes = 0;
  private inFlightBytes = 0;
  private isResident = false;

  /** `steady`: the size of a state saved by an earlier run (adopted from the store), else 0. */
  constructor(steady = 0) {
    this.steadyBytes = steady;
  }

  get steady(): number {
    return this.steadyBytes;
  }

  get reserved(): number {
    return this.reservedBytes;
  }

  get inFlight(): number {
    return this.inFlightBytes;
  }

  /** The engine holds the session's KV cache. */
  get resident(): boolean {
    return this.isResident;
  }

  /** What the session holds between requests: max(steady, reservation). */
  get held(): number {
    return Math.max(this.steadyBytes, this.reservedBytes);
  }

  /** Bytes counted against the tenant's quota and the pool; `busy`: requests are queued or running
   * on the session (a session being opened or restored is busy and not resident yet). */
  accounted(busy: boolean): number {
    // Offloaded: no engine KV, so nothing against the quota or the pool. Its stored bytes are bounded
    // apart (the tenant's max_stored_bytes, store.ts); an offload the store refuses is a failed one,
    // and admission then tries another victim or refuses (admission.ts).
    return this.isResident || (busy && this.reservedBytes > 0) ? this.held + this.inFlightBytes : 0;
  }

  /** Admission granted the session `total` bytes: for a resident session the part above what it
   * holds is the running request's in-flight peak; a session outside the engine reserves it. */
  grant(total: number): void {
    if (this.isResident) this.inFlightBytes = Math.max(0, total - this.held);
    else this.reservedBytes = Math.max(this.reservedBytes, total);
  }

  /** The engine opened the session; its reservation stands until the first append completes. */
  opened(): void {
    this.isResident = true;
  }

  /** The engine holds the session again (restored, or reopened empty), with `extra` bytes in
   * flight for the request that brought it back; the reservation is spent. */
  restored(extra: number): void {
    this.reservedBytes = 0;
    this.isResident = true;
    this.inFlightBytes = extra;
  }

  /** A restore or reopen did not happen (it failed): the reservation is released. */
  unreserve(): void {
    this.reservedBytes = 0;
  }

  /** An append completed: the engine's exact size replaces the reservation and the peak. */
  settle(steady: number): void {
    this.steadyBytes = steady;
    this.reservedBytes = 0;
    this.inFlightBytes = 0;
  }

  /** The engine's exact size from its stats (the reservation, if any, stands). */
  measure(steady: number): void {
    this.steadyBytes = steady;
  }

  /** The running request ended (completed or failed): its in-flight peak is released. */
  end(): void {
    this.inFlightBytes = 0;
  }

  /** Saved and closed in the engine (offloaded, or closed for good). */
  offloaded(): void {
    this.isResident = false;
  }

  /** The engine died: the session is back to its last checkpoint, outside the engine. */
  evicted(): void {
    this.isResident = false;
    this.inFlightBytes = 0;
  }
}
