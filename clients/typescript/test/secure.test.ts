/**
 * The client against the real server with TLS and authentication on: certificates
 * made at test time (clients/test-certs.sh, the openssl CLI), an API key from a policy
 * file, mutual TLS whose certificate identity names a policy entry, and refusals.
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

import { createGrpcTransport, Http2SessionManager } from "@connectrpc/connect-node";

import {
  bearerToken,
  connect,
  NotFoundError,
  PermissionDeniedError,
  TidewatchError,
  UnauthenticatedError,
} from "../src/index.js";
import { startServer, type Server } from "./server.js";

const KEY = "tw_test_fleet_a_3c9e71d04b2a4f86a5d1e0c7b9f24e61";
const IDENTITY = "spiffe://tidewatch.test/device/fleet-a-7";
/** clients/typescript/dist/test -> clients/test-certs.sh */
const CERTS_SCRIPT = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..", "..", "test-certs.sh");

interface Secure {
  server: Server;
  /** `localhost:port`: the server certificate names localhost. */
  target: string;
  pem(name: string): Buffer;
  done(): Promise<void>;
}

async function secureServer(mutual: boolean): Promise<Secure> {
  const dir = mkdtempSync(join(tmpdir(), "tidewatch-ts-secure-"));
  // Throws (failing the test) when openssl is missing: nothing is skipped.
  execFileSync("sh", [CERTS_SCRIPT, dir, IDENTITY], { stdio: "inherit" });
  const policy = {
    principals: [
      {
        name: "fleet-a",
        scopes: ["ingest", "analyze", "watch"],
        devices: ["fleet-a/*"],
        api_keys_sha256: [createHash("sha256").update(KEY).digest("hex")],
      },
      { name: IDENTITY, scopes: ["ingest", "analyze"], devices: ["fleet-a/*"] },
    ],
  };
  writeFileSync(join(dir, "policy.json"), JSON.stringify(policy));
  const env: Record<string, string> = {
    TLS_CERT: join(dir, "server.pem"),
    TLS_KEY: join(dir, "server.key"),
    AUTH_POLICY: join(dir, "policy.json"),
  };
  if (mutual) env["TLS_CLIENT_CA"] = join(dir, "ca.pem");
  const server = await startServer(env);
  return {
    server,
    target: `localhost:${server.port}`,
    pem: (name) => readFileSync(join(dir, name)),
    done: async () => {
      await server.stop("SIGKILL");
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

test("an API key over TLS ingests and analyzes its own devices only", async () => {
  const s = await secureServer(false);
  const client = connect(s.target, { tls: { ca: s.pem("ca.pem") }, token: KEY });
  try {
    assert.equal(client.baseUrl, `https://${s.target}`);
    // Every call kind carries the token: server streaming (watch) too.
    const watch = client.watchAnomalies({ deviceIds: ["fleet-a/pump-1"] });
    await watch.ready;
    watch.cancel();
    const verdicts = [];
    for await (const v of client.ingest([1, 2, 3].map((rps) => ({ deviceId: "fleet-a/pump-1", metrics: { rps } })))) {
      verdicts.push(v);
    }
    assert.equal(verdicts.length, 3);
    assert.equal((await client.analyze("fleet-a/pump-1")).deviceId, "fleet-a/pump-1");
    await assert.rejects(client.analyze("fleet-b/pump-1"), PermissionDeniedError);
  } finally {
    client.close();
    await s.done();
  }
});

test("a wrong or missing token is UNAUTHENTICATED", async () => {
  const s = await secureServer(false);
  const wrong = connect(s.target, { tls: { ca: s.pem("ca.pem") }, token: "wrong" });
  const none = connect(s.target, { tls: { ca: s.pem("ca.pem") } });
  try {
    await assert.rejects(wrong.analyze("fleet-a/pump-1"), UnauthenticatedError);
    await assert.rejects(wrong.watchAnomalies({}).ready, UnauthenticatedError);
    await assert.rejects(async () => {
      for await (const _ of wrong.ingest([{ deviceId: "fleet-a/pump-1", metrics: { rps: 1 } }])) {
        // a verdict here would be a failure: the stream must be refused
      }
    }, UnauthenticatedError);
    await assert.rejects(none.analyze("fleet-a/pump-1"), UnauthenticatedError);
  } finally {
    wrong.close();
    none.close();
    await s.done();
  }
});

test("a token callback is called when each call opens", async () => {
  const s = await secureServer(false);
  let current = "expired";
  const client = connect(s.target, { tls: { ca: s.pem("ca.pem") }, token: async () => current });
  try {
    await assert.rejects(client.analyze("fleet-a/none"), UnauthenticatedError);
    current = KEY;
    // Authenticated now: the device is simply unknown.
    await assert.rejects(client.analyze("fleet-a/none"), NotFoundError);
  } finally {
    client.close();
    await s.done();
  }
});

test("a caller-built TLS transport with bearerToken", async () => {
  const s = await secureServer(false);
  const baseUrl = `https://${s.target}`;
  // The caller owns the connection of a transport it built: close it at the end.
  const sessions = new Http2SessionManager(baseUrl, {}, { ca: s.pem("ca.pem") });
  const transport = createGrpcTransport({
    baseUrl,
    sessionManager: sessions,
    interceptors: [bearerToken(KEY)],
  });
  const client = connect(transport);
  try {
    await assert.rejects(client.analyze("fleet-a/none"), NotFoundError);
    assert.throws(() => connect(transport, { token: KEY }), TypeError);
  } finally {
    sessions.abort();
    await s.done();
  }
});

test("mutual TLS: the certificate identity names the policy entry", async () => {
  const s = await secureServer(true);
  const client = connect(s.target, {
    tls: { ca: s.pem("ca.pem"), cert: s.pem("client.pem"), key: s.pem("client.key") },
  });
  const foreign = connect(s.target, {
    tls: { ca: s.pem("ca.pem"), cert: s.pem("foreign.pem"), key: s.pem("foreign.key") },
  });
  try {
    await assert.rejects(client.analyze("fleet-a/none"), NotFoundError);
    await assert.rejects(client.analyze("fleet-b/none"), PermissionDeniedError);
    // The same identity from a CA the server does not trust: the handshake fails.
    await assert.rejects(foreign.analyze("fleet-a/none"), (error: unknown) => {
      assert.ok(error instanceof TidewatchError);
      assert.ok(!(error instanceof NotFoundError), String(error));
      return true;
    });
  } finally {
    client.close();
    foreign.close();
    await s.done();
  }
});
