#!/usr/bin/env node
// `npx pkv-engine …`: runs the built C++ engine with the same arguments, stdio and exit code.
import { spawn } from "node:child_process";
import { existsSync } from "node:fs";

import { engineBinary } from "./engine-path.js";

const bin = engineBinary();
if (!existsSync(bin)) {
  process.stderr.write(`error: engine binary not found at ${bin} (run \`make engine\` or \`make test\` first)\n`);
  process.exit(2);
}
const child = spawn(bin, process.argv.slice(2), { stdio: "inherit" });
for (const signal of ["SIGINT", "SIGTERM"] as const) process.on(signal, () => child.kill(signal));
child.on("exit", (code, signal) => process.exit(code ?? (signal ? 128 : 1)));
