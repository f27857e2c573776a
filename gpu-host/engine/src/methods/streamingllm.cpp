// StreamingLLM: the first tokens act as attention sinks; keeping them plus the most recent ones
// keeps the softmax stable without looking at any scores. Uniform budget B: 4 sinks + B−4 recent.
#include <algorithm>
#include <string>

#include "methods.h"

namespace pkv {

namespace {

constexpr int kAttentionSinks = 4;

HeadSelection select(const LayerAttention & att, int keep, const CompressionParams &) {
    if (keep >= att.n) return all_positions(att.n_head_kv, att.n);
    keep             = std::max(keep, 0);
    const int sinks  = std::min(kAttentionSinks, keep);
    const int recent = keep - sinks;
    // keep < n, so the sink range and the recent range never overlap.
    std::vector<int32_t> pos;
    pos.reserve(keep);
    for (int j = 0; j < sinks; ++j) pos.push_back(j);
    for (int j = att.n - recent; j < att.n; ++j) pos.push_back(j);
    return HeadSelection(std::max(att.n_head_kv, 0), pos);
}

std::string validate(const CompressionParams & p) {
    if (p.budget <= kAttentionSinks) {
        return "--budget: " + std::to_string(p.budget) + " must be greater than " + std::to_string(kAttentionSinks) +
               " for streamingllm (its attention sinks)";
    }
    return "";
}

}  // namespace

const Method kStreamingLLM{ "streamingllm",
                            "StreamingLLM: 4 attention sinks plus the most recent tokens",
                            /*compresses=*/true,
                            /*needs_window_probs=*/false,
                            /*needs_accumulated=*/false,
                            /*keeps_window=*/false,  // the B−4 most recent, which may be fewer than the window
                            /*min_budget=*/kAttentionSinks + 1,
                            uniform_layer_budgets,
                            select,
                            validate };

}  // namespace pkv
