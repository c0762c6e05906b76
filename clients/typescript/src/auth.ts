/**
 * Credentials for a server with authentication on: TLS settings for the Node transport
 * and a bearer token (fixed, or a callback that returns a refreshed one) added to every
 * call by a Connect interceptor.
 */
import type { Interceptor } from "@connectrpc/connect";

/** A token, or a function called when each call opens that returns the current one. */
export type Token = string | (() => string | Promise<string>);

/**
 * TLS settings of the transport made from an address (PEM strings or Buffers, as
 * `node:tls` takes them). With them the address is dialled with `https://`.
 */
export interface TlsOptions {
  /** The CA that signed the server's certificate (default: Node's public roots). */
  ca?: string | Buffer;
  /** The client's certificate chain, for mutual TLS. */
  cert?: string | Buffer;
  /** The client's private key, for mutual TLS. */
  key?: string | Buffer;
  /** The name to check the server's certificate against, when not the address's host. */
  servername?: string;
}

/**
 * An interceptor that sends `authorization: Bearer <token>` on every call. The server
 * checks the token once per call, so an ingest stream keeps the token it opened with
 * and a reconnect picks up a refreshed one. Add it to a transport you build yourself:
 * `createGrpcTransport({ baseUrl, interceptors: [bearerToken(token)] })`.
 */
export function bearerToken(token: Token): Interceptor {
  return (next) => async (request) => {
    const value = typeof token === "string" ? token : await token();
    request.header.set("authorization", `Bearer ${value}`);
    return next(request);
  };
}
