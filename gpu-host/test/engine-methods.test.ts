// The shared methods table (shared/src/methods.ts) equals the built engine's registry: the same
// methods in the same order with the same traits, and the same defaults, in `pkv-engine methods
// --json` and in the hello frame of `serve --stdio`. A method added to the engine and not to
// shared (or the other way round), or a default changed on one side, fails here.
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { test } from "node:test";

import {
  ENGINE_DEFAULTS,
  ENGINE_METHODS,
  type EngineCatalog,
  FrameDecoder,
  parseEngineCatalog,
} from "@pyramidkv/shared";

import { engineBinary } from "../src/engine/engine-path.js";

// The fields of each engine method that the shared table carries.
function shared(c: EngineCatalog) {
  return {
    methods: c.methods.map((m) => ({ name: m.name, compresses: m.compresses, min_budget: m.min_budget })),
    defaults: c.defaults,
  };
}

function cliCatalog(): EngineCatalog {
  const r = spawnSync(engineBinary(), ["methods", "--json"], { encoding: "utf8" });
  assert.equal(r.status, 0, r.stderr);
  return parseEngineCatalog(JSON.parse(r.stdout));
}

async function helloOfServe(): Promise<Record<string, unknown>> {
  const proc = spawn(engineBinary(), ["serve", "--stdio"], { stdio: ["pipe", "pipe", "inherit"] });
  const decoder = new FrameDecoder("from_engine");
  try {
    return await new Promise((resolve, reject) => {
      proc.on("error", reject);
      proc.on("exit", (code) => reject(new Error(`the engine exited (${code}) before its hello`)));
      proc.stdout.on("data", (chunk: Buffer) => {
        for (const f of decoder.push(chunk)) {
          if (f.ok) resolve(f.message as Record<string, unknown>);
          else reject(new Error(f.error));
        }
      });
    });
  } finally {
    proc.stdin.end(); // end of input: the engine exits
  }
}

test("pkv-engine methods --json lists exactly the shared table's methods, traits and defaults", () => {
  const c = cliCatalog();
  assert.deepEqual(shared(c), { methods: ENGINE_METHODS.map((m) => ({ ...m })), defaults: { ...ENGINE_DEFAULTS } });
  for (const m of c.methods) assert.equal(typeof m.description, "string", `${m.name} has a description`);
});

test("the engine's hello lists the same methods and defaults as pkv-engine methods --json", async () => {
  const hello = await helloOfServe();
  assert.equal(hello.type, "hello");
  const fromHello = parseEngineCatalog({ methods: hello.methods, defaults: hello.defaults });
  assert.deepEqual(fromHello, cliCatalog());
  assert.deepEqual(
    shared(fromHello).methods,
    ENGINE_METHODS.map((m) => ({ ...m })),
  );
  assert.equal(typeof hello.protocol_minor, "number");
});
