// Token generation over a session: the prefill → decode loop (sampling: sampling.h).
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "sampling.h"
#include "session.h"

namespace pkv {

struct GenerationResult {
    std::string          text;
    std::vector<int32_t> tokens;
    int                  new_tokens = 0;
    std::vector<int>     prompt_kv_lengths;  // per layer, right after prefill + compression
    size_t               prompt_kv_bytes          = 0;
    size_t               prompt_full_kv_bytes     = 0;
    double               prefill_seconds          = 0.0;
    double               decode_tokens_per_second = 0.0;  // decode steps / their wall time
};

// Prefill `prompt`, then sample up to max_new tokens, stopping at the end of the turn. Each
// sampled piece is passed to on_piece as soon as it is known.
GenerationResult generate(Session & session, const std::vector<int32_t> & prompt, int max_new,
                          const SamplerOptions & so, const std::function<void(const std::string &)> & on_piece);

}  // namespace pkv
