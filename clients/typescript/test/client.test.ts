/**
 * The TypeScript client against the real tidewatch binary.
 */
import assert from "node:assert/strict";
import { test } from "node:test";

import {
  backoffCap,
  backoffDelay,
  connect,
  InvalidArgumentError,
  NotFoundError,
  SessionClosedError,
  Source,
  UnavailableError,
  type SampleInit,
  type SessionOptions,
  type TidewatchClient,
  type Verdict,
} from "../src/index.js";
import { startServer, type Server } from "./server.js";

const SEED = [420, 430, 410, 440, 425, 900];

const rps = (deviceId: string, value: number): SampleInit => ({ deviceId, metrics: { rps: value } });

async function collect(
  client: TidewatchClient,
  samples: Iterable<SampleInit>,
  options: SessionOptions = {},
): Promise<Verdict[]> {
  const verdicts: Verdict[] = [];
  for await (const verdict of client.ingest(samples, options)) verdicts.push(verdict);
  return verdicts;
}

/** Runs `body` with a fresh server and a client of it. */
async function withServer(body: (server: Server, client: TidewatchClient) => Promise<void>): Promise<void> {
  const server = await startServer();
  const client = connect(server.addr);
  try {
    await body(server, client);
  } finally {
    client.close();
    await server.stop("SIGKILL");
  }
}

test("seed check: 900 after five ordinary values is an anomaly", () =>
  withServer(async (_server, client) => {
    const verdicts = await collect(client, SEED.map((v) => rps("sensor-1", v)), { batchSize: 1 });
    assert.deepEqual(
      verdicts.map((v) => v.anomaly),
      [false, false, false, false, false, true],
    );
    const last = verdicts.at(-1)!;
    assert.equal(last.deviceId, "sensor-1");
    assert.equal(last.metrics[0]!.metric, "rps");
    assert.equal(last.metrics[0]!.zScore, 47.5);
    assert.equal(last.metrics[0]!.mean, 425);
    assert.ok(verdicts.every((v) => v.error === ""));
    const seqs = verdicts.map((v) => v.seq);
    assert.ok(seqs[0]! > 0n);
    assert.ok(seqs.every((s, i) => i === 0 || s > seqs[i - 1]!), "seq increases per device");
  }));

test("a 10,000-sample session is answered in order", () =>
  withServer(async (_server, client) => {
    const samples = Array.from({ length: 10_000 }, (_, i) => rps(`dev-${i % 7}`, i));
    const verdicts = await collect(client, samples, { batchSize: 250 });
    assert.equal(verdicts.length, 10_000);
    verdicts.forEach((v, i) => {
      assert.equal(v.metrics[0]!.value, i);
      assert.equal(v.deviceId, `dev-${i % 7}`);
      assert.equal(v.error, "");
      assert.equal(v.duplicate, false);
    });
  }));

for (const sig of ["SIGKILL", "SIGTERM"] as const) {
  test(`server ${sig}ed and restarted mid-session: every sample answered once`, () =>
    withServer(async (server, client) => {
      const total = 3_000;
      const session = client.session({
        batchSize: 10,
        maxInFlight: 8,
        backoff: { initialMs: 50, maxMs: 500, multiplier: 2 },
      });
      const received: Verdict[] = [];
      let killed!: () => void;
      const gone = new Promise<void>((resolve) => (killed = resolve));
      let restarted: Promise<void> | undefined;
      const consumer = (async () => {
        for await (const verdict of session) {
          received.push(verdict);
          if (received.length === 1_000) {
            // Samples sent after the first thousand are still in flight now.
            server.signal(sig);
            killed();
            restarted = server.restartAfterExit();
          }
        }
      })();
      for (let i = 0; i < total; i++) {
        // The second half goes out only once the server is gone.
        if (i === total / 2) await gone;
        await session.send(rps("restart-dev", i));
      }
      await session.close();
      await consumer;
      await restarted;
      assert.ok(session.streamsOpened >= 2, `streams opened: ${session.streamsOpened}`);
      assert.equal(received.length, total);
      received.forEach((v, i) => {
        assert.equal(v.metrics[0]!.value, i, `verdict ${i} is for sample ${i}`);
        assert.equal(v.error, "");
      });
      const seqs = new Set(received.map((v) => v.seq));
      assert.equal(seqs.size, total, "no sample answered twice");
    }));
}

test("analyze returns a device's statistics; an unknown device is NOT_FOUND", () =>
  withServer(async (_server, client) => {
    await collect(client, SEED.map((v) => rps("sensor-a", v)));
    const stats = await client.analyze("sensor-a");
    assert.equal(stats.deviceId, "sensor-a");
    assert.equal(stats.source, Source.MEMORY);
    assert.ok(stats.lastSeq > 0n);
    assert.equal(stats.metrics.length, 1);
    const m = stats.metrics[0]!;
    assert.equal(m.metric, "rps");
    assert.equal(m.windowCount, 6);
    assert.equal(m.lastValue, 900);
    assert.equal(m.lastAnomaly, true);
    assert.equal(m.anomaliesTotal, 1n);
    assert.ok(Math.abs(m.rollingAverage - SEED.reduce((a, b) => a + b) / 6) < 1e-9);
    await assert.rejects(client.analyze("never-seen"), (error: unknown) => {
      assert.ok(error instanceof NotFoundError);
      return true;
    });
  }));

test("deleteDevice forgets a device; deleting it again finds nothing", () =>
  withServer(async (_server, client) => {
    await collect(client, SEED.map((v) => rps("to-delete", v)));
    const deleted = await client.deleteDevice("to-delete");
    assert.equal(deleted.deviceId, "to-delete");
    assert.equal(deleted.deleted, true);
    await assert.rejects(client.analyze("to-delete"), (error: unknown) => error instanceof NotFoundError);
    assert.equal((await client.deleteDevice("to-delete")).deleted, false);
  }));

