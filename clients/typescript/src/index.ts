/**
 * @tidewatch/client: a TypeScript client for tidewatch, streaming anomaly detection
 * over gRPC. The messages are the protoc-gen-es types of tidewatch.v1, re-exported.
 */
export { connect, TidewatchClient, AnomalyWatch } from "./client.js";
export type { ClientOptions, NodeTransportOptions, WatchFilter, HealthStatus } from "./client.js";
export { bearerToken } from "./auth.js";
export type { TlsOptions, Token } from "./auth.js";
export { IngestSession, DEFAULT_DEVICE } from "./session.js";
export type { SampleInit, SessionOptions } from "./session.js";
export { DEFAULT_BACKOFF, backoffCap, backoffDelay } from "./backoff.js";
export type { Backoff } from "./backoff.js";
export {
  Code,
  TidewatchError,
  NotFoundError,
  InvalidArgumentError,
  ResourceExhaustedError,
  UnavailableError,
  DeadlineExceededError,
  UnauthenticatedError,
  PermissionDeniedError,
  SessionClosedError,
  ProtocolError,
  toTidewatchError,
} from "./errors.js";
export * from "./gen/tidewatch/v1/telemetry_pb.js";
