import { existsSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";

/** Repository root, from this file's location (gpu-host/dist/src/ or gpu-host/src/). */
export function repoRoot(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  while (!existsSync(resolve(dir, "gpu-host", "engine", "CMakeLists.txt"))) {
    const up = dirname(dir);
    if (up === dir) throw new Error("cannot locate the pyramidkv repository root");
    dir = up;
  }
  return dir;
}

/** The built engine binary: $PKV_ENGINE_BIN, else gpu-host/engine/build/pkv-engine. */
export function engineBinary(): string {
  return process.env.PKV_ENGINE_BIN ?? resolve(repoRoot(), "gpu-host", "engine", "build", "pkv-engine");
}
