/**
 * A caller-built transport (interceptors, headers, transport options) carries every
 * call, and constructing a client or a session starts nothing.
 */
import assert from "node:assert/strict";
import { test } from "node:test";

import type { Interceptor } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";

import { connect, TidewatchClient } from "../src/index.js";
import { startServer } from "./server.js";

const SEED = [420, 430, 410, 440, 425, 900];

test("a caller-built transport with an interceptor carries every call", async () => {
  const server = await startServer();
  const seen: string[] = [];
  const served: string[] = [];
  // Sets a request header on every call and reads the server's response headers.
  const interceptor: Interceptor = (next) => async (request) => {
    request.header.set("x-request-id", `test-${seen.length}`);
    seen.push(request.method.name);
    const response = await next(request);
    served.push(response.header.get("content-type") ?? "");
    return response;
  };
  const transport = createGrpcTransport({ baseUrl: `http://${server.addr}`, interceptors: [interceptor] });
  const client = connect(transport);
  try {
    assert.equal(client.baseUrl, undefined);
    assert.equal(client.transport, transport);
    assert.equal(await client.checkHealth(), "SERVING");
    const verdicts = [];
    for await (const v of client.ingest(SEED.map((rps) => ({ deviceId: "ts-transport", metrics: { rps } })))) {
      verdicts.push(v.anomaly);
    }
    assert.deepEqual(verdicts, [false, false, false, false, false, true]);
    const stats = await client.analyze("ts-transport");
    assert.equal(stats.metrics[0]!.windowCount, 6);
    assert.deepEqual(seen, ["Check", "Ingest", "Analyze"]);
    assert.ok(served.every((type) => type.startsWith("application/grpc")), served.join());
  } finally {
    client.close(); // the caller's transport stays the caller's: nothing to close here
    await server.stop("SIGKILL");
  }
});

test("transport options reach the transport made from an address", async () => {
  const server = await startServer();
  const seen: string[] = [];
  const client = connect(server.addr, {
    transport: {
      interceptors: [
        (next) => async (request) => {
          seen.push(request.method.name);
          return next(request);
        },
      ],
    },
  });
  try {
    assert.equal(await client.checkHealth(), "SERVING");
    assert.deepEqual(seen, ["Check"]);
  } finally {
    client.close();
    await server.stop("SIGKILL");
  }
});

test("constructing a client or a session starts nothing", async () => {
  // Nothing listens on port 1: a client or session that dialled would fail or hang.
  const client = new TidewatchClient("127.0.0.1:1");
  const session = client.session();
  const internals = client as unknown as { made?: unknown; sessions?: unknown };
  assert.equal(internals.made, undefined, "the transport was made by the constructor");
  assert.equal(internals.sessions, undefined, "an HTTP/2 session manager exists already");
  assert.equal((session as unknown as { driver?: unknown }).driver, undefined, "the session started");
  await session.abort();
  client.close();
  assert.equal(client.baseUrl, "http://127.0.0.1:1");
  // A closed, never-started session ends its iteration at once.
  const verdicts = [];
  for await (const v of session) verdicts.push(v);
  assert.deepEqual(verdicts, []);
});
