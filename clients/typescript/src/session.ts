/**
 * The ingest session: one logical Ingest stream that survives broken connections.
 * Samples are batched into messages, numbered per device (`seq`), and re-sent on a
 * new stream when the old one broke before answering them.
 */
import { create } from "@bufbuild/protobuf";
import { timestampFromDate, type Timestamp } from "@bufbuild/protobuf/wkt";
import type { Client } from "@connectrpc/connect";

import { backoffDelay, DEFAULT_BACKOFF, type Backoff } from "./backoff.js";
import {
  Code,
  ProtocolError,
  SessionClosedError,
  TidewatchError,
  toTidewatchError,
  UnavailableError,
} from "./errors.js";
import {
  IngestRequestSchema,
  SampleSchema,
  type DetectorConfig,
  type IngestRequest,
  type Sample,
  type TelemetryService,
  type Verdict,
} from "./gen/tidewatch/v1/telemetry_pb.js";

/** The device the server uses for samples without one. */
export const DEFAULT_DEVICE = "default";

/** A sample to send: a plain object or a generated `Sample`. */
export interface SampleInit {
  /** Device identifier; empty or absent means "default". */
  deviceId?: string;
  /** Metric name to value. */
  metrics: Record<string, number>;
  /** When the sample was taken; absent means the server's receive time. */
  time?: Date | Timestamp;
  /** Sequence number; absent or 0 lets the session assign one. */
  seq?: bigint;
}

/** Options of an ingest session. */
export interface SessionOptions {
  /** Detector for the stream, sent in the first message of every (re)opened stream. */
  detector?: Partial<Omit<DetectorConfig, "$typeName">> | undefined;
  /** Samples per message at most (default 100). */
  batchSize?: number;
  /** How long a sample may wait for more to fill its message, in ms (default 5). */
  lingerMs?: number;
  /** Messages waiting for their answer before `send` waits (default 64). */
  maxInFlight?: number;
  /** Number samples without a `seq` per device (default true). */
  assignSeq?: boolean;
  /** Reconnect backoff (default: 100 ms doubling to 10 s, forever). */
  backoff?: Backoff;
}

/** Wakes everyone waiting for a change of the session's state. */
class Notifier {
  private waiters: Array<() => void> = [];

  notify(): void {
    const waiters = this.waiters;
    this.waiters = [];
    for (const wake of waiters) wake();
  }

  async until(ready: () => boolean): Promise<void> {
    while (!ready()) {
      await new Promise<void>((resolve) => this.waiters.push(resolve));
    }
  }
}

/**
 * The reason a server gives for a sample whose device another replica holds
 * (docs/architecture.md, "Ownership"): nothing was applied; the session sends it again.
 */
const MOVED = "moved:";

/** How long a sample answered `moved` waits before it is sent again. */
const MOVED_RETRY_MS = 50;

/** Verdicts in order, then the end or the session's error. */
class VerdictQueue {
  private items: Verdict[] = [];
  private head = 0;
  private done = false;
  private error: TidewatchError | undefined;
  private readonly changed = new Notifier();

  push(verdict: Verdict): void {
    this.items.push(verdict);
    this.changed.notify();
  }

  end(error?: TidewatchError): void {
    if (this.done) return;
    this.done = true;
    this.error = error;
    this.changed.notify();
  }

  async next(): Promise<IteratorResult<Verdict, undefined>> {
    await this.changed.until(() => this.head < this.items.length || this.done);
    if (this.head < this.items.length) {
      const value = this.items[this.head] as Verdict;
      this.items[this.head] = undefined as unknown as Verdict;
      this.head += 1;
      if (this.head > 4096 && this.head * 2 > this.items.length) {
        this.items = this.items.slice(this.head);
        this.head = 0;
      }
      return { value, done: false };
    }
    if (this.error) throw this.error;
    return { value: undefined, done: true };
  }
}

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * One logical Ingest stream. `send` queues samples; iterating the session
 * (`for await (const verdict of session)`) yields one `Verdict` per sample in the order
 * they were sent, exactly once, across reconnects. `close` sends what is buffered, waits
 * for every answer and ends the iteration; `abort` stops at once.
 */
export class IngestSession implements AsyncIterable<Verdict> {
  /** Streams opened so far (1 + reconnects). */
  streamsOpened = 0;

