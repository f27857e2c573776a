// GET /v1/models and GET /v1/models/{id}: the models the healthy GPU hosts serve (a model's id is
// its GGUF file name without .gguf), with whether each renders chats with its own template
// (chat_template: gguf) or ChatML (the GGUF has none), its context and how many hosts serve it.
import { Hono } from "hono";

import type { AppEnv, Env } from "../env.js";
import { ApiError, noHost } from "../errors.js";
import { type HostHealth, helloOf, modelId, rankHosts } from "../routing.js";

export const models = new Hono<AppEnv>();

async function listModels(env: Env) {
  const { ranked } = await rankHosts(env);
  if (ranked.length === 0) throw noHost("no GPU host is available to list its models");
  const byModel = new Map<string, HostHealth[]>();
  for (const h of ranked) {
    const id = modelId(h.model ?? "unknown");
    byModel.set(id, [...(byModel.get(id) ?? []), h]);
  }
  return Promise.all(
    [...byModel].map(async ([id, hosts]) => {
      const h = hosts[0]!;
      // A host whose /health does not report them: its hello does.
      const hello =
        h.chat_template === undefined || h.n_ctx === undefined
          ? await helloOf(env, h.url).catch(() => undefined)
          : undefined;
      return {
        id,
        object: "model",
        created: 0,
        owned_by: "pyramidkv",
        chat_template: h.chat_template ?? hello?.chat_template ?? null,
        context_length: h.n_ctx ?? hello?.n_ctx ?? null,
        hosts: hosts.length,
      };
    }),
  );
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