test("watchAnomalies delivers anomalies, filtered by device and metric", () =>
  withServer(async (_server, client) => {
    const every = client.watchAnomalies();
    const onlyB = client.watchAnomalies({ deviceIds: ["watch-b"], metrics: ["rps"] });
    await every.ready;
    await onlyB.ready;
    await collect(client, SEED.map((v) => rps("watch-a", v)));
    await collect(client, SEED.map((v) => rps("watch-b", v)));
    const all = every[Symbol.asyncIterator]();
    const first = (await all.next()).value!;
    const second = (await all.next()).value!;
    assert.deepEqual([first.verdict!.deviceId, second.verdict!.deviceId], ["watch-a", "watch-b"]);
    assert.equal(first.verdict!.anomaly, true);
    assert.equal(first.missed, 0n);
    assert.ok(first.time!.seconds > 0n);
    // The filtered watcher never saw watch-a's anomaly: its first event is watch-b's.
    const eventB = (await onlyB[Symbol.asyncIterator]().next()).value!;
    assert.equal(eventB.verdict!.deviceId, "watch-b");
    assert.equal(eventB.verdict!.metrics[0]!.value, 900);
    every.cancel();
    onlyB.cancel();
  }));

test("watchAnomalies ends with UNAVAILABLE at server shutdown", () =>
  withServer(async (server, client) => {
    const watch = client.watchAnomalies();
    await watch.ready;
    await server.stop("SIGTERM");
    await assert.rejects(
      (async () => {
        for await (const _ of watch) {
          // No anomalies are produced.
        }
      })(),
      UnavailableError,
    );
  }));

test("a bad sample gets its own error and the stream goes on", () =>
  withServer(async (_server, client) => {
    const verdicts = await collect(
      client,
      [
        { deviceId: "bad-1", metrics: { cpu: 1 } },
        { deviceId: "bad-1", metrics: { cpu: Number.NaN } },
        { deviceId: "bad-1", metrics: {} },
        { deviceId: "bad-1", metrics: { cpu: 2 } },
      ],
      { batchSize: 4 },
    );
    assert.deepEqual(
      verdicts.map((v) => v.error === ""),
      [true, false, false, true],
    );
    assert.equal(verdicts[1]!.error, 'invalid_value: metric "cpu" is NaN');
    assert.match(verdicts[2]!.error, /^no_metrics/);
    const stats = await client.analyze("bad-1");
    assert.equal(stats.metrics[0]!.windowCount, 2);
  }));

test("a detector config goes with the first message", () =>
  withServer(async (_server, client) => {
    const verdicts = await collect(client, SEED.map((v) => rps("det-1", v)), {
      detector: { name: "zscore", threshold: 2 },
    });
    assert.deepEqual(
      verdicts.map((v) => v.anomaly),
      [false, false, false, false, false, true],
    );
  }));

test("health check", () =>
  withServer(async (server, client) => {
    assert.equal(await client.checkHealth(), "SERVING");
    assert.equal(await client.checkHealth("tidewatch.v1.TelemetryService"), "SERVING");
    await assert.rejects(client.checkHealth("no.such.Service"), NotFoundError);
    await server.stop("SIGKILL");
    await assert.rejects(client.checkHealth("", { timeoutMs: 5_000 }), UnavailableError);
  }));

test("a session gives up after maxAttempts failed connections", () =>
  withServer(async (server, client) => {
    await server.stop("SIGKILL");
    await assert.rejects(
      collect(client, [rps("x", 1)], { backoff: { initialMs: 10, maxMs: 50, multiplier: 2, maxAttempts: 3 } }),
      UnavailableError,
    );
  }));

test("a closed session rejects samples", () =>
  withServer(async (_server, client) => {
    const session = client.session();
    await session.send(rps("closed-1", 1));
    await session.close();
    const values: number[] = [];
    for await (const v of session) values.push(v.metrics[0]!.value);
    assert.deepEqual(values, [1]);
    await assert.rejects(session.send(rps("closed-1", 2)), SessionClosedError);
  }));

test("backoff grows within bounds", () => {
  const backoff = { initialMs: 100, maxMs: 1_000, multiplier: 2 };
  assert.deepEqual(
    [0, 1, 2, 3, 4, 5].map((n) => backoffCap(backoff, n)),
    [100, 200, 400, 800, 1_000, 1_000],
  );
  for (let n = 0; n < 6; n++) {
    const delay = backoffDelay(backoff, n);
    assert.ok(delay >= backoffCap(backoff, n) / 2 && delay <= backoffCap(backoff, n));
  }
});

test("a too large message fails the session with INVALID_ARGUMENT", () =>
  withServer(async (_server, client) => {
    const samples = Array.from({ length: 10_001 }, (_, i) => rps("big-1", i));
    await assert.rejects(collect(client, samples, { batchSize: 10_001 }), InvalidArgumentError);
  }));

test("stopping early releases a blocked producer", () =>
  withServer(async (_server, client) => {
    function* many(): Generator<SampleInit> {
      for (let i = 0; i < 5_000; i++) yield rps("early-1", i);
    }
    let seen = 0;
    for await (const _ of client.ingest(many(), { batchSize: 5, maxInFlight: 1 })) {
      if (++seen === 10) break;
    }
    assert.equal(seen, 10);
    const session = client.session({ batchSize: 1, maxInFlight: 1 });
    await session.send(rps("early-2", 1));
    const blocked = session.send(rps("early-2", 2));
    await session.abort();
    await assert.rejects(blocked, SessionClosedError);
  }));
