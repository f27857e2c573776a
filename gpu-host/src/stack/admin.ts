// `pkv admin`: tenants, API keys, quotas and GPU hosts' tokens of an edge worker, through its admin API.
// Local (default): the dev worker of `npm run dev` (its URL and admin token in .pkv-dev/dev.json)
// or, when none runs, a worker started on the same Miniflare storage (.pkv-dev/state) for the
// duration of the command. Remote: --remote URL --admin-token T (or PKV_ADMIN_TOKEN).
import { existsSync, readFileSync } from "node:fs";
import { resolve } from "node:path";

import { KV_METHODS } from "@pyramidkv/shared";

import { repoRoot } from "../engine/engine-path.js";
import { bool, defineCommand, type FlagValues, int, oneOf, parseFlags, string } from "../flags.js";
import { AdminClient, HOST_NAME, newSecret, startWorker } from "./stack.js";

export const ADMIN_USAGE = `usage: pkv admin [--remote URL --admin-token T] <command>
  tenant set NAME [--kv-quota-bytes N] [--max-sessions N] [--rpm N] [--policy refuse|auto]
                  [--kv-method ${KV_METHODS.join("|")}] [--kv-budget N]
                  [--session-ttl-seconds N] [--max-stored-bytes N]
                  [--kv-cache on|off] [--cache-max-bytes N] [--cache-ttl-seconds N]   create or update a tenant
                  (--kv-method / --kv-budget: the compression of its requests that name none; full allowed;
                   --session-ttl-seconds: idle sessions are closed after it, default 3600;
                   --max-stored-bytes: offloaded session state per host, default the host's;
                   --kv-cache: the prompt cache of requests that name no kv_cache, default on;
                   --cache-max-bytes: its cached states in R2, default 1073741824;
                   --cache-ttl-seconds: a cached state unused that long is gone, default 3600)
  tenant show NAME | tenant list
  key create TENANT                     a new API key (printed once; stored hashed)
  host create NAME                      a host token for a GPU host named NAME (printed once; stored hashed):
                                        pkv host --connect <worker URL> --host-token <token>
  host revoke NAME                      delete the host's token and close its connection
  host list                             every host: connected, live, draining, free KV; the routing counters
  Without --remote: the local dev worker (npm run dev), or its Miniflare storage in .pkv-dev/`;

export const devDir = () => resolve(repoRoot(), ".pkv-dev");

export interface DevInfo {
  url: string;
  admin_token: string;
}

async function reachable(url: string): Promise<boolean> {
  try {
    return (await fetch(`${url}/`, { signal: AbortSignal.timeout(2000) })).ok;
  } catch {
    return false;
  }
}

const ADMIN_FLAGS = {
  remote: string(),
  "admin-token": string({ env: "PKV_ADMIN_TOKEN" }),
  "kv-quota-bytes": int({ min: 0 }),
  "max-sessions": int({ min: 0 }),
  rpm: int({ min: 0 }),
  policy: oneOf(["refuse", "auto"]),
  "kv-method": oneOf(KV_METHODS),
  "kv-budget": int({ min: 16, max: 1 << 20 }),
  "session-ttl-seconds": int({ min: 1, max: 30 * 86_400 }),
  "max-stored-bytes": int({ min: 0 }),
  "kv-cache": oneOf(["on", "off"]),
  "cache-max-bytes": int({ min: 0 }),
  "cache-ttl-seconds": int({ min: 1, max: 30 * 86_400 }),
  help: bool(),
};

/** `pkv admin ARGS`, for callers that hold the raw arguments (the end-to-end tests); bad flags reject. */
export async function runAdmin(
  argv: string[],
  print: (s: string) => void = (s) => process.stdout.write(`${s}\n`),
): Promise<number> {
  const { values, positionals } = parseFlags(ADMIN_FLAGS, argv, { positionals: true });
  return admin(values, positionals, print);
}

export const command = defineCommand({
  flags: ADMIN_FLAGS,
  positionals: true,
  help: ADMIN_USAGE,
  run: (values, positionals) => admin(values, positionals, (s) => process.stdout.write(`${s}\n`)),
});

async function admin(
  values: FlagValues<typeof ADMIN_FLAGS>,
  positionals: string[],
  print: (s: string) => void,
): Promise<number> {
  const [group, action, arg] = positionals;
  if (values.help || !group) {
    print(ADMIN_USAGE);
    return values.help ? 0 : 2;
  }
  // Refused before any worker is reached or started.
  if (group === "host" && (action === "add" || action === "remove"))
    throw new Error(
      `pkv admin host ${action}: hosts dial in now (host protocol 3.0), the edge keeps no host URLs: ` +
        (action === "add"
          ? "make a token with 'pkv admin host create NAME' and start the host with 'pkv host --connect <worker URL> --host-token <token>'"
          : "'pkv admin host revoke NAME' deletes a host's token and closes its connection"),
    );
  if (group === "host" && (action === "create" || action === "revoke") && arg !== undefined && !HOST_NAME.test(arg))
    throw new Error(`pkv admin host ${action}: NAME '${arg.slice(0, 80)}' does not match ${HOST_NAME.source}`);
  const run = async (client: AdminClient): Promise<unknown> => {
    const need = (what: string) => {
      if (!arg) throw new Error(`pkv admin ${group} ${action}: ${what} is required`);
      return arg;
    };
    if (group === "tenant" && action === "set") {
      return client.setTenant(need("NAME"), {
        kv_quota_bytes: values["kv-quota-bytes"],
        max_sessions: values["max-sessions"],
        requests_per_minute: values.rpm,
        policy: values.policy,
        kv_method: values["kv-method"],
        kv_budget: values["kv-budget"],
        session_ttl_s: values["session-ttl-seconds"],
        max_stored_bytes: values["max-stored-bytes"],
        kv_cache: values["kv-cache"],
        cache_max_bytes: values["cache-max-bytes"],
        cache_ttl_s: values["cache-ttl-seconds"],
      });
    }
    if (group === "tenant" && action === "show") return client.tenant(need("NAME"));
    if (group === "tenant" && action === "list") return client.tenants();
    if (group === "key" && action === "create") return { tenant: need("TENANT"), key: await client.createKey(arg!) };
    if (group === "host" && action === "create") return client.createHost(need("NAME"));
    if (group === "host" && action === "revoke") return client.revokeHost(need("NAME"));
    if (group === "host" && action === "list") return client.hosts();
    throw new Error(`unknown command 'admin ${positionals.join(" ")}'\n${ADMIN_USAGE}`);
  };
  if (values.remote) {
    const token = values["admin-token"];
    if (!token) throw new Error("--remote needs --admin-token (or PKV_ADMIN_TOKEN): the worker's ADMIN_TOKEN secret");
    print(JSON.stringify(await run(new AdminClient(values.remote.replace(/\/$/, ""), token)), null, 2));
    return 0;
  }
  const infoFile = resolve(devDir(), "dev.json");
  if (existsSync(infoFile)) {
    const info = JSON.parse(readFileSync(infoFile, "utf8")) as DevInfo;
    if (await reachable(info.url)) {
      print(JSON.stringify(await run(new AdminClient(info.url, info.admin_token)), null, 2));
      return 0;
    }
  }
  // No dev worker running: the same storage, through a worker of our own for this command.
  const adminToken = newSecret();
  const worker = await startWorker({ adminToken, persistDir: resolve(devDir(), "state") });
  try {
    print(JSON.stringify(await run(new AdminClient(worker.url, adminToken)), null, 2));
  } finally {
    await worker.stop();
  }
  return 0;
}
