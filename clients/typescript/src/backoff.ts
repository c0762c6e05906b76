/**
 * Exponential backoff with jitter for reconnecting broken Ingest streams: the delay
 * before attempt `n` is uniform in `[cap/2, cap]` with `cap = min(initial * multiplier^n, max)`,
 * so it still grows while the reconnects of many devices spread out.
 */

/** Backoff settings (the same defaults as the Rust and Python SDKs). */
export interface Backoff {
  /** Cap of the first delay, in milliseconds (default 100). */
  readonly initialMs: number;
  /** Largest delay, in milliseconds (default 10000). */
  readonly maxMs: number;
  /** Growth of the cap per attempt (default 2). */
  readonly multiplier: number;
  /** Failed attempts in a row before giving up; `undefined` retries forever. */
  readonly maxAttempts?: number | undefined;
}

/** The default backoff. */
export const DEFAULT_BACKOFF: Backoff = { initialMs: 100, maxMs: 10_000, multiplier: 2 };

/** The exponential cap for `attempt` (0-based), before jitter, in milliseconds. */
export function backoffCap(backoff: Backoff, attempt: number): number {
  const factor = Math.max(backoff.multiplier, 1) ** Math.min(attempt, 64);
  return Math.max(0, Math.min(backoff.initialMs * factor, backoff.maxMs));
}

/** The jittered delay before `attempt` (0-based), in milliseconds. */
export function backoffDelay(backoff: Backoff, attempt: number): number {
  const cap = backoffCap(backoff, attempt);
  return cap * (0.5 + Math.random() * 0.5);
}
