/**
 * The client: calls to one tidewatch server (health, analyze, watchAnomalies, ingest
 * sessions) over a Connect transport: one the caller built (interceptors, headers, TLS,
 * any runtime), or Connect's gRPC transport for Node made from an address on first use.
 */
import { create } from "@bufbuild/protobuf";
import { createClient, type Client, type Transport } from "@connectrpc/connect";
import {
  createGrpcTransport,
  Http2SessionManager,
  type GrpcTransportOptions,
} from "@connectrpc/connect-node";

import { bearerToken, type TlsOptions, type Token } from "./auth.js";
import { DEFAULT_BACKOFF, type Backoff } from "./backoff.js";
import { toTidewatchError } from "./errors.js";
import {
  Health,
  HealthCheckResponse_ServingStatus,
} from "./gen/grpc/health/v1/health_pb.js";
import {
  TelemetryService,
  WatchAnomaliesRequestSchema,
  type AnalyzeResponse,
  type DeleteDeviceResponse,
  type Sample,
  type Verdict,
  type WatchAnomaliesResponse,
} from "./gen/tidewatch/v1/telemetry_pb.js";
import { IngestSession, type SampleInit, type SessionOptions } from "./session.js";

/**
 * Options of the transport made from an address: those of `createGrpcTransport` of
 * `@connectrpc/connect-node` but `baseUrl` and `sessionManager`, e.g. `interceptors`
 * (headers, auth, logging) and `nodeOptions` (TLS: `ca`, `cert`, `key`).
 */
export type NodeTransportOptions = Omit<GrpcTransportOptions, "baseUrl" | "sessionManager">;

/** Options of a client. */
export interface ClientOptions {
  /** How to build the transport when the client is given an address. */
  transport?: NodeTransportOptions;
  /**
   * TLS for the transport made from an address (a `host:port` address is then dialled
   * with `https://`). For a transport you build, pass these as its `nodeOptions`.
   */
  tls?: TlsOptions;
  /**
   * Bearer token for every call made through the transport built from an address. For
   * a transport you build, add `bearerToken(token)` to its interceptors instead.
   */
  token?: Token;
  /** Default reconnect backoff of ingest sessions. */
  backoff?: Backoff;
  /** Deadline of unary calls (health, analyze), in ms (default 10000). */
  timeoutMs?: number;
}

/** Filters of the anomaly feed; empty or absent means everything. */
export interface WatchFilter {
  /** Only these devices. */
  deviceIds?: string[];
  /** Only verdicts where one of these metrics is anomalous. */
  metrics?: string[];
}

/** A health status name of grpc.health.v1: "SERVING", "NOT_SERVING", ... */
export type HealthStatus = keyof typeof HealthCheckResponse_ServingStatus;

/**
 * A running WatchAnomalies call: iterate it with `for await`; `ready` resolves once the
 * server has subscribed it (no later anomaly is missed); `cancel` stops it. At server
 * shutdown the iteration throws `UnavailableError`.
 */
export class AnomalyWatch implements AsyncIterable<WatchAnomaliesResponse> {
  /** Resolves once the server has subscribed this watcher. */
  readonly ready: Promise<void>;
  private readonly controller = new AbortController();
  private readonly events: AsyncIterable<WatchAnomaliesResponse>;

  /** Use `TidewatchClient.watchAnomalies` rather than this constructor. */
  constructor(rpc: Client<typeof TelemetryService>, filter: WatchFilter) {
    let subscribed!: () => void;
    let refused!: (error: unknown) => void;
    this.ready = new Promise<void>((resolve, reject) => {
      subscribed = resolve;
      refused = reject;
    });
    // Avoid an unhandled rejection when nobody awaits `ready`.
    this.ready.catch(() => undefined);
    const request = create(WatchAnomaliesRequestSchema, {
      deviceIds: filter.deviceIds ?? [],
      metrics: filter.metrics ?? [],
    });
    this.events = rpc.watchAnomalies(request, {
      signal: this.controller.signal,
      onHeader: () => subscribed(),
    });
    this.iterator = this.events[Symbol.asyncIterator]();
    // Pull the first event now, so a refused call rejects `ready` instead of leaving it pending.
    this.first = this.iterator.next();
    this.first.catch((error: unknown) => refused(toTidewatchError(error, this.controller.signal.aborted)));
  }

  private readonly iterator: AsyncIterator<WatchAnomaliesResponse>;
  private first: Promise<IteratorResult<WatchAnomaliesResponse>> | undefined;

  /** Stop watching; the iteration ends. */
  cancel(): void {
    this.controller.abort();
  }

  [Symbol.asyncIterator](): AsyncIterator<WatchAnomaliesResponse> {
    return {
      next: async () => {
        const next = this.first ?? this.iterator.next();
        this.first = undefined;
        try {
          return await next;
        } catch (error) {
          if (this.controller.signal.aborted) return { value: undefined, done: true };
          throw toTidewatchError(error, this.controller.signal.aborted);
        }
      },
      return: async () => {
        this.cancel();
        return { value: undefined, done: true };
      },
    };
  }
}

/** A connection to one tidewatch server. */
export class TidewatchClient {
  /** The server's base URL, when the client was given an address. */
  readonly baseUrl: string | undefined;
  private readonly given: Transport | undefined;
  private readonly transportOptions: NodeTransportOptions;
  private sessions: Http2SessionManager | undefined;
  private made: Transport | undefined;
  private rpcClient: Client<typeof TelemetryService> | undefined;
  private healthClient: Client<typeof Health> | undefined;
  private readonly backoff: Backoff;
  private readonly timeoutMs: number;

