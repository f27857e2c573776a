// The worker's bindings as `env` from "cloudflare:workers" sees them in tests.
import type { Env as WorkerEnv } from "../src/env.js";

declare global {
  namespace Cloudflare {
    interface Env extends WorkerEnv {}
  }
}
