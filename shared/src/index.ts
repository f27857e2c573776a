// Protocol and types shared by the worker and the GPU host. The wire protocol (msgpack frames,
// versioned) lands here with the engine-serving issue; for now only the compression settings
// that every side validates the same way.

/** KV-cache compression methods implemented by the engine (pkv-engine generate --method). */
export const KV_METHODS = ["full", "streamingllm", "h2o", "snapkv", "pyramidkv"] as const;
export type KvMethod = (typeof KV_METHODS)[number];

export function isKvMethod(value: string): value is KvMethod {
  return (KV_METHODS as readonly string[]).includes(value);
}
