// `pkv admin`: tenants, API keys, quotas and GPU hosts of an edge worker, through its admin API.
// Local (default): the dev worker of `npm run dev` (its URL and admin token in .pkv-dev/dev.json)
// or, when none runs, a worker started on the same Miniflare storage (.pkv-dev/state) for the
// duration of the command. Remote: --remote URL --admin-token T (or PKV_ADMIN_TOKEN).
import { existsSync, readFileSync } from "node:fs";
import { resolve } from "node:path";
import { parseArgs } from "node:util";

import { repoRoot } from "../engine/engine-path.js";
import { AdminClient, newSecret, startWorker } from "./stack.js";

export const ADMIN_USAGE = `usage: pkv admin [--remote URL --admin-token T] <command>
  tenant set NAME [--kv-quota-bytes N] [--max-sessions N] [--rpm N] [--policy refuse|auto]   create or update a tenant
  tenant show NAME | tenant list
  key create TENANT                     a new API key (printed once; stored hashed)
  host add URL | host remove URL | host list
  Without --remote: the local dev worker (npm run dev), or its Miniflare storage in .pkv-dev/`;

export const devDir = () => resolve(repoRoot(), ".pkv-dev");

export interface DevInfo {
  url: string;
  admin_token: string;
}

function nonNegative(name: string, v: string | undefined): number | undefined {
  if (v === undefined) return undefined;
  const n = Number(v);
  if (!Number.isSafeInteger(n) || n < 0) throw new Error(`--${name}: '${v}' is not an integer >= 0`);
  return n;
}

async function reachable(url: string): Promise<boolean> {
  try {
    return (await fetch(`${url}/`, { signal: AbortSignal.timeout(2000) })).ok;
  } catch {
    return false;
  }
}

export async function runAdmin(
  argv: string[],
  print: (s: string) => void = (s) => process.stdout.write(`${s}\n`),
): Promise<number> {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      remote: { type: "string" },
      "admin-token": { type: "string" },
      "kv-quota-bytes": { type: "string" },
      "max-sessions": { type: "string" },
      rpm: { type: "string" },
      policy: { type: "string" },
      help: { type: "boolean" },
    },
  });
  const [group, action, arg] = positionals;
  if (values.help || !group) {
    print(ADMIN_USAGE);
    return values.help ? 0 : 2;
  }
  const run = async (admin: AdminClient): Promise<unknown> => {
    const need = (what: string) => {
      if (!arg) throw new Error(`pkv admin ${group} ${action}: ${what} is required`);
      return arg;
    };
    if (group === "tenant" && action === "set") {
      const policy = values.policy;
      if (policy !== undefined && policy !== "refuse" && policy !== "auto")
        throw new Error(`--policy: '${policy}' is not one of refuse, auto`);
      return admin.setTenant(need("NAME"), {
        kv_quota_bytes: nonNegative("kv-quota-bytes", values["kv-quota-bytes"]),
        max_sessions: nonNegative("max-sessions", values["max-sessions"]),
        requests_per_minute: nonNegative("rpm", values.rpm),
        policy,
      });
    }
    if (group === "tenant" && action === "show") return admin.tenant(need("NAME"));
    if (group === "tenant" && action === "list") return admin.tenants();
    if (group === "key" && action === "create") return { tenant: need("TENANT"), key: await admin.createKey(arg!) };
    if (group === "host" && action === "add") return admin.addHost(need("URL"));
    if (group === "host" && action === "remove") return admin.removeHost(need("URL"));
    if (group === "host" && action === "list") return admin.hosts();
    throw new Error(`unknown command 'admin ${positionals.join(" ")}'\n${ADMIN_USAGE}`);
  };
  if (values.remote) {
    const token = values["admin-token"] ?? process.env.PKV_ADMIN_TOKEN;
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
  const worker = await startWorker({ secret: newSecret(), adminToken, persistDir: resolve(devDir(), "state") });
  try {
    print(JSON.stringify(await run(new AdminClient(worker.url, adminToken)), null, 2));
  } finally {
    await worker.stop();
  }
  return 0;
}