  /**
   * `target` is `host:port` (plaintext), a URL (`http://...`, `https://...`), or a
   * Connect `Transport` the caller built (interceptors, headers, TLS, a gRPC-Web
   * transport...). The constructor starts nothing: an address's transport is made and
   * dialled by the first call.
   */
  constructor(target: string | Transport, options: ClientOptions = {}) {
    if (typeof target === "string") {
      const scheme = options.tls ? "https" : "http";
      this.baseUrl = /^https?:\/\//.test(target) ? target : `${scheme}://${target}`;
    } else {
      if (options.tls || options.token !== undefined) {
        // Silently ignoring them would send calls without the credentials asked for.
        throw new TypeError("tls and token apply to a transport made from an address; configure your transport instead");
      }
      this.given = target;
    }
    const transport = options.transport ?? {};
    this.transportOptions = {
      ...transport,
      interceptors:
        options.token === undefined
          ? transport.interceptors
          : [bearerToken(options.token), ...(transport.interceptors ?? [])],
      nodeOptions: options.tls ? { ...transport.nodeOptions, ...options.tls } : transport.nodeOptions,
    };
    this.backoff = options.backoff ?? DEFAULT_BACKOFF;
    this.timeoutMs = options.timeoutMs ?? 10_000;
  }

  /** The transport: the caller's, or the one made from the address on first use. */
  get transport(): Transport {
    if (this.given) return this.given;
    if (!this.made) {
      const o = this.transportOptions;
      this.sessions = new Http2SessionManager(
        this.baseUrl!,
        {
          pingIntervalMs: o.pingIntervalMs,
          pingIdleConnection: o.pingIdleConnection,
          pingTimeoutMs: o.pingTimeoutMs,
          idleConnectionTimeoutMs: o.idleConnectionTimeoutMs,
        },
        o.nodeOptions,
      );
      this.made = createGrpcTransport({
        ...this.transportOptions,
        baseUrl: this.baseUrl!,
        sessionManager: this.sessions,
      });
    }
    return this.made;
  }

  private get rpc(): Client<typeof TelemetryService> {
    this.rpcClient ??= createClient(TelemetryService, this.transport);
    return this.rpcClient;
  }

  private get health(): Client<typeof Health> {
    this.healthClient ??= createClient(Health, this.transport);
    return this.healthClient;
  }

  /**
   * Close the connection the client made; running calls fail. A caller's transport is
   * the caller's to close.
   */
  close(): void {
    this.sessions?.abort();
  }

  /** `close`, for `using client = connect(...)` (TypeScript 5.2+). */
  [Symbol.dispose](): void {
    this.close();
  }

  /**
   * The grpc.health.v1 status of `service` ("" is the whole server, or
   * "tidewatch.v1.TelemetryService"); `NotFoundError` for a service the server does not know.
   */
  async checkHealth(service = "", options: { timeoutMs?: number } = {}): Promise<HealthStatus> {
    try {
      const response = await this.health.check({ service }, { timeoutMs: options.timeoutMs ?? this.timeoutMs });
      return HealthCheckResponse_ServingStatus[response.status] as HealthStatus;
    } catch (error) {
      throw toTidewatchError(error);
    }
  }

  /** The current window statistics of one device; `NotFoundError` if unknown. */
  async analyze(deviceId = "", options: { timeoutMs?: number } = {}): Promise<AnalyzeResponse> {
    try {
      return await this.rpc.analyze({ deviceId }, { timeoutMs: options.timeoutMs ?? this.timeoutMs });
    } catch (error) {
      throw toTidewatchError(error);
    }
  }

  /**
   * Deletes one device's state from the memory of every replica and from Redis; its
   * next sample starts fresh. `deleted` in the answer says whether it had any. Needs
   * the `admin` scope when the server authenticates (`PermissionDeniedError`);
   * `UnavailableError` means nothing was deleted.
   */
  async deleteDevice(deviceId = "", options: { timeoutMs?: number } = {}): Promise<DeleteDeviceResponse> {
    try {
      return await this.rpc.deleteDevice({ deviceId }, { timeoutMs: options.timeoutMs ?? this.timeoutMs });
    } catch (error) {
      throw toTidewatchError(error);
    }
  }

  /** The live feed of anomalous verdicts, filtered by devices and metrics. */
  watchAnomalies(filter: WatchFilter = {}): AnomalyWatch {
    return new AnomalyWatch(this.rpc, filter);
  }

  /** An ingest session: `send` samples, iterate verdicts, `close` when done. */
  session(options: SessionOptions = {}): IngestSession {
    return new IngestSession(() => this.rpc, { backoff: this.backoff, ...options });
  }

  /**
   * Stream `samples` and yield one verdict per sample, in order. Takes the options of
   * `session`; throws the session's error if it fails.
   */
  async *ingest(
    samples: Iterable<SampleInit | Sample> | AsyncIterable<SampleInit | Sample>,
    options: SessionOptions = {},
  ): AsyncGenerator<Verdict, void, undefined> {
    const session = this.session(options);
    let feedError: unknown;
    const feeder = (async () => {
      try {
        for await (const sample of samples) await session.send(sample);
        await session.close();
      } catch (error) {
        feedError = error;
        await session.abort();
      }
    })();
    try {
      for await (const verdict of session) yield verdict;
      await feeder;
      if (feedError !== undefined) throw feedError;
    } finally {
      await session.abort();
      await feeder;
    }
  }
}

/**
 * A client for the server at `target` (`host:port` or a URL), or over a transport the
 * caller built. Nothing is dialled until the first call.
 */
export function connect(target: string | Transport, options: ClientOptions = {}): TidewatchClient {
  return new TidewatchClient(target, options);
}
