// A progress bar with ETA on stderr: redrawn in place on a terminal, otherwise a plain line at
// most every 30 s (and at the end), so logs of long runs stay readable.

export function formatDuration(seconds: number): string {
  if (!Number.isFinite(seconds) || seconds < 0) return "--:--";
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const sec = s % 60;
  return h > 0 ? `${h}h${String(m).padStart(2, "0")}m` : `${m}:${String(sec).padStart(2, "0")}`;
}

export class Progress {
  private done = 0;
  private readonly started = Date.now();
  private lastPlain = 0;

  constructor(
    private readonly label: string,
    private readonly total: number,
    private readonly out: NodeJS.WriteStream = process.stderr,
    private readonly enabled = true,
  ) {}

  tick(n = 1): void {
    this.done += n;
    this.draw(false);
  }

  /** ETA from the mean time per finished cell so far. */
  line(): string {
    const elapsed = (Date.now() - this.started) / 1000;
    const frac = this.total === 0 ? 1 : this.done / this.total;
    const width = 24;
    const filled = Math.round(frac * width);
    const eta = this.done === 0 ? Number.NaN : (elapsed / this.done) * (this.total - this.done);
    return (
      `${this.label} [${"#".repeat(filled)}${".".repeat(width - filled)}] ${this.done}/${this.total} ` +
      `${(frac * 100).toFixed(0)}% elapsed ${formatDuration(elapsed)} ETA ${formatDuration(eta)}`
    );
  }

  finish(): void {
    this.draw(true);
  }

  private draw(final: boolean): void {
    if (!this.enabled) return;
    if (this.out.isTTY) {
      this.out.write(`\r${this.line()}${final ? "\n" : ""}`);
      return;
    }
    const now = Date.now();
    if (final || now - this.lastPlain >= 30_000) {
      this.lastPlain = now;
      this.out.write(`${this.line()}\n`);
    }
  }
}