  private readonly detector: DetectorConfig | undefined;
  private readonly batchSize: number;
  private readonly lingerMs: number;
  private readonly maxInFlight: number;
  private readonly assignSeq: boolean;
  private readonly backoff: Backoff;
  /** Samples not yet in a message. */
  private buffer: Sample[] = [];
  private lingerTimer: NodeJS.Timeout | undefined;
  /** Messages not yet written to the current stream, oldest first. */
  private unsent: Sample[][] = [];
  /** Messages written to the current stream and not yet answered, oldest first. */
  private pending: Sample[][] = [];
  /** Samples answered `moved`, waiting to be sent again. */
  private moved = 0;
  private readonly changed = new Notifier();
  private readonly verdicts = new VerdictQueue();
  private readonly lastSeq = new Map<string, bigint>();
  private closing = false;
  private error: TidewatchError | undefined;
  private readonly stop = new AbortController();
  /** Started by the first send, close or iteration: constructing starts nothing. */
  private driver: Promise<void> | undefined;

  /** Use `TidewatchClient.session` rather than this constructor. */
  constructor(
    /** The service client, or a function that makes it (when the stream first opens). */
    private readonly rpc: Client<typeof TelemetryService> | (() => Client<typeof TelemetryService>),
    options: SessionOptions = {},
  ) {
    this.batchSize = options.batchSize ?? 100;
    this.lingerMs = options.lingerMs ?? 5;
    this.maxInFlight = options.maxInFlight ?? 64;
    this.assignSeq = options.assignSeq ?? true;
    this.backoff = options.backoff ?? DEFAULT_BACKOFF;
    if (this.batchSize < 1 || this.maxInFlight < 1) {
      throw new RangeError("batchSize and maxInFlight must be at least 1");
    }
    this.detector = options.detector
      ? create(IngestRequestSchema, { detector: options.detector }).detector
      : undefined;
  }

  private start(): Promise<void> {
    this.driver ??= this.drive();
    return this.driver;
  }

  [Symbol.asyncIterator](): AsyncIterator<Verdict, undefined> {
    return {
      next: () => {
        void this.start();
        return this.verdicts.next();
      },
    };
  }

  /**
   * Queue one sample; waits while `maxInFlight` messages are unanswered. Without a
   * `seq` (and with `assignSeq`), the sample gets its device's next one: above the last,
   * and at least the current time in microseconds, so a new session's samples are never
   * taken for duplicates of an earlier session's.
   */
  async send(init: SampleInit | Sample): Promise<void> {
    if (this.error) throw this.error;
    if (this.closing) throw new SessionClosedError("the ingest session is closed", Code.FailedPrecondition);
    void this.start();
    const sample = create(SampleSchema, {
      deviceId: init.deviceId ?? "",
      metrics: { ...init.metrics },
      seq: init.seq ?? 0n,
      time: init.time instanceof Date ? timestampFromDate(init.time) : init.time,
    });
    const device = sample.deviceId || DEFAULT_DEVICE;
    const last = this.lastSeq.get(device) ?? 0n;
    if (sample.seq === 0n && this.assignSeq) {
      const now = BigInt(Date.now()) * 1000n;
      sample.seq = last + 1n > now ? last + 1n : now;
    }
    if (sample.seq > last) this.lastSeq.set(device, sample.seq);
    this.buffer.push(sample);
    if (this.buffer.length >= this.batchSize) {
      await this.flush();
    } else if (this.lingerTimer === undefined) {
      this.lingerTimer = setTimeout(() => {
        this.lingerTimer = undefined;
        // A failure reaches the caller through the iteration and the next send.
        this.flush().catch(() => undefined);
      }, this.lingerMs);
    }
  }

  /** Put the buffered samples into a message now; waits for room in flight. */
  async flush(): Promise<void> {
    if (this.lingerTimer !== undefined) {
      clearTimeout(this.lingerTimer);
      this.lingerTimer = undefined;
    }
    if (this.buffer.length === 0) return;
    const batch = this.buffer;
    this.buffer = [];
    await this.changed.until(
      () =>
        this.error !== undefined ||
        this.stop.signal.aborted ||
        this.unsent.length + this.pending.length < this.maxInFlight,
    );
    if (this.error) throw this.error;
    if (this.stop.signal.aborted) {
      throw new SessionClosedError("the ingest session was aborted", Code.FailedPrecondition);
    }
    this.unsent.push(batch);
    this.changed.notify();
  }

