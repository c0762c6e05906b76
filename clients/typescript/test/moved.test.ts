/**
 * A sample answered `moved` (its device is held by another replica of the server) is
 * sent again by the session until it is applied: the real binary on a real
 * `redis-server` where a live "other replica" holds the device for 3 s.
 */
import assert from "node:assert/strict";
import { execFileSync, spawn } from "node:child_process";
import { createServer } from "node:net";
import { test } from "node:test";

import { connect, type Verdict } from "../src/index.js";
import { startServer } from "./server.js";

async function freePort(): Promise<number> {
  return new Promise((found) => {
    const probe = createServer();
    probe.listen(0, "127.0.0.1", () => {
      const address = probe.address();
      const port = typeof address === "object" && address !== null ? address.port : 0;
      probe.close(() => found(port));
    });
  });
}

const cli = (port: number, ...args: string[]): string =>
  execFileSync("redis-cli", ["-p", String(port), ...args], { encoding: "utf8" }).trim();

test("samples answered moved are sent again until applied, in order", async () => {
  const port = await freePort();
  const redis = spawn("redis-server", ["--port", String(port), "--save", "", "--appendonly", "no"], {
    stdio: "ignore",
  });
  try {
    for (let i = 0; i < 100; i += 1) {
      try {
        if (cli(port, "PING") === "PONG") break;
      } catch {
        // Not listening yet.
      }
      await new Promise((done) => setTimeout(done, 50));
    }
    cli(port, "SET", "tidewatch:v1:replica:ghost", "1", "PX", "3000");
    cli(port, "SET", "{tidewatch:v1:device:held}:owner", "ghost");
    process.env["REDIS_URL"] = `redis://127.0.0.1:${port}`;
    const server = await startServer();
    delete process.env["REDIS_URL"];
    const client = connect(server.addr);
    try {
      const verdicts: Verdict[] = [];
      const samples = [1, 2, 3].map((t) => ({ deviceId: "held", metrics: { t } }));
      for await (const verdict of client.ingest(samples, { batchSize: 1 })) verdicts.push(verdict);
      assert.deepEqual(
        verdicts.map((v) => v.error),
        ["", "", ""],
      );
      assert.deepEqual(
        verdicts.map((v) => v.metrics[0]!.value),
        [1, 2, 3],
      );
    } finally {
      client.close();
      await server.stop("SIGKILL");
    }
  } finally {
    delete process.env["REDIS_URL"];
    redis.kill("SIGKILL");
  }
});
