// The one flag parser of every `pkv` command. A command declares its flags once, as a schema of
// typed flags with their ranges and defaults; parseFlags reads them with node:util's parseArgs and
// checks every value, so a command's `run` gets values it can trust. Every error names the flag,
// the value and what is accepted: `--port: '70000' is not an integer in [0, 65535]`.
import { parseArgs } from "node:util";

export interface Flag<T> {
  /** how parseArgs reads it: a value, or present/absent */
  readonly type: "string" | "boolean";
  /** the environment variable read when the flag is absent */
  readonly env?: string;
  /** the checked value of what the command line (or the environment) gave; undefined = absent */
  value(name: string, raw: string | boolean | undefined): T;
}

export type FlagSchema = Record<string, Flag<unknown>>;
export type FlagValues<S extends FlagSchema> = { [K in keyof S]: S[K] extends Flag<infer T> ? T : never };

/**
 * `raw` as an integer in [min, max]; without max, any safe integer ≥ min. Number() semantics, as
 * the flags have always had (surrounding spaces ignored, "1e3" is 1000).
 */
export function integer(name: string, raw: string, min: number, max?: number): number {
  const n = Number(raw);
  if (!Number.isInteger(n) || n < min || n > (max ?? Number.MAX_SAFE_INTEGER)) {
    const range = max === undefined ? `>= ${min}` : `in [${min}, ${max}]`;
    throw new Error(`--${name}: '${raw}' is not an integer ${range}`);
  }
  return n;
}

interface IntOptions {
  min: number;
  max?: number;
  env?: string;
}

/**
 * An integer flag. One that reads an environment variable takes an empty value as unset (a unit
 * file's `Environment=PKV_PORT=` line), as `pkv host` always has.
 */
export function int(o: IntOptions & { default: number }): Flag<number>;
export function int(o: IntOptions): Flag<number | undefined>;
export function int(o: IntOptions & { default?: number }): Flag<number | undefined> {
  return {
    type: "string",
    env: o.env,
    value: (name, raw) =>
      raw === undefined || (o.env !== undefined && raw === "") ? o.default : integer(name, String(raw), o.min, o.max),
  };
}

/** A comma list of integers, each in [min, max] (`--depths 25,50,75`). */
export function ints(o: IntOptions & { default: number[] }): Flag<number[]>;
export function ints(o: IntOptions): Flag<number[] | undefined>;
export function ints(o: IntOptions & { default?: number[] }): Flag<number[] | undefined> {
  return {
    type: "string",
    env: o.env,
    value: (name, raw) =>
      raw === undefined
        ? o.default
        : String(raw)
            .split(",")
            .map((v) => integer(name, v, o.min, o.max)),
  };
}

interface StringOptions {
  env?: string;
}

export function string(o: StringOptions & { default: string }): Flag<string>;
export function string(o?: StringOptions): Flag<string | undefined>;
export function string(o: StringOptions & { default?: string } = {}): Flag<string | undefined> {
  return { type: "string", env: o.env, value: (_, raw) => (raw === undefined ? o.default : String(raw)) };
}

/** One of a fixed set of words (`--policy refuse|auto`). */
export function oneOf<C extends string>(choices: readonly C[], o: StringOptions & { default: C }): Flag<C>;
export function oneOf<C extends string>(choices: readonly C[], o?: StringOptions): Flag<C | undefined>;
export function oneOf<C extends string>(
  choices: readonly C[],
  o: StringOptions & { default?: C } = {},
): Flag<C | undefined> {
  return {
    type: "string",
    env: o.env,
    value: (name, raw) => {
      if (raw === undefined) return o.default;
      if (!(choices as readonly string[]).includes(String(raw)))
        throw new Error(`--${name}: '${String(raw)}' is not one of ${choices.join(", ")}`);
      return raw as C;
    },
  };
}

/** Present or absent (`--json`). */
export function bool(): Flag<boolean> {
  return { type: "boolean", value: (_, raw) => raw === true };
}

export interface ParsedFlags<S extends FlagSchema> {
  values: FlagValues<S>;
  positionals: string[];
}

/**
 * Parses `args` against `schema`: an unknown flag or a stray positional is parseArgs' error; each
 * value is checked by its flag, in the schema's order; an absent flag reads its environment
 * variable (from `o.env`, default process.env), then its default.
 */
export function parseFlags<S extends FlagSchema>(
  schema: S,
  args: string[],
  o: { env?: NodeJS.ProcessEnv; positionals?: boolean } = {},
): ParsedFlags<S> {
  const env = o.env ?? process.env;
  const parsed = parseArgs({
    args,
    allowPositionals: o.positionals === true,
    options: Object.fromEntries(Object.entries(schema).map(([name, flag]) => [name, { type: flag.type }])),
  });
  const raw = parsed.values as Record<string, string | boolean | undefined>;
  const values: Record<string, unknown> = {};
  for (const [name, flag] of Object.entries(schema)) {
    values[name] = flag.value(name, raw[name] ?? (flag.env === undefined ? undefined : env[flag.env]));
  }
  return { values: values as FlagValues<S>, positionals: parsed.positionals };
}

/** A `pkv` command: its flags and what it does with them. Usage lines live in cli.ts's table. */
export interface Command<S extends FlagSchema = FlagSchema> {
  flags: S;
  /** positional arguments allowed (`pkv admin tenant set NAME`) */
  positionals?: boolean;
  /** the text of `pkv <command> --help`, for commands the table's one usage line does not cover */
  help?: string;
  /** exit code */
  run(values: FlagValues<S>, positionals: string[]): Promise<number>;
}

/** Types a command's `run` by its own schema. */
export function defineCommand<S extends FlagSchema>(c: Command<S>): Command<S> {
  return c;
}
