// Token generation over a session: sampling (libllama samplers) and the prefill → decode loop.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "session.h"

struct llama_sampler;

namespace pkv {

struct SamplerOptions {
    float    temperature = 0.0f;  // 0: greedy
    int      top_k       = 0;     // 0: off
    float    top_p       = 1.0f;  // 1: off
    uint32_t seed        = 0;
};

// libllama's sampler chain over our logits. Greedy when temperature is 0.
class Sampler {
  public:
    explicit Sampler(const SamplerOptions & o);
    ~Sampler();
    Sampler(const Sampler &)             = delete;
    Sampler & operator=(const Sampler &) = delete;
    int32_t   sample(const std::vector<float> & logits);

  private:
    bool            greedy_;
    llama_sampler * chain_ = nullptr;
};

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