  /** Send what is buffered, wait for every verdict, end the iteration. */
  async close(): Promise<void> {
    if (!this.closing && !this.error) {
      await this.flush();
      this.closing = true;
      this.changed.notify();
    }
    await this.start();
    if (this.error) throw this.error;
  }

  /** Stop at once; unanswered samples get no verdict, waiting senders `SessionClosedError`. */
  async abort(): Promise<void> {
    this.closing = true;
    if (this.lingerTimer !== undefined) {
      clearTimeout(this.lingerTimer);
      this.lingerTimer = undefined;
    }
    this.stop.abort();
    this.changed.notify();
    if (this.driver) await this.driver;
    this.verdicts.end();
  }

  private finished(): boolean {
    return (
      this.closing &&
      this.unsent.length === 0 &&
      this.pending.length === 0 &&
      this.buffer.length === 0 &&
      this.moved === 0
    );
  }

  /** Queues samples answered `moved` again after `MOVED_RETRY_MS`. */
  private sendAgain(samples: Sample[]): void {
    this.moved += samples.length;
    setTimeout(() => {
      this.moved -= samples.length;
      this.unsent.push(samples);
      this.changed.notify();
    }, MOVED_RETRY_MS);
  }

  /** Open streams until every message is answered; reconnect on retryable errors. */
  private async drive(): Promise<void> {
    let attempt = 0;
    try {
      for (;;) {
        // Open a stream only when there is something to send.
        await this.changed.until(() => this.unsent.length > 0 || this.closing);
        if (this.finished() || this.stop.signal.aborted) break;
        const call = new AbortController();
        const onStop = (): void => call.abort();
        this.stop.signal.addEventListener("abort", onStop);
        this.streamsOpened += 1;
        let failure: TidewatchError;
        try {
          const rpc = typeof this.rpc === "function" ? this.rpc() : this.rpc;
          const responses = rpc.ingest(this.requests(call.signal), { signal: call.signal });
          for await (const response of responses) {
            const batch = this.pending.shift();
            if (batch === undefined) throw new ProtocolError("a response arrived for no request", Code.Internal);
            if (response.verdicts.length !== batch.length) {
              throw new ProtocolError(`${response.verdicts.length} verdicts for ${batch.length} samples`, Code.Internal);
            }
            attempt = 0;
            const moved: Sample[] = [];
            response.verdicts.forEach((verdict, i) => {
              // Nothing was applied: the device is moving between replicas of the
              // server. Sent again shortly, in order.
              const sample = batch[i];
              if (sample !== undefined && verdict.error.startsWith(MOVED)) moved.push(sample);
              else this.verdicts.push(verdict);
            });
            if (moved.length > 0) this.sendAgain(moved);
            this.changed.notify();
          }
          if (this.finished()) break;
          // The server ended the stream without answering everything: re-send the rest.
          failure = new UnavailableError("the server ended the stream early", Code.Unavailable);
        } catch (error) {
          if (this.stop.signal.aborted) break;
          if (error instanceof ProtocolError) throw error;
          failure = toTidewatchError(error, call.signal.aborted);
          if (!failure.retryable) throw failure;
        } finally {
          call.abort();
          this.stop.signal.removeEventListener("abort", onStop);
          // What the broken stream did not answer goes first on the next one.
          this.unsent.unshift(...this.pending);
          this.pending = [];
          this.changed.notify();
        }
        attempt += 1;
        if (this.backoff.maxAttempts !== undefined && attempt > this.backoff.maxAttempts) throw failure;
        await sleep(backoffDelay(this.backoff, attempt - 1));
      }
      this.verdicts.end();
    } catch (error) {
      this.error = toTidewatchError(error);
      this.verdicts.end(this.error);
      this.changed.notify();
    }
  }

  /** The messages of one stream; the first carries the detector. */
  private async *requests(signal: AbortSignal): AsyncGenerator<IngestRequest> {
    const wake = (): void => this.changed.notify();
    signal.addEventListener("abort", wake);
    try {
      let first = true;
      for (;;) {
        await this.changed.until(
          () =>
            signal.aborted ||
            this.unsent.length > 0 ||
            (this.closing && this.buffer.length === 0 && this.moved === 0),
        );
        if (signal.aborted) return;
        const batch = this.unsent.shift();
        if (batch === undefined) return;
        this.pending.push(batch);
        yield create(IngestRequestSchema, {
          samples: batch,
          detector: first ? this.detector : undefined,
        });
        first = false;
      }
    } finally {
      signal.removeEventListener("abort", wake);
    }
  }
}
