// The registered GPU hosts (one Durable Object instance, "hosts"): the edge dials them. Hosts
// come from the PKV_HOSTS variable and the admin API; a host that fails (connect, health, or mid
// request) is marked down for DOWN_MS and skipped by routing, then probed again.
import { DurableObject } from "cloudflare:workers";

import type { Env } from "./env.js";

export interface HostEntry {
  url: string;
  added: number;
  down_until: number; // ms; 0 = routable
  last_error?: string;
}

export const DOWN_MS = 30_000;

export function normaliseHostUrl(raw: string): string {
  let u: URL;
  try {
    u = new URL(raw.trim());
  } catch {
    throw new Error(`host url '${raw}' is not a URL (http(s)://host:port or ws(s)://host:port)`);
  }
  if (u.protocol === "ws:") u.protocol = "http:";
  if (u.protocol === "wss:") u.protocol = "https:";
  if (u.protocol !== "http:" && u.protocol !== "https:")
    throw new Error(`host url '${raw}': the scheme must be http, https, ws or wss`);
  return `${u.protocol}//${u.host}`;
}

export class HostRegistry extends DurableObject<Env> {
  private async hosts(): Promise<Record<string, HostEntry>> {
    let hosts = await this.ctx.storage.get<Record<string, HostEntry>>("hosts");
    if (!hosts) {
      hosts = {};
      for (const raw of (this.env.PKV_HOSTS ?? "").split(",").filter((s) => s.trim() !== "")) {
        const url = normaliseHostUrl(raw);
        hosts[url] = { url, added: Date.now(), down_until: 0 };
      }
      await this.ctx.storage.put("hosts", hosts);
    }
    return hosts;
  }

  async list(): Promise<HostEntry[]> {
    return Object.values(await this.hosts());
  }

  async add(raw: string): Promise<HostEntry> {
    const hosts = await this.hosts();
    const url = normaliseHostUrl(raw);
    hosts[url] = { url, added: Date.now(), down_until: 0 };
    await this.ctx.storage.put("hosts", hosts);
    return hosts[url]!;
  }

  async remove(raw: string): Promise<boolean> {
    const hosts = await this.hosts();
    const url = normaliseHostUrl(raw);
    if (!hosts[url]) return false;
    delete hosts[url];
    await this.ctx.storage.put("hosts", hosts);
    return true;
  }

  async markDown(url: string, why: string, nowMs = Date.now()): Promise<void> {
    const hosts = await this.hosts();
    const h = hosts[url];
    if (!h) return;
    h.down_until = nowMs + DOWN_MS;
    h.last_error = why;
    await this.ctx.storage.put("hosts", hosts);
  }

  async markUp(url: string): Promise<void> {
    const hosts = await this.hosts();
    const h = hosts[url];
    if (!h || h.down_until === 0) return;
    h.down_until = 0;
    await this.ctx.storage.put("hosts", hosts);
  }
}
