/**
 * The real tidewatch binary on free ports, for the tests: started per test, parsed from
 * its JSON log line `grpc listening`, restartable on the same gRPC port.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
/** clients/typescript/dist/test -> repository root. */
const repo = resolve(here, "..", "..", "..", "..");
export const BINARY = process.env["TIDEWATCH_BIN"] ?? resolve(repo, "target", "release", "tidewatch");

/** One tidewatch process. */
export class Server {
  addr = "";
  port = 0;
  private process: ChildProcess | undefined;
  private exited: Promise<void> = Promise.resolve();

  /** `env`: extra environment (TLS and policy settings), kept across restarts. */
  constructor(private readonly env: Record<string, string> = {}) {}

  /** Start it; resolves once it logged its gRPC address. */
  async start(grpcAddr = "127.0.0.1:0"): Promise<void> {
    if (!existsSync(BINARY)) {
      throw new Error(`${BINARY} is missing: run cargo build --release -p tidewatch-server`);
    }
    const env: NodeJS.ProcessEnv = {
      ...process.env,
      GRPC_ADDR: grpcAddr,
      LISTEN_ADDR: "127.0.0.1:0",
      LOG_FORMAT: "json",
      LOG_LEVEL: "info",
      ...this.env,
    };
    delete env["RUST_LOG"];
    const child = spawn(BINARY, [], { env, stdio: ["ignore", "pipe", "ignore"] });
    this.process = child;
    this.exited = new Promise((done) => child.once("exit", () => done()));
    const lines = createInterface({ input: child.stdout! });
    this.addr = await new Promise<string>((found, failed) => {
      let reported = false;
      lines.on("line", (line) => {
        if (reported) return;
        try {
          const entry = JSON.parse(line) as Record<string, unknown>;
          const fields = (entry["fields"] ?? entry) as Record<string, unknown>;
          if (fields["message"] === "grpc listening") {
            reported = true;
            found(String(fields["grpc_addr"]));
          }
        } catch {
          // Not a JSON line: keep reading (every line is read so the pipe never fills).
        }
      });
      lines.once("close", () => {
        if (!reported) failed(new Error("tidewatch exited before logging `grpc listening`"));
      });
    });
    this.port = Number(this.addr.slice(this.addr.lastIndexOf(":") + 1));
  }

  /** Send a signal without waiting. */
  signal(sig: NodeJS.Signals): void {
    this.process?.kill(sig);
  }

  /** Send `sig` (default SIGTERM) and wait for the exit. */
  async stop(sig: NodeJS.Signals = "SIGTERM"): Promise<void> {
    if (this.process === undefined) return;
    if (this.process.exitCode === null && this.process.signalCode === null) this.process.kill(sig);
    await this.exited;
    this.process = undefined;
  }

  /** Wait for the exit of a signalled process, then start a new one on the same port. */
  async restartAfterExit(): Promise<void> {
    await this.exited;
    this.process = undefined;
    await this.start(`127.0.0.1:${this.port}`);
  }
}

/** A started server. */
export async function startServer(env: Record<string, string> = {}): Promise<Server> {
  const server = new Server(env);
  await server.start();
  return server;
}
