/**
 * The README's example, run as printed against the real binary, prints what it says.
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { readFile, rm, writeFile } from "node:fs/promises";
import { dirname, resolve } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";

import { startServer } from "./server.js";

const here = dirname(fileURLToPath(import.meta.url));
const packageRoot = resolve(here, "..", "..");

function block(readme: string, language: string): string {
  const found = new RegExp("```" + language + "\\n([\\s\\S]*?)```").exec(readme);
  assert.ok(found, `no ${language} block in the README`);
  return found[1]!;
}

test("the README example prints what the README says", async () => {
  const readme = await readFile(resolve(packageRoot, "README.md"), "utf8");
  const code = block(readme, "js");
  assert.ok(code.includes("127.0.0.1:50051"));
  const server = await startServer();
  // Inside the package, so `@tidewatch/client` resolves to this build (self-reference).
  const script = resolve(here, "readme-example.mjs");
  try {
    await writeFile(script, code.replace("127.0.0.1:50051", server.addr));
    const { stdout } = await promisify(execFile)(process.execPath, [script], { timeout: 60_000 });
    assert.equal(stdout, block(readme, "text"));
  } finally {
    await rm(script, { force: true });
    await server.stop("SIGKILL");
  }
});
