/**
 * A small progress bar for long CLI work: `label [#####-----] step/total elapsed 0:12 eta 0:20`.
 * On a TTY it redraws one line in place; elsewhere (pipes, CI logs) it prints a plain line every
 * `every` steps and at the end, so logs stay short and readable.
 */

export interface ProgressStream {
  readonly isTTY?: boolean;
  readonly columns?: number;
  write(s: string): boolean;
}

export interface ProgressOptions {
  readonly stream?: ProgressStream;
  /** Milliseconds since some origin; injectable for tests. */
  readonly now?: () => number;
  /** Non-TTY: print a line every this many steps (and the last). Default: about every 10%. */
  readonly every?: number;
}

/** m:ss (or h:mm:ss) of a duration in milliseconds. */
export function formatDuration(ms: number): string {
  const s = Math.max(0, Math.round(ms / 1000));
  const pad = (n: number) => String(n).padStart(2, '0');
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  return h > 0 ? `${h}:${pad(m)}:${pad(s % 60)}` : `${m}:${pad(s % 60)}`;
}

export class ProgressBar {
  private readonly stream: ProgressStream;
  private readonly now: () => number;
  private readonly started: number;
  private readonly every: number;
  private lastPrinted = 0;
  private done = false;

  constructor(
    private readonly label: string,
    private readonly total: number,
    o: ProgressOptions = {},
  ) {
    this.stream = o.stream ?? process.stderr;
    this.now = o.now ?? (() => performance.now());
    this.started = this.now();
    this.every = o.every ?? Math.max(1, Math.ceil(total / 10));
  }

  /** The text of the bar after `step` of `total` steps (no newline, no escape codes). */
  render(step: number, width = 20): string {
    const elapsed = this.now() - this.started;
    const frac = this.total > 0 ? Math.min(1, step / this.total) : 1;
    const filled = Math.round(frac * width);
    const bar = '#'.repeat(filled) + '-'.repeat(width - filled);
    const eta = step > 0 ? (elapsed / step) * (this.total - step) : NaN;
    const etaText = Number.isFinite(eta) ? formatDuration(eta) : '?';
    return `${this.label} [${bar}] ${step}/${this.total} elapsed ${formatDuration(elapsed)} eta ${etaText}`;
  }

  update(step: number): void {
    if (this.done) return;
    if (this.stream.isTTY) {
      this.stream.write(`\r${this.render(step)}\x1b[K`);
    } else if (step === this.total || step - this.lastPrinted >= this.every) {
      this.stream.write(`${this.render(step)}\n`);
      this.lastPrinted = step;
    }
  }

  /** Ends the bar's line (TTY); call once, also after an error, before printing anything else. */
  finish(): void {
    if (this.done) return;
    this.done = true;
    if (this.stream.isTTY) this.stream.write('\n');
  }
}
