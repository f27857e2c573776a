// The one flag parser: typed values, ranges, defaults, environment variables, and errors that name
// the flag, the value and the accepted range.
import assert from "node:assert/strict";
import { test } from "node:test";

import { bool, int, integer, ints, oneOf, parseFlags, string } from "../src/flags.js";

const schema = {
  port: int({ min: 0, max: 65535, default: 8790 }),
  threads: int({ min: 1, max: 1024 }),
  quota: int({ min: 0 }),
  depths: ints({ min: 0, max: 100, default: [25, 50, 75] }),
  model: string(),
  method: string({ default: "pyramidkv" }),
  policy: oneOf(["refuse", "auto"]),
  json: bool(),
};

test("absent flags take their defaults; given ones their typed values", () => {
  assert.deepEqual(parseFlags(schema, []).values, {
    port: 8790,
    threads: undefined,
    quota: undefined,
    depths: [25, 50, 75],
    model: undefined,
    method: "pyramidkv",
    policy: undefined,
    json: false,
  });
  const { values } = parseFlags(schema, [
    "--port",
    "0",
    "--threads=1024",
    "--quota",
    "9007199254740991",
    "--depths",
    "0,100",
    "--model",
    "m.gguf",
    "--policy",
    "auto",
    "--json",
  ]);
  assert.deepEqual(values, {
    port: 0,
    threads: 1024,
    quota: Number.MAX_SAFE_INTEGER,
    depths: [0, 100],
    model: "m.gguf",
    method: "pyramidkv",
    policy: "auto",
    json: true,
  });
});

test("a bad integer names the flag, the value and the accepted range", () => {
  const bad: [string[], string][] = [
    [["--port", "65536"], "--port: '65536' is not an integer in [0, 65535]"],
    [["--port=-1"], "--port: '-1' is not an integer in [0, 65535]"],
    [["--port", "1.5"], "--port: '1.5' is not an integer in [0, 65535]"],
    [["--port", "abc"], "--port: 'abc' is not an integer in [0, 65535]"],
    [["--threads", "0"], "--threads: '0' is not an integer in [1, 1024]"],
    [["--quota=-3"], "--quota: '-3' is not an integer >= 0"],
    [["--quota", "9007199254740992"], "--quota: '9007199254740992' is not an integer >= 0"],
    [["--depths", "0,50,101"], "--depths: '101' is not an integer in [0, 100]"],
    [["--depths", "10,x"], "--depths: 'x' is not an integer in [0, 100]"],
    [["--policy", "maybe"], "--policy: 'maybe' is not one of refuse, auto"],
  ];
  for (const [args, message] of bad) assert.throws(() => parseFlags(schema, args), { message }, args.join(" "));
  assert.throws(() => integer("budget", "8", 9, 1_000_000), {
    message: "--budget: '8' is not an integer in [9, 1000000]",
  });
});

test("unknown flags and stray arguments are refused; positionals only where the command takes them", () => {
  assert.throws(() => parseFlags(schema, ["--nope"]), /Unknown option '--nope'/);
  assert.throws(() => parseFlags(schema, ["extra"]), /Unexpected argument 'extra'/);
  assert.deepEqual(parseFlags(schema, ["tenant", "set", "acme", "--quota", "5"], { positionals: true }).positionals, [
    "tenant",
    "set",
    "acme",
  ]);
});

test("an absent flag reads its environment variable; the flag wins; an empty variable is unset", () => {
  const envSchema = {
    port: int({ min: 0, max: 65535, default: 8790, env: "PKV_HOST_PORT" }),
    pool: int({ min: 1, max: Number.MAX_SAFE_INTEGER, env: "PKV_KV_POOL_BYTES" }),
    listen: string({ env: "PKV_HOST_LISTEN", default: "127.0.0.1" }),
    checkpoint: oneOf(["on", "off"], { env: "PKV_CHECKPOINT", default: "on" }),
  };
  const env = { PKV_HOST_PORT: "9000", PKV_KV_POOL_BYTES: "", PKV_HOST_LISTEN: "0.0.0.0", PKV_CHECKPOINT: "off" };
  assert.deepEqual(parseFlags(envSchema, [], { env }).values, {
    port: 9000,
    pool: undefined,
    listen: "0.0.0.0",
    checkpoint: "off",
  });
  assert.equal(parseFlags(envSchema, ["--port", "9001"], { env }).values.port, 9001);
  assert.equal(parseFlags(envSchema, [], { env: { PKV_HOST_PORT: "" } }).values.port, 8790);
  // a bad value from the environment is named by its flag, as the usage pairs them
  assert.throws(() => parseFlags(envSchema, [], { env: { PKV_HOST_PORT: "x" } }), {
    message: "--port: 'x' is not an integer in [0, 65535]",
  });
  assert.throws(() => parseFlags(envSchema, [], { env: { PKV_CHECKPOINT: "" } }), {
    message: "--checkpoint: '' is not one of on, off",
  });
  // without `env`, an empty value is a value: --depth '' is no integer of [1, 100]
  assert.throws(() => parseFlags({ depth: int({ min: 1, max: 100 }) }, ["--depth", ""]), {
    message: "--depth: '' is not an integer in [1, 100]",
  });
});
