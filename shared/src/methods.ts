// The engine's compression methods and defaults, as TypeScript sees them: one table that the host
// and the worker import instead of retyping names, defaults or "does this method compress?".
//
// The engine's registry (gpu-host/engine/src/compress.cpp) is the source of truth; it lists itself
// in `pkv-engine methods --json` and in its `hello` frame (docs/PROTOCOL.md), and
// gpu-host/test/engine-methods.test.ts fails when this table and the built engine's list differ
// (a method added on one side only, a trait or a default changed on one side).

/** What TypeScript needs of each method, in the engine's registry order. */
export const ENGINE_METHODS = [
  { name: "full", compresses: false, min_budget: 2 },
  { name: "streamingllm", compresses: true, min_budget: 5 },
  { name: "h2o", compresses: true, min_budget: 2 },
  { name: "snapkv", compresses: true, min_budget: 2 },
  { name: "pyramidkv", compresses: true, min_budget: 2 },
] as const satisfies readonly EngineMethod[];

export type KvMethod = (typeof ENGINE_METHODS)[number]["name"];

/** KV-cache compression methods implemented by the engine (pkv-engine generate --method). */
export const KV_METHODS: readonly KvMethod[] = ENGINE_METHODS.map((m) => m.name);

/** The method that keeps every entry (FullKV): exact prefills, fork sources and references use it
 * (the engine's `exact_method()`). */
export const EXACT_METHOD: KvMethod = (ENGINE_METHODS.find((m) => !m.compresses) ?? ENGINE_METHODS[0]).name;

export function isKvMethod(value: string): value is KvMethod {
  return (KV_METHODS as readonly string[]).includes(value);
}

/** The engine's defaults for the fields an `open` or `generate` leaves out (`chunk_size`: the
 * engine's built-in `--chunk-size`; a host that starts it with another says so in its hello). */
export const ENGINE_DEFAULTS = {
  method: "pyramidkv",
  budget: 128,
  window: 8,
  beta: 20,
  kernel_size: 7,
  pooling: "maxpool",
  head_aggregation: "mean",
  chunk_size: 8192,
  max_tokens: 256,
  kv_type: "f16",
} as const satisfies EngineDefaults;

/** One method as the engine lists it (`methods` of hello and of `pkv-engine methods --json`). */
export interface EngineMethod {
  readonly name: string;
  /** false: keeps every entry (FullKV); its budget changes nothing */
  readonly compresses: boolean;
  /** the smallest budget it accepts with the smallest window (1); any budget must also exceed the window */
  readonly min_budget: number;
}

export interface EngineDefaults {
  readonly method: string;
  readonly budget: number;
  readonly window: number;
  readonly beta: number;
  readonly kernel_size: number;
  readonly pooling: string;
  readonly head_aggregation: string;
  readonly chunk_size: number;
  readonly max_tokens: number;
  /** storage type of the pooled KV entries (f16, q8_0, q4_0): the engine's --kv-type */
  readonly kv_type: string;
}

/** The engine's methods and defaults: `pkv-engine methods --json`, or the same fields of hello. */
export interface EngineCatalog {
  readonly methods: readonly (EngineMethod & Readonly<Record<string, unknown>>)[];
  readonly defaults: EngineDefaults;
}

/** The table entry of a method; throws naming the method and the accepted ones when unknown. */
export function methodInfo(name: string): (typeof ENGINE_METHODS)[number] {
  const m = ENGINE_METHODS.find((x) => x.name === name);
  if (!m) throw new Error(`unknown method '${name}' (accepted: ${KV_METHODS.join(", ")})`);
  return m;
}

/** The smallest budget the engine accepts for `method` with observation window `window`. */
export function minBudget(method: string, window: number = ENGINE_DEFAULTS.window): number {
  return Math.max(methodInfo(method).min_budget, window + 1);
}

/**
 * Checks the shape of the engine's list (from hello or `pkv-engine methods --json`) and returns
 * it typed; throws one line naming the field that is wrong. Extra fields are kept (the engine
 * also describes each method and the scores it needs).
 */
export function parseEngineCatalog(value: unknown): EngineCatalog {
  const fail = (where: string, what: string): never => {
    throw new Error(`engine catalog: ${where} ${what}`);
  };
  const isObject = (v: unknown): v is Record<string, unknown> =>
    typeof v === "object" && v !== null && !Array.isArray(v);
  if (!isObject(value)) return fail("the catalog", "must be an object");
  const { methods, defaults } = value;
  if (!Array.isArray(methods) || methods.length === 0) return fail("'methods'", "must be a non-empty array");
  const seen = new Set<string>();
  for (const [i, m] of (methods as unknown[]).entries()) {
    if (!isObject(m)) return fail(`methods[${i}]`, "must be an object");
    if (typeof m.name !== "string" || m.name === "") fail(`methods[${i}].name`, "must be a non-empty string");
    if (seen.has(m.name as string)) fail(`methods[${i}].name`, `'${String(m.name)}' is listed twice`);
    seen.add(m.name as string);
    if (typeof m.compresses !== "boolean") fail(`methods[${i}].compresses`, "must be a bool");
    if (!Number.isInteger(m.min_budget) || (m.min_budget as number) < 1)
      fail(`methods[${i}].min_budget`, "must be an integer >= 1");
  }
  if (!isObject(defaults)) return fail("'defaults'", "must be an object");
  // An engine before protocol 2.2 lists no kv_type: it stores f16 only.
  const withType = defaults.kv_type === undefined ? { ...defaults, kv_type: "f16" } : defaults;
  for (const [k, v] of Object.entries(ENGINE_DEFAULTS)) {
    if (typeof withType[k] !== typeof v) fail(`defaults.${k}`, `must be a ${typeof v}`);
  }
  if (!seen.has(defaults.method as string))
    fail("defaults.method", `'${String(defaults.method)}' is not a listed method`);
  return { methods: methods as EngineCatalog["methods"], defaults: withType as unknown as EngineDefaults };
}
