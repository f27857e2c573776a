#pragma once

#include "kv_pool.h"
#include "msgpack.h"

namespace pkv {
// `pkv-engine serve --stdio`: length-prefixed msgpack frames on stdin/stdout, as defined in
// shared/protocol/engine.json. Many sessions in one process; generating sessions decode together
// (one graph evaluation per step); prefill runs chunk by chunk between decode steps.
int cmd_serve(int argc, char ** argv);

// Tokens a `generate` samples when it names no max_tokens.
constexpr int kDefaultMaxTokens = 256;

// What the engine offers, as its hello lists it and `pkv-engine methods --json` prints it:
// {methods: [{name, description, compresses, min_budget, keeps_window, scores}] in registry order,
//  defaults: {method, budget, window, beta, kernel_size, pooling, head_aggregation, chunk_size,
//  max_tokens, kv_type}} — the defaults being what an `open` or `generate` without those fields gets.
mp::Value engine_catalog(int chunk_size, KvType kv_type = KvType::F16);
}  // namespace pkv
