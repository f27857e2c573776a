/// <reference types="node" />
// The methods table: KV_METHODS and the helpers follow it, and parseEngineCatalog accepts the
// engine's list and names what is wrong in a broken one. That the table equals the built engine's
// list is gpu-host/test/engine-methods.test.ts (it needs the engine binary).
import assert from "node:assert/strict";
import { test } from "node:test";

import {
  ENGINE_DEFAULTS,
  ENGINE_METHODS,
  isKvMethod,
  KV_METHODS,
  methodInfo,
  minBudget,
  parseEngineCatalog,
} from "../src/index.js";

const catalog = () => ({
  methods: ENGINE_METHODS.map((m) => ({ ...m, description: `${m.name}: what it keeps` })),
  defaults: { ...ENGINE_DEFAULTS },
});

test("KV_METHODS lists the table's names in its order, and isKvMethod accepts exactly those", () => {
  assert.deepEqual(
    KV_METHODS,
    ENGINE_METHODS.map((m) => m.name),
  );
  for (const m of ENGINE_METHODS) assert.ok(isKvMethod(m.name), m.name);
  assert.equal(isKvMethod("nope"), false);
  assert.equal(isKvMethod(""), false);
  assert.ok(isKvMethod(ENGINE_DEFAULTS.method), "the default method is a listed one");
});

test("methodInfo finds every method and names the accepted ones for an unknown name", () => {
  for (const m of ENGINE_METHODS) assert.equal(methodInfo(m.name), m);
  assert.throws(
    () => methodInfo("magic"),
    new RegExp(`unknown method 'magic' \\(accepted: ${KV_METHODS.join(", ")}\\)`),
  );
});

test("minBudget is the method's own minimum or window + 1, whichever is larger", () => {
  for (const m of ENGINE_METHODS) {
    assert.equal(minBudget(m.name, 1), Math.max(m.min_budget, 2), m.name);
    assert.equal(minBudget(m.name, 100), 101, m.name);
    assert.equal(minBudget(m.name), Math.max(m.min_budget, ENGINE_DEFAULTS.window + 1), m.name);
  }
});

test("parseEngineCatalog accepts the engine's shape and keeps extra fields", () => {
  const c = parseEngineCatalog(catalog());
  assert.deepEqual(
    c.methods.map((m) => m.name),
    [...KV_METHODS],
  );
  assert.equal(c.methods[0]?.description, `${ENGINE_METHODS[0].name}: what it keeps`);
  assert.deepEqual(c.defaults, ENGINE_DEFAULTS);
});

test("parseEngineCatalog names the field that is wrong", () => {
  const broken = (edit: (c: ReturnType<typeof catalog>) => void) => {
    const c = catalog();
    edit(c);
    return () => parseEngineCatalog(c);
  };
  assert.throws(() => parseEngineCatalog([]), /the catalog must be an object/);
  assert.throws(
    broken((c) => {
      (c as { methods: unknown }).methods = [];
    }),
    /'methods' must be a non-empty array/,
  );
  assert.throws(
    broken((c) => {
      (c.methods[1] as { compresses: unknown }).compresses = "yes";
    }),
    /methods\[1\]\.compresses must be a bool/,
  );
  assert.throws(
    broken((c) => {
      (c.methods[0] as { min_budget: unknown }).min_budget = 0;
    }),
    /methods\[0\]\.min_budget must be an integer >= 1/,
  );
  assert.throws(
    broken((c) => {
      c.methods.push({ ...c.methods[0]! });
    }),
    /is listed twice/,
  );
  assert.throws(
    broken((c) => {
      (c.defaults as { budget: unknown }).budget = "128";
    }),
    /defaults\.budget must be a number/,
  );
  assert.throws(
    broken((c) => {
      (c.defaults as { method: unknown }).method = "magic";
    }),
    /defaults\.method 'magic' is not a listed method/,
  );
});
