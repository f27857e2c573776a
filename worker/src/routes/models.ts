// GET /v1/models and GET /v1/models/{id}: the models the live GPU hosts serve (a model's id is
// its GGUF file name without .gguf), with whether each renders chats with its own template
// (chat_template: gguf) or ChatML (the GGUF has none), its context and how many hosts serve it —
// all from the routing table (registry.ts), no host is asked.
import { Hono } from "hono";

import type { AppEnv, Env } from "../env.js";
import { ApiError, noHost } from "../errors.js";
import type { HostView } from "../registry.js";
import { modelId, registry } from "../routing.js";

export const models = new Hono<AppEnv>();

async function listModels(env: Env) {
  const live = (await registry(env).list()).filter((h) => h.live);
  if (live.length === 0) throw noHost("no GPU host is available to list its models");
  const byModel = new Map<string, HostView[]>();
  for (const h of live) {
    const id = modelId(h.model);
    byModel.set(id, [...(byModel.get(id) ?? []), h]);
  }
  return [...byModel].map(([id, hosts]) => ({
    id,
    object: "model",
    created: 0,
    owned_by: "pyramidkv",
    chat_template: hosts[0]!.chat_template ?? null,
    context_length: hosts[0]!.n_ctx,
    hosts: hosts.length,
  }));
}

models.get("/", async (c) => c.json({ object: "list", data: await listModels(c.env) }));

models.get("/:id{.+}", async (c) => {
  const id = c.req.param("id");
  const list = await listModels(c.env);
  const m = list.find((x) => x.id === id);
  if (!m)
    throw new ApiError(
      404,
      "not_found_error",
      `the model '${id.slice(0, 100)}' does not exist: the GPU hosts serve ${list.map((x) => x.id).join(", ")}`,
      "model",
      "model_not_found",
    );
  return c.json(m);
});
