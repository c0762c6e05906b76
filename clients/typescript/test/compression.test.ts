/**
 * Connect's gRPC transport with gzip on against the real server (docs/api.md,
 * "Compression"): compressed requests on every method, compressed answers when
 * `GRPC_COMPRESSION` allows them (the interceptor reads `grpc-encoding`), and a message
 * that decompresses past `MAX_MESSAGE_BYTES` refused without being expanded.
 */
import assert from "node:assert/strict";
import { test } from "node:test";

import { create } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { compressionGzip, createGrpcTransport } from "@connectrpc/connect-node";

import { connect } from "../src/index.js";
import { IngestRequestSchema, TelemetryService } from "../src/gen/tidewatch/v1/telemetry_pb.js";
import { startServer } from "./server.js";

/** Every message compressed (Connect compresses from 1 KiB on by default). */
const GZIP = { sendCompression: compressionGzip, acceptCompression: [compressionGzip], compressMinBytes: 0 };

for (const answers of ["gzip", "off"]) {
  test(`gzip calls on every method, answers ${answers}`, async () => {
    const server = await startServer({ GRPC_COMPRESSION: answers });
    const encodings = new Map<string, string>();
    const seen: Interceptor = (next) => async (request) => {
      const response = await next(request);
      encodings.set(request.method.name, response.header.get("grpc-encoding") ?? "none");
      return response;
    };
    const client = connect(server.addr, { transport: { ...GZIP, interceptors: [seen] } });
    try {
      assert.equal(await client.checkHealth(), "SERVING");
      const watch = client.watchAnomalies({ deviceIds: ["ts-gz-0"] });
      await watch.ready;
      const samples = Array.from({ length: 2000 }, (_, i) => ({
        deviceId: `ts-gz-${i % 4}`,
        metrics: { rps: 400, cpu: 0.5 },
      }));
      samples.push({ deviceId: "ts-gz-0", metrics: { rps: 9e6, cpu: 0.5 } });
      const verdicts = [];
      for await (const v of client.ingest(samples, { batchSize: 100 })) verdicts.push(v);
      assert.equal(verdicts.length, 2001);
      assert.deepEqual(
        verdicts.map((v) => v.deviceId),
        samples.map((s) => s.deviceId),
      );
      assert.ok(verdicts.every((v) => !v.error && !v.duplicate));
      assert.ok(verdicts[2000]!.anomaly);
      const stats = await client.analyze("ts-gz-1");
      assert.equal(stats.metrics.length, 2);
      for await (const event of watch) {
        assert.equal(event.verdict?.deviceId, "ts-gz-0");
        break;
      }
      watch.cancel();
      const expected = answers === "gzip" ? "gzip" : "none";
      for (const method of ["Check", "Ingest", "Analyze", "WatchAnomalies"]) {
        assert.equal(encodings.get(method), expected, method);
      }
    } finally {
      client.close();
      await server.stop("SIGKILL");
    }
  });
}

test("a message that decompresses past MAX_MESSAGE_BYTES is refused", async () => {
  const server = await startServer({ MAX_MESSAGE_BYTES: String(64 * 1024) });
  const transport = createGrpcTransport({ baseUrl: `http://${server.addr}`, ...GZIP });
  const rpc = createClient(TelemetryService, transport);
  try {
    async function* requests() {
      yield create(IngestRequestSchema, { samples: [{ deviceId: "ts-before", metrics: { rps: 1 } }] });
      // 1 MiB of one letter: about a kilobyte once gzipped, 16 times the limit after.
      yield create(IngestRequestSchema, { samples: [{ deviceId: "a".repeat(1 << 20), metrics: { x: 1 } }] });
    }
    const answered: number[] = [];
    await assert.rejects(
      (async () => {
        for await (const response of rpc.ingest(requests())) answered.push(response.verdicts.length);
      })(),
      (error: unknown) => {
        assert.ok(error instanceof ConnectError);
        assert.equal(error.code, Code.ResourceExhausted);
        assert.equal(
          error.rawMessage,
          "Error decompressing: size limit, of 65536 bytes, exceeded while decompressing message (MAX_MESSAGE_BYTES)",
        );
        return true;
      },
    );
    assert.deepEqual(answered, [1]);
  } finally {
    await server.stop("SIGKILL");
  }
});
