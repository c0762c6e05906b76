/**
 * Typed errors: one class per gRPC status a caller handles differently.
 */
import { Code, ConnectError } from "@connectrpc/connect";

export { Code };

/** Base class of every error the client throws; `code` is the gRPC status code. */
export class TidewatchError extends Error {
  /** The gRPC status code (`Code.Unknown` when the failure had none). */
  readonly code: Code;
  /** The server's (or transport's) message without the code prefix. */
  readonly details: string;

  constructor(details: string, code: Code = Code.Unknown, options?: { cause?: unknown }) {
    super(`${Code[code] ?? code}: ${details}`, options);
    this.name = new.target.name;
    this.code = code;
    this.details = details;
  }

  /** Whether re-sending on a new stream can succeed (ingest sessions do so). */
  get retryable(): boolean {
    return RETRYABLE.has(this.code);
  }
}

/** The device (analyze) or health service is unknown: `NOT_FOUND`. */
export class NotFoundError extends TidewatchError {}
/** The request is invalid, such as too many samples in one message. */
export class InvalidArgumentError extends TidewatchError {}
/** A message is too large or the server has too many open streams. */
export class ResourceExhaustedError extends TidewatchError {}
/** The server is unreachable or shutting down; retrying later can work. */
export class UnavailableError extends TidewatchError {}
/** The call's deadline passed, or the server ended a silent stream. */
export class DeadlineExceededError extends TidewatchError {}
/** No credentials, or credentials the server does not accept (a wrong or expired token). */
export class UnauthenticatedError extends TidewatchError {}
/** The caller lacks the scope for the call, or the device is outside its namespace. */
export class PermissionDeniedError extends TidewatchError {}
/** A sample was sent to an ingest session that is closed or has failed. */
export class SessionClosedError extends TidewatchError {}
/** The server broke the Ingest contract (for example, a wrong number of verdicts). */
export class ProtocolError extends TidewatchError {}

const RETRYABLE = new Set<Code>([Code.Unavailable, Code.DeadlineExceeded, Code.Aborted]);

const BY_CODE = new Map<Code, new (details: string, code: Code, options?: { cause?: unknown }) => TidewatchError>([
  [Code.NotFound, NotFoundError],
  [Code.InvalidArgument, InvalidArgumentError],
  [Code.ResourceExhausted, ResourceExhaustedError],
  [Code.Unavailable, UnavailableError],
  [Code.DeadlineExceeded, DeadlineExceededError],
  [Code.Unauthenticated, UnauthenticatedError],
  [Code.PermissionDenied, PermissionDeniedError],
]);

/**
 * The typed error for anything a call threw. `cancelledByUs` says whether the caller
 * aborted the call: otherwise a CANCELED status is the transport's (an HTTP/2 stream
 * reset by a connection that died) and becomes `UnavailableError`, which is retryable.
 */
export function toTidewatchError(error: unknown, cancelledByUs = false): TidewatchError {
  if (error instanceof TidewatchError) {
    return error;
  }
  const connect = ConnectError.from(error);
  if (connect.code === Code.Canceled && !cancelledByUs) {
    return new UnavailableError(`connection lost: ${connect.rawMessage}`, Code.Unavailable, { cause: error });
  }
  const Class = BY_CODE.get(connect.code) ?? TidewatchError;
  return new Class(connect.rawMessage, connect.code, { cause: error });
}
